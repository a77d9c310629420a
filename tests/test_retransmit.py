"""
Retransmission with exponential backoff, driven by a fake clock.
"""

from __future__ import annotations

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from punchd.retransmit import Backoff, RequestTimedOut, Transactions

TID = b"t" * 12
OTHER = b"o" * 12


def outcome(d: Deferred[object]) -> list[object]:
    """
    What C{d} fired with so far (a value or a Failure), consuming failures so
    that none is reported as unhandled.
    """
    results: list[object] = []

    def record(result: object) -> None:
        results.append(result)

    d.addBoth(record)
    return results


def advance(clock: Clock, amount: float) -> None:
    """
    Move C{clock} on by C{amount}, running each call at its own time (a
    single C{Clock.advance} would run a chain of calls all at the end).
    """
    target = clock.seconds() + amount
    while True:
        due = [c.getTime() for c in clock.getDelayedCalls() if c.getTime() <= target]
        if not due:
            break
        clock.advance(max(0.0, min(due) - clock.seconds()))
    clock.advance(target - clock.seconds())


class Sender:
    """
    Counts sends and when they happened.
    """

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.times: list[float] = []

    def __call__(self) -> None:
        self.times.append(self.clock.seconds())


def test_backoff_doubles_up_to_maximum() -> None:
    assert Backoff().delays() == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert Backoff(initial=0.1, maximum=0.4, attempts=5).delays() == [0.1, 0.2, 0.4, 0.4, 0.4]
    assert Backoff(initial=1.0, maximum=100.0, attempts=3).total() == 7.0
    assert Backoff(attempts=0).delays() == []


def test_sends_at_once_then_on_schedule() -> None:
    clock = Clock()
    transactions: Transactions[str] = Transactions(clock)
    send = Sender(clock)
    backoff = Backoff(initial=0.5, maximum=2.0, attempts=4)
    transactions.start(TID, send, backoff)
    assert send.times == [0.0]
    assert TID in transactions and len(transactions) == 1
    clock.advance(0.49)
    assert send.times == [0.0]
    advance(clock, 3.01)
    assert send.times == [0.0, 0.5, 1.5, 3.5]


def test_answer_fires_and_stops_retransmission() -> None:
    clock = Clock()
    transactions: Transactions[str] = Transactions(clock)
    send = Sender(clock)
    d = transactions.start(TID, send, Backoff())
    results = outcome(d)
    clock.advance(0.5)
    assert transactions.answer(TID, "the answer") is True
    assert results == ["the answer"]
    assert TID not in transactions and len(transactions) == 0
    assert clock.getDelayedCalls() == []
    advance(clock, 60)
    assert send.times == [0.0, 0.5]


def test_second_answer_is_ignored() -> None:
    clock = Clock()
    transactions: Transactions[str] = Transactions(clock)
    results = outcome(transactions.start(TID, Sender(clock), Backoff()))
    assert transactions.answer(TID, "first")
    assert transactions.answer(TID, "second") is False
    assert results == ["first"]


def test_answer_matches_transaction_id() -> None:
    clock = Clock()
    transactions: Transactions[str] = Transactions(clock)
    mine = outcome(transactions.start(TID, Sender(clock), Backoff()))
    other = outcome(transactions.start(OTHER, Sender(clock), Backoff()))
    assert transactions.answer(b"x" * 12, "stray") is False
    assert transactions.answer(OTHER, "for other")
    assert mine == [] and other == ["for other"]
    assert TID in transactions and OTHER not in transactions


def test_times_out_after_the_last_send_and_its_delay() -> None:
    clock = Clock()
    transactions: Transactions[str] = Transactions(clock)
    send = Sender(clock)
    backoff = Backoff(initial=0.5, maximum=4.0, attempts=6)
    results = outcome(transactions.start(TID, send, backoff))
    advance(clock, backoff.total() - 0.001)
    assert results == []
    assert len(send.times) == 6
    advance(clock, 0.001)
    assert len(results) == 1
    failure = results[0]
    assert isinstance(failure, Failure) and failure.check(RequestTimedOut)
    assert "6 sends" in failure.getErrorMessage()
    assert len(transactions) == 0 and clock.getDelayedCalls() == []
    assert transactions.answer(TID, "too late") is False


def test_zero_attempts_fails_at_once_without_sending() -> None:
    clock = Clock()
    transactions: Transactions[str] = Transactions(clock)
    send = Sender(clock)
    results = outcome(transactions.start(TID, send, Backoff(attempts=0)))
    assert send.times == []
    assert isinstance(results[0], Failure) and results[0].check(RequestTimedOut)
    assert TID not in transactions


def test_cancelling_the_deferred_forgets_the_request() -> None:
    clock = Clock()
    transactions: Transactions[str] = Transactions(clock)
    send = Sender(clock)
    d = transactions.start(TID, send, Backoff())
    results = outcome(d)
    d.cancel()
    assert isinstance(results[0], Failure) and results[0].check(CancelledError)
    assert TID not in transactions and clock.getDelayedCalls() == []
    advance(clock, 60)
    assert send.times == [0.0]
    assert transactions.answer(TID, "late") is False


def test_cancel_all() -> None:
    clock = Clock()
    transactions: Transactions[str] = Transactions(clock)
    first = outcome(transactions.start(TID, Sender(clock), Backoff()))
    second = outcome(transactions.start(OTHER, Sender(clock), Backoff()))
    transactions.cancel_all()
    for results in (first, second):
        assert isinstance(results[0], Failure) and results[0].check(CancelledError)
    assert len(transactions) == 0 and clock.getDelayedCalls() == []


def test_resend_sends_now_and_keeps_the_schedule() -> None:
    clock = Clock()
    transactions: Transactions[str] = Transactions(clock)
    send = Sender(clock)
    transactions.start(TID, send, Backoff(initial=0.5, maximum=4.0, attempts=3))
    advance(clock, 0.2)
    transactions.resend(TID)
    transactions.resend(OTHER)  # not in flight: nothing happens
    assert send.times == [0.0, 0.2]
    advance(clock, 0.3)
    assert send.times == [0.0, 0.2, 0.5]
    transactions.answer(TID, "done")
    transactions.resend(TID)
    assert len(send.times) == 3
