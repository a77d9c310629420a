"""
Request retransmission with exponential backoff, matched by transaction id.

UDP loses datagrams; every punchd request is sent again until its answer
comes or its budget runs out.  The clock is injected so tests drive time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime

T = TypeVar("T")


class RequestTimedOut(Exception):
    """
    No answer came after every retransmission.
    """


@dataclass(frozen=True)
class Backoff:
    """
    When to send again: C{initial}, doubling up to C{maximum}, C{attempts}
    sends in all; the request fails C{maximum} after the last one.
    """

    initial: float = 0.5
    maximum: float = 4.0
    attempts: int = 6

    def delays(self) -> list[float]:
        delays, rto = [], self.initial
        for _ in range(self.attempts):
            delays.append(rto)
            rto = min(rto * 2, self.maximum)
        return delays

    def total(self) -> float:
        return sum(self.delays())


class Pending(Generic[T]):
    """
    One request in flight: sends it, sends it again, fires its Deferred.
    """

    def __init__(
        self,
        clock: IReactorTime,
        send: Callable[[], None],
        backoff: Backoff,
        done: Callable[[Pending[T]], None],
    ) -> None:
        self._clock = clock
        self._send = send
        self._delays = backoff.delays()
        self._done = done
        self._timer: IDelayedCall | None = None
        self.sent = 0
        self.deferred: Deferred[T] = Deferred(lambda d: self._finish())
        self._transmit()

    def _transmit(self) -> None:
        if self.sent >= len(self._delays):
            self._finish()
            self.deferred.errback(RequestTimedOut(f"no answer after {self.sent} sends"))
            return
        delay = self._delays[self.sent]
        self.sent += 1
        # Schedule first: a send that raises must not end the retransmissions.
        self._timer = self._clock.callLater(delay, self._transmit)
        self._send()

    def _finish(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._done(self)

    def resend(self) -> None:
        """
        Send again now, out of schedule; the backoff timer runs on.
        """
        self._send()

    def answer(self, value: T) -> None:
        self._finish()
        self.deferred.callback(value)

    def fail(self, reason: Exception) -> None:
        self._finish()
        self.deferred.errback(reason)


class Transactions(Generic[T]):
    """
    Requests in flight, by transaction id.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._pending: dict[bytes, Pending[T]] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def __contains__(self, transaction_id: object) -> bool:
        return transaction_id in self._pending

    def start(
        self, transaction_id: bytes, send: Callable[[], None], backoff: Backoff
    ) -> Deferred[T]:
        """
        Send now and again until L{answer} is called with this id.
        """

        def done(finished: Pending[T]) -> None:
            if self._pending.get(transaction_id) is finished:
                del self._pending[transaction_id]

        pending: Pending[T] = Pending(self._clock, send, backoff, done)
        if not pending.deferred.called:
            self._pending[transaction_id] = pending
        return pending.deferred

    def answer(self, transaction_id: bytes, value: T) -> bool:
        """
        Fire the request with this id; False when none is in flight.
        """
        pending = self._pending.get(transaction_id)
        if pending is None:
            return False
        pending.answer(value)
        return True

    def resend(self, transaction_id: bytes) -> None:
        """
        Send the request with this id again now, if it is still in flight.
        """
        pending = self._pending.get(transaction_id)
        if pending is not None:
            pending.resend()

    def cancel_all(self) -> None:
        for pending in list(self._pending.values()):
            pending.fail(CancelledError())
        self._pending.clear()
