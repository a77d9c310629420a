"""
punchd's standing fuzz campaign: coverage-guided (atheris) and, in the test
suite, a short deterministic slice of it.

Each target is one module in L{fuzz.targets} defining

  - C{one_input(data: bytes) -> None}: feed one input to the code under test;
    raise on a crash (an escaped exception, an internal error a daemon
    caught and counted, a logged failure, a broken invariant);
  - C{seeds() -> Iterable[bytes]}: real messages built with the project's
    own builders, from which C{python -m fuzz.make_corpus} writes
    C{fuzz/corpus/NAME/}.

So adding a target is one file: write C{fuzz/targets/NAME.py}, then run
C{python -m fuzz.make_corpus} and commit the new corpus.  C{make fuzz} (see
L{fuzz.run}) and C{tests/test_fuzz.py} find it by itself.
"""

from __future__ import annotations

import pkgutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def target_names() -> list[str]:
    """
    The targets, by module name; importing nothing of punchd (see L{fuzz.run}).
    """
    return sorted(m.name for m in pkgutil.iter_modules([str(ROOT / "targets")]) if not m.ispkg)
