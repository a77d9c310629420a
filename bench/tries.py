"""
One tunnel between two lab hosts, tried again and again: what became of
each try, and the set-up times of the direct ones.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from netlab.scenarios import Outcome, World


def percentile(values: Sequence[float], q: float) -> float:
    """The value at fraction C{q} of the sorted C{values}."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Tries:
    """What C{count} tries of one tunnel came to."""

    count: int
    seconds: float = 0.0
    #: How many tries ended on each path, or failed with each code.
    paths: Counter[str] = field(default_factory=Counter)
    #: The tries that went direct.
    direct: list[Outcome] = field(default_factory=list)

    def print_summary(self) -> None:
        "The outcomes, the share that went direct, and their set-up times."
        print("  outcomes: " + ", ".join(f"{k} {v}" for k, v in self.paths.most_common()))
        direct = self.paths["direct"]
        print(f"  direct: {direct}/{self.count} = {direct / self.count:.0%}")
        times = [o.setup_ms for o in self.direct if o.setup_ms is not None]
        if times:
            print(
                f"  set-up of direct tunnels (ms): median {statistics.median(times):.0f},"
                f" p95 {percentile(times, 0.95):.0f}, worst {max(times):.0f}"
            )


def try_tunnel(world: World, initiator: str, responder: str, count: int, timeout: float) -> Tries:
    """Open the tunnel C{count} times, one after another."""
    tries = Tries(count)
    started = time.monotonic()
    for _ in range(count):
        outcome = world.tunnel(initiator, responder, timeout=timeout)
        tries.paths[str(outcome.path) if outcome.ok else f"failed ({outcome.code})"] += 1
        if outcome.ok and outcome.path == "direct":
            tries.direct.append(outcome)
    tries.seconds = time.monotonic() - started
    return tries
