"""
Connectivity checks: signed Binding requests on each candidate pair.

Every known pair is checked at once (a few dozen tiny datagrams at most),
pairs learned later are paced, and a check from the peer triggers an
immediate check back (ICE's triggered check).  Only an answer from where the
check went counts (as in ICE).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from punchd import stun
from punchd.agent.birthday import HARD_SIDE_BACKOFF, PROBE_BACKOFF, Spray
from punchd.agent.pairs import Address, Pair
from punchd.agent.tunnel_core import (
    CHECK_BACKOFF,
    EXTRA_SOCKETS,
    NOMINATE_BACKOFF,
    PACING,
    TRIGGER_GAP,
    StateData,
    TunnelCore,
    answer_mapped,
)
from punchd.retransmit import Backoff

log = Logger()

Answer = tuple[stun.Message, Address]


def check(core: TunnelCore, pair: Pair, nominate: bool) -> Deferred[Answer]:
    """
    Check C{pair} until it answers or the backoff runs out.
    """
    assert core.signer is not None
    transaction_id = stun.new_transaction_id()
    data = core.signer.check(transaction_id, nominate)
    core.check_targets[transaction_id] = pair
    pair.in_progress = True
    pair.transaction_id = transaction_id
    last_sent = [core.clock.seconds()]

    def send() -> None:
        pair.checks_sent += 1
        last_sent[0] = core.clock.seconds()
        core.io.send(pair.local, data, pair.address)

    def answered(answer: Answer) -> Answer:
        pair.in_progress = False
        pair.answered = True
        # The latest send is the likeliest one answered (Karn's caveat aside).
        pair.rtt = core.clock.seconds() - last_sent[0]
        log.debug(
            "tunnel {id}: {remote} answered after {sends} sends, rtt {rtt:.1f} ms",
            id=core.id_hex[:12],
            remote=pair.remote,
            sends=pair.checks_sent,
            rtt=pair.rtt * 1000,
        )
        answer_mapped(pair, answer[0])
        return answer

    def failed(failure: Failure) -> Failure:
        pair.in_progress = False
        return failure

    backoff = nominate_backoff(pair) if nominate else backoff_for(pair)
    return core.checks.start(transaction_id, send, backoff).addCallbacks(answered, failed)


def backoff_for(pair: Pair) -> Backoff:
    """
    Ordinary checks insist; a birthday probe goes once, and the hard side's
    many sockets only need their mappings opened.
    """
    if pair.guess:
        return PROBE_BACKOFF
    if pair.local >= EXTRA_SOCKETS:
        return HARD_SIDE_BACKOFF
    return CHECK_BACKOFF


def nominate_backoff(pair: Pair) -> Backoff:
    """
    Retransmit the nomination no sooner than the path can answer: an early
    resend on a slow path only earns a second answer that could arrive after
    the hand-off.
    """
    initial = min(1.0, max(NOMINATE_BACKOFF.initial, 2 * (pair.rtt or 0.0)))
    return Backoff(initial, max(NOMINATE_BACKOFF.maximum, initial), NOMINATE_BACKOFF.attempts)


@dataclass
class Checking(StateData):
    """
    The checking state's own: the pacer, the grace period, the hold.
    """

    core: TunnelCore
    succeeded: Callable[[Pair], None]
    pacer: LoopingCall | None = None
    grace: IDelayedCall | None = None
    #: Set while a responder told to wait holds its first checks.
    held: IDelayedCall | None = None
    started: bool = field(default=False)
    #: The easy side's birthday probes, and what sends them.
    spray: Spray | None = None
    sprayer: LoopingCall | None = None

    def start_spray(self, spray: Spray) -> None:
        self.spray = spray
        self.sprayer = LoopingCall(self.probe)
        self.sprayer.clock = self.core.clock
        self.sprayer.start(PACING, now=True)

    def probe(self) -> None:
        assert self.spray is not None and self.sprayer is not None
        for candidate in self.spray.next_batch():
            self.check(self.core.pairs.add(0, candidate, guess=True))
        if self.spray.spent:
            self.sprayer.stop()

    def start(self) -> None:
        """
        Check every known pair at once, then pace those learned later.
        """
        if self.held is not None and self.held.active():
            self.held.cancel()
        self.held = None
        if self.started:
            return
        self.started = True
        while (pair := self.core.pairs.next_unchecked()) is not None:
            self.check(pair)
        self.pacer = LoopingCall(self.pace)
        self.pacer.clock = self.core.clock
        self.pacer.start(PACING, now=False)

    def hold(self, delay: float) -> None:
        self.held = self.timers.later(delay, self.start)

    def pace(self) -> None:
        pair = self.core.pairs.next_unchecked()
        if pair is not None:
            self.check(pair)

    def check(self, pair: Pair) -> None:
        check(self.core, pair, nominate=False).addCallbacks(
            lambda _: self.succeeded(pair), lambda f: None
        )

    def trigger(self, pair: Pair) -> None:
        """
        The peer's check just came through on C{pair}, so the path is open
        now: check back at once instead of waiting for the pacer or for a
        retransmission timer.
        """
        if not self.started or pair.answered:
            return
        now = self.core.clock.seconds()
        if pair.in_progress:
            if pair.transaction_id is not None and now - pair.triggered_at >= TRIGGER_GAP:
                pair.triggered_at = now
                self.core.checks.resend(pair.transaction_id)
            return
        if pair in self.core.pairs.queue:
            self.core.pairs.queue.remove(pair)
        pair.triggered_at = now
        self.check(pair)

    def stop(self) -> None:
        super().stop()
        if self.pacer is not None and self.pacer.running:
            self.pacer.stop()
        if self.sprayer is not None and self.sprayer.running:
            self.sprayer.stop()
        self.core.pairs.queue.clear()
        self.core.checks.cancel_all()
