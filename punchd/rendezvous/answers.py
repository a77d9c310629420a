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
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._by_agent: dict[str, OrderedDict[bytes, Answer]] = {}

    def __len__(self) -> int:
        return sum(len(recent) for recent in self._by_agent.values())

    def agents(self) -> set[str]:
        return set(self._by_agent)

    def remember(
        self, name: str, transaction_id: bytes, address: tuple[str, int], data: bytes
    ) -> None:
        recent = self._by_agent.setdefault(name, OrderedDict())
        recent[transaction_id] = Answer(self._clock.seconds(), address, data)
        while len(recent) > RECENT_ANSWERS:
            recent.popitem(last=False)

    def lookup(self, name: str, transaction_id: bytes) -> Answer | None:
        recent = self._by_agent.get(name)
        return None if recent is None else recent.get(transaction_id)

    def forget(self, name: str) -> None:
        self._by_agent.pop(name, None)

    def expire(self) -> None:
        oldest = self._clock.seconds() - RECENT_ANSWER_SECONDS
        for name, recent in list(self._by_agent.items()):
            while recent and next(iter(recent.values())).at < oldest:
                recent.popitem(last=False)
            if not recent:
                del self._by_agent[name]
