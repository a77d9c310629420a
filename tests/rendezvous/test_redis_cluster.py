"""
A rendezvous service of two nodes on a real redis-server, with real agents:
peers and tunnels across nodes, a node that dies, and Redis restarting.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from netlab.deployment import Deployment
from punchd import client
from tests import wait_for
from tests.rendezvous.redis_helpers import RedisServer, Service

KEEPALIVE = 2.0
#: One keepalive, the request's retransmissions (8.1 s) and the first
#: backoff, with room for a busy machine.
FAILOVER = 40.0


def open_pair(
    d: Deployment, initiator: str, target: str, service: str = "chat", timeout: float = 10.0
) -> tuple[client.Tunnel, client.Tunnel]:
    with client.listen(service, socket_path=d.agents[target].socket_path) as listener:
        accepted: list[client.Tunnel] = []
        thread = threading.Thread(target=lambda: accepted.append(listener.accept(timeout=timeout)))
        thread.start()
        try:
            ours = client.connect(
                target, service, socket_path=d.agents[initiator].socket_path, timeout=timeout
            )
        finally:
            thread.join(timeout + 5)
    assert accepted, f"{target}'s listener got no tunnel"
    return ours, accepted[0]


def check_tunnel(d: Deployment, initiator: str, target: str) -> None:
    ours, theirs = open_pair(d, initiator, target)
    with ours, theirs:
        assert ours.info["peer"] == target and theirs.info["peer"] == initiator
        ours.socket.settimeout(5)
        theirs.socket.settimeout(5)
        ours.socket.send(b"ping")
        assert theirs.socket.recv(100) == b"ping"
        theirs.socket.send(b"pong")
        assert ours.socket.recv(100) == b"pong"


def peer_names(d: Deployment, agent: str) -> list[str]:
    return [p["name"] for p in client.peers(socket_path=d.agents[agent].socket_path)]


def wait_peers(d: Deployment, agent: str, expected: list[str], timeout: float = 20) -> None:
    """
    A registration reaches the other nodes' lists a few milliseconds after
    its answer (claims are batched): poll.
    """

    def listed() -> bool:
        try:
            return peer_names(d, agent) == expected
        except client.TunnelError:
            return False

    wait_for(listed, timeout, f"{agent}'s peers to be {expected}")


def on_node(service: Service, d: Deployment, agent: str, node: str) -> bool:
    status = d.status(agent)
    port = service.nodes[node].port
    return bool(
        status["registration"] == "registered" and status["rendezvous"].endswith(f":{port}")
    )


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    d = Deployment(tmp_path / "service", keepalive=KEEPALIVE)
    s = Service(d, redis)
    try:
        for name in ("alice", "bob", "carol"):
            d.add_agent(name)
        d.add_agent("mallory", network="elsewhere")
        s.add_node("node1")
        s.add_node("node2")
        s.start_node("node1")
        s.start_node("node2")
        s.point("alice", "node1", "node2")
        s.point("bob", "node2", "node1")
        s.point("carol", "node1", "node2")
        s.point("mallory", "node2", "node1")
        for name in ("alice", "bob", "carol", "mallory"):
            d.start_agent(name, wait=60)
        yield s
    finally:
        s.close()
        redis.stop()


def test_agents_on_two_nodes_see_and_reach_each_other(service: Service) -> None:
    d = service.deployment
    assert on_node(service, d, "alice", "node1") and on_node(service, d, "bob", "node2")
    wait_peers(d, "alice", ["bob", "carol"])
    wait_peers(d, "bob", ["alice", "carol"])
    assert peer_names(d, "mallory") == []
    check_tunnel(d, "alice", "bob")  # node1 -> node2
    check_tunnel(d, "bob", "alice")  # node2 -> node1
    check_tunnel(d, "alice", "carol")  # both on node1
    with pytest.raises(client.TunnelError) as e:
        client.connect("mallory", "chat", socket_path=d.agents["alice"].socket_path, timeout=5)
    assert e.value.code == "peer-unknown"


def test_agents_of_a_dead_node_fail_over_and_connect_again(service: Service) -> None:
    d = service.deployment
    service.kill_node("node2")
    wait_for(lambda: on_node(service, d, "bob", "node1"), FAILOVER, "bob to fail over to node1")
    wait_peers(d, "alice", ["bob", "carol"])
    check_tunnel(d, "alice", "bob")
    check_tunnel(d, "bob", "alice")


def test_a_redis_restart_loses_nothing_that_matters(service: Service) -> None:
    d = service.deployment
    service.redis.stop()
    # Same-node work goes on without Redis; across nodes, a clear error.
    check_tunnel(d, "alice", "carol")
    assert peer_names(d, "alice") == ["carol"]  # node1's own, for now
    with pytest.raises(client.TunnelError) as e:
        client.connect("bob", "chat", socket_path=d.agents["alice"].socket_path, timeout=5)
    assert "unreachable" in str(e.value).lower()
    service.redis.start()

    wait_peers(d, "alice", ["bob", "carol"], 30)  # the nodes published again
    check_tunnel(d, "alice", "bob")
    check_tunnel(d, "bob", "alice")


def test_a_node_that_was_taken_for_dead_does_not_steal_agents_back(service: Service) -> None:
    """
    node2 frozen past its heartbeat's grace: bob moves to node1; when node2
    wakes it publishes what it holds again, but bob's newer record stands.
    """
    d = service.deployment
    process = service.nodes["node2"].process
    assert process is not None
    process.send_signal(signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        wait_for(lambda: on_node(service, d, "bob", "node1"), FAILOVER, "bob to move to node1")
        time.sleep(max(0.0, stopped + 12 - time.monotonic()))  # past the 10 s grace
    finally:
        process.send_signal(signal.SIGCONT)
    wait_for(lambda: "taken for dead" in service.tail("node2"), 30, "node2 to notice it was swept")
    # Redis holds bob where bob last registered: node1, or node2 once bob
    # has moved back to its first rendezvous by itself, never node2's
    # stale claim while bob is on node1.
    redis = service.redis.client()

    def held_where_registered() -> bool:
        holder = redis.execute("HGET", "punchd:agent:bob", "node").decode()
        for name in ("node1", "node2"):
            if on_node(service, d, "bob", name):
                process = service.nodes[name].process
                return process is not None and f"-{process.pid}-" in holder
        return False

    # bob asks node2 again only 30 s after it moved: it is still on node1.
    time.sleep(1)
    assert on_node(service, d, "bob", "node1")
    wait_for(held_where_registered, 10, "Redis to hold bob where bob registered")
    wait_peers(d, "alice", ["bob", "carol"])
    check_tunnel(d, "alice", "bob")
    check_tunnel(d, "bob", "carol")


def test_agents_move_back_to_their_first_rendezvous_when_it_returns(service: Service) -> None:
    d = service.deployment
    service.kill_node("node2")
    wait_for(lambda: on_node(service, d, "bob", "node1"), FAILOVER, "bob to fail over to node1")
    service.start_node("node2")
    # 30 s after it moved (three keepalives, at least 30 s), and every 30 s
    # after, bob asks node2 whether it answers again.
    wait_for(lambda: on_node(service, d, "bob", "node2"), 90, "bob to move back to node2")
    wait_peers(d, "alice", ["bob", "carol"])
    check_tunnel(d, "alice", "bob")
    check_tunnel(d, "bob", "alice")
