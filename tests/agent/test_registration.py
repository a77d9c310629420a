"""
The registration machine, driven by a fake clock and hand-fired attempts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.logger import LogEvent, capturedLogs, formatEvent

from punchd.agent.registration import (
    Registered,
    Registration,
    RegistrationCore,
    backoff_delay,
    build_registration_machine,
)
from punchd.retransmit import RequestTimedOut

KEEPALIVE = 25.0
MAPPED = ("198.51.100.7", 40000)
OTHER_MAPPED = ("198.51.100.7", 41234)
JITTER = 0.5  # every delay shortened by a tenth


class Rig:
    """
    A registration machine whose attempts are Deferreds the test fires.
    """

    def __init__(self, jitter: Callable[[], float] = lambda: JITTER) -> None:
        self.clock = Clock()
        self.attempts: list[Deferred[Registered]] = []
        self.cancelled: list[Deferred[Registered]] = []
        self.core = RegistrationCore(
            clock=self.clock,
            attempt=self._attempt,
            keepalive=KEEPALIVE,
            server=lambda: "203.0.113.1:3478",
            jitter=jitter,
        )
        self.machine: Registration = build_registration_machine(self.core)

    def _attempt(self) -> Deferred[Registered]:
        d: Deferred[Registered] = Deferred(self.cancelled.append)
        self.attempts.append(d)
        return d

    @property
    def last(self) -> Deferred[Registered]:
        return self.attempts[-1]

    def succeed(self, mapped: tuple[str, int] = MAPPED, lifetime: int = 80) -> None:
        self.last.callback((mapped, lifetime))

    def fail(self, reason: str = "no answer after 5 sends") -> None:
        self.last.errback(RequestTimedOut(reason))

    def timer_delay(self) -> float:
        """
        When the one pending timer fires, from now.
        """
        (call,) = self.clock.getDelayedCalls()
        return call.getTime() - self.clock.seconds()

    def into(self, state: str) -> None:
        """
        Drive the machine from scratch into C{state}.
        """
        if state == "stopped":
            return
        self.machine.start()
        if state == "registering":
            return
        self.succeed()
        if state == "registered":
            return
        if state == "refreshing":
            self.clock.advance(KEEPALIVE)
            return
        assert state == "retrying"
        self.clock.advance(KEEPALIVE)
        self.fail()


@pytest.fixture
def logs() -> Iterator[list[LogEvent]]:
    with capturedLogs() as events:
        yield events  # type: ignore[misc]


def messages(events: list[LogEvent]) -> list[str]:
    return [formatEvent(e) for e in events if e.get("log_namespace", "").endswith("registration")]


def test_starts_stopped_and_start_sends_an_attempt() -> None:
    rig = Rig()
    assert rig.machine.describe() == "stopped"
    assert rig.attempts == []
    rig.machine.start()
    assert len(rig.attempts) == 1
    assert rig.machine.describe() == "registering"
    assert rig.clock.getDelayedCalls() == []


def test_success_registers_and_schedules_keepalive(logs: list[LogEvent]) -> None:
    rig = Rig()
    rig.clock.advance(3)
    rig.machine.start()
    rig.succeed(MAPPED, 80)
    assert rig.machine.describe() == "registered"
    assert rig.core.mapped == MAPPED
    assert rig.core.lifetime == 80
    assert rig.core.registered_at == 3
    assert rig.timer_delay() == KEEPALIVE
    assert any("registered with rendezvous 203.0.113.1:3478" in m for m in messages(logs))


def test_keepalive_refreshes() -> None:
    rig = Rig()
    rig.into("registered")
    rig.clock.advance(KEEPALIVE - 0.01)
    assert len(rig.attempts) == 1
    rig.clock.advance(0.01)
    assert len(rig.attempts) == 2
    assert rig.machine.describe() == "registered"  # refreshing still counts as registered
    assert rig.clock.getDelayedCalls() == []
    rig.clock.advance(5)
    rig.succeed()
    assert rig.core.registered_at == KEEPALIVE + 5
    assert rig.timer_delay() == KEEPALIVE


def test_refresh_failure_retries_with_jittered_backoff(logs: list[LogEvent]) -> None:
    rig = Rig()
    rig.into("refreshing")
    rig.fail("no answer after 5 sends")
    assert rig.machine.describe() == "retrying"
    assert rig.core.failures == 1
    assert rig.core.last_error == "no answer after 5 sends"
    assert rig.timer_delay() == pytest.approx(0.9)
    warnings = [m for m in messages(logs) if "did not accept us" in m]
    assert warnings == [
        "rendezvous 203.0.113.1:3478 did not accept us (no answer after 5 sends); retrying"
    ]
    rig.clock.advance(0.89)
    assert len(rig.attempts) == 2
    rig.clock.advance(0.01)
    assert len(rig.attempts) == 3
    assert rig.machine.describe() == "registering"


def test_backoff_grows_and_is_capped_at_30_seconds() -> None:
    rig = Rig()
    rig.machine.start()
    delays = []
    for _ in range(8):
        rig.fail()
        delays.append(rig.timer_delay())
        rig.clock.advance(delays[-1])
    expected = [1, 2, 4, 8, 16, 30, 30, 30]
    assert delays == pytest.approx([0.9 * d for d in expected])
    assert len(rig.attempts) == 9
    assert rig.core.failures == 8


@pytest.mark.parametrize("jitter", [0.0, 0.25, 0.999])
def test_backoff_delay_jitter_shortens_by_at_most_a_fifth(jitter: float) -> None:
    for attempt, base in [(0, 1), (1, 1), (2, 2), (5, 16), (6, 30), (40, 30)]:
        delay = backoff_delay(attempt, lambda: jitter)
        assert delay == pytest.approx(base * (1 - 0.2 * jitter))
        assert 0.8 * base < delay <= base


def test_jitter_differs_between_agents() -> None:
    delays = {backoff_delay(3) for _ in range(20)}
    assert len(delays) > 1
    assert all(3.2 <= d <= 4.0 for d in delays)


def test_retry_succeeds(logs: list[LogEvent]) -> None:
    rig = Rig()
    rig.machine.start()
    rig.fail("401 Unauthorized")
    rig.clock.advance(rig.timer_delay())
    rig.fail("401 Unauthorized")
    assert "registration attempt 2 failed (401 Unauthorized); next in 1.8 s" in messages(logs)
    rig.clock.advance(rig.timer_delay())
    rig.succeed()
    assert rig.machine.describe() == "registered"
    assert rig.core.failures == 0
    assert rig.core.last_error is None
    assert rig.timer_delay() == KEEPALIVE
    registered = [m for m in messages(logs) if m.startswith("registered with")]
    assert len(registered) == 1


def test_a_synchronous_failure_is_handled() -> None:
    rig = Rig()
    rig.core.attempt = lambda: fail(RequestTimedOut("resolver says no"))
    rig.machine.start()
    assert rig.machine.describe() == "retrying"
    assert rig.core.last_error == "resolver says no"


@pytest.mark.parametrize("state", ["registering", "registered", "refreshing", "retrying"])
def test_stop_from_every_state_cancels_everything(state: str) -> None:
    rig = Rig()
    rig.into(state)
    inflight = rig.core.inflight
    rig.machine.stop()
    assert rig.machine.describe() == "stopped"
    assert rig.clock.getDelayedCalls() == []
    assert rig.core.inflight is None
    if inflight is not None:
        assert rig.cancelled == [inflight]
    else:
        assert rig.cancelled == []
    attempts = len(rig.attempts)
    rig.clock.advance(1000)
    assert len(rig.attempts) == attempts
    assert rig.machine.describe() == "stopped"


def test_stop_when_stopped_and_restart() -> None:
    rig = Rig()
    rig.machine.stop()
    assert rig.machine.describe() == "stopped"
    rig.into("registered")
    rig.machine.stop()
    rig.machine.start()
    assert rig.machine.describe() == "registering"
    assert len(rig.attempts) == 2


def test_late_answer_after_stop_is_ignored() -> None:
    rig = Rig()
    rig.machine.start()
    stale = rig.last
    rig.machine.stop()
    assert stale.called  # cancelled: its CancelledError must not count as a failure
    assert rig.core.failures == 0
    assert rig.machine.describe() == "stopped"
    assert rig.core.last_error is None
    assert rig.clock.getDelayedCalls() == []


def test_start_while_running_sends_nothing_more() -> None:
    rig = Rig()
    rig.into("registered")
    rig.machine.start()
    assert len(rig.attempts) == 1
    assert rig.machine.describe() == "registered"


def test_reregister_now_when_registered_refreshes_at_once() -> None:
    rig = Rig()
    rig.into("registered")
    rig.machine.reregisterNow()
    assert len(rig.attempts) == 2
    assert rig.clock.getDelayedCalls() == []  # the keepalive timer is gone
    rig.succeed()
    assert rig.timer_delay() == KEEPALIVE


def test_reregister_now_when_retrying_skips_the_wait() -> None:
    rig = Rig()
    rig.into("retrying")
    attempts = len(rig.attempts)
    rig.machine.reregisterNow()
    assert len(rig.attempts) == attempts + 1
    assert rig.machine.describe() == "registering"
    assert rig.clock.getDelayedCalls() == []


@pytest.mark.parametrize("state", ["stopped", "registering", "refreshing"])
def test_reregister_now_is_ignored_when_stopped_or_in_flight(state: str) -> None:
    rig = Rig()
    rig.into(state)
    attempts = len(rig.attempts)
    rig.machine.reregisterNow()
    assert len(rig.attempts) == attempts


def test_mapped_address_change_is_logged(logs: list[LogEvent]) -> None:
    rig = Rig()
    rig.into("registered")
    rig.clock.advance(KEEPALIVE)
    rig.succeed(MAPPED)
    assert not [m for m in messages(logs) if "changed" in m]
    rig.clock.advance(KEEPALIVE)
    rig.succeed(OTHER_MAPPED)
    assert rig.core.mapped == OTHER_MAPPED
    changed = [e for e in logs if "changed" in formatEvent(e)]
    assert len(changed) == 1
    assert changed[0]["old"] == "198.51.100.7:40000"
    assert changed[0]["new"] == "198.51.100.7:41234"


@pytest.mark.parametrize(
    ("state", "name"),
    [
        ("stopped", "stopped"),
        ("registering", "registering"),
        ("registered", "registered"),
        ("refreshing", "registered"),
        ("retrying", "retrying"),
    ],
)
def test_describe(state: str, name: str) -> None:
    rig = Rig()
    rig.into(state)
    assert rig.machine.describe() == name
