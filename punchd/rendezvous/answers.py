"""
The answers the rendezvous gave to authenticated requests, kept a little
while so that a retransmitted request gets the very same bytes again
instead of being carried out twice.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

from twisted.internet.interfaces import IReactorTime

RECENT_ANSWERS = 64
RECENT_ANSWER_SECONDS = 30.0


class Answer(NamedTuple):
    at: float
    address: tuple[str, int]
    data: bytes


class RecentAnswers:
    """
    Per agent, its last L{RECENT_ANSWERS} answers of the last
    L{RECENT_ANSWER_SECONDS}, by transaction id.

    All answers are kept in one queue, oldest first, so that expiring them
    touches only those that are due: a sweep that visited every agent cost
    a node of 500,000 agents over half a second of blocked reactor every
    five seconds (docs/scale-out.rst).  Per agent only the transaction ids
    are listed, for the cap and for L{forget}.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._queue: OrderedDict[tuple[str, bytes], Answer] = OrderedDict()
        self._by_agent: dict[str, list[bytes]] = {}

    def __len__(self) -> int:
        return len(self._queue)

    def agents(self) -> set[str]:
        return set(self._by_agent)

    def remember(
        self, name: str, transaction_id: bytes, address: tuple[str, int], data: bytes
    ) -> None:
        key = (name, transaction_id)
        ids = self._by_agent.setdefault(name, [])
        if self._queue.pop(key, None) is not None:
            ids.remove(transaction_id)
        self._queue[key] = Answer(self._clock.seconds(), address, data)
        ids.append(transaction_id)
        if len(ids) > RECENT_ANSWERS:
            del self._queue[(name, ids.pop(0))]

    def lookup(self, name: str, transaction_id: bytes) -> Answer | None:
        return self._queue.get((name, transaction_id))

    def forget(self, name: str) -> None:
        for transaction_id in self._by_agent.pop(name, []):
            del self._queue[(name, transaction_id)]

    def expire(self) -> None:
        oldest = self._clock.seconds() - RECENT_ANSWER_SECONDS
        while self._queue:
            if next(iter(self._queue.values())).at >= oldest:
                return
            (name, transaction_id), _ = self._queue.popitem(last=False)
            ids = self._by_agent[name]
            ids.remove(transaction_id)
            if not ids:
                del self._by_agent[name]
