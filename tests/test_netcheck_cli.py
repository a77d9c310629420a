"""
C{punchctl netcheck} against real daemons on loopback: the rendezvous's
alternate port, the agent's control op, and both ways of printing.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from netlab.deployment import Deployment, free_udp_port
from punchd import cli
from punchd.cli import describe_netcheck


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    root: Path = tmp_path_factory.mktemp("netcheck")
    with Deployment(root, keepalive=2.0, alternate_port=free_udp_port()) as d:
        d.add_agent("alice")
        d.start_rendezvous()
        d.start_agent("alice")
        yield d


def test_netcheck_json(deployment: Deployment, capsys: pytest.CaptureFixture[str]) -> None:
    socket_path = deployment.agents["alice"].socket_path
    assert cli.main(["--socket", socket_path, "netcheck", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["udp"] is True and report["ipv4"] == "127.0.0.1"
    assert report["mapping_varies_by_destination"] is False and report["nat"] is False
    # The rendezvous is on loopback: the gateway is not asked.
    assert report["port_mapping"] == []
    assert report["rendezvous_rtt_ms"] < 1000
    assert report["summary"].startswith("direct to most peers")
    status = deployment.status("alice")
    assert status["netcheck"] == report["summary"]


def test_netcheck_lines(deployment: Deployment, capsys: pytest.CaptureFixture[str]) -> None:
    socket_path = deployment.agents["alice"].socket_path
    assert cli.main(["--socket", socket_path, "netcheck"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "UDP",
        "public IPv4",
        "public IPv6",
        "NAT",
        "port mapping",
        "in short",
    ]
    assert "none (this host has the public address)" in lines[3]


def test_describe_blocked_and_unknown() -> None:
    blocked = {"udp": False, "port_mapping": [], "summary": "UDP ... relay only"}
    text = describe_netcheck(blocked)
    assert "blocked" in text and "unknown" in text
    unknown = {"udp": True, "nat": True, "rendezvous_rtt_ms": 3.5, "port_mapping": ["nat-pmp"]}
    text = describe_netcheck(unknown)
    assert "round trip 3.5 ms" in text and "no alternate port" in text and "nat-pmp" in text
