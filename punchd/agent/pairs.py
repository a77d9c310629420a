"""
Candidate pairs: which local socket may reach which remote address, and what
each pair has shown so far.

A pair is (local socket, remote address, kind of the remote candidate).
Ranking and nomination look only at a pair's priority, never at its kind, so a
new kind of candidate (port-mapped, relayed) is one more entry in
L{punchd.wire.CandidateKind} and a gatherer that produces it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from punchd.wire import Candidate, CandidateKind, normalize_address

Address = tuple[str, int]
#: A pair's identity: the local socket's index and the remote address.
PairKey = tuple[int, Address]

#: A peer behind NATs shows up from a few addresses, not dozens: a replayed
#: check from everywhere must not make us check (and answer) everywhere.
MAX_PEER_REFLEXIVE = 8


@dataclass
class Pair:
    """
    One local socket and one remote candidate, and what was heard on it.
    """

    local: int
    remote: Candidate
    checks_sent: int = 0
    answered: bool = False
    heard: bool = False
    rtt: float | None = None
    #: Our own address as the peer saw it (from its answer).
    mapped: Address | None = None
    in_progress: bool = False
    transaction_id: bytes | None = None
    triggered_at: float = float("-inf")
    #: A birthday probe's guess at a port, not a candidate the peer gave.
    guess: bool = False

    @property
    def key(self) -> PairKey:
        return (self.local, self.remote.address)

    @property
    def address(self) -> Address:
        return self.remote.address

    @property
    def priority(self) -> int:
        """
        Direct LAN over reflexive over relayed; within a type, IPv6 first
        (no NAT in its way, as RFC 8421 prefers for ICE).
        """
        return self.remote.kind.preference * 2 + (":" in self.remote.host)

    def describe(self) -> str:
        heard = "answered" if self.answered else ("heard from" if self.heard else "silent")
        return f"{self.remote}: {self.checks_sent} checks, {heard}"


class Pairs:
    """
    The pairs of one tunnel, in check order (best first).
    """

    def __init__(self) -> None:
        self._pairs: dict[PairKey, Pair] = {}
        #: Pairs not checked yet, best first.
        self.queue: list[Pair] = []

    def __iter__(self) -> Iterator[Pair]:
        return iter(self._pairs.values())

    def __len__(self) -> int:
        return len(self._pairs)

    def get(self, local: int, remote: Address) -> Pair | None:
        return self._pairs.get((local, remote))

    def add(self, local: int, candidate: Candidate, *, guess: bool = False) -> Pair:
        """
        The pair of C{local} and C{candidate}, new or known; a peer-reflexive
        pair that the peer later signals takes the signalled kind.  A guess
        (birthday probing) is checked by its prober, not queued.
        """
        candidate = Candidate(candidate.kind, *normalize_address(candidate.address))
        pair = self._pairs.get((local, candidate.address))
        if pair is None:
            pair = Pair(local, candidate, guess=guess)
            self._pairs[pair.key] = pair
            if not guess:
                self.queue.append(pair)
                self.queue.sort(key=lambda p: -p.priority)
        elif pair.remote.kind == CandidateKind.PRFLX and candidate.kind != CandidateKind.PRFLX:
            pair.remote = candidate
        return pair

    def learn(self, local: int, source: Address) -> Pair | None:
        """
        The pair a check from C{source} arrived on, learning it as
        peer-reflexive if it is new (at most L{MAX_PEER_REFLEXIVE}).
        """
        pair = self._pairs.get((local, source))
        if pair is not None:
            return pair
        learned = sum(p.remote.kind == CandidateKind.PRFLX and not p.guess for p in self)
        if learned >= MAX_PEER_REFLEXIVE:
            return None
        return self.add(local, Candidate(CandidateKind.PRFLX, *source))

    def next_unchecked(self) -> Pair | None:
        while self.queue:
            pair = self.queue.pop(0)
            if not (pair.in_progress or pair.answered):
                return pair
        return None

    def best_possible(self) -> int:
        """
        The best priority a pair still unanswered could bring.
        """
        return max((p.priority for p in self if not p.answered), default=-1)

    def best_answered(self) -> Pair:
        return max((p for p in self if p.answered), key=lambda p: p.priority)

    def anything_heard(self) -> bool:
        return any(p.heard or p.answered for p in self)

    def rtts(self) -> list[float]:
        return [p.rtt for p in self if p.rtt is not None]

    def explain(self, peer: str) -> str:
        """
        Why no path was found: what was tried and what was heard.
        """
        if not self._pairs:
            return "the peer offered no candidates"
        if any(p.answered for p in self):
            why = "a path answered but the nomination was lost"
        elif any(p.heard for p in self):
            why = (
                "the peer's checks reached us but our checks never reached it (its NAT filters us)"
            )
        else:
            why = (
                "no check got through either way "
                "(both NATs filter, or a symmetric NAT hides the port)"
            )
        tried = "; ".join(p.describe() for p in self if not p.guess)
        guesses = sum(p.guess for p in self)
        if guesses:
            tried += f"; {guesses} birthday probes to random ports, none answered"
        return f"no direct path to {peer}: {why}; tried {tried}"
