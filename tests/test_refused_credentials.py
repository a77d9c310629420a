"""
An agent whose name or key the rendezvous does not accept, as real
processes: what status, peers and connect say, what the rendezvous logs,
and that a corrected peers file lets the agent in.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from netlab.deployment import Deployment
from punchd import client
from punchd.keys import PrivateKey

REFUSED = "the rendezvous refused our credentials"


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """
    Seconds until C{condition} held; fails after C{timeout}.
    """
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if condition():
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def answers(d: Deployment, name: str) -> bool:
    try:
        d.status(name)
    except client.TunnelError:
        return False
    return True


def refused(d: Deployment, name: str) -> bool:
    return d.status(name)["registration"] == "refused"


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    with Deployment(tmp_path_factory.mktemp("refused"), keepalive=2.0) as d:
        d.add_agent("alice")
        # An agent configured with another rendezvous's key.
        wrongkey = d.add_agent("wrongkey")
        other = PrivateKey.generate().public_key().to_base64()
        right = d.rendezvous_key.public_key().to_base64()
        wrongkey.config.write_text(wrongkey.config.read_text().replace(right, other))
        # An agent the peers file does not list (yet).
        d.add_agent("stranger")
        peers = d.root / "peers.toml"
        listed = peers.read_text()
        peers.write_text(listed.split("[peers.stranger]")[0])
        d.start_rendezvous()
        d.start_agent("alice")
        for name in ("wrongkey", "stranger"):
            d.start_agent(name, wait=0)
        for name in ("wrongkey", "stranger"):
            wait_for(lambda name=name: answers(d, name), 15, f"{name}'s control socket")
        (d.root / "peers.full").write_text(listed)
        yield d


@pytest.mark.parametrize("name", ["wrongkey", "stranger"])
def test_status_says_why_at_once(deployment: Deployment, name: str) -> None:
    waited = wait_for(lambda: refused(deployment, name), 10, f"{name} to be refused")
    assert waited < 3.0
    status = deployment.status(name)
    error = status["last_error"]
    assert error.startswith(REFUSED)
    assert f"does not list agent {name}" in error
    public = deployment.agents[name].key.public_key().to_base64()
    assert f"public key {public}" in error
    assert "rendezvous_public_key" in error


@pytest.mark.parametrize("name", ["wrongkey", "stranger"])
def test_peers_and_connect_fail_fast_saying_why(deployment: Deployment, name: str) -> None:
    wait_for(lambda: refused(deployment, name), 10, f"{name} to be refused")
    socket_path = deployment.agents[name].socket_path
    started = time.monotonic()
    with pytest.raises(client.TunnelError) as peers:
        client.peers(socket_path=socket_path)
    with pytest.raises(client.TunnelError) as connect:
        client.connect("alice", "chat", socket_path=socket_path, timeout=10)
    assert time.monotonic() - started < 1.0
    for raised in (peers.value, connect.value):
        assert raised.code == "unauthorized"
        assert str(raised).startswith(REFUSED)


def test_punchctl_shows_the_reason(deployment: Deployment) -> None:
    agent = deployment.agents["wrongkey"]
    wait_for(lambda: refused(deployment, "wrongkey"), 10, "wrongkey to be refused")
    env = {**os.environ, "PUNCHD_SOCKET": agent.socket_path}

    def punchctl(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "punchd.cli", *args]
        return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=30)

    status = punchctl("status")
    assert status.returncode == 0
    assert REFUSED in status.stdout
    peers = punchctl("peers")
    assert peers.returncode != 0
    assert REFUSED in peers.stderr


def log_lines(path: Path, text: str) -> list[str]:
    return [line for line in path.read_text(errors="replace").splitlines() if text in line]


def test_the_rendezvous_logs_each_refused_source_once(deployment: Deployment) -> None:
    for name in ("wrongkey", "stranger"):
        # Two attempts, of at least two requests each, have been refused.
        wait_for(
            lambda name=name: bool(
                log_lines(deployment.agents[name].log, "registration attempt 2 refused")
            ),
            15,
            f"{name}'s second refused attempt",
        )
    log = deployment.rendezvous_log
    unknown = log_lines(log, "as agent 'stranger', which is not in the peers file")
    bad = log_lines(log, "as agent 'wrongkey' with a bad signature")
    assert len(unknown) == 1, unknown
    assert len(bad) == 1, bad
    assert "refused a request from 127.0.0.1:" in unknown[0]
    for key in (*(a.key for a in deployment.agents.values()), deployment.rendezvous_key):
        assert key.public_key().to_base64() not in log.read_text()


def test_a_corrected_peers_file_lets_the_agent_in(deployment: Deployment) -> None:
    wait_for(lambda: refused(deployment, "stranger"), 10, "stranger to be refused")
    (deployment.root / "peers.toml").write_text((deployment.root / "peers.full").read_text())
    assert deployment.rendezvous_process is not None
    deployment.rendezvous_process.send_signal(signal.SIGHUP)
    deployment.wait_registered("stranger", timeout=45)
    status = deployment.status("stranger")
    assert status["last_error"] is None
    names = {p["name"] for p in client.peers(socket_path=deployment.agents["stranger"].socket_path)}
    assert "alice" in names
