"""
Tunnels through a gateway's port mapping: a host behind a symmetric NAT
running miniupnpd has no direct path but the one it maps, and takes it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from netlab.lab import Lab
from netlab.scenarios import World

pytestmark = pytest.mark.netlab


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with Lab() as lab:
        world = World(lab, alternate_port=3479)
        try:
            world.add("upnp", "miniupnpd", agents=["upnp"])
            world.add("conea", "cone", agents=["cone"])
            world.add("symb", "symmetric", agents=["sym"])
            world.start()
            deadline = time.monotonic() + 30
            while "port mapping" not in str(world.deployment.status("upnp").get("netcheck")):
                assert time.monotonic() < deadline, world.deployment.status("upnp")
                time.sleep(0.2)
            yield world
        finally:
            world.close()


@pytest.mark.parametrize(
    ("initiator", "responder"),
    [("upnp", "cone"), ("cone", "upnp"), ("upnp", "sym"), ("sym", "upnp")],
)
def test_a_mapped_port_gives_a_direct_path(world: World, initiator: str, responder: str) -> None:
    outcome = world.tunnel(initiator, responder)
    assert outcome.ok, outcome.message
    assert outcome.path == "direct"
    mapped_side = outcome.local_kind if initiator == "upnp" else outcome.remote_kind
    assert mapped_side == "mapped"
    assert outcome.exchanged == 20 and not outcome.strays
