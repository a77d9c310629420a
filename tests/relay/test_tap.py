"""
The relay as the rendezvous daemon runs it: settings, options, and the
child service that C{makeService} makes and hands to the protocol.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.internet.testing import MemoryReactorClock

from netlab.deployment import free_udp_port
from punchd.config import ConfigError, load_rendezvous_config
from punchd.keys import PrivateKey, derive_rendezvous_key, write_private_key
from punchd.relay import RelayService
from punchd.rendezvous.tap import Options, RendezvousService, UDPService, makeService

ALICE = PrivateKey.generate()


class Reactor(MemoryReactorClock):
    """
    Records the UDP ports the relay opens (MemoryReactor has no listenUDP).
    """

    def __init__(self) -> None:
        super().__init__()
        self.udp: dict[int, tuple[str, int]] = {}

    def listenUDP(
        self, port: int, protocol: object, interface: str = "", maxPacketSize: int = 8192
    ) -> object:
        self.udp[port] = (interface, maxPacketSize)
        return object()


@pytest.fixture
def config(tmp_path: Path) -> Iterator[Path]:
    server = PrivateKey.generate()
    write_private_key(tmp_path / "rendezvous.key", server)
    (tmp_path / "peers.toml").write_text(f'[peers.alice]\npublic_key = "{ALICE.public_key()}"\n')
    path = tmp_path / "rendezvous.toml"
    path.write_text(
        f'port = {free_udp_port()}\ninterface = "127.0.0.1"\n'
        'private_key = "rendezvous.key"\npeers = "peers.toml"\n'
    )
    previous = signal.getsignal(signal.SIGHUP)
    yield path
    signal.signal(signal.SIGHUP, previous)


def make(config: Path, *arguments: str) -> tuple[RendezvousService, Reactor]:
    options = Options()
    options.parseOptions(["--config", str(config), *arguments])
    reactor = Reactor()
    service = makeService(options, reactor)
    assert isinstance(service, RendezvousService)
    for child in service:
        if isinstance(child, UDPService):
            child._socket.close()
    return service, reactor


def test_the_relay_is_on_by_default_as_a_child_service(config: Path) -> None:
    service, reactor = make(config)
    relay = service.relay
    assert isinstance(relay, RelayService)
    assert relay in list(service) and service.protocol.relay is relay
    assert relay.ports == (49152, 65535) and relay.interface == "127.0.0.1"
    assert (relay.idle_timeout, relay.max_per_agent, relay.rate) == (120.0, 16, 0.0)
    server = load_rendezvous_config(config).private_key
    assert relay.keys("alice") == derive_rendezvous_key(server, ALICE.public_key(), "alice")
    assert relay.keys("nobody") is None
    a, b = relay.allocate(b"T" * 16, "alice", "bob")
    assert reactor.udp == {a: ("127.0.0.1", 65535), b: ("127.0.0.1", 65535)}


def test_options_set_the_relay(config: Path) -> None:
    service, _ = make(
        config,
        "--relay-ports=20000-20009",
        "--relay-idle-timeout=30",
        "--relay-max-per-agent=2",
        "--relay-rate=125000",
    )
    relay = service.relay
    assert relay is not None
    assert (relay.ports, relay.idle_timeout, relay.max_per_agent, relay.rate) == (
        (20000, 20009),
        30.0,
        2,
        125000.0,
    )


@pytest.mark.parametrize("off", ["--relay=false", "--relay=no", "--relay=off"])
def test_the_relay_can_be_turned_off(config: Path, off: str) -> None:
    service, _ = make(config, off)
    assert service.relay is None and service.protocol.relay is None
    assert not any(isinstance(child, RelayService) for child in service)


def test_the_relay_can_be_turned_off_in_the_file(config: Path) -> None:
    config.write_text(config.read_text() + "relay = false\n")
    service, _ = make(config)
    assert service.relay is None


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("relay_ports", "1000-2000", 'must be a port range "LOW-HIGH" within 1024-65535'),
        ("relay_ports", "50000-70000", 'must be a port range "LOW-HIGH" within 1024-65535'),
        ("relay_ports", "50000", 'must be a port range "LOW-HIGH"'),
        ("relay_ports", "6000-5000", "with LOW below HIGH, got '6000-5000'"),
        ("relay_ports", "6000-6000", "with LOW below HIGH"),
        ("relay", "maybe", "must be true or false, got 'maybe'"),
        ("relay_idle_timeout", "0", "must be a number 1-86400, got 0"),
        ("relay_max_per_agent", "0", "must be an integer 1-65536, got 0"),
        ("relay_rate", "-1", "must be a number >= 0, got -1"),
    ],
)
def test_bad_relay_settings_are_one_line_errors(
    config: Path, key: str, value: str, message: str
) -> None:
    with pytest.raises(ConfigError) as error:
        load_rendezvous_config(config, {key: value})
    text = str(error.value)
    assert text.startswith(f"--{key.replace('_', '-')}: ") and message in text, text


def test_relay_ports_in_the_file_are_checked_and_normalized(config: Path) -> None:
    base = config.read_text()
    config.write_text(base + 'relay_ports = " 40000 - 40100 "\n')
    assert load_rendezvous_config(config).relay_ports == "40000-40100"
    config.write_text(base + "relay_ports = 40000\n")
    with pytest.raises(ConfigError, match="key 'relay_ports': must be a port range"):
        load_rendezvous_config(config)
