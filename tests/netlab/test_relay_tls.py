"""
A site whose firewall lets no UDP out: its agent registers over TLS, and
its tunnels go through the relay over that TLS connection (relay-tls), in
both directions, to a cone peer and to a symmetric peer.  When UDP comes
back, the agent moves back to it and tunnels are direct again.  A wrong
certificate is refused, and status says why.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from netlab.certs import make_certificates
from netlab.lab import RENDEZVOUS_ADDRESS, Lab
from netlab.scenarios import World
from punchd import client
from punchd.client import TunnelError
from tests import wait_for

pytestmark = pytest.mark.netlab

TLS_PORT = 443


def tls_world(lab: Lab, ca_dir: Path, server_dir: Path | None = None) -> World:
    """
    A world whose rendezvous serves TLS with a certificate for its address
    (signed by the CA in C{server_dir}, C{ca_dir}'s by default), and whose
    agents trust the CA in C{ca_dir}.
    """
    trusted = make_certificates(ca_dir, [RENDEZVOUS_ADDRESS])
    served = trusted if server_dir is None else make_certificates(server_dir, [RENDEZVOUS_ADDRESS])
    return World(
        lab,
        rendezvous_extra=(
            f"tls_port = {TLS_PORT}\n"
            f'tls_certificate = "{served.certificate}"\n'
            f'tls_private_key = "{served.private_key}"\n'
        ),
        agent_extra=(
            f'rendezvous_tls = "{RENDEZVOUS_ADDRESS}:{TLS_PORT}"\nrendezvous_ca = "{trusted.ca}"\n'
        ),
    )


def status_of(world: World, name: str) -> dict[str, Any]:
    """
    The agent's status, or nothing while its control socket is not there yet.
    """
    try:
        return world.deployment.status(name)
    except TunnelError:
        return {}


def test_a_site_without_udp_gets_every_tunnel_through_the_relay_over_tls(
    lab: Lab, tmp_path: Path
) -> None:
    world = tls_world(lab, tmp_path)
    try:
        world.add("office", "cone")
        world.add("conea", "cone")
        world.add("syma", "symmetric")
        world.sites["office"].block_udp()
        world.deployment.start_rendezvous(launch=lab.rendezvous_host.run)
        for name, host in world.hosts.items():
            world.deployment.start_agent(name, launch=host.run, wait=0)
        # UDP is tried first (about 8 s without an answer), then TLS.
        world.wait_registered(timeout=60)
        status = world.deployment.status("office1")
        assert status["transport"].startswith("UDP blocked, using TLS"), status
        assert world.deployment.status("conea1")["transport"] == "UDP"
        # netcheck looks again when the way to the rendezvous changes.
        wait_for(
            lambda: "UDP blocked, using TLS" in (status_of(world, "office1").get("netcheck") or ""),
            30,
            "netcheck to say UDP is blocked",
        )
        # It sees its peers, and they see it.
        peers = client.peers(socket_path=world.deployment.agents["office1"].socket_path)
        assert sorted(p["name"] for p in peers) == ["conea1", "syma1"]
        peers = client.peers(socket_path=world.deployment.agents["conea1"].socket_path)
        assert "office1" in {p["name"] for p in peers}

        outcome = world.tunnel("office1", "conea1", count=1000, timeout=40.0)
        assert outcome.ok, outcome.message
        assert outcome.path == "relay-tls"
        assert outcome.exchanged == 1000 and outcome.strays == []

        # The blocked side listening, a symmetric peer connecting.
        outcome = world.tunnel("syma1", "office1", count=1000, timeout=40.0)
        assert outcome.ok, outcome.message
        assert outcome.path == "relay"  # the symmetric side's end is plain UDP
        assert outcome.accept["info"]["path"] == "relay-tls"
        # The rendezvous offers the relay at once for a target on TLS: no
        # second round was needed.
        assert "rounds" not in outcome.info, outcome.info
        assert outcome.exchanged == 1000 and outcome.strays == []

        # UDP comes back: the agent moves back within a few keepalives, and
        # its tunnels go direct again.
        world.sites["office"].block_udp(False)
        wait_for(
            lambda: world.deployment.status("office1")["transport"] == "UDP",
            30,
            "the agent to move back to UDP",
        )
        world.wait_registered(["office1"], timeout=30)
        outcome = world.retry_tunnel("office1", "conea1", within=20, count=20)
        assert outcome.ok, outcome.message
        assert outcome.path == "direct"
    finally:
        world.close()


def test_a_certificate_from_another_ca_is_refused_and_status_says_why(
    lab: Lab, tmp_path: Path
) -> None:
    world = tls_world(lab, tmp_path / "trusted", server_dir=tmp_path / "impostor")
    try:
        world.add("office", "cone")
        world.sites["office"].block_udp()
        world.deployment.start_rendezvous(launch=lab.rendezvous_host.run)
        world.deployment.start_agent("office1", launch=world.hosts["office1"].run, wait=0)
        wait_for(
            lambda: bool(status_of(world, "office1").get("tls_error")),
            60,
            "a TLS error in the status",
        )
        status = world.deployment.status("office1")
        assert "certificate was refused" in status["tls_error"], status
        assert status["registration"] != "registered"
        log = world.deployment.agents["office1"].log.read_text()
        assert "certificate was refused" in log
    finally:
        world.close()
