"""
Birthday probing through real NATs: a symmetric NAT (a new port for every
destination) facing a cone or a carrier-grade NAT gets a direct path.  The
agents probe more than by default (SURE_BIRTHDAY), so that the one try per
pair goes direct every time; the success rate with the defaults is
bench/bench_birthday.py's.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from netlab.lab import Lab
from netlab.scenarios import SURE_BIRTHDAY, World

pytestmark = pytest.mark.netlab


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with Lab() as lab:
        world = World(lab, alternate_port=3479, agent_extra=SURE_BIRTHDAY)
        try:
            world.add("conea", "cone", agents=["cone"])
            world.add("cgna", "cgnat", agents=["cgnat"])
            world.add("syma", "symmetric", agents=["sym"])
            world.add("symb", "symmetric", agents=["sym2"])
            world.start()
            world.wait_netcheck()
            yield world
        finally:
            world.close()


@pytest.mark.parametrize(
    ("initiator", "responder"), [("cone", "sym"), ("sym", "cone"), ("cgnat", "sym")]
)
def test_one_hard_nat_gets_a_direct_path(world: World, initiator: str, responder: str) -> None:
    outcome = world.tunnel(initiator, responder, timeout=10.0)
    assert outcome.ok, outcome.message
    assert outcome.path == "direct", outcome
    assert outcome.exchanged == 20 and not outcome.strays


def test_two_hard_nats_go_to_the_relay(world: World) -> None:
    outcome = world.tunnel("sym", "sym2", timeout=10.0)
    assert outcome.ok, outcome.message
    assert outcome.path == "relay"
