"""
STUN (RFC 8489) message codec: pure functions and classes, no I/O.

Parsing is strict: every rejection raises a subclass of L{StunError} saying
why, and nothing else ever escapes L{parse}, whatever bytes it is given.
Encoders raise C{ValueError} for arguments that cannot be encoded: that is a
bug in the caller, not bad input from the network.
"""

from __future__ import annotations

import enum
import hmac
import ipaddress
import os
import socket
import struct
import zlib
from collections.abc import Container, Iterable, Sequence
from dataclasses import dataclass

MAGIC_COOKIE: int = 0x2112A442
HEADER_LENGTH = 20


class MessageClass(enum.IntEnum):
    REQUEST = 0
    INDICATION = 1
    SUCCESS = 2
    ERROR = 3


class Method(enum.IntEnum):
    """
    Binding, and punchd's own methods: unassigned numbers below 0x100, so
    that the message type's first byte stays in RFC 7983's STUN range (0-3)
    and Wireshark decodes them (docs/protocol.rst, "Methods").
    """

    BINDING = 0x001
    REGISTER = 0x0F1
    PEERS = 0x0F2
    CONNECT = 0x0F3
    INCOMING = 0x0F4
    CONFIRM = 0x0F5
    ABANDON = 0x0F6
    RELAY_BIND = 0x0F7


class Attr(enum.IntEnum):
    MAPPED_ADDRESS = 0x0001
    USERNAME = 0x0006
    MESSAGE_INTEGRITY = 0x0008
    ERROR_CODE = 0x0009
    UNKNOWN_ATTRIBUTES = 0x000A
    REALM = 0x0014
    NONCE = 0x0015
    MESSAGE_INTEGRITY_SHA256 = 0x001C
    XOR_MAPPED_ADDRESS = 0x0020
    PRIORITY = 0x0024
    USE_CANDIDATE = 0x0025
    SOFTWARE = 0x8022
    FINGERPRINT = 0x8028
    ICE_CONTROLLED = 0x8029
    ICE_CONTROLLING = 0x802A
    SEQUENCE = 0x4D01
    SERVICE = 0x4D02
    PEER = 0x4D03
    TUNNEL_ID = 0x4D04
    CANDIDATE = 0x4D05
    PUBLIC_KEY = 0x4D06
    LIFETIME = 0x4D07
    MORE = 0x4D08
    WAIT = 0x4D09
    TUNNEL_NONCE = 0x4D0A
    TIMESTAMP = 0x4D0B
    RELAY = 0x4D0C
    RELAY_PORT = 0x4D0D
    HARD_NAT = 0x4D0E
    ALTERNATE_PORT = 0x4D10
    RELAY_REFUSED = 0x4D11
    RELAY_ADDRESS = 0x4D12


def _attr_name(attr_type: int) -> str:
    try:
        return Attr(attr_type).name.replace("_", "-")
    except ValueError:
        return f"0x{attr_type:04X}"


class StunError(Exception):
    """
    A datagram is not an acceptable STUN message; C{str()} says why.
    """


class NotStun(StunError):
    """
    Not STUN at all: too short for a header, leading bits set, or no magic cookie.
    """


class BadLength(StunError):
    """
    The header length disagrees with the datagram, or an attribute overruns it.
    """


class BadAttribute(StunError):
    """
    An attribute value is malformed.

    @ivar attr_type: the attribute's type, or C{None} when the decoder that
        found the fault (such as L{decode_u32}) serves several types.
    """

    def __init__(self, reason: str, attr_type: int | None = None) -> None:
        if attr_type is not None:
            reason = f"{_attr_name(attr_type)}: {reason}"
        super().__init__(reason)
        self.attr_type = attr_type


class BadOrdering(StunError):
    """
    An attribute follows MESSAGE-INTEGRITY, MESSAGE-INTEGRITY-SHA256 or
    FINGERPRINT where RFC 8489 14.5-14.7 allow none.
    """


class BadFingerprint(StunError):
    """
    The FINGERPRINT does not match the message: corrupted, or not STUN.
    """


@dataclass(frozen=True, slots=True)
class Message:
    """
    A parsed STUN message.

    @ivar method: the 12-bit method (a plain C{int}: unknown methods parse too).
    @ivar attributes: C{(type, value)} pairs in wire order, padding removed,
        including integrity and fingerprint attributes.
    @ivar raw: the exact datagram parsed (C{b""} for a message not parsed);
        integrity verification needs it.
    """

    method: int
    cls: MessageClass
    transaction_id: bytes
    attributes: tuple[tuple[int, bytes], ...]
    raw: bytes

    def get(self, attr_type: int) -> bytes | None:
        """
        The value of the first attribute of C{attr_type}, or C{None}.
        """
        for found, value in self.attributes:
            if found == attr_type:
                return value
        return None

    def get_all(self, attr_type: int) -> list[bytes]:
        return [value for found, value in self.attributes if found == attr_type]

    def has(self, attr_type: int) -> bool:
        return any(found == attr_type for found, _ in self.attributes)

    def unknown_required(self, known: Container[int]) -> list[int]:
        """
        Comprehension-required types (< 0x8000) not in C{known}, each once, in
        wire order: what a 420 response lists in UNKNOWN-ATTRIBUTES.
        """
        return list(dict.fromkeys(t for t, _ in self.attributes if t < 0x8000 and t not in known))


_HEADER = struct.Struct("!HHI12s")
_TYPE_LENGTH_COOKIE = struct.Struct("!HHI")
_ATTR_HEADER = struct.Struct("!HH")
_FINGERPRINT_ATTR = struct.Struct("!HHI")
_FINGERPRINT_XOR = 0x5354554E
_COOKIE_BYTES = MAGIC_COOKIE.to_bytes(4, "big")

# Plain ints: the attribute walk is on the rendezvous' hot path.
_MI = 0x0008
_MI_SHA256 = 0x001C
_FINGERPRINT = 0x8028
_TRAILERS = frozenset({_MI, _MI_SHA256, _FINGERPRINT})
# RFC 8489 14.5-14.7: what may follow each of the trailing attributes.
_MAY_FOLLOW: dict[int, frozenset[int]] = {
    _MI: frozenset({_MI_SHA256, _FINGERPRINT}),
    _MI_SHA256: frozenset({_FINGERPRINT}),
    _FINGERPRINT: frozenset(),
}


def _message_type(method: int, cls: int) -> int:
    """
    Interleave method and class bits: M11..M7 C1 M6..M4 C0 M3..M0 (RFC 8489 5).
    """
    return (
        (method & 0x00F)
        | ((method & 0x070) << 1)
        | ((method & 0xF80) << 2)
        | ((cls & 1) << 4)
        | ((cls & 2) << 7)
    )


def _scan(data: bytes) -> list[tuple[int, int, int]]:
    """
    Validate framing, ordering and trailer values; return C{(type, value
    offset, value length)} per attribute.

    Shared by L{parse} and L{binding_response} so that both agree exactly on
    what is well-formed.
    """
    size = len(data)
    if size < HEADER_LENGTH:
        raise NotStun(f"{size} bytes is shorter than the 20-byte STUN header")
    msg_type, length, cookie = _TYPE_LENGTH_COOKIE.unpack_from(data)
    if msg_type & 0xC000:
        raise NotStun("the two leading bits of the message type are not zero")
    if cookie != MAGIC_COOKIE:
        raise NotStun(f"magic cookie is 0x{cookie:08X}, not 0x{MAGIC_COOKIE:08X}")
    if length & 3:
        raise BadLength(f"message length {length} is not a multiple of 4")
    if length != size - HEADER_LENGTH:
        raise BadLength(
            f"message length {length} disagrees with the {size - HEADER_LENGTH} bytes "
            "after the header"
        )
    found: list[tuple[int, int, int]] = []
    trailer = 0  # the last MI / MI-SHA256 / FINGERPRINT seen, 0 before any
    pos = HEADER_LENGTH
    # Every step is a multiple of 4 and so is the length: 4 header bytes always remain.
    while pos < size:
        attr_type, value_length = _ATTR_HEADER.unpack_from(data, pos)
        start = pos + 4
        pos = start + ((value_length + 3) & ~3)
        if pos > size:
            raise BadLength(
                f"attribute {_attr_name(attr_type)} of {value_length} bytes at offset "
                f"{start - 4} overruns the message or lacks its padding"
            )
        if trailer and attr_type not in _MAY_FOLLOW[trailer]:
            raise BadOrdering(f"{_attr_name(attr_type)} follows {_attr_name(trailer)}")
        if attr_type in _TRAILERS:
            trailer = attr_type
            if attr_type == _MI:
                if value_length != 20:
                    raise BadAttribute(f"{value_length} bytes, not 20", attr_type)
            elif attr_type == _MI_SHA256:
                if value_length & 3 or not 16 <= value_length <= 32:
                    raise BadAttribute(
                        f"{value_length} bytes, not a multiple of 4 from 16 to 32", attr_type
                    )
            elif value_length != 4:
                raise BadAttribute(f"{value_length} bytes, not 4", attr_type)
        found.append((attr_type, start, value_length))
    if trailer == _FINGERPRINT:
        start = found[-1][1]
        expected = zlib.crc32(data[: start - 4]) ^ _FINGERPRINT_XOR
        if int.from_bytes(data[start : start + 4], "big") != expected:
            raise BadFingerprint("FINGERPRINT does not match the message's CRC-32")
    return found


def parse(data: bytes) -> Message:
    """
    Parse and validate one datagram.

    Checks framing, attribute bounds and padding presence (padding values are
    ignored, as RFC 8489 14 says), that nothing but the allowed trailers
    follows MESSAGE-INTEGRITY, MESSAGE-INTEGRITY-SHA256 and FINGERPRINT, the
    sizes of those three, and FINGERPRINT's value.  Integrity is not checked:
    that needs a key, see L{verify_integrity_sha256}.

    @raise StunError: a subclass saying why the datagram was rejected.
    """
    data = bytes(data)
    found = _scan(data)
    msg_type = (data[0] << 8) | data[1]
    return Message(
        method=(msg_type & 0x000F) | ((msg_type >> 1) & 0x0070) | ((msg_type >> 2) & 0x0F80),
        cls=MessageClass(((msg_type >> 4) & 1) | ((msg_type >> 7) & 2)),
        transaction_id=data[8:20],
        attributes=tuple((t, data[start : start + n]) for t, start, n in found),
        raw=data,
    )


def _integrity_input(message: Message, attr_type: int) -> tuple[bytes, bytes] | None:
    """
    The HMAC input for the first C{attr_type} attribute and its received
    value: the message up to that attribute, with the header length adjusted
    to end where the attribute ends (RFC 8489 14.5, 14.6).  C{None} when
    the attribute is absent.  Without C{message.raw} the HMAC simply fails.
    """
    raw = message.raw
    pos = HEADER_LENGTH
    for found, value in message.attributes:
        if found == attr_type:
            adjusted = (pos + 4 + len(value) - HEADER_LENGTH).to_bytes(2, "big")
            return raw[:2] + adjusted + raw[4:pos], value
        pos += 4 + ((len(value) + 3) & ~3)
    return None


def verify_integrity_sha256(message: Message, key: bytes) -> bool:
    """
    Whether MESSAGE-INTEGRITY-SHA256 is present and correct under C{key},
    including values truncated to 16..28 bytes (RFC 8489 14.6).
    """
    found = _integrity_input(message, _MI_SHA256)
    if found is None:
        return False
    text, value = found
    if len(value) & 3 or not 16 <= len(value) <= 32:
        return False
    return hmac.compare_digest(hmac.digest(key, text, "sha256")[: len(value)], value)


def verify_integrity_sha1(message: Message, key: bytes) -> bool:
    """
    Whether MESSAGE-INTEGRITY is present and correct under C{key}.
    """
    found = _integrity_input(message, _MI)
    if found is None:
        return False
    text, value = found
    return hmac.compare_digest(hmac.digest(key, text, "sha1"), value)


def build(
    method: int,
    cls: MessageClass,
    transaction_id: bytes,
    attributes: Iterable[tuple[int, bytes]] = (),
    *,
    integrity_sha256: bytes | None = None,
    integrity_sha1: bytes | None = None,
    fingerprint: bool = False,
) -> bytes:
    """
    Encode a message: C{attributes} padded with zeros, then MESSAGE-INTEGRITY
    under C{integrity_sha1}, MESSAGE-INTEGRITY-SHA256 (full 32 bytes) under
    C{integrity_sha256} and FINGERPRINT, each only when asked for.

    The trailers are only accepted as keyword arguments, so that a built
    message always has them in order and correct.
    """
    if not 0 <= method <= 0xFFF:
        raise ValueError(f"method 0x{method:X} does not fit in 12 bits")
    msg_type = _message_type(method, MessageClass(cls))
    if len(transaction_id) != 12:
        raise ValueError(f"transaction id is {len(transaction_id)} bytes, not 12")
    parts: list[bytes] = []
    for attr_type, value in attributes:
        if attr_type in _TRAILERS:
            raise ValueError(f"{_attr_name(attr_type)} is added by build()'s keyword arguments")
        if not 0 <= attr_type <= 0xFFFF:
            raise ValueError(f"attribute type {attr_type} does not fit in 16 bits")
        if len(value) > 0xFFFF:
            raise ValueError(f"{_attr_name(attr_type)} value of {len(value)} bytes is too long")
        parts.append(_ATTR_HEADER.pack(attr_type, len(value)))
        parts.append(value)
        parts.append(b"\x00" * (-len(value) & 3))
    body = b"".join(parts)
    total = len(body)
    total += 24 if integrity_sha1 is not None else 0
    total += 36 if integrity_sha256 is not None else 0
    total += 8 if fingerprint else 0
    if total > 0xFFFF:
        raise ValueError(f"{total} bytes of attributes do not fit a STUN message")
    if integrity_sha1 is not None:
        text = _HEADER.pack(msg_type, len(body) + 24, MAGIC_COOKIE, transaction_id) + body
        body += _ATTR_HEADER.pack(_MI, 20) + hmac.digest(integrity_sha1, text, "sha1")
    if integrity_sha256 is not None:
        text = _HEADER.pack(msg_type, len(body) + 36, MAGIC_COOKIE, transaction_id) + body
        body += _ATTR_HEADER.pack(_MI_SHA256, 32) + hmac.digest(integrity_sha256, text, "sha256")
    if fingerprint:
        text = _HEADER.pack(msg_type, len(body) + 8, MAGIC_COOKIE, transaction_id) + body
        body += _FINGERPRINT_ATTR.pack(_FINGERPRINT, 4, zlib.crc32(text) ^ _FINGERPRINT_XOR)
    return _HEADER.pack(msg_type, len(body), MAGIC_COOKIE, transaction_id) + body


def new_transaction_id() -> bytes:
    return os.urandom(12)


# -- addresses -----------------------------------------------------------

_V4_MAPPED_PREFIX = b"\x00" * 10 + b"\xff\xff"
_FAMILY_IPV4 = 0x01
_FAMILY_IPV6 = 0x02
_ADDRESS_SIZES = {_FAMILY_IPV4: 4, _FAMILY_IPV6: 16}
_XOR_PORT = MAGIC_COOKIE >> 16


def _pack_host(host: str) -> bytes:
    """
    The 4 or 16 address bytes of C{host}.

    An IPv4-mapped IPv6 address (what a dual-stack socket reports for an IPv4
    peer) gives the IPv4 address: that is the address the peer knows itself by.
    A scope (C{%eth0}) is dropped: it means nothing to the other host.
    """
    try:
        return socket.inet_pton(socket.AF_INET, host)
    except (OSError, ValueError):
        pass
    try:
        packed = socket.inet_pton(socket.AF_INET6, host.partition("%")[0])
    except (OSError, ValueError):
        raise ValueError(f"not an IP address: {host!r}") from None
    return packed[12:] if packed[:12] == _V4_MAPPED_PREFIX else packed


def _check_port(port: int) -> None:
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port {port} is out of range")


def _xor(data: bytes, mask: bytes) -> bytes:
    return (int.from_bytes(data, "big") ^ int.from_bytes(mask[: len(data)], "big")).to_bytes(
        len(data), "big"
    )


def _xor_mask(transaction_id: bytes) -> bytes:
    if len(transaction_id) != 12:
        raise ValueError(f"transaction id is {len(transaction_id)} bytes, not 12")
    return _COOKIE_BYTES + transaction_id


def _split_address(value: bytes, attr_type: int) -> tuple[int, bytes]:
    """
    Port and address bytes of a (XOR-)MAPPED-ADDRESS body.

    The first byte is not checked: RFC 8489 14.1 says receivers ignore it.
    """
    if len(value) < 4:
        raise BadAttribute(f"{len(value)} bytes is too short for an address", attr_type)
    family = value[1]
    size = _ADDRESS_SIZES.get(family)
    if size is None:
        raise BadAttribute(f"unknown address family {family}", attr_type)
    if len(value) != 4 + size:
        raise BadAttribute(
            f"{len(value)} bytes, but an IPv{4 if size == 4 else 6} address needs {4 + size}",
            attr_type,
        )
    return int.from_bytes(value[2:4], "big"), value[4:]


def _host_text(packed: bytes) -> str:
    return ipaddress.ip_address(packed).compressed


def encode_xor_address(host: str, port: int, transaction_id: bytes) -> bytes:
    """
    An XOR-MAPPED-ADDRESS value (RFC 8489 14.2): 8 bytes for IPv4, 20 for IPv6.
    """
    packed = _pack_host(host)
    _check_port(port)
    family = _FAMILY_IPV4 if len(packed) == 4 else _FAMILY_IPV6
    return struct.pack("!BBH", 0, family, port ^ _XOR_PORT) + _xor(
        packed, _xor_mask(transaction_id)
    )


def _decode_xor(value: bytes, transaction_id: bytes, attr_type: int) -> tuple[str, int]:
    xport, xaddress = _split_address(value, attr_type)
    host = _host_text(_xor(xaddress, _xor_mask(transaction_id)))
    return host, xport ^ _XOR_PORT


def decode_xor_address(value: bytes, transaction_id: bytes) -> tuple[str, int]:
    """
    C{(host, port)} of an XOR-MAPPED-ADDRESS value; host in compressed text form.

    @raise BadAttribute: unknown family, or a length that does not match it.
    """
    return _decode_xor(value, transaction_id, Attr.XOR_MAPPED_ADDRESS)


def encode_address(host: str, port: int) -> bytes:
    """
    A MAPPED-ADDRESS value (RFC 8489 14.1), which only RFC 3489 clients need.
    """
    packed = _pack_host(host)
    _check_port(port)
    family = _FAMILY_IPV4 if len(packed) == 4 else _FAMILY_IPV6
    return struct.pack("!BBH", 0, family, port) + packed


def decode_address(value: bytes) -> tuple[str, int]:
    port, packed = _split_address(value, Attr.MAPPED_ADDRESS)
    return _host_text(packed), port


def encode_candidate(kind: int, host: str, port: int, transaction_id: bytes) -> bytes:
    """
    A CANDIDATE value: the kind byte in place of XOR-MAPPED-ADDRESS's
    leading zero byte (docs/protocol.rst); 8 bytes for IPv4, 20 for IPv6.
    Which kinds exist is L{punchd.wire.CandidateKind}'s business, not the codec's.
    """
    if not 0 <= kind <= 0xFF:
        raise ValueError(f"candidate kind {kind} does not fit in a byte")
    return bytes((kind,)) + encode_xor_address(host, port, transaction_id)[1:]


def decode_candidate(value: bytes, transaction_id: bytes) -> tuple[int, str, int]:
    """
    C{(kind, host, port)} of a CANDIDATE value; the kind byte is returned as
    is, for L{punchd.wire.CandidateKind} to judge.
    """
    if not value:
        raise BadAttribute("empty", Attr.CANDIDATE)
    host, port = _decode_xor(b"\x00" + value[1:], transaction_id, Attr.CANDIDATE)
    return value[0], host, port


# -- other attribute values ----------------------------------------------

_MAX_REASON_BYTES = 763  # RFC 8489 14.8: < 128 characters, up to 763 bytes on receipt
_MAX_USERNAME_BYTES = 508  # RFC 8489 14.3: fewer than 509 bytes
_MAX_SOFTWARE_CHARACTERS = 127  # RFC 8489 14.14: fewer than 128 characters


def encode_error_code(code: int, reason: str) -> bytes:
    """
    An ERROR-CODE value (RFC 8489 14.8): C{code} from 300 to 699, C{reason}
    at most 763 bytes of UTF-8.
    """
    if not 300 <= code <= 699:
        raise ValueError(f"error code {code} is not between 300 and 699")
    encoded = reason.encode("utf-8")
    if len(encoded) > _MAX_REASON_BYTES:
        raise ValueError(f"reason phrase of {len(encoded)} bytes is longer than 763")
    return struct.pack("!HBB", 0, code // 100, code % 100) + encoded


def decode_error_code(value: bytes) -> tuple[int, str]:
    """
    C{(code, reason)} of an ERROR-CODE value; the 21 reserved bits are ignored
    as RFC 8489 14.8 says.
    """
    if len(value) < 4:
        raise BadAttribute(f"{len(value)} bytes is too short", Attr.ERROR_CODE)
    error_class = value[2] & 0x07
    number = value[3]
    if not 3 <= error_class <= 6 or number > 99:
        raise BadAttribute(f"class {error_class} number {number} is no code", Attr.ERROR_CODE)
    return error_class * 100 + number, _decode_text(value[4:], _MAX_REASON_BYTES, Attr.ERROR_CODE)


def _decode_text(value: bytes, max_bytes: int, attr_type: int) -> str:
    if len(value) > max_bytes:
        raise BadAttribute(f"{len(value)} bytes is longer than {max_bytes}", attr_type)
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise BadAttribute("not UTF-8", attr_type) from None


def encode_username(username: str) -> bytes:
    """
    A USERNAME value: UTF-8, fewer than 509 bytes (RFC 8489 14.3).
    """
    encoded = username.encode("utf-8")
    if len(encoded) > _MAX_USERNAME_BYTES:
        raise ValueError(f"username of {len(encoded)} bytes is longer than 508")
    return encoded


def decode_username(value: bytes) -> str:
    return _decode_text(value, _MAX_USERNAME_BYTES, Attr.USERNAME)


def encode_software(software: str) -> bytes:
    """
    A SOFTWARE value: fewer than 128 characters of UTF-8 (RFC 8489 14.14).
    """
    if len(software) > _MAX_SOFTWARE_CHARACTERS:
        raise ValueError(f"software of {len(software)} characters is longer than 127")
    return software.encode("utf-8")


def decode_software(value: bytes) -> str:
    """
    The SOFTWARE text; up to 763 bytes are accepted, as RFC 8489 14.14 says.
    """
    return _decode_text(value, _MAX_REASON_BYTES, Attr.SOFTWARE)


def encode_unknown_attributes(types: Sequence[int]) -> bytes:
    for attr_type in types:
        if not 0 <= attr_type <= 0xFFFF:
            raise ValueError(f"attribute type {attr_type} does not fit in 16 bits")
    return struct.pack(f"!{len(types)}H", *types)


def decode_unknown_attributes(value: bytes) -> list[int]:
    if len(value) & 1:
        raise BadAttribute(f"odd length {len(value)}", Attr.UNKNOWN_ATTRIBUTES)
    return list(struct.unpack(f"!{len(value) // 2}H", value))


def encode_u32(n: int) -> bytes:
    if not 0 <= n <= 0xFFFFFFFF:
        raise ValueError(f"{n} does not fit in 32 bits")
    return n.to_bytes(4, "big")


def decode_u32(value: bytes) -> int:
    if len(value) != 4:
        raise BadAttribute(f"{len(value)} bytes where a u32 needs 4")
    return int.from_bytes(value, "big")


def encode_u64(n: int) -> bytes:
    if not 0 <= n <= 0xFFFFFFFFFFFFFFFF:
        raise ValueError(f"{n} does not fit in 64 bits")
    return n.to_bytes(8, "big")


def decode_u64(value: bytes) -> int:
    if len(value) != 8:
        raise BadAttribute(f"{len(value)} bytes where a u64 needs 8")
    return int.from_bytes(value, "big")


# -- the rendezvous' fast path -------------------------------------------

#: Comprehension-required attributes a Binding request may carry without a
#: 420: credentials (short- or long-term: integrity is not checked, a plain
#: STUN server has no credentials to check it with) and ICE's (RFC 8445).
#: Comprehension-optional ones (>= 0x8000) are ignored anyway.
BINDING_REQUEST_ATTRIBUTES: frozenset[int] = frozenset(
    int(t)
    for t in (
        Attr.USERNAME,
        Attr.MESSAGE_INTEGRITY,
        Attr.MESSAGE_INTEGRITY_SHA256,
        Attr.REALM,
        Attr.NONCE,
        Attr.PRIORITY,
        Attr.USE_CANDIDATE,
    )
)
_BINDING_REQUEST_TYPE = b"\x00\x01"
_SUCCESS_V4 = struct.Struct("!HH16sHHHHI")  # header, XOR-MAPPED-ADDRESS: 32 bytes
_SUCCESS_V6 = struct.Struct("!HH16sHHHH16s")  # 44 bytes
_BINDING_SUCCESS = 0x0101
_XOR_MAPPED_ADDRESS = 0x0020


def binding_response(request: bytes, host: str, port: int) -> bytes | None:
    """
    Answer a Binding request from C{host}:C{port} as a plain STUN server would.

    The success response carries XOR-MAPPED-ADDRESS only, plus FINGERPRINT
    iff the request had one: 32 or 40 bytes for an IPv4 client, 44 or 52 for
    IPv6, so it is never larger than the request plus the 12 or 24 bytes of
    the address.  A request with comprehension-required attributes outside
    L{BINDING_REQUEST_ATTRIBUTES} gets a 420 error listing them, with an empty
    reason phrase to keep it small; the rendezvous sends it only when it is
    no larger than the request (docs/protocol.rst, "Reply sizes").
    MESSAGE-INTEGRITY is not checked and the answer carries none.

    @return: C{None} for anything but a well-formed Binding request, as
        L{parse} judges it (a wrong FINGERPRINT included); never raises for
        any C{request}.
    @raise ValueError: C{host} or C{port} is not an address (a caller bug).
    """
    if request[:2] != _BINDING_REQUEST_TYPE or request[4:8] != _COOKIE_BYTES:
        return None
    try:
        found = _scan(request)
    except StunError:
        return None
    fingerprint = bool(found) and found[-1][0] == _FINGERPRINT
    unknown = [t for t, _, _ in found if t < 0x8000 and t not in BINDING_REQUEST_ATTRIBUTES]
    if unknown:
        return _unknown_attributes_response(request, unknown, fingerprint)
    packed = _pack_host(host)
    _check_port(port)
    extra = 8 if fingerprint else 0
    if len(packed) == 4:
        response = _SUCCESS_V4.pack(
            _BINDING_SUCCESS,
            12 + extra,
            request[4:20],
            _XOR_MAPPED_ADDRESS,
            8,
            _FAMILY_IPV4,
            port ^ _XOR_PORT,
            int.from_bytes(packed, "big") ^ MAGIC_COOKIE,
        )
    else:
        response = _SUCCESS_V6.pack(
            _BINDING_SUCCESS,
            24 + extra,
            request[4:20],
            _XOR_MAPPED_ADDRESS,
            20,
            _FAMILY_IPV6,
            port ^ _XOR_PORT,
            _xor(packed, request[4:20]),
        )
    if fingerprint:
        crc = zlib.crc32(response) ^ _FINGERPRINT_XOR
        response += _FINGERPRINT_ATTR.pack(_FINGERPRINT, 4, crc)
    return response


def _unknown_attributes_response(request: bytes, unknown: list[int], fingerprint: bool) -> bytes:
    return build(
        Method.BINDING,
        MessageClass.ERROR,
        request[8:20],
        [
            (Attr.ERROR_CODE, encode_error_code(420, "")),
            (Attr.UNKNOWN_ATTRIBUTES, encode_unknown_attributes(list(dict.fromkeys(unknown)))),
        ],
        fingerprint=fingerprint,
    )
