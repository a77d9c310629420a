"""
A rendezvous and two agents as real twistd processes on loopback, used
through the stdlib client exactly as a program would.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from netlab.deployment import Deployment
from punchd import client


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    with Deployment(tmp_path_factory.mktemp("e2e"), keepalive=2.0) as d:
        d.add_agent("alice")
        d.add_agent("bob")
        d.add_agent("mallory", network="elsewhere")
        d.start_rendezvous()
        for name in ("alice", "bob", "mallory"):
            d.start_agent(name)
        yield d


def open_pair(
    d: Deployment, service: str = "chat", timeout: float = 10.0
) -> tuple[client.Tunnel, client.Tunnel]:
    with client.listen(service, socket_path=d.agents["bob"].socket_path) as listener:
        accepted: list[client.Tunnel] = []
        thread = threading.Thread(target=lambda: accepted.append(listener.accept(timeout=timeout)))
        thread.start()
        try:
            ours = client.connect(
                "bob", service, socket_path=d.agents["alice"].socket_path, timeout=timeout
            )
        finally:
            thread.join(timeout + 5)
    assert accepted, "bob's listener got no tunnel"
    return ours, accepted[0]


def exchange(a: socket.socket, b: socket.socket, count: int, tag: bytes = b"") -> None:
    a.settimeout(5)
    b.settimeout(5)
    for i in range(count):
        a.send(b"a>%s%d" % (tag, i))
        assert b.recv(2048) == b"a>%s%d" % (tag, i)
        b.send(b"b>%s%d" % (tag, i))
        assert a.recv(2048) == b"b>%s%d" % (tag, i)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def settled_fds(*pids: int) -> tuple[int, ...]:
    """
    Descriptor counts once they stop changing (an earlier control
    connection may still be closing on the agent's side).
    """
    counts = tuple(open_fds(p) for p in pids)
    for _ in range(50):
        time.sleep(0.1)
        again = tuple(open_fds(p) for p in pids)
        if again == counts:
            return counts
        counts = again
    return counts


def test_peers_are_listed_per_network(deployment: Deployment) -> None:
    alice = client.peers(socket_path=deployment.agents["alice"].socket_path)
    mallory = client.peers(socket_path=deployment.agents["mallory"].socket_path)
    assert [p["name"] for p in alice] == ["bob"]
    assert mallory == []


def test_status_reports_registration(deployment: Deployment) -> None:
    status = deployment.status("alice")
    assert status["name"] == "alice"
    assert status["registration"] == "registered"
    assert status["mapped"].startswith("127.0.0.1:")
    assert status["rendezvous"] == f"127.0.0.1:{deployment.rendezvous_port}"


def test_tunnel_is_a_connected_udp_socket_carrying_only_peer_data(deployment: Deployment) -> None:
    ours, theirs = open_pair(deployment)
    with ours, theirs:
        for tunnel in (ours, theirs):
            assert tunnel.socket.type == socket.SOCK_DGRAM
            assert tunnel.info["path"] == "direct"
            assert tunnel.info["setup_ms"] > 0
        assert ours.info["peer"] == "bob" and theirs.info["peer"] == "alice"
        assert ours.socket.getpeername() == theirs.socket.getsockname()
        assert theirs.socket.getpeername() == ours.socket.getsockname()
        # A stranger's datagram never reaches the program: the socket is connected.
        with socket.socket(ours.socket.family, socket.SOCK_DGRAM) as stranger:
            stranger.sendto(b"junk", ours.socket.getsockname())
        exchange(ours.socket, theirs.socket, 1000)
        ours.socket.settimeout(0.3)
        with pytest.raises(TimeoutError):
            ours.socket.recv(2048)
        theirs.socket.settimeout(0.3)
        with pytest.raises(TimeoutError):
            theirs.socket.recv(2048)


def test_errors_are_explained(deployment: Deployment) -> None:
    path = deployment.agents["alice"].socket_path
    cases = {
        ("bob", "nobody-listens"): "no-listener",
        ("carol", "chat"): "peer-unknown",
        ("mallory", "chat"): "peer-unknown",
        ("alice", "chat"): "bad-request",
    }
    for (peer, service), code in cases.items():
        with pytest.raises(client.TunnelError) as failure:
            client.connect(peer, service, socket_path=path, timeout=5)
        assert failure.value.code == code, (peer, service, failure.value)


def test_no_listener_is_refused_quickly(deployment: Deployment) -> None:
    started = time.monotonic()
    with pytest.raises(client.TunnelError):
        client.connect(
            "bob", "nobody", socket_path=deployment.agents["alice"].socket_path, timeout=10
        )
    assert time.monotonic() - started < 2.0


def test_garbage_on_the_control_socket_gets_errors(deployment: Deployment) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(deployment.agents["alice"].socket_path)
        s.sendall(b"\xff\xfe garbage\n{}\n[1,2]\n" + b'{"id":7,"op":"dance"}\n')
        replies = b""
        while replies.count(b"\n") < 4:
            chunk = s.recv(65536)
            assert chunk
            replies += chunk
    assert replies.count(b'"bad-request"') == 4
    assert deployment.status("alice")["registration"] == "registered"


def test_many_concurrent_tunnels_and_descriptors_return_to_baseline(
    deployment: Deployment,
) -> None:
    count = 200
    alice, bob = deployment.agents["alice"], deployment.agents["bob"]
    assert alice.process is not None and bob.process is not None
    baseline = settled_fds(alice.process.pid, bob.process.pid)
    accepted: list[client.Tunnel] = []
    with client.listen("bulk", socket_path=bob.socket_path) as listener:

        def accept_all() -> None:
            for _ in range(count):
                accepted.append(listener.accept(timeout=30))

        acceptor = threading.Thread(target=accept_all)
        acceptor.start()
        with ThreadPoolExecutor(max_workers=count) as pool:
            futures = [
                pool.submit(
                    client.connect, "bob", "bulk", socket_path=alice.socket_path, timeout=20
                )
                for _ in range(count)
            ]
            opened = [f.result() for f in futures]
        acceptor.join(40)
    assert len(opened) == count and len(accepted) == count
    by_id = {t.info["id"]: t for t in accepted}
    assert len(by_id) == count
    for tunnel in opened:
        peer = by_id[tunnel.info["id"]]
        exchange(tunnel.socket, peer.socket, 2)
    for tunnel in opened + accepted:
        tunnel.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        now = (open_fds(alice.process.pid), open_fds(bob.process.pid))
        if now == baseline:
            break
        time.sleep(0.1)
    assert now == baseline


def test_tunnel_outlives_both_agents(tmp_path: Path) -> None:
    with Deployment(tmp_path, keepalive=2.0) as d:
        d.add_agent("alice")
        d.add_agent("bob")
        d.start_rendezvous()
        d.start_agent("alice")
        d.start_agent("bob")
        ours, theirs = open_pair(d)
        with ours, theirs:
            exchange(ours.socket, theirs.socket, 10)
            d.stop_agent("alice")
            d.stop_agent("bob")
            d.stop_rendezvous()
            exchange(ours.socket, theirs.socket, 1000, tag=b"after")


def test_a_stopped_agent_is_offline_at_once(tmp_path: Path) -> None:
    with Deployment(tmp_path, keepalive=30.0) as d:
        d.add_agent("alice")
        d.add_agent("bob")
        d.start_rendezvous()
        d.start_agent("alice")
        d.start_agent("bob")
        path = d.agents["alice"].socket_path
        assert [p["name"] for p in client.peers(socket_path=path)] == ["bob"]
        d.stop_agent("bob")
        # Long before bob's registration (lifetime 95 s) would have run out:
        assert client.peers(socket_path=path) == []
        with pytest.raises(client.TunnelError) as failure:
            client.connect("bob", "chat", socket_path=path, timeout=5)
        assert failure.value.code == "peer-offline"
        assert "signed off" in d.rendezvous_log.read_text()


def test_a_rendezvous_on_ipv6(tmp_path: Path) -> None:
    with Deployment(tmp_path, rendezvous_host="::1") as d:
        d.add_agent("alice")
        d.add_agent("bob")
        d.start_rendezvous()
        d.start_agent("alice")
        d.start_agent("bob")
        assert d.status("alice")["mapped"].startswith("[::1]:")
        ours, theirs = open_pair(d)
        with ours, theirs:
            exchange(ours.socket, theirs.socket, 10)
