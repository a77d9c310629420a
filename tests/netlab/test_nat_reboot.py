"""
A NAT reboot right after the target registered: the rendezvous's Incoming
is dropped by the target's NAT until the target's next keepalive opens a
new mapping.  The rendezvous holds the introduction and delivers it then,
so the connect succeeds within the target's keepalive period plus a second.
"""

from __future__ import annotations

import time

import pytest

from netlab.lab import Lab
from netlab.scenarios import World

pytestmark = pytest.mark.netlab

#: Longer than the rendezvous used to retry an Incoming (6.75 s), shorter
#: than it now holds an introduction (8.75 s).
KEEPALIVE = 8.0


def wait_for_refresh(world: World, name: str, timeout: float = 2 * KEEPALIVE) -> None:
    """
    Return right after C{name}'s agent registered again.
    """
    before = world.deployment.status(name)["registered_at"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if world.deployment.status(name)["registered_at"] != before:
            return
        time.sleep(0.02)
    raise AssertionError(f"{name} did not refresh its registration within {timeout} s")


def test_connect_right_after_the_targets_nat_rebooted(lab: Lab) -> None:
    world = World(lab, keepalive=KEEPALIVE)
    try:
        world.add("conea", "cone")
        world.add("coneb", "cone")
        world.start()
        wait_for_refresh(world, "coneb1")
        world.sites["coneb"].flush_conntrack()
        outcome = world.tunnel("conea1", "coneb1", count=5, timeout=10.0)
        assert outcome.ok, f"{outcome.code}: {outcome.message}"
        assert outcome.exchanged == 5
        assert outcome.setup_ms is not None and outcome.setup_ms <= (KEEPALIVE + 1) * 1000
        # The introduction did wait for the keepalive: it was not an easy case.
        assert outcome.setup_ms > 2000
    finally:
        world.close()
