"""
Relayed tunnels through real NATs: a cone NAT facing a symmetric one has no
direct path, so the rendezvous's relay carries the tunnel.
"""

from __future__ import annotations

import sys
import time

import pytest

from netlab.demo import Program, punchctl
from netlab.lab import RENDEZVOUS_ADDRESS, Lab
from netlab.scenarios import World

pytestmark = pytest.mark.netlab

RELAY_PORTS = (50000, 50015)

#: A stranger on the internet sending junk to every relay port, for a while.
FLOOD = """
import socket, sys, time
host, first, last, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
end = time.monotonic() + seconds
while time.monotonic() < end:
    for port in range(first, last + 1):
        try:
            s.sendto(b"INJECTED", (host, port))
        except OSError:
            pass
    time.sleep(0.001)
"""


def test_a_relayed_tunnel_carries_everything_and_nothing_else(lab: Lab) -> None:
    first, last = RELAY_PORTS
    world = World(lab, rendezvous_extra=f'relay_ports = "{first}-{last}"\n')
    try:
        world.add("conea", "cone")
        world.add("syma", "symmetric")
        world.add("stranger", "public")
        world.start()
        flood = world.hosts["stranger"].run(
            [sys.executable, "-c", FLOOD, RENDEZVOUS_ADDRESS, *map(str, RELAY_PORTS), "60"]
        )
        try:
            outcome = world.tunnel("conea1", "syma1", count=1000, timeout=30.0)
        finally:
            flood.kill()
            flood.wait(5)
        assert outcome.ok, outcome.message
        assert outcome.path == "relay"
        assert outcome.exchanged == 1000  # each way, none lost
        assert outcome.strays == []  # nothing of punchd's, nothing of the stranger's
    finally:
        world.close()


def test_a_relayed_tunnel_is_set_up_under_ten_percent_loss(lab: Lab) -> None:
    world = World(lab)
    try:
        world.add("conea", "cone", loss=10)
        world.add("syma", "symmetric", loss=10)
        world.start()
        outcome = world.tunnel("conea1", "syma1", count=50, timeout=10.0)
        assert outcome.ok, outcome.message
        assert outcome.path == "relay"
        assert outcome.exchanged == 50
    finally:
        world.close()


def test_a_relayed_tunnel_outlives_both_agents(lab: Lab) -> None:
    world = World(lab)
    try:
        world.add("conea", "cone")
        world.add("syma", "symmetric")
        world.start()
        sockets = {name: a.socket_path for name, a in world.deployment.agents.items()}
        listen = punchctl(sockets["syma1"], "listen", "chat")
        bob = Program("syma1", listen, world.hosts["syma1"].run)
        heard = bob.expect(bob.err, "listening")
        deadline = time.monotonic() + 30
        while "chat" not in world.deployment.status("syma1").get("listening", []):
            assert time.monotonic() < deadline, (heard, world.deployment.status("syma1"))
            time.sleep(0.1)
        alice = Program(
            "conea1",
            punchctl(sockets["conea1"], "connect", "syma1", "chat"),
            world.hosts["conea1"].run,
        )
        try:
            said: list[str] = []
            try:
                connected = alice.progress_until("connected to", said.append)
            except RuntimeError:
                log = world.deployment.agents["syma1"].log.read_text()[-3000:]
                pytest.fail(f"punchctl connect failed: {said}; bob said {heard!r}\n{log}")
            assert "via relay" in connected, said
            bob.expect(bob.err, "connected to")
            alice.type("before")
            bob.expect(bob.out, "before")
            world.deployment.stop_agent("conea1")
            world.deployment.stop_agent("syma1")
            alice.type("after both agents stopped")
            bob.expect(bob.out, "after both agents stopped")
            bob.type("and back")
            alice.expect(alice.out, "and back")
        finally:
            alice.finish()
            bob.finish()
    finally:
        world.close()


def test_without_a_relay_a_pair_with_no_direct_path_is_told_why(lab: Lab) -> None:
    world = World(lab, rendezvous_extra="relay = false\n")
    try:
        world.add("conea", "cone")
        world.add("syma", "symmetric")
        world.start()
        outcome = world.tunnel("conea1", "syma1", count=5, timeout=6.0)
        assert not outcome.ok and outcome.code == "unreachable"
        assert "no relay: this rendezvous runs no relay" in outcome.message, outcome.message
    finally:
        world.close()
