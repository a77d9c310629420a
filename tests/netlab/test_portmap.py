"""
punchd's port mapper against the real miniupnpd in a symmetric lab NAT:
each protocol offered, a mapping that works from the internet, and nothing
left in miniupnpd's table afterwards.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from netlab.lab import Host, Lab, Site

pytestmark = pytest.mark.netlab


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    with Lab() as lab:
        site = lab.add_site("up", "miniupnpd")
        lab.add_public_host("far")
        yield site


def read_json(proc: subprocess.Popen[str], timeout: float = 10.0) -> dict[str, Any]:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("{"):
            result: dict[str, Any] = json.loads(line)
            return result
        if not line and proc.poll() is not None:
            break
    raise AssertionError("no JSON line from the mapping program")


def send_from(host: Host, address: tuple[str, int], text: str) -> None:
    code = (
        "import socket,sys; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);"
        f"s.sendto({text.encode()!r}, ({address[0]!r}, {address[1]}))"
    )
    host.check_output([sys.executable, "-c", code])


@pytest.mark.parametrize("protocol", ["pcp", "nat-pmp", "upnp"])
def test_gateway_maps_a_socket_reachable_from_the_internet(site: Site, protocol: str) -> None:
    lab = site._lab
    far = lab.public_hosts["far"]
    # Discovery gives the gateway under a second to answer; a machine busy
    # enough to make miniupnpd slower than that gets another try.
    for _attempt in range(3):
        proc = site.hosts[0].run(
            [sys.executable, "-m", "netlab.upnp", "map", "--protocol", protocol],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        report = read_json(proc)
        if report["offered"] == ["pcp", "nat-pmp", "upnp"]:
            break
        proc.kill()
        proc.wait()
    try:
        assert report["offered"] == ["pcp", "nat-pmp", "upnp"]
        _, host, port = report["mapping"]
        assert (report["mapping"][0], host) == (protocol, site.public_address)
        assert any(f"dport {port} " in rule for rule in site.port_mappings())
        # Unsolicited, from a host that never heard from it: through the symmetric NAT.
        send_from(far, (host, port), "hello")
        assert read_json(proc)["received"] == "hello"
        assert proc.stdin is not None
        proc.stdin.close()
        assert read_json(proc) == {"deleted": True}
        assert not any(f"dport {port} " in rule for rule in site.port_mappings())
    finally:
        proc.kill()
        proc.wait()


def test_no_gateway_answers_quickly_with_nothing(site: Site) -> None:
    far = site._lab.public_hosts["far"]
    proc = far.run(
        [sys.executable, "-m", "netlab.upnp", "map"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        started = time.monotonic()
        report = read_json(proc)
        assert report["offered"] == [] and report["mapping"] is None
        # Bounded by the discovery deadline (under a second), not a 30 s
        # HTTP timeout: generous, so that only a hang fails it.
        assert time.monotonic() - started < 15
    finally:
        proc.kill()
        proc.wait()


def test_stun_responder_ignores_change_request() -> None:
    from netlab.upnp import stun_answer

    request = bytes.fromhex("000100082112a442") + bytes(12) + bytes.fromhex("0003000400000006")
    answer = stun_answer(request, ("203.0.113.7", 4242))
    assert answer is not None and answer[:2] == b"\x01\x01"
    assert socket.inet_ntoa(bytes(a ^ b for a, b in zip(answer[-4:], request[4:8]))) == (
        "203.0.113.7"
    )
