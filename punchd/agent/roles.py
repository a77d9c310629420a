"""
What differs between the two ends of a tunnel, chosen once per tunnel.

The initiator asked for the tunnel: it introduces itself through the
rendezvous, picks the pair (nominates) and confirms.  The responder was
introduced: it answers the introduction with its candidates, accepts the
initiator's nomination and waits for its confirmation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from twisted.internet.defer import Deferred

from punchd.agent.api import TunnelFailed
from punchd.agent.hops import primer_ttl
from punchd.agent.tunnel_core import CONFIRM_COPIES, LINGER_MIN
from punchd.keys import PublicKey
from punchd.wire import Candidate

if TYPE_CHECKING:
    from punchd.agent.tunnel import TunnelInputs
    from punchd.agent.tunnel_core import TunnelCore

#: What an introduction yields the initiator: the peer's candidates, its
#: public key, the responder's nonce for the tunnel key, and whether the
#: peer's NAT maps per destination.
Introduced = tuple[list[Candidate], PublicKey, bytes, bool]


class Introducer(Protocol):
    """
    Asks the rendezvous to introduce us to the peer (the initiator's side).
    """

    def introduce(self, tunnel_id: bytes, candidates: list[Candidate]) -> Deferred[Introduced]:
        """
        Send our candidates to the peer; fire with its answer, or fail with
        L{TunnelFailed}.  Cancelling stops asking.
        """


class Role(Protocol):
    name: str
    #: We pick the pair (the initiator); the peer's nomination means nothing to us.
    nominates: bool
    #: Our first checks wait for the peer's (a responder in a second round).
    holds_first_checks: bool

    def introduce(self, m: TunnelInputs, core: TunnelCore) -> Deferred[Introduced] | None:
        "We have gathered: introduce ourselves (or say we already are), or fire when we have."

    def checks_started(self, core: TunnelCore) -> None:
        "Our first checks are out (or deliberately held back)."

    def peer_gave_up(self, core: TunnelCore) -> TunnelFailed:
        "How the peer's Abandon reads to our program."

    def straggler_wait(self, core: TunnelCore) -> float:
        "How long to keep reading after a Confirm from the peer."

    def last_words(self, core: TunnelCore) -> None:
        "The peer confirmed the chosen pair: tell it we are done with it."

    def ended(self, error: TunnelFailed) -> None:
        "The tunnel failed with C{error}."


@dataclass
class Initiator:
    introducer: Introducer
    name: str = "initiator"
    nominates: bool = True
    holds_first_checks: bool = False

    def introduce(self, m: TunnelInputs, core: TunnelCore) -> Deferred[Introduced]:
        candidates = core.candidates()
        core.progress({"event": "gathered", "candidates": [str(c) for c in candidates]})

        def introduced(result: Introduced) -> Introduced:
            core.progress({"event": "introduced", "candidates": [str(c) for c in result[0]]})
            return result

        return self.introducer.introduce(core.tunnel_id, candidates).addCallback(introduced)

    def checks_started(self, core: TunnelCore) -> None:
        pass

    def peer_gave_up(self, core: TunnelCore) -> TunnelFailed:
        return TunnelFailed("unreachable", f"{core.pairs.explain(core.peer)}; the peer gave up")

    def straggler_wait(self, core: TunnelCore) -> float:
        # The responder's Confirm is the last thing its agent sends: only
        # reordering can bring one of its answers after it.
        return LINGER_MIN

    def last_words(self, core: TunnelCore) -> None:
        pass

    def ended(self, error: TunnelFailed) -> None:
        pass


@dataclass
class Responder:
    peer_key: PublicKey
    candidates: list[Candidate]
    nonce: bytes
    #: Hold our first checks until the initiator's arrive (its second round).
    holds_first_checks: bool = False
    #: The initiator's NAT maps per destination.
    peer_hard: bool = False
    #: Fires with our candidates, the answer to the introduction.
    answer: Deferred[list[Candidate]] = field(default_factory=Deferred)
    #: How many hops away the farthest router toward an address that
    #: answers is (L{punchd.agent.hops.Tracer}); with it a responder told to
    #: wait primes its NAT before it answers.
    trace: Callable[[str], Deferred[int | None]] | None = None
    name: str = "responder"
    nominates: bool = False

    def introduce(self, m: TunnelInputs, core: TunnelCore) -> Deferred[Introduced] | None:
        introduced = (self.candidates, self.peer_key, self.nonce, self.peer_hard)
        target = self._public_address()
        if not self.holds_first_checks or self.trace is None or target is None:
            m.introduced(*introduced)
            return None

        def traced(router: int | None) -> Introduced:
            ttl = primer_ttl(router)
            core.primer = None if ttl is None else (target, ttl)
            return introduced

        return self.trace(target).addCallback(traced)

    def _public_address(self) -> str | None:
        "The peer's public IPv4 address, where its NAT is."
        found = (c.host for c in self.candidates if c.kind.at_a_nat and ":" not in c.host)
        return next(found, None)

    def checks_started(self, core: TunnelCore) -> None:
        # Our first checks left before this answer can reach the initiator:
        # its checks then find our NAT already open toward it, even if that
        # NAT would let an early arrival claim our mapping
        # (docs/architecture.rst, "NATs in the lab").
        self.answer.callback(core.candidates())

    def peer_gave_up(self, core: TunnelCore) -> TunnelFailed:
        return TunnelFailed("cancelled", f"{core.peer} gave up on the tunnel")

    def straggler_wait(self, core: TunnelCore) -> float:
        # Once every copy is in, only network duplicates can trail, so a
        # short tail will do; until then a copy may just be late (or lost).
        all_in = len(core.confirmations) >= CONFIRM_COPIES
        return LINGER_MIN if all_in else core.linger_time()

    def last_words(self, core: TunnelCore) -> None:
        # The initiator lingers until it hears we answer none of its checks
        # any more: the rest of our linger only eats its stragglers.
        core.send_confirm()

    def ended(self, error: TunnelFailed) -> None:
        # Only a responder's introduction waits on its answer.
        if not self.answer.called:
            self.answer.errback(error)
