"""
Two NATs that both accept unsolicited WAN traffic, each behind a router of
its ISP: the responder's primer (punchd.agent.hops) opens its NAT without
reaching the initiator's, so every tunnel goes direct, one after another
(ICMP rate limits and conntrack left from earlier tries included).  The
success rate over many tries is bench/bench_open_input.py's.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from netlab.lab import Lab
from netlab.scenarios import World

pytestmark = pytest.mark.netlab

TRIES = 5


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with Lab() as lab:
        world = World(lab)
        try:
            world.add("routa", "cone", wan_input="accept", isp_router=True)
            world.add("routb", "cone", wan_input="accept", isp_router=True)
            world.start()
            yield world
        finally:
            world.close()


def test_two_open_input_nats_behind_routers_connect_directly_every_time(world: World) -> None:
    outcomes = [world.tunnel("routa1", "routb1", timeout=10.0) for _ in range(TRIES)]
    paths = [o.path if o.ok else f"{o.code}: {o.message}" for o in outcomes]
    assert paths == ["direct"] * TRIES
    for outcome in outcomes:
        assert (outcome.local_kind, outcome.remote_kind) == ("srflx", "srflx")
        assert outcome.exchanged == 20 and not outcome.strays
