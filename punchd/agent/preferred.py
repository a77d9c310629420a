"""
Back to the first rendezvous: an agent that failed over to another node of
its service (C{rendezvous} as a list) asks the first one now and then
whether it answers again, and moves back when it does, so that a service's
agents gather on the node listed first once it has recovered, instead of
staying wherever the last outage sent them.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

__all__ = ["PreferredCheck"]

log = Logger()


class PreferredCheck:
    """
    From L{start} (the agent registered elsewhere), every C{interval}
    seconds (less up to a fifth, at random, so that the agents of one
    outage do not return in lockstep), C{probe()} the first rendezvous for
    as long as C{away()} says we are elsewhere; when it answers, C{back()}.
    """

    def __init__(
        self,
        clock: IReactorTime,
        interval: float,
        away: Callable[[], bool],
        probe: Callable[[], Deferred[bool]],
        back: Callable[[], None],
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self._clock = clock
        self._interval = interval
        self._away = away
        self._probe = probe
        self._back = back
        self._jitter = jitter
        self._timer: IDelayedCall | None = None
        self._probing: Deferred[bool] | None = None

    def start(self) -> None:
        if self._timer is None and self._probing is None:
            delay = self._interval * (1.0 - 0.2 * self._jitter())
            self._timer = self._clock.callLater(delay, self._due)

    def stop(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()
        probing, self._probing = self._probing, None
        if probing is not None:
            probing.cancel()

    def _due(self) -> None:
        self._timer = None
        if not self._away():
            return
        probing = self._probing = self._probe()

        def answered(works: bool) -> None:
            if self._probing is not probing:
                return  # stopped meanwhile
            self._probing = None
            if not self._away():
                return
            if works:
                log.info("the first rendezvous answers again: moving back to it")
                self._back()
            else:
                self.start()

        probing.addCallbacks(answered, lambda failure: answered(False))
