"""
The STUN codec: parse, the attribute decoders, integrity checks, the
Binding fast path, and build/parse round trips.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from fuzz.harness import Crash
from punchd import stun, wire
from punchd.stun import Attr, MessageClass, Method

KEY = bytes(range(32))
TID = bytes.fromhex("0102030405060708090a0b0c")
TRAILERS = (Attr.MESSAGE_INTEGRITY, Attr.MESSAGE_INTEGRITY_SHA256, Attr.FINGERPRINT)


def _decoders(tid: bytes) -> dict[int, Callable[[bytes], Any]]:
    return {
        Attr.XOR_MAPPED_ADDRESS: lambda v: stun.decode_xor_address(v, tid),
        Attr.MAPPED_ADDRESS: stun.decode_address,
        Attr.CANDIDATE: lambda v: stun.decode_candidate(v, tid),
        Attr.ERROR_CODE: stun.decode_error_code,
        Attr.USERNAME: stun.decode_username,
        Attr.SOFTWARE: stun.decode_software,
        Attr.UNKNOWN_ATTRIBUTES: stun.decode_unknown_attributes,
        Attr.LIFETIME: stun.decode_u32,
        Attr.SEQUENCE: stun.decode_u64,
    }


def _normal(decoded: tuple[Any, ...]) -> tuple[Any, ...]:
    *kind, host, port = decoded
    return (*kind, *wire.normalize_address((host, port)))


def _round_trip_value(attr_type: int, decoded: Any, tid: bytes) -> None:
    """
    Whatever decodes must encode back to something that decodes the same.
    """
    again: tuple[Any, ...]
    if attr_type == Attr.XOR_MAPPED_ADDRESS:
        host, port = decoded
        again = stun.decode_xor_address(stun.encode_xor_address(host, port, tid), tid)
    elif attr_type == Attr.CANDIDATE:
        kind, host, port = decoded
        again = stun.decode_candidate(stun.encode_candidate(kind, host, port, tid), tid)
    elif attr_type == Attr.MAPPED_ADDRESS:
        host, port = decoded
        again = stun.decode_address(stun.encode_address(host, port))
    else:
        return
    # An IPv4-mapped IPv6 address is sent as the IPv4 address it stands for.
    if _normal(again) != _normal(decoded):
        raise Crash(f"attribute 0x{attr_type:04x}: {decoded!r} encodes to {again!r}")


def _check_message(message: stun.Message, data: bytes) -> None:
    message.unknown_required(wire.KNOWN_ATTRIBUTES)
    stun.verify_integrity_sha256(message, KEY)
    stun.verify_integrity_sha1(message, KEY)
    wire.error_of(message)
    try:
        wire.decode_candidates(message)
    except wire.ProtocolError:
        pass
    decoders = _decoders(message.transaction_id)
    for attr_type, value in message.attributes:
        decode = decoders.get(attr_type)
        if decode is None:
            continue
        try:
            decoded = decode(value)
        except stun.StunError:
            continue
        _round_trip_value(attr_type, decoded, message.transaction_id)
    body = [(t, v) for t, v in message.attributes if t not in TRAILERS]
    if len(body) == len(message.attributes):
        rebuilt = stun.parse(stun.build(message.method, message.cls, message.transaction_id, body))
        if rebuilt.attributes != message.attributes or rebuilt.method != message.method:
            raise Crash(f"build(parse(x)) differs from x: {data!r}")
    signed = stun.build(
        message.method,
        message.cls,
        message.transaction_id,
        body,
        integrity_sha256=KEY,
        integrity_sha1=KEY,
        fingerprint=True,
    )
    again = stun.parse(signed)
    if not (stun.verify_integrity_sha256(again, KEY) and stun.verify_integrity_sha1(again, KEY)):
        raise Crash(f"a message signed by build() does not verify: {data!r}")


def one_input(data: bytes) -> None:
    for host, port in (("192.0.2.1", 3478), ("2001:db8::1", 65535)):
        response = stun.binding_response(data, host, port)
        if response is not None:
            if len(response) > len(data) + 24:
                raise Crash(f"a {len(response)}-byte Binding answer to {len(data)} bytes")
            stun.parse(response)
    try:
        message = stun.parse(data)
    except stun.StunError:
        return
    try:
        _check_message(message, data)
    except ValueError as e:
        if len(data) < 0xFFFF - 100:  # only a message near the size limit may not rebuild
            raise Crash(f"rebuilding a parsed message failed: {e}") from e


def seeds() -> Iterable[bytes]:
    yield stun.build(Method.BINDING, MessageClass.REQUEST, TID)
    yield stun.build(Method.BINDING, MessageClass.REQUEST, TID, fingerprint=True)
    yield stun.build(
        Method.BINDING,
        MessageClass.REQUEST,
        TID,
        [(Attr.USERNAME, b"alice:bob"), (Attr.PRIORITY, b"\x6e\x00\x01\xff")],
        integrity_sha1=KEY,
        fingerprint=True,
    )
    yield stun.build(Method.BINDING, MessageClass.REQUEST, TID, [(0x7777, b"x")])
    yield (
        stun.binding_response(
            stun.build(Method.BINDING, MessageClass.REQUEST, TID), "192.0.2.1", 3478
        )
        or b""
    )
    yield (
        stun.binding_response(
            stun.build(Method.BINDING, MessageClass.REQUEST, TID, fingerprint=True),
            "2001:db8::1",
            4000,
        )
        or b""
    )
    yield wire.signed(
        Method.CONNECT,
        MessageClass.REQUEST,
        TID,
        [
            (Attr.USERNAME, b"alice"),
            (Attr.SEQUENCE, stun.encode_u64(1_700_000_000_000_000)),
            (Attr.NONCE, bytes(20)),
            (Attr.PEER, b"bob"),
            (Attr.SERVICE, b"chat"),
            (Attr.TUNNEL_ID, bytes(range(16))),
            *wire.encode_candidates(
                [
                    wire.Candidate(wire.CandidateKind.HOST, "192.168.1.10", 40000),
                    wire.Candidate(wire.CandidateKind.SRFLX, "2001:db8::7", 40001),
                ],
                TID,
            ),
        ],
        KEY,
    )
    yield wire.signed(
        Method.REGISTER,
        MessageClass.ERROR,
        TID,
        [
            *wire.error_attributes(420),
            (Attr.UNKNOWN_ATTRIBUTES, stun.encode_unknown_attributes([0x7777, 0x10])),
        ],
        KEY,
    )
    yield wire.signed(
        Method.REGISTER,
        MessageClass.SUCCESS,
        TID,
        [
            (Attr.XOR_MAPPED_ADDRESS, stun.encode_xor_address("198.51.100.7", 40000, TID)),
            (Attr.MAPPED_ADDRESS, stun.encode_address("198.51.100.7", 40000)),
            (Attr.LIFETIME, stun.encode_u32(60)),
            (Attr.SOFTWARE, stun.encode_software("punchd fuzz")),
        ],
        KEY,
    )
