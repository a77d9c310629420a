"""
The example files of etc/ (configs, systemd units, sysusers.d), reachable
after C{pip install}: C{punchctl examples} lists, prints or copies them.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent


def directory() -> Path:
    """
    Where the examples are: package data in an installed wheel, the
    checkout's own etc/ in a source tree or an editable install.
    """
    for candidate in (_HERE / "etc", _HERE.parent / "etc"):
        if (candidate / "punchd").is_dir():
            return candidate
    raise FileNotFoundError("punchd's example files are missing from this installation")


def names() -> list[str]:
    """
    Every example as a path relative to L{directory}, such as C{punchd/agent.toml}.
    """
    root = directory()
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def find(name: str) -> Path:
    """
    The example called C{name}: its relative path or just its file name.

    @raise LookupError: no such example; the message lists them.
    """
    for relative in names():
        if name in (relative, Path(relative).name):
            return directory() / relative
    raise LookupError(f"no example called {name!r}; there are: {', '.join(names())}")


def copy_to(destination: Path) -> list[Path]:
    """
    Copy every example under C{destination}, keeping the layout of etc/.

    @raise FileExistsError: a target exists; nothing has been written then.
    """
    targets = {destination / relative: directory() / relative for relative in names()}
    existing = [str(t) for t in targets if t.exists()]
    if existing:
        raise FileExistsError(f"not overwriting {', '.join(existing)}")
    for target, source in targets.items():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    return list(targets)


def _run(args: argparse.Namespace) -> int:
    try:
        if args.copy is not None:
            for target in copy_to(Path(args.copy)):
                print(target)
        elif args.name is not None:
            sys.stdout.write(find(args.name).read_text())
        else:
            print("\n".join(names()))
    except (LookupError, OSError) as e:
        print(f"punchctl examples: {e}", file=sys.stderr)
        return 1
    return 0


def add_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """
    Add C{examples [NAME] [--copy DIR]} to punchctl's sub-commands.
    """
    command = commands.add_parser(
        "examples",
        help="list, print (NAME) or copy (--copy DIR) the example configs and systemd units",
    )
    command.add_argument("name", nargs="?", metavar="NAME", help="print this one, e.g. agent.toml")
    command.add_argument(
        "--copy", metavar="DIR", help="copy them all under DIR (never overwrites a file)"
    )
    command.set_defaults(func=_run)
