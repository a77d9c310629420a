"""
Birthday probing through the NAT lab's real NATs: how often a symmetric NAT
(a new port per destination) and a cone NAT get a direct path, how long it
takes, and how many probes it costs, next to what the formula expects.

With n sockets on the hard side among P possible ports, k probes from the
easy side find one with chance 1 - (1 - n/P)^k.

    python -m bench.bench_birthday [--tries 50] [--timeout 10]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections.abc import Sequence

from bench.tries import percentile, try_tunnel
from netlab.lab import Lab, unavailable_reason
from netlab.scenarios import World
from punchd.agent.birthday import PORTS

NEEDS_ROOT = True
SOCKETS = 256  # the agents' default hard_nat_sockets


def expected_probes(chance: float, sockets: int = SOCKETS) -> float:
    """
    Probes needed to find one of C{sockets} open ports with C{chance}.
    """
    return math.log(1 - chance) / math.log(1 - sockets / len(PORTS))


def run(tries: int, timeout: float) -> None:
    with Lab() as lab:
        world = World(lab, alternate_port=3479)
        try:
            world.add("conea", "cone", agents=["cone"])
            world.add("syma", "symmetric", agents=["sym"])
            world.start()
            world.wait_netcheck()
            for initiator, responder in (("cone", "sym"), ("sym", "cone")):
                measure(world, initiator, responder, tries, timeout)
        finally:
            world.close()


def measure(world: World, initiator: str, responder: str, tries: int, timeout: float) -> None:
    done = try_tunnel(world, initiator, responder, tries, timeout)
    probes: list[int] = []
    for outcome in done.direct:
        easy = outcome.info if initiator == "cone" else outcome.accept.get("info", {})
        if "birthday_probes" in easy:
            probes.append(easy["birthday_probes"])
    print(f"\n{initiator} -> {responder}: {tries} tries in {done.seconds:.0f} s")
    done.print_summary()
    if probes:
        print(
            f"  probes sent by the easy side per success: median {statistics.median(probes):.0f},"
            f" p95 {percentile(probes, 0.95):.0f}, worst {max(probes)}"
        )
    print(
        f"  the formula ({SOCKETS} sockets, {len(PORTS)} ports): 50% by"
        f" {expected_probes(0.5):.0f} probes, 95% by {expected_probes(0.95):.0f},"
        f" 98% by {expected_probes(0.98):.0f}"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_birthday", description=__doc__)
    parser.add_argument("--tries", type=int, default=50, help="tunnels per direction (50)")
    parser.add_argument("--timeout", type=float, default=10.0, help="connect timeout (10)")
    args = parser.parse_args(argv)
    reason = unavailable_reason()
    if reason is not None:
        print(f"bench_birthday skipped: {reason}")
        return
    try:
        run(args.tries, args.timeout)
    finally:
        sys.stdout.flush()


if __name__ == "__main__":
    main()
