"""
The machine that moves the agent between UDP and TLS, driven by a Clock.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from punchd.agent.fallback import PathCore, RendezvousPath, build_path_machine


class FakeStream:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


class World:
    def __init__(self) -> None:
        self.clock = Clock()
        self.connects: list[Deferred[Any]] = []
        self.probes: list[Deferred[bool]] = []
        self.using: list[Any] = []
        self.changes = 0
        self.seen: list[str] = []
        self.core = PathCore(
            clock=self.clock,
            connect=self._connect,
            probe_udp=self._probe,
            use=self.using.append,
            changed=self._changed,
            recheck=20.0,
            where=lambda: "rdv.test:443",
        )
        self.path: RendezvousPath = build_path_machine(self.core)

    def _connect(self) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.connects.append(d)
        return d

    def _probe(self) -> Deferred[bool]:
        d: Deferred[bool] = Deferred()
        self.probes.append(d)
        return d

    def _changed(self) -> None:
        # The agent registers again at once, asking which way to go.
        self.changes += 1
        self.seen.append(self.path.describe())

    def on_tls(self) -> FakeStream:
        self.path.udpWentSilent()
        stream = FakeStream()
        self.connects[-1].callback(stream)
        self.clock.advance(0)
        self.clock.advance(0)
        return stream


def test_udp_until_it_goes_silent() -> None:
    world = World()
    assert world.path.describe() == "udp"
    world.clock.advance(3600)
    assert world.connects == [] and world.probes == []
    world.path.udpWentSilent()
    assert world.path.describe() == "connecting" and len(world.connects) == 1


def test_a_checked_connection_carries_the_requests() -> None:
    world = World()
    waiting = world.core.settled()
    stream = world.on_tls()
    assert world.path.describe() == "tls"
    assert world.using == [stream] and world.changes == 1 and world.seen == ["tls"]
    assert waiting.called and world.core.last_error is None


def test_a_refused_connection_says_why_and_stays_on_udp() -> None:
    world = World()
    world.path.udpWentSilent()
    waiting = world.core.settled()
    world.connects[0].errback(ValueError("its certificate was refused"))
    world.clock.advance(0)
    world.clock.advance(0)
    assert world.path.describe() == "udp"
    assert world.core.last_error == "its certificate was refused"
    assert world.core.tls_failures == 1 and waiting.called
    assert world.using == [] and world.changes == 0
    # Silent again: tries TLS again.
    world.path.udpWentSilent()
    assert len(world.connects) == 2


def test_udp_is_rechecked_every_period_and_taken_back_when_it_answers() -> None:
    world = World()
    stream = world.on_tls()
    world.clock.advance(19.9)
    assert world.probes == []
    world.clock.advance(0.1)
    assert len(world.probes) == 1
    world.probes[0].callback(False)
    assert world.path.describe() == "tls" and not stream.closed
    world.clock.advance(20)
    assert len(world.probes) == 2
    world.probes[1].callback(True)
    world.clock.advance(0)
    assert world.path.describe() == "udp"
    assert stream.closed and world.using == [stream, None] and world.changes == 2
    world.clock.advance(3600)
    assert len(world.probes) == 2


def test_a_probe_that_fails_counts_as_silence() -> None:
    world = World()
    world.on_tls()
    world.clock.advance(20)
    world.probes[0].errback(OSError("no socket"))
    assert world.path.describe() == "tls"
    world.clock.advance(20)
    assert len(world.probes) == 2


def test_a_lost_connection_goes_back_to_udp_and_registers_again() -> None:
    world = World()
    stream = world.on_tls()
    world.path.tlsFailed("the TLS connection to rdv.test:443 was lost")
    world.clock.advance(0)
    assert world.path.describe() == "udp" and stream.closed and world.seen == ["tls", "udp"]
    assert world.using == [stream, None] and world.changes == 2
    assert world.core.last_error == "the TLS connection to rdv.test:443 was lost"
    world.clock.advance(3600)
    assert world.probes == [], "no recheck timer left behind"


def test_stop_closes_everything_and_ignores_what_comes_late() -> None:
    world = World()
    world.path.udpWentSilent()
    world.path.stop()
    assert world.path.describe() == "stopped"
    assert world.connects[0].called  # cancelled
    late = FakeStream()
    world.path.tlsIsUp(late)  # type: ignore[arg-type]
    assert late.closed and world.using == [None]

    world = World()
    stream = world.on_tls()
    world.path.stop()
    world.clock.advance(0)
    assert stream.closed and world.clock.getDelayedCalls() == []
    world.path.udpWentSilent()
    assert world.path.describe() == "stopped"


def test_settled_fires_when_the_connection_fails() -> None:
    world = World()
    d = world.core.settled()
    world.path.udpWentSilent()
    world.connects[0].errback(ValueError("refused"))
    world.clock.advance(0)
    world.clock.advance(0)
    assert d.called


def test_a_connection_that_fails_at_once_fails_after_the_transition() -> None:
    world = World()
    failing: Deferred[Any] = Deferred()
    failing.errback(ValueError("cannot use rendezvous_ca: no such file"))
    world.core.connect = lambda: failing
    world.path.udpWentSilent()
    assert world.path.describe() == "connecting"
    world.clock.advance(0)
    assert world.path.describe() == "udp"
    assert world.core.last_error == "cannot use rendezvous_ca: no such file"
