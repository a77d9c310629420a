"""
Introductions in flight: a Connect from an initiator waiting for its
target's answer to the Incoming the rendezvous forwarded.

L{Introductions} owns everything an introduction needs while it is pending
(its Incoming id, the Connect it answers, how many each agent has open, and
the Incoming's retransmission), the way magic-wormhole's transit relay keeps
C{PendingRequests} beside C{ActiveConnections}: the protocol asks it to
L{begin <Introductions.begin>} one, routes the target's L{answer
<Introductions.answer>} to it, and it L{finishes <Introductions.finish>}
when the answer comes or the retransmissions run out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from punchd import stun
from punchd.retransmit import Backoff, Transactions

#: How the rendezvous sends an Incoming again while its target stays silent:
#: 8.75 s in all, within an agent's default 10 s connect.  A target whose NAT
#: lost its mapping answers once its next registration (or keepalive) has
#: opened a new one, and the Incoming goes again at that moment.
INCOMING_BACKOFF = Backoff(initial=0.25, maximum=1.0, attempts=10)


@dataclass(eq=False)
class Introduction:
    """
    One Connect waiting for its target's answer.
    """

    initiator: str
    initiator_address: tuple[str, int]
    connect_id: bytes
    target: str
    key: bytes = field(repr=False)
    started: float = 0.0
    incoming_id: bytes = field(default_factory=stun.new_transaction_id)
    tunnel_id: bytes = b""
    #: The relay ports allocated with it: (initiator's, target's).
    relay_ports: tuple[int, int] | None = None
    #: Why the initiator asked for a relay and got none, in words.
    relay_refused: str | None = None


class Introductions:
    """
    The pending introductions, by Incoming id, by Connect, and by agent.

    At most C{max_pending} per agent (as initiator or target together), so
    that one busy or hostile agent cannot hold the server's memory.
    """

    def __init__(
        self, clock: IReactorTime, max_pending: int, backoff: Backoff = INCOMING_BACKOFF
    ) -> None:
        self._clock = clock
        self._max_pending = max_pending
        self._backoff = backoff
        self._by_incoming: dict[bytes, Introduction] = {}
        self._by_connect: dict[tuple[str, bytes], Introduction] = {}
        self._by_agent: dict[str, set[Introduction]] = {}
        self._outgoing: Transactions[stun.Message] = Transactions(clock)

    def __len__(self) -> int:
        return len(self._by_incoming)

    def pending_for(self, name: str) -> int:
        return len(self._by_agent.get(name, ()))

    def in_progress(self, initiator: str, connect_id: bytes) -> bool:
        """
        Whether this Connect is already being introduced (a retransmission).
        """
        return (initiator, connect_id) in self._by_connect

    def has_room(self, *agents: str) -> bool:
        return all(self.pending_for(agent) < self._max_pending for agent in agents)

    def waiting_for(self, target: str) -> Iterator[Introduction]:
        return (i for i in list(self._by_agent.get(target, ())) if i.target == target)

    def begin(self, introduction: Introduction, send: Callable[[], None]) -> Deferred[stun.Message]:
        """
        Hold C{introduction} and send its Incoming with C{send}, again and
        again, until L{answer} fires the result with the target's answer (or
        the retransmissions run out: L{RequestTimedOut}).  The introduction
        is finished before the result fires.
        """
        introduction.started = self._clock.seconds()
        self._by_incoming[introduction.incoming_id] = introduction
        self._by_connect[(introduction.initiator, introduction.connect_id)] = introduction
        for agent in (introduction.initiator, introduction.target):
            self._by_agent.setdefault(agent, set()).add(introduction)
        d = self._outgoing.start(introduction.incoming_id, send, self._backoff)

        def finished(result: object) -> object:
            self.finish(introduction)
            return result

        return d.addBoth(finished)

    def get(self, incoming_id: bytes) -> Introduction | None:
        return self._by_incoming.get(incoming_id)

    def answer(self, incoming_id: bytes, message: stun.Message) -> None:
        """
        The target answered (its integrity already checked by the caller).
        """
        self._outgoing.answer(incoming_id, message)

    def resend(self, introduction: Introduction) -> None:
        """
        Send its Incoming again now, out of schedule.
        """
        self._outgoing.resend(introduction.incoming_id)

    def finish(self, introduction: Introduction) -> None:
        """
        Forget C{introduction} everywhere (idempotent).
        """
        self._by_incoming.pop(introduction.incoming_id, None)
        self._by_connect.pop((introduction.initiator, introduction.connect_id), None)
        for agent in (introduction.initiator, introduction.target):
            mine = self._by_agent.get(agent)
            if mine is not None:
                mine.discard(introduction)
                if not mine:
                    del self._by_agent[agent]

    def cancel_all(self) -> None:
        self._outgoing.cancel_all()
