"""
Two NATs that both accept unsolicited WAN traffic: how often they get a
direct path, and how long it takes, with a router of each one's ISP
between them (the responder primes its NAT, L{punchd.agent.hops}) next to
the same NATs sharing one link (no hop for a primer to die on: a race).

    python -m bench.bench_open_input [--tries 20] [--timeout 10]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from bench.tries import try_tunnel
from netlab.lab import Lab, unavailable_reason
from netlab.scenarios import World

NEEDS_ROOT = True
#: Most tries of the baseline, whose tunnels are relayed.
BASELINE_TRIES = 10


def run(tries: int, timeout: float) -> None:
    with Lab() as lab:
        world = World(lab)
        try:
            world.add("routa", "cone", wan_input="accept", isp_router=True)
            world.add("routb", "cone", wan_input="accept", isp_router=True)
            world.add("opena", "cone", wan_input="accept")
            world.add("openb", "cone", wan_input="accept")
            world.start()
            measure(world, "routa1", "routb1", "behind ISP routers", tries, timeout)
            # Relayed tunnels hold their relay ports until 120 s idle, and an
            # agent may hold 16 (relay_max_per_agent): stay below that.
            baseline = min(tries, BASELINE_TRIES)
            measure(world, "opena1", "openb1", "on one link (baseline)", baseline, timeout)
        finally:
            world.close()


def measure(
    world: World, initiator: str, responder: str, label: str, tries: int, timeout: float
) -> None:
    done = try_tunnel(world, initiator, responder, tries, timeout)
    print(f"\nopen-input cone -> open-input cone, {label}: {tries} tries in {done.seconds:.0f} s")
    done.print_summary()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_open_input", description=__doc__)
    parser.add_argument("--tries", type=int, default=20, help="tunnels per setting (20)")
    parser.add_argument("--timeout", type=float, default=10.0, help="connect timeout (10)")
    args = parser.parse_args(argv)
    reason = unavailable_reason()
    if reason is not None:
        print(f"bench_open_input skipped: {reason}")
        return
    try:
        run(args.tries, args.timeout)
    finally:
        sys.stdout.flush()


if __name__ == "__main__":
    main()
