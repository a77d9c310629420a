"""
The authenticated gather: how an agent learns the public address of a
fresh tunnel socket from the rendezvous without sharing the anonymous
Binding budget of its public IP.

The request is a STUN Binding request carrying USERNAME (the agent's name),
SOFTWARE (padding, see below), MESSAGE-INTEGRITY-SHA256 under the agent's
rendezvous key, and FINGERPRINT.  It has no NONCE and no SEQUENCE: the
answer changes no state, so a replay earns only the answer to the replayer's
own address.  The answer is a Binding success with XOR-MAPPED-ADDRESS,
signed the same way.

The SOFTWARE value makes every request at least as large as its answer,
even over IPv6: the rendezvous drops a gather whose answer would be larger
than the request (docs/protocol.rst).
"""

from __future__ import annotations

from punchd import stun, wire
from punchd.stun import Attr, MessageClass, Method

#: Pads the request: USERNAME (8+) and SOFTWARE (20) outweigh an IPv6 XOR-MAPPED-ADDRESS (24).
GATHER_SOFTWARE = b"punchd gather"


def build_gather_request(name: str, key: bytes) -> tuple[bytes, bytes]:
    """
    A transaction id and the signed Binding request to send from the socket
    whose public address is wanted.
    """
    transaction_id = stun.new_transaction_id()
    attributes = [(Attr.USERNAME, name.encode("ascii")), (Attr.SOFTWARE, GATHER_SOFTWARE)]
    request = wire.signed(Method.BINDING, MessageClass.REQUEST, transaction_id, attributes, key)
    return transaction_id, request


def build_gather_answer(transaction_id: bytes, source: tuple[str, int], key: bytes) -> bytes:
    """
    The rendezvous' answer: where the request came from, signed under C{key}.
    """
    mapped = stun.encode_xor_address(source[0], source[1], transaction_id)
    return wire.signed(
        Method.BINDING,
        MessageClass.SUCCESS,
        transaction_id,
        [(Attr.XOR_MAPPED_ADDRESS, mapped)],
        key,
    )


def parse_gather_answer(
    message: bytes | stun.Message, key: bytes, transaction_id: bytes | None = None
) -> tuple[str, int] | None:
    """
    The mapped address in a gather answer signed under C{key} (and for
    C{transaction_id}, when given); None for anything else.
    """
    if isinstance(message, bytes):
        try:
            message = stun.parse(message)
        except stun.StunError:
            return None
    if (message.method, message.cls) != (Method.BINDING, MessageClass.SUCCESS):
        return None
    if transaction_id is not None and message.transaction_id != transaction_id:
        return None
    if not stun.verify_integrity_sha256(message, key):
        return None
    return wire.mapped_address(message)
