"""
Birthday probing: a direct path between a NAT whose mapping varies by
destination (hard) and one that keeps a mapping per socket (easy).

The hard side cannot tell the easy side which port its NAT will use, so it
opens many sockets and sends from each towards the easy side's public
address: each gets a mapping on a random port of the hard side's public
address, open to the easy side.  The easy side probes random ports of that
address at a paced rate; with n sockets among P ports, k probes find one
with chance 1 - (1 - n/P)^k (256 sockets: about 170 probes for 50%, 1,000
for 98%).  The first probe to arrive is a connectivity check like any
other: it is answered, the pair nominated, and every other socket closed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from punchd.retransmit import Backoff
from punchd.wire import Candidate, CandidateKind

#: The ports a NAT may pick for a mapping.
PORTS = range(1024, 65536)
#: The hard side's checks only open its mappings: sent twice, not insisted on.
HARD_SIDE_BACKOFF = Backoff(initial=1.0, maximum=1.0, attempts=2)
#: A probe goes once; its answer, if any, comes within a second.
PROBE_BACKOFF = Backoff(initial=1.0, maximum=1.0, attempts=1)
#: Birthday sockets all tunnels of one agent may hold at once.
MAX_AGENT_SOCKETS = 512
#: Birthday sprays one agent runs at once: a peer that claims a hard NAT
#: must not turn this agent into a source of probes without bound.
MAX_AGENT_SPRAYS = 2
#: How long after the spray should have ended the hard side keeps its sockets.
HARD_SIDE_MARGIN = 2.0


@dataclass(frozen=True)
class BirthdayPlan:
    """
    The agent's settings: sockets the hard side opens, probes per second and
    probes at most from the easy side.
    """

    sockets: int
    rate: float
    budget: int

    @property
    def duration(self) -> float:
        return self.budget / self.rate if self.rate else 0.0


@dataclass
class SocketBudget:
    """
    Birthday sockets an agent holds, across its tunnels.
    """

    limit: int = MAX_AGENT_SOCKETS
    held: int = 0

    def take(self, n: int) -> bool:
        if self.held + n > self.limit:
            return False
        self.held += n
        return True

    def give(self, n: int) -> None:
        self.held = max(0, self.held - n)


@dataclass
class Spray:
    """
    The easy side's probes: random ports of the hard side's address, each
    at most once, a batch per tick.
    """

    host: str
    budget: int
    batch: int
    chance: random.Random = field(default_factory=random.Random)
    tried: set[int] = field(default_factory=set)

    def next_batch(self) -> list[Candidate]:
        batch: list[Candidate] = []
        while len(batch) < self.batch and len(self.tried) < self.budget:
            port = self.chance.choice(PORTS)
            if port not in self.tried:
                self.tried.add(port)
                batch.append(Candidate(CandidateKind.PRFLX, self.host, port))
        return batch

    @property
    def spent(self) -> bool:
        return len(self.tried) >= self.budget
