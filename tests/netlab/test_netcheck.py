"""
C{punchctl netcheck --json} through real NATs, one site of each kind, with
the rendezvous answering Binding on a second port.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from netlab.lab import Lab
from netlab.scenarios import World

pytestmark = pytest.mark.netlab

ALTERNATE_PORT = 3479
SITES = {
    "pub": "public",
    "cone": "cone",
    "fullcone": "full-cone",
    "sym": "symmetric",
    "cgnat": "cgnat",
    "upnp": "miniupnpd",
}


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with Lab() as lab:
        world = World(lab, alternate_port=ALTERNATE_PORT)
        try:
            for name, profile in SITES.items():
                world.add(name, profile, agents=[name])
            world.start()
            yield world
        finally:
            world.close()


def netcheck(world: World, name: str) -> dict[str, Any]:
    socket_path = world.deployment.agents[name].socket_path
    argv = [sys.executable, "-m", "punchd.cli", "--socket", socket_path, "netcheck", "--json"]
    report: dict[str, Any] = json.loads(world.hosts[name].check_output(argv, timeout=30))
    assert report["udp"] is True and report["ipv6"] is None
    assert 0 < report["rendezvous_rtt_ms"] < 1000
    return report


def public_address(world: World, name: str) -> str:
    site = world.sites.get(name)
    return site.public_address if site is not None else world.hosts[name].address


@pytest.mark.parametrize("name", ["cone", "fullcone", "cgnat"])
def test_cone_nats_keep_one_mapping(world: World, name: str) -> None:
    report = netcheck(world, name)
    assert report["ipv4"] == public_address(world, name)
    assert report["nat"] is True
    assert report["mapping_varies_by_destination"] is False
    assert report["port_mapping"] == []
    assert report["summary"].startswith("direct to most peers")


def test_public_host_has_no_nat(world: World) -> None:
    report = netcheck(world, "pub")
    assert report["ipv4"] == world.hosts["pub"].address
    assert (report["nat"], report["mapping_varies_by_destination"]) == (False, False)
    assert report["port_mapping"] == []
    assert report["summary"].startswith("direct to most peers")


def test_symmetric_nat_maps_per_destination(world: World) -> None:
    report = netcheck(world, "sym")
    assert report["ipv4"] == public_address(world, "sym")
    assert report["mapping_varies_by_destination"] is True
    assert report["port_mapping"] == []
    assert report["summary"].startswith("direct only to easy NATs, relay otherwise")
    # status carries the summary of the last check.
    assert world.deployment.status("sym")["netcheck"] == report["summary"]


def test_symmetric_nat_with_miniupnpd_offers_port_mapping(world: World) -> None:
    report = netcheck(world, "upnp")
    assert report["ipv4"] == public_address(world, "upnp")
    assert report["mapping_varies_by_destination"] is True
    assert report["port_mapping"] == ["pcp", "nat-pmp", "upnp"]
    assert "port mapping (pcp)" in report["summary"]


def test_readable_lines(world: World) -> None:
    socket_path = world.deployment.agents["sym"].socket_path
    argv = [sys.executable, "-m", "punchd.cli", "--socket", socket_path, "netcheck"]
    text = world.hosts["sym"].check_output(argv, timeout=30)
    assert "NAT:" in text and "symmetric" in text
    assert f"public IPv4:  {public_address(world, 'sym')}\n" in text
