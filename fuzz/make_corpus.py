"""
Write each target's seeds to C{fuzz/corpus/NAME/}, one file per message,
named after its content: C{python -m fuzz.make_corpus [NAME...]}.

The seeds are built by the project's own builders with fixed keys and ids,
so running this again changes nothing unless the wire format changed.
Files of seeds no longer produced are removed.
"""

from __future__ import annotations

import hashlib
import sys

from fuzz.harness import load, target_names


def write(name: str) -> int:
    target = load(name)
    target.corpus.mkdir(parents=True, exist_ok=True)
    wanted = {hashlib.sha1(seed).hexdigest()[:16]: seed for seed in target.seeds()}
    for path in target.corpus.iterdir():
        if path.name not in wanted:
            path.unlink()
    for file_name, seed in wanted.items():
        (target.corpus / file_name).write_bytes(seed)
    return len(wanted)


def main(argv: list[str]) -> None:
    for name in argv or target_names():
        print(f"{name}: {write(name)} seeds in fuzz/corpus/{name}/")


if __name__ == "__main__":
    main(sys.argv[1:])
