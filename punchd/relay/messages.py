"""
The relay's one message: RELAY_BIND, from an agent's tunnel socket to its
relay port (docs/relay.rst).

A bind names the agent (USERNAME) and the tunnel (TUNNEL_ID), is signed
with the agent's rendezvous message key (MESSAGE-INTEGRITY-SHA256) and ends
with FINGERPRINT.  LIFETIME 0 asks the relay to free the allocation (the
tunnel went direct).  The signed SUCCESS answer carries the address the
relay saw (XOR-MAPPED-ADDRESS): the agent's NAT mapping towards the relay.
The answer is always smaller than the request.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from punchd import stun, wire
from punchd.keys import TUNNEL_ID_LENGTH
from punchd.stun import Attr, MessageClass, Method

__all__ = ["BIND_TYPE", "Bind", "bind_answer", "build_bind", "parse_bind", "parse_bind_answer"]

#: The first two bytes of every RELAY_BIND request: the forwarding path
#: looks no further into a datagram that does not start with them.
BIND_TYPE = stun.build(Method.RELAY_BIND, MessageClass.REQUEST, bytes(12))[:2]
_KNOWN = frozenset({Attr.USERNAME, Attr.TUNNEL_ID, Attr.LIFETIME, Attr.MESSAGE_INTEGRITY_SHA256})


@dataclass(frozen=True)
class Bind:
    """
    A well-formed RELAY_BIND request, not yet authenticated.
    """

    name: str
    tunnel_id: bytes
    release: bool
    message: stun.Message = field(repr=False)

    def verify(self, key: bytes) -> bool:
        return stun.verify_integrity_sha256(self.message, key)


def build_bind(
    name: str, key: bytes, tunnel_id: bytes, release: bool = False
) -> tuple[bytes, bytes]:
    """
    (transaction id, datagram) of a bind for C{name}'s side of C{tunnel_id},
    or of its release.
    """
    if len(tunnel_id) != TUNNEL_ID_LENGTH:
        raise ValueError(f"a tunnel id is {TUNNEL_ID_LENGTH} bytes")
    tid = stun.new_transaction_id()
    attributes = [(Attr.USERNAME, name.encode("ascii")), (Attr.TUNNEL_ID, tunnel_id)]
    if release:
        attributes.append((Attr.LIFETIME, stun.encode_u32(0)))
    return tid, wire.signed(Method.RELAY_BIND, MessageClass.REQUEST, tid, attributes, key)


def parse_bind(datagram: bytes) -> Bind | None:
    """
    The bind in C{datagram}, or None for anything else (malformed, another
    method, missing or bad attributes, an unknown required attribute).
    """
    try:
        message = stun.parse(datagram)
        if message.method != Method.RELAY_BIND or message.cls != MessageClass.REQUEST:
            return None
        if not message.has(Attr.FINGERPRINT) or message.unknown_required(_KNOWN):
            return None
        name = wire.decode_name(message.get(Attr.USERNAME), "username")
        tunnel_id = wire.decode_tunnel_id(message)
    except (stun.StunError, wire.ProtocolError):
        return None
    lifetime = message.get(Attr.LIFETIME)
    if lifetime is not None and len(lifetime) != 4:
        return None
    release = lifetime is not None and stun.decode_u32(lifetime) == 0
    return Bind(name, tunnel_id, release, message)


def bind_answer(bind: Bind, address: tuple[str, int], key: bytes) -> bytes:
    """
    The signed SUCCESS for C{bind}, telling the agent the C{address} bound.
    """
    tid = bind.message.transaction_id
    attributes = [(Attr.XOR_MAPPED_ADDRESS, stun.encode_xor_address(*address, tid))]
    if bind.release:
        attributes.append((Attr.LIFETIME, stun.encode_u32(0)))
    return wire.signed(Method.RELAY_BIND, MessageClass.SUCCESS, tid, attributes, key)


def parse_bind_answer(message: stun.Message | bytes, key: bytes) -> tuple[str, int] | None:
    """
    The bound address a relay's answer reports, or None unless it is a
    RELAY_BIND SUCCESS signed with C{key}.  The caller matches the
    transaction id against the bind it sent.
    """
    if isinstance(message, bytes):
        try:
            message = stun.parse(message)
        except stun.StunError:
            return None
    if message.method != Method.RELAY_BIND or message.cls != MessageClass.SUCCESS:
        return None
    if not stun.verify_integrity_sha256(message, key):
        return None
    return wire.mapped_address(message)
