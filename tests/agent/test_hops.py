"""
The traceroute that sets a primer's TTL (L{punchd.agent.hops}): the parsing
of the kernel's error queue, the choice of the router, and a real trace on
loopback.  The lab's open-input NATs behind ISP routers use it for real.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs

from punchd.agent import hops

TARGET = "203.0.113.50"
#: The port before the first TTL's.
BASE = 30000


def icmp_error(icmp_type: int, offender: str, origin: int = 2) -> list[tuple[int, int, bytes]]:
    """The control data of one error queue read, as Linux writes it."""
    extended = struct.pack("=IBBBBII", errno.EHOSTUNREACH, origin, icmp_type, 0, 0, 0, 0)
    sockaddr = struct.pack("=HH4s8x", socket.AF_INET, 0, socket.inet_aton(offender))
    return [(socket.IPPROTO_IP, hops.IP_RECVERR, extended + sockaddr)]


def test_an_icmp_error_names_its_type_and_offender() -> None:
    assert hops.parse_icmp_error(icmp_error(11, "198.51.100.1")) == (11, "198.51.100.1")
    assert hops.parse_icmp_error(icmp_error(3, TARGET)) == (3, TARGET)


@pytest.mark.parametrize(
    "ancdata",
    [
        [],
        icmp_error(11, "198.51.100.1", origin=1),  # a local error, not ICMP
        [(socket.IPPROTO_IPV6, hops.IP_RECVERR, icmp_error(11, "198.51.100.1")[0][2])],
        [(socket.IPPROTO_IP, hops.IP_RECVERR, b"\x00" * 12)],  # cut short
    ],
)
def test_anything_else_in_the_error_queue_is_no_icmp_error(ancdata: Any) -> None:
    assert hops.parse_icmp_error(ancdata) is None


@pytest.mark.parametrize(
    ("router", "ttl"), [(None, None), (1, None), (2, 2), (3, 3), (4, 3), (12, 11)]
)
def test_a_primer_dies_short_of_the_farthest_router_but_past_our_own_nat(
    router: int | None, ttl: int | None
) -> None:
    assert hops.primer_ttl(router) == ttl


class FakeErrorQueue:
    """
    A socket whose error queue the test fills: C{answers} maps a TTL to the
    ICMP error its datagram drew, C{at} when it arrives (C{at * TTL} when
    C{slower}).
    """

    def __init__(
        self,
        clock: Clock,
        answers: dict[int, tuple[int, str]],
        at: float = 0.0,
        slower: bool = False,
    ) -> None:
        self.clock = clock
        self.answers = answers
        self.at = at
        self.slower = slower
        self.sent: list[tuple[str, int]] = []
        self.ttl = 64
        self.closed = False
        self.refuse_next = True  # an earlier ICMP error fails the first send once

    def setblocking(self, flag: bool) -> None:
        pass

    def setsockopt(self, level: int, option: int, value: int) -> None:
        if option == socket.IP_TTL:
            self.ttl = value

    def sendto(self, data: bytes, address: tuple[str, int]) -> int:
        if self.refuse_next:
            self.refuse_next = False
            raise OSError(errno.ECONNREFUSED, "refused")
        self.sent.append(address)
        return 0

    def recvmsg(self, size: int, ancsize: int, flags: int) -> Any:
        assert flags == socket.MSG_ERRQUEUE
        for address in self.sent:
            ttl = address[1] - BASE
            due = self.at * ttl if self.slower else self.at
            if ttl in self.answers and self.clock.seconds() >= due:
                self.sent.remove(address)
                return b"", icmp_error(*self.answers[ttl]), 0, address
        raise OSError(errno.EAGAIN, "empty")

    def close(self) -> None:
        self.closed = True


def fake_trace(
    answers: dict[int, tuple[int, str]],
    at: float = 0.0,
    slower: bool = False,
) -> tuple[Clock, FakeErrorQueue, list[int | None]]:
    clock = Clock()
    fake = FakeErrorQueue(clock, answers, at, slower)
    results: list[int | None] = []
    hops.trace(clock, TARGET, lambda: fake, lambda: BASE).addCallback(results.append)
    # Every port names its TTL; the one refused send was sent again.
    assert [port for _, port in fake.sent] == [BASE + ttl for ttl in range(1, hops.MAX_TTL + 1)]
    return clock, fake, results


ROUTERS = {1: (11, "192.0.2.1"), 2: (11, "198.51.100.1"), 3: (11, "198.51.100.9")}


def test_the_trace_ends_as_soon_as_every_router_before_the_target_answered() -> None:
    answers = {**ROUTERS, **{ttl: (3, TARGET) for ttl in range(4, hops.MAX_TTL + 1)}}
    clock, fake, results = fake_trace(answers)
    clock.advance(hops.POLL)
    assert results == [3] and fake.closed
    assert clock.getDelayedCalls() == []


def test_without_a_word_from_the_target_the_trace_ends_when_routers_fall_quiet() -> None:
    # The peer's NAT drops what it did not ask for (or spent its ICMP).
    clock, fake, results = fake_trace(dict(ROUTERS), at=0.04)
    clock.pump([hops.POLL] * 4)
    assert results == [] and not fake.closed  # the routers answered at 40 ms
    clock.pump([hops.POLL] * 8)
    assert results == [] and not fake.closed  # not yet 2 x 40 ms + 50 ms
    clock.pump([hops.POLL] * 2)
    assert results == [3] and fake.closed


def test_routers_farther_and_farther_away_are_waited_for_until_the_deadline() -> None:
    routers = {ttl: (11, f"198.51.100.{ttl}") for ttl in range(1, hops.MAX_TTL + 1)}
    clock, fake, results = fake_trace(routers, at=0.04, slower=True)
    clock.pump([hops.POLL] * 49)
    assert results == [] and not fake.closed
    clock.pump([hops.POLL] * 2)
    assert results == [12] and fake.closed  # the 12th answered at 480 ms


def test_a_target_next_to_our_nat_leaves_no_router_for_a_primer() -> None:
    answers = {1: ROUTERS[1], **{ttl: (3, TARGET) for ttl in range(2, hops.MAX_TTL + 1)}}
    clock, fake, results = fake_trace(answers)
    clock.advance(hops.POLL)
    assert results == [1] and fake.closed
    assert hops.primer_ttl(results[0]) is None


def test_silence_from_the_start_ends_the_trace_soon() -> None:
    clock, fake, results = fake_trace({})
    clock.pump([hops.POLL] * 5)
    assert results == [] and not fake.closed
    clock.pump([hops.POLL] * 2)
    assert results == [None] and fake.closed


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest_twisted.ensureDeferred
async def test_a_real_trace_on_loopback_finds_no_router() -> None:
    before = open_fds()
    # 127.0.0.1 answers at TTL 1 itself: there is no router in between.
    assert await hops.trace(reactor, "127.0.0.1") is None
    assert open_fds() == before


@pytest_twisted.ensureDeferred
async def test_a_cancelled_trace_closes_its_socket() -> None:
    before = open_fds()
    tracing = hops.trace(reactor, "127.0.0.1")
    assert open_fds() == before + 1
    tracing.cancel()
    assert open_fds() == before
    with pytest.raises(CancelledError):
        await tracing


def test_an_ipv6_target_is_not_traced() -> None:
    results: list[int | None] = []
    hops.trace(Clock(), "2001:db8::1").addCallback(results.append)
    assert results == [None]


class BrokenQueue(FakeErrorQueue):
    """A socket that fails in the way C{broken} names."""

    def __init__(self, clock: Clock, broken: str) -> None:
        super().__init__(clock, dict(ROUTERS))
        self.broken = broken

    def sendto(self, data: bytes, address: tuple[str, int]) -> int:
        if self.broken == "every send refused":
            raise OSError(errno.ECONNREFUSED, "refused")
        return super().sendto(data, address)

    def recvmsg(self, size: int, ancsize: int, flags: int) -> Any:
        if self.broken == "error queue fails":
            raise OSError(errno.EBADF, "bad")
        if self.broken == "a bug":
            raise RuntimeError("a bug")
        return super().recvmsg(size, ancsize, flags)


@pytest.mark.parametrize("broken", ["every send refused", "error queue fails", "a bug"])
def test_a_trace_that_breaks_finds_nothing_and_closes_its_socket(broken: str) -> None:
    clock = Clock()
    fake = BrokenQueue(clock, broken)
    results: list[int | None] = []
    with capturedLogs() as events:
        hops.trace(clock, TARGET, lambda: fake, lambda: BASE).addCallback(results.append)
        clock.pump([hops.POLL] * 10)
    assert results == [None] and fake.closed
    failures = [e for e in events if "log_failure" in e]
    assert len(failures) == (1 if broken == "a bug" else 0)
    assert clock.getDelayedCalls() == []


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("203.0.113.7", True),
        ("8.8.8.8", True),
        ("10.1.2.3", False),
        ("172.20.0.1", False),
        ("192.168.1.1", False),
        ("100.64.0.1", False),
        ("127.0.0.1", False),
        ("0.0.0.0", False),
        ("169.254.1.1", False),
        ("224.0.0.251", False),
        ("255.255.255.255", False),
        ("2001:db8::1", False),
        ("not an address", False),
    ],
)
def test_only_what_could_be_a_nats_public_address_is_worth_a_trace(
    address: str, public: bool
) -> None:
    assert hops.could_be_public(address) is public


#: /proc/net/route: default via 192.0.2.1, and 192.0.2.0/28 on eth0.
ROUTE_TABLE = (
    "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
    "eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"
    "eth0\t000200C0\t00000000\t0001\t0\t0\t0\tF0FFFFFF\t0\t0\t0\n"
)


def test_a_target_on_one_of_our_networks_is_on_link(tmp_path: Path) -> None:
    routes = tmp_path / "route"
    routes.write_text(ROUTE_TABLE)
    assert hops.on_link("192.0.2.5", routes)
    assert not hops.on_link("192.0.2.17", routes)
    assert not hops.on_link("203.0.113.7", routes)
    assert hops.on_link("203.0.113.7", tmp_path / "missing")  # unknown: no trace


class Starts:
    """The traces a L{hops.Tracer} starts, answered by hand."""

    def __init__(self) -> None:
        self.started: list[tuple[str, Deferred[int | None]]] = []

    def __call__(self, clock: Any, target: str) -> Deferred[int | None]:
        d: Deferred[int | None] = Deferred()
        self.started.append((target, d))
        return d


def make_tracer() -> tuple[Clock, Starts, hops.Tracer]:
    clock, starts = Clock(), Starts()
    tracer = hops.Tracer(clock, starts, on_link=lambda target: target == "203.0.113.99")
    return clock, starts, tracer


def results_of(d: Deferred[int | None]) -> list[int | None]:
    results: list[int | None] = []
    d.addCallback(results.append)
    return results


def test_the_tracer_skips_what_is_not_worth_a_trace() -> None:
    _, starts, tracer = make_tracer()
    assert results_of(tracer("192.168.1.1")) == [None]
    assert results_of(tracer("203.0.113.99")) == [None]  # on our own network
    assert starts.started == []


def test_the_tracer_remembers_a_finding_for_a_while() -> None:
    clock, starts, tracer = make_tracer()
    first = results_of(tracer(TARGET))
    starts.started[0][1].callback(5)
    assert first == [5]
    clock.advance(hops.REMEMBER - 1)
    assert results_of(tracer(TARGET)) == [5] and len(starts.started) == 1
    clock.advance(1)
    tracer(TARGET)
    assert len(starts.started) == 2


def test_the_tracer_runs_a_few_traces_at_once() -> None:
    _, starts, tracer = make_tracer()
    running = [tracer(f"203.0.113.{i}") for i in range(hops.MAX_TRACES)]
    assert results_of(tracer("203.0.113.200")) == [None]  # one too many: no primer
    assert len(starts.started) == hops.MAX_TRACES
    running[0].addErrback(lambda f: None)
    running[0].cancel()  # a cancelled one makes room
    tracer("203.0.113.200")
    assert len(starts.started) == hops.MAX_TRACES + 1
