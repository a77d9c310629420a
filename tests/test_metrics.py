"""
The daemons' Prometheus metrics, scraped from real twistd processes with a
real HTTP client and parsed with prometheus_client's own parser.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from netlab.deployment import TWIST, Deployment
from punchd import client, stun
from punchd.stun import MessageClass, Method

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def scrape(port: int, host: str = "127.0.0.1") -> Samples:
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    with Deployment(tmp_path_factory.mktemp("metrics"), keepalive=2.0) as d:
        d.ports = {}  # type: ignore[attr-defined]
        for name in ("alice", "bob"):
            agent = d.add_agent(name)
            d.ports[name] = free_tcp_port()  # type: ignore[attr-defined]
            with agent.config.open("a") as f:
                f.write(f'metrics = "127.0.0.1:{d.ports[name]}"\n')  # type: ignore[attr-defined]
        d.ports["rendezvous"] = free_tcp_port()  # type: ignore[attr-defined]
        with (d.root / "rendezvous.toml").open("a") as f:
            f.write(f'metrics = "127.0.0.1:{d.ports["rendezvous"]}"\n')  # type: ignore[attr-defined]
        d.start_rendezvous()
        yield d


def ports(d: Deployment) -> dict[str, int]:
    return d.ports  # type: ignore[attr-defined, no-any-return]


def open_pair(d: Deployment) -> tuple[client.Tunnel, client.Tunnel]:
    with client.listen("chat", socket_path=d.agents["bob"].socket_path) as listener:
        accepted: list[client.Tunnel] = []
        thread = threading.Thread(target=lambda: accepted.append(listener.accept(timeout=15)))
        thread.start()
        try:
            ours = client.connect("bob", "chat", socket_path=d.agents["alice"].socket_path)
        finally:
            thread.join(20)
    assert accepted, "bob's listener got no tunnel"
    return ours, accepted[0]


def test_registrations_and_a_tunnel_show_in_the_metrics(deployment: Deployment) -> None:
    d, port = deployment, ports(deployment)
    before = scrape(port["rendezvous"])
    assert value(before, "punchd_registrations_total") == 0
    assert value(before, "punchd_agents_registered") == 0
    # The relay (on by default) reports its allocations, none yet.
    assert ("punchd_relay_allocations_total", frozenset()) in before
    assert value(before, "punchd_relay_allocations_active") == 0
    for name in ("alice", "bob"):
        d.start_agent(name)
    after = scrape(port["rendezvous"])
    assert value(after, "punchd_registrations_total") == 2
    assert value(after, "punchd_keepalives_total") >= 2
    assert value(after, "punchd_agents_registered") == 2
    alice = scrape(port["alice"])
    assert value(alice, "punchd_registration_state", state="registered") == 1
    assert value(alice, "punchd_registration_state", state="refused") == 0
    assert value(alice, "punchd_registrations_total", outcome="ok") == 1
    assert value(alice, "punchd_tunnels_total", role="initiator", path="direct", outcome="ok") == 0

    ours, theirs = open_pair(d)
    with ours, theirs:
        ours.socket.send(b"hello")
        theirs.socket.settimeout(5)
        assert theirs.socket.recv(100) == b"hello"

    server = scrape(port["rendezvous"])
    assert value(server, "punchd_introductions_total", outcome="accepted") == 1
    assert value(server, "punchd_introductions_requested_total") == 1
    alice = scrape(port["alice"])
    assert value(alice, "punchd_tunnels_total", role="initiator", path="direct", outcome="ok") == 1
    assert value(alice, "punchd_tunnel_setup_seconds_count", role="initiator") == 1
    assert 0 < value(alice, "punchd_tunnel_setup_seconds_sum", role="initiator") < 15
    assert value(alice, "punchd_tunnel_setup_seconds_bucket", role="initiator", le="+Inf") == 1
    assert value(alice, "punchd_control_requests_total", op="connect") == 1
    assert value(alice, "punchd_control_connections_total", outcome="accepted") >= 1
    bob = scrape(port["bob"])
    assert value(bob, "punchd_tunnels_total", role="responder", path="direct", outcome="ok") == 1
    assert value(bob, "punchd_introductions_received_total", outcome="accepted") == 1
    assert value(bob, "punchd_control_requests_total", op="listen") == 1


def test_failed_connects_count_by_their_error_code(deployment: Deployment) -> None:
    d, port = deployment, ports(deployment)
    d.wait_registered("alice")
    with pytest.raises(client.TunnelError) as raised:
        client.connect("nobody", "chat", socket_path=d.agents["alice"].socket_path, timeout=5)
    assert raised.value.code == "peer-unknown"
    alice = scrape(port["alice"])
    assert (
        value(alice, "punchd_tunnels_total", role="initiator", path="none", outcome="peer-unknown")
        == 1
    )
    server = scrape(port["rendezvous"])
    assert value(server, "punchd_introductions_total", outcome="peer_unknown") == 1


def test_bindings_and_drops_are_counted(deployment: Deployment) -> None:
    port = ports(deployment)
    before = scrape(port["rendezvous"])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        request = stun.build(Method.BINDING, MessageClass.REQUEST, b"m" * 12)
        s.sendto(request, (deployment.rendezvous_host, deployment.rendezvous_port))
        assert stun.parse(s.recv(2048)).cls == MessageClass.SUCCESS
        s.sendto(
            b"\x01\x02 not STUN at all", (deployment.rendezvous_host, deployment.rendezvous_port)
        )
        # A second Binding, answered after the junk: the junk has been seen by then.
        s.sendto(request, (deployment.rendezvous_host, deployment.rendezvous_port))
        s.recv(2048)
    after = scrape(port["rendezvous"])
    answered = "punchd_bindings_answered_total"
    assert value(after, answered, kind="anonymous") == value(before, answered, kind="anonymous") + 2
    assert total(after, "punchd_dropped_total") == total(before, "punchd_dropped_total") + 1


def test_metrics_are_served_on_the_given_address_only(deployment: Deployment) -> None:
    port = ports(deployment)["rendezvous"]
    assert scrape(port)  # 127.0.0.1 answers...
    with pytest.raises(urllib.error.URLError):
        scrape(port, host="127.0.0.2")  # ...another loopback address does not


def test_a_metrics_address_in_use_stops_the_daemon_in_one_line(tmp_path: Path) -> None:
    Deployment(tmp_path)  # writes the config files
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        argv = [*TWIST, "rendezvous", "--config", "rendezvous.toml"]
        argv += ["--metrics", f"127.0.0.1:{taken.getsockname()[1]}"]
        done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 78
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("rendezvous: cannot serve metrics on TCP 127.0.0.1:")
    assert "in use" in lines[0]


def test_metrics_must_be_an_ip_address(tmp_path: Path) -> None:
    Deployment(tmp_path)
    argv = [*TWIST, "rendezvous", "--config", "rendezvous.toml", "--metrics", "localhost:9478"]
    done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 78
    assert '--metrics: must be "" (off) or "IP:port"' in done.stderr


def test_the_twisted_resource_is_importable_without_the_global_registry() -> None:
    """
    Each daemon's registry is its own: nothing of ours is in the global one.
    """
    code = (
        "from prometheus_client import REGISTRY\n"
        "import punchd.metrics, punchd.agent.tap, punchd.rendezvous.tap\n"
        "assert not [m for m in REGISTRY.collect() if m.name.startswith('punchd_')]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
