"""
Run every benchmark there is, one after another (C{make bench}).

Each module's C{main()} prints its own numbers.  A module that does not
exist yet is skipped with a line saying so, and so is one that needs root
(the NAT lab's network namespaces and nftables) when we are not root.  A
module may declare C{NEEDS_ROOT = True} itself.

    python -m bench.run_all [NAME ...]
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
import time
import traceback
from collections.abc import Sequence

#: Every benchmark module, in the order they run, and whether it needs root.
MODULES: dict[str, bool] = {
    "bench_stun": False,
    "bench_tunnels": False,
    "bench_rendezvous": False,
    "bench_relay": False,
    "bench_relay_tls": False,
    "bench_netlab": True,
    "bench_birthday": True,
    "bench_open_input": True,
}


def run(name: str, needs_root: bool) -> bool:
    """
    Run one module's C{main()}; returns whether it failed.
    """
    module_name = f"{__package__ or 'bench'}.{name}"
    print(f"\n===== {module_name} =====", flush=True)
    if importlib.util.find_spec(module_name) is None:
        print(f"skipped: {module_name} does not exist (yet)")
        return False
    root = os.geteuid() == 0
    if needs_root and not root:
        print("skipped: needs root (network namespaces and nftables); try `sudo make bench`")
        return False
    started = time.monotonic()
    argv = sys.argv
    try:
        module = importlib.import_module(module_name)
        if getattr(module, "NEEDS_ROOT", False) and not root:
            print("skipped: needs root (the module says so); try `sudo make bench`")
            return False
        sys.argv = [f"python -m {module_name}"]
        module.main()
    except SystemExit as e:
        if e.code not in (None, 0):
            print(f"FAILED: {module_name} exited with {e.code!r}")
            return True
    except Exception:
        traceback.print_exc(file=sys.stdout)
        print(f"FAILED: {module_name} raised")
        return True
    finally:
        sys.argv = argv
        sys.stdout.flush()
    print(f"({module_name}: {time.monotonic() - started:.1f} s)")
    return False


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run_all", description=__doc__)
    parser.add_argument("names", nargs="*", help=f"only these, of {', '.join(MODULES)}")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in MODULES]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; known: {', '.join(MODULES)}")
    failed = [
        name
        for name, needs_root in MODULES.items()
        if (not args.names or name in args.names) and run(name, needs_root)
    ]
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
