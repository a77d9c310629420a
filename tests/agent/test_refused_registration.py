"""
The registration machine when the rendezvous refuses our credentials.
"""

from __future__ import annotations

import pytest
from twisted.logger import LogEvent, capturedLogs, formatEvent

from punchd.agent.rendezvous_client import Refused
from tests.agent.test_registration import KEEPALIVE, Rig

WHY = "the rendezvous refused our credentials: because"


def refuse(rig: Rig) -> None:
    rig.last.errback(Refused(WHY))


def lines(events: list[LogEvent]) -> list[str]:
    return [formatEvent(e) for e in events if "registration" in e.get("log_namespace", "")]


def test_a_refusal_is_a_state_with_its_reason_and_is_retried() -> None:
    rig = Rig()
    with capturedLogs() as events:
        rig.machine.start()
        refuse(rig)
        assert rig.machine.describe() == "refused"
        assert rig.core.last_error == WHY
        assert rig.timer_delay() == pytest.approx(0.9)
        rig.clock.advance(0.9)
        assert len(rig.attempts) == 2
        assert rig.machine.describe() == "refused"  # still, while the retry is out
        refuse(rig)
        assert rig.machine.describe() == "refused"
        assert rig.timer_delay() == pytest.approx(1.8)
    said = lines(events)  # type: ignore[arg-type]
    assert said[0] == f"{WHY}; retrying in 0.9 s"
    assert said[1:] == ["registration attempt 2 refused; next in 1.8 s"]
    assert rig.core.outcomes == {"refused": 2}


def test_a_fixed_configuration_registers_on_the_next_retry() -> None:
    rig = Rig()
    rig.machine.start()
    refuse(rig)
    rig.clock.advance(rig.timer_delay())
    rig.succeed()
    assert rig.machine.describe() == "registered"
    assert rig.core.last_error is None
    assert rig.core.failures == 0
    assert rig.core.outcomes == {"refused": 1, "registered": 1}


def test_a_refused_refresh_leaves_the_registered_state() -> None:
    rig = Rig()
    rig.into("registered")
    rig.clock.advance(KEEPALIVE)
    refuse(rig)
    assert rig.machine.describe() == "refused"
    assert rig.core.outcomes == {"registered": 1, "refused": 1}


def test_silence_after_a_refusal_is_a_plain_retry() -> None:
    rig = Rig()
    rig.machine.start()
    refuse(rig)
    rig.clock.advance(rig.timer_delay())
    rig.fail("no answer after 7 sends")
    assert rig.machine.describe() == "retrying"
    assert rig.core.last_error == "no answer after 7 sends"


def test_reregister_now_retries_at_once_when_refused() -> None:
    rig = Rig()
    rig.machine.start()
    refuse(rig)
    rig.machine.reregisterNow()
    assert len(rig.attempts) == 2
    assert rig.clock.getDelayedCalls() == []
    rig.machine.reregisterNow()  # one attempt at a time
    assert len(rig.attempts) == 2


@pytest.mark.parametrize("in_flight", [False, True])
def test_stop_when_refused(in_flight: bool) -> None:
    rig = Rig()
    rig.machine.start()
    refuse(rig)
    if in_flight:
        rig.clock.advance(rig.timer_delay())
    rig.machine.stop()
    assert rig.machine.describe() == "stopped"
    assert rig.clock.getDelayedCalls() == []
    assert rig.core.inflight is None
