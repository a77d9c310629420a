"""
Coverage-guided fuzzing with atheris: C{python -m fuzz.run [--seconds N]
[NAME...]} runs each target (all by default) for N seconds in its own
process and prints executions, coverage and crashes per target.

The checked-in seeds (C{fuzz/corpus/NAME/}) are read; what the fuzzer finds
goes to C{fuzz/.work/NAME/corpus/}, crashing inputs to
C{fuzz/.work/NAME/crash-*} and the fuzzer's log to C{fuzz/.work/NAME.log}.
Replay a crash with C{python -m fuzz.run --replay NAME FILE}.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

# Nothing of punchd (nor fuzz.harness) here: atheris instruments only what
# is imported after it starts, in the child.
from fuzz import ROOT, target_names

WORK = ROOT / ".work"
MAX_LEN = 8192
_STATS = re.compile(r"^#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)/")
_DONE = re.compile(r"^Done (\d+) runs in (\d+) second")


def fuzz_one(name: str, seconds: int, extra: list[str]) -> None:
    """
    Run in the child: instrument punchd as the target imports it, then fuzz.
    """
    import atheris  # type: ignore[import-untyped]

    with atheris.instrument_imports(include=["punchd"]):
        from fuzz.harness import load

        target = load(name)
    work = WORK / name
    (work / "corpus").mkdir(parents=True, exist_ok=True)
    args = [
        sys.argv[0],
        str(work / "corpus"),
        str(target.corpus),
        f"-max_total_time={seconds}",
        f"-max_len={MAX_LEN}",
        "-timeout=10",
        "-rss_limit_mb=2048",
        f"-artifact_prefix={work}/",
        "-print_final_stats=1",
        *extra,
    ]
    atheris.Setup(args, target.one_input)
    atheris.Fuzz()


def summary(name: str, log: Path, returncode: int) -> tuple[str, bool]:
    """
    One line for a finished target, and whether it crashed.
    """
    text = log.read_text(errors="replace")
    runs = cov = ft = corpus = "?"
    for line in text.splitlines():
        stats = _STATS.match(line)
        if stats:
            runs, cov, ft, corpus = stats.groups()
        done = _DONE.match(line)
        if done:
            runs = done.group(1)
    crashes = sorted(p.name for p in (WORK / name).glob("crash-*"))
    crashed = returncode != 0 or bool(crashes)
    line = f"{name}: {runs} executions, cov {cov}, ft {ft}, corpus {corpus}, "
    line += f"crashes: {len(crashes)}" + (f" ({', '.join(crashes)})" if crashes else "")
    if returncode != 0:
        line += f", exit {returncode}: see {log}"
    return line, crashed


def campaign(names: list[str], seconds: int, extra: list[str]) -> int:
    WORK.mkdir(exist_ok=True)
    failed = False
    for name in names:
        log = WORK / f"{name}.log"
        print(f"fuzzing {name} for {seconds} s (log: {log})", flush=True)
        with log.open("w") as out:
            child = subprocess.run(
                [sys.executable, "-m", "fuzz.run", "--child", name, "--seconds", str(seconds)]
                + [f"--libfuzzer={arg}" for arg in extra],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT.parent,
                check=False,
            )
        line, crashed = summary(name, log, child.returncode)
        failed |= crashed
        print(line, flush=True)
    return 1 if failed else 0


def replay(name: str, path: str) -> None:
    from fuzz.harness import load

    load(name).one_input(Path(path).read_bytes())
    print(f"{name}: {path} runs cleanly")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m fuzz.run", description=__doc__)
    parser.add_argument("targets", nargs="*", help=f"default: all of {', '.join(target_names())}")
    parser.add_argument("--seconds", type=int, default=60, help="per target (default 60)")
    parser.add_argument("--child", metavar="NAME", help=argparse.SUPPRESS)
    parser.add_argument("--libfuzzer", action="append", default=[], help="extra libFuzzer flag")
    parser.add_argument("--replay", nargs=2, metavar=("NAME", "FILE"), help="rerun one input")
    options = parser.parse_args()
    if options.child:
        fuzz_one(options.child, options.seconds, options.libfuzzer)
        return 0
    if options.replay:
        replay(*options.replay)
        return 0
    names = options.targets or target_names()
    unknown = set(names) - set(target_names())
    if unknown:
        parser.error(f"no such target: {', '.join(sorted(unknown))}")
    return campaign(names, options.seconds, options.libfuzzer)


if __name__ == "__main__":
    sys.exit(main())
