"""
Authenticated gathers (L{punchd.gather}): Binding requests signed by an
agent, answered outside the anonymous per-IP Binding budget.

A neighbour behind the same CGNAT, or anyone spoofing the agents' public
IP, can drain that IP's anonymous bucket; an agent's own gathers are
charged instead to a budget keyed by (name, source IP, source port), in the
same constant-memory buckets, so that nothing short of the agent's own
exact address and key spends it.  Nothing is kept per request.
"""

from __future__ import annotations

from collections.abc import Callable

from punchd import stun, wire
from punchd.gather import build_gather_answer
from punchd.rendezvous.auth import Directory
from punchd.rendezvous.limits import Counters, SourceLimiter
from punchd.stun import Attr

#: A gather from one tunnel socket: a few sends per address family and tunnel.
GATHER_RATE = 10.0
GATHER_BURST = 20.0

Address = tuple[str, int]


def looks_signed(datagram: bytes) -> bool:
    """
    Whether a Binding request may be a gather: USERNAME comes first.  The
    anonymous path (a bare request, or FINGERPRINT only) never pays more.
    """
    return datagram[20:22] == b"\x00\x06"


class Gathers:
    """
    Answers gathers: verified under the named agent's key, budgeted per
    (name, address), answered signed, never larger than the request.
    """

    def __init__(
        self,
        directory: Callable[[], Directory],
        limiter: SourceLimiter,
        counters: Counters,
        send: Callable[[bytes, Address], None],
    ) -> None:
        self._directory = directory
        self._limiter = limiter
        self._counters = counters
        self._send = send

    def handle(self, datagram: bytes, source: Address) -> bool:
        """
        Answer or drop a gather; False when C{datagram} is no gather (no
        MESSAGE-INTEGRITY-SHA256), for the anonymous Binding path to take.
        """
        try:
            message = stun.parse(datagram)
        except stun.StunError:
            return False
        if not message.has(Attr.MESSAGE_INTEGRITY_SHA256):
            return False
        key = self._key_of(message)
        if key is None or not stun.verify_integrity_sha256(message, key):
            self._counters["dropped-gather-unauthenticated"] += 1
            return True
        name = message.get(Attr.USERNAME) or b""
        if not self._limiter.allow(f"{name!r}|{source[0]}|{source[1]}"):
            self._counters["gather-rate-limited"] += 1
            return True
        answer = build_gather_answer(message.transaction_id, source, key)
        if len(answer) > len(datagram):
            self._counters["dropped-reply-larger-than-request"] += 1
            return True
        self._counters["gather"] += 1
        self._send(answer, source)
        return True

    def _key_of(self, message: stun.Message) -> bytes | None:
        try:
            name = wire.decode_name(message.get(Attr.USERNAME), "username")
        except wire.ProtocolError:
            return None
        return self._directory().key_for(name)
