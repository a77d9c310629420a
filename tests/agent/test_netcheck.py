"""
L{punchd.agent.netcheck} on a fake clock and transport: the report from
the answers of the rendezvous's two ports, silence, and the sharing of
checks.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from punchd import stun
from punchd.agent.netcheck import GATHER_DEADLINE, NetChecker, NetReport
from punchd.gather import build_gather_answer

KEY = bytes(range(32))
SERVER = ("203.0.113.10", 3478)
ALTERNATE = 3479
LOCAL = "192.0.2.2"


class FakePort:
    def __init__(self, protocol: Any) -> None:
        self.protocol = protocol
        self.sent: list[tuple[bytes, tuple[str, int]]] = []
        self.open = True

    def write(self, data: bytes, address: tuple[str, int]) -> None:
        self.sent.append((data, address))

    def stopListening(self) -> None:
        self.open = False


class FakeReactor(Clock):
    def __init__(self) -> None:
        super().__init__()
        self.ports: list[FakePort] = []

    def listenUDP(self, port: int, protocol: Any, interface: str = "") -> FakePort:
        fake = FakePort(protocol)
        self.ports.append(fake)
        protocol.makeConnection(fake)
        return fake


class FakeMapper:
    def __init__(self, offered: list[str]) -> None:
        self.asked = 0
        self._offered = offered

    def offered(self) -> Deferred[list[str]]:
        self.asked += 1
        return succeed(self._offered)


def checker(
    reactor: FakeReactor,
    alternate: int = ALTERNATE,
    server: tuple[str, int] = SERVER,
    mapper: FakeMapper | None = None,
) -> NetChecker:
    return NetChecker(
        reactor,
        "alice",
        KEY,
        resolve=lambda: succeed(server),
        rendezvous_host=server[0],
        alternate_port=lambda: alternate,
        mapper=mapper,  # type: ignore[arg-type]
        addresses=lambda: [LOCAL],
    )


def answer(reactor: FakeReactor, mapped: dict[int, tuple[str, int]], after: float = 0.01) -> None:
    """
    Answer the last gather sent to each server port with C{mapped[port]}.
    """
    reactor.advance(0)
    port = reactor.ports[-1]
    for server_port, address in mapped.items():
        sent = [(d, a) for d, a in port.sent if a[1] == server_port]
        if not sent:
            reactor.advance(0)
            sent = [(d, a) for d, a in port.sent if a[1] == server_port]
        data, server = sent[-1]
        reactor.advance(after)
        tid = stun.parse(data).transaction_id
        port.protocol.datagramReceived(build_gather_answer(tid, address, KEY), server)


def report_of(d: Deferred[NetReport]) -> NetReport:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results and isinstance(results[0], NetReport), results
    report: NetReport = results[0]
    return report


def test_same_address_from_both_ports_is_a_cone() -> None:
    reactor = FakeReactor()
    d = checker(reactor, mapper=FakeMapper([])).check()
    answer(reactor, {3478: ("198.51.100.1", 5000), ALTERNATE: ("198.51.100.1", 5000)})
    report = report_of(d)
    assert report.to_json() == {
        "udp": True,
        "ipv4": "198.51.100.1",
        "ipv6": None,
        "mapping_varies_by_destination": False,
        "port_mapping": [],
        "rendezvous_rtt_ms": 10.0,
        "nat": True,
        "over_tls": False,
        "checked_at": report.checked_at,
        "summary": "direct to most peers (the NAT keeps one mapping per socket)",
    }
    assert not reactor.ports[0].open and reactor.getDelayedCalls() == []


def test_another_port_per_destination_is_symmetric() -> None:
    reactor = FakeReactor()
    mapper = FakeMapper(["pcp", "upnp"])
    d = checker(reactor, mapper=mapper).check()
    answer(reactor, {3478: ("198.51.100.1", 5000), ALTERNATE: ("198.51.100.1", 5001)})
    report = report_of(d)
    assert report.mapping_varies_by_destination is True
    assert report.port_mapping == ["pcp", "upnp"] and mapper.asked == 1
    assert "port mapping (pcp)" in report.summary
    report = NetReport(True, "198.51.100.1", None, True, [], 1.0, True)
    assert (
        report.summary == "direct only to easy NATs, relay otherwise (the NAT maps per destination)"
    )


def test_without_alternate_port_the_mapping_is_unknown() -> None:
    reactor = FakeReactor()
    d = checker(reactor, alternate=0).check()
    answer(reactor, {3478: (LOCAL, 5000)})
    report = report_of(d)
    assert report.mapping_varies_by_destination is None and report.nat is False
    assert [a for _, a in reactor.ports[0].sent] == [SERVER]


def test_silence_means_no_udp_and_nothing_left_behind() -> None:
    reactor = FakeReactor()
    d = checker(reactor).check()
    reactor.advance(0)
    reactor.advance(GATHER_DEADLINE)
    report = report_of(d)
    assert (report.udp, report.ipv4, report.rendezvous_rtt_ms) == (False, None, None)
    assert report.summary.startswith("UDP to the rendezvous is blocked")
    assert len(reactor.ports[0].sent) == 4  # resent while waiting
    assert not reactor.ports[0].open and reactor.getDelayedCalls() == []


def test_answers_from_elsewhere_or_under_another_key_are_ignored() -> None:
    reactor = FakeReactor()
    d = checker(reactor, alternate=0).check()
    reactor.advance(0)
    port = reactor.ports[0]
    data, server = port.sent[0]
    tid = stun.parse(data).transaction_id
    port.protocol.datagramReceived(build_gather_answer(tid, ("1.2.3.4", 1), KEY), ("9.9.9.9", 1))
    port.protocol.datagramReceived(build_gather_answer(tid, ("1.2.3.4", 1), bytes(32)), server)
    assert not d.called
    reactor.advance(GATHER_DEADLINE)
    assert report_of(d).udp is False


def test_checks_asked_together_share_one_run_and_moves_start_one() -> None:
    reactor = FakeReactor()
    netcheck = checker(reactor, alternate=0)
    first, second = netcheck.check(), netcheck.check()
    answer(reactor, {3478: ("198.51.100.1", 5000)})
    assert report_of(first) is report_of(second) is netcheck.last
    assert len(reactor.ports) == 1
    netcheck.moved(("198.51.100.1", 5000), ("198.51.100.2", 6000))
    answer(reactor, {3478: ("198.51.100.2", 6000)})
    assert len(reactor.ports) == 2
    assert netcheck.last is not None and netcheck.last.ipv4 == "198.51.100.2"


def test_gateway_is_not_asked_when_the_rendezvous_is_on_loopback() -> None:
    reactor = FakeReactor()
    mapper = FakeMapper(["pcp"])
    d = checker(reactor, alternate=0, server=("127.0.0.1", 3478), mapper=mapper).check()
    answer(reactor, {3478: ("127.0.0.1", 5000)})
    assert report_of(d).port_mapping == [] and mapper.asked == 0
