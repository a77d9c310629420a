"""
The initiator's introduction: a Connect through the rendezvous, its answer checked.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from punchd import stun, wire
from punchd.agent.api import TunnelFailed
from punchd.agent.rendezvous_client import RendezvousClient
from punchd.agent.roles import Introduced
from punchd.keys import PublicKey
from punchd.stun import Attr, Method
from punchd.wire import Candidate, CandidateKind

log = Logger()


@dataclass
class RendezvousIntroducer:
    """
    Asks the rendezvous to introduce us to C{peer} for C{service}
    (an L{punchd.agent.roles.Introducer}).
    """

    client: RendezvousClient
    peer: str
    service: str
    #: Ask the peer to hold its first checks until ours arrive.
    wait: bool
    #: Ask the rendezvous for a relay as well.
    relay: bool
    #: Our NAT maps per destination: birthday probing, if the peer's does not.
    hard: bool
    #: The key configured for the peer, which the rendezvous must vouch for.
    pinned: PublicKey | None
    #: Turns the rendezvous' failures into L{TunnelFailed}.
    explain: Callable[[Failure], Failure]
    #: Why the rendezvous gave no relay we asked for, in its words.
    relay_refused: str | None = None

    def introduce(self, tunnel_id: bytes, candidates: list[Candidate]) -> Deferred[Introduced]:
        def attributes(transaction_id: bytes) -> list[tuple[int, bytes]]:
            return [
                (Attr.PEER, self.peer.encode("ascii")),
                (Attr.SERVICE, self.service.encode("ascii")),
                (Attr.TUNNEL_ID, tunnel_id),
                *wire.encode_candidates(candidates, transaction_id),
                *([(Attr.WAIT, b"")] if self.wait else []),
                *([(Attr.RELAY, b"")] if self.relay else []),
                *([(Attr.HARD_NAT, b"")] if self.hard else []),
            ]

        d = self.client.request(Method.CONNECT, attributes)
        return d.addCallback(self.answered).addErrback(self.explain)

    def answered(self, message: stun.Message) -> Introduced:
        """
        The peer's candidates, key and nonce from the rendezvous' answer.
        """
        try:
            key = wire.decode_public_key(message)
            nonce = wire.decode_tunnel_nonce(message)
        except wire.ProtocolError as e:
            raise TunnelFailed("internal", f"the rendezvous' answer is unusable: {e}") from None
        if self.pinned is not None and self.pinned != key:
            log.error(
                "the rendezvous vouched for a key of {peer} that differs from the pinned one",
                peer=self.peer,
            )
            raise TunnelFailed("unauthorized", f"{self.peer}'s key does not match the pinned key")
        try:
            # A relay candidate comes only from the rendezvous' RELAY-PORT.
            candidates = [
                c for c in wire.decode_candidates(message) if c.kind != CandidateKind.RELAY
            ]
            relay = relay_candidate(message, self.client.server)
            refused = message.get(Attr.RELAY_REFUSED)
            if refused is not None and not relay:
                self.relay_refused = printable(refused)
        except wire.ProtocolError as e:
            raise TunnelFailed("internal", f"bad candidates from the rendezvous: {e}") from None
        return [*candidates, *relay], key, nonce, message.has(Attr.HARD_NAT)


def relay_candidate(message: stun.Message, rendezvous: tuple[str, int] | None) -> list[Candidate]:
    """
    The relay port the rendezvous allocated for our side, as a candidate:
    the relay runs on the rendezvous' host, or, for a tunnel with an agent
    of another node of the service, where RELAY-ADDRESS says (the message
    is signed by the service).
    """
    elsewhere = message.get(Attr.RELAY_ADDRESS)
    if elsewhere is not None:
        try:
            host, port = stun.decode_xor_address(elsewhere, message.transaction_id)
        except stun.StunError:
            raise wire.ProtocolError(400, "bad relay address") from None
        if not 0 < port < 65536:
            raise wire.ProtocolError(400, "bad relay address")
        return [Candidate(CandidateKind.RELAY, host, port)]
    value = message.get(Attr.RELAY_PORT)
    if value is None or rendezvous is None:
        return []
    if len(value) != 4 or not 0 < stun.decode_u32(value) < 65536:
        raise wire.ProtocolError(400, "bad relay port")
    return [Candidate(CandidateKind.RELAY, rendezvous[0], stun.decode_u32(value))]


def printable(value: bytes) -> str:
    """
    A reason the rendezvous gave, safe to show and log: at most 128
    characters, control characters replaced.
    """
    text = value[:128].decode("utf-8", "replace")
    return "".join(c if c.isprintable() else "?" for c in text)
