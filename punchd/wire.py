"""
punchd's messages on top of the STUN codec: names, error codes, candidates,
and signing, shared by the rendezvous and the agent (docs/protocol.rst).
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from punchd import stun
from punchd.keys import KEY_LENGTH, TUNNEL_ID_LENGTH, PublicKey
from punchd.stun import Attr, MessageClass

#: Peer, agent and service names: short, printable, safe in logs and paths.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")

MAX_CANDIDATES = 16

#: STUN error code -> the control socket's error name (docs/architecture.rst).
ERROR_NAMES: dict[int, str] = {
    400: "bad-request",
    401: "unauthorized",
    403: "rejected",
    404: "peer-unknown",
    408: "timeout",
    420: "bad-request",
    438: "stale-nonce",
    460: "no-listener",
    470: "not-registered",
    480: "peer-offline",
    486: "busy",
    500: "internal",
    503: "unavailable",
}
REASONS: dict[int, str] = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Rejected",
    404: "Peer Unknown",
    408: "Timeout",
    420: "Unknown Attribute",
    438: "Stale Nonce",
    439: "Sequence Out Of Window",
    460: "No Listener",
    470: "Not Registered",
    480: "Peer Offline",
    486: "Busy",
    500: "Server Error",
    503: "Other Rendezvous Nodes Unreachable",
}

#: Attributes each side understands; anything else comprehension-required gets 420.
KNOWN_ATTRIBUTES = frozenset(int(a) for a in Attr)


class CandidateKind(enum.IntEnum):
    """
    Where an address came from; the value is its CANDIDATE kind byte.
    """

    HOST = 0
    SRFLX = 1
    PRFLX = 2
    RELAY = 3
    MAPPED = 4

    @property
    def label(self) -> str:
        return self.name.lower()

    @property
    def preference(self) -> int:
        """
        ICE type preference: a direct LAN path beats a reflexive one beats a relay.
        """
        # A gateway's port mapping admits anyone, unlike a NAT's own mapping.
        return {0: 126, 1: 100, 2: 110, 3: 0, 4: 105}[int(self)]

    @property
    def patience(self) -> float | None:
        """
        How long a pair of this kind that answered waits for a better pair
        before it is nominated, when better pairs are still untried; None:
        a few of its round trips.  A relayed path is the last resort: the
        direct pairs get time to answer first.
        """
        return 0.5 if self is CandidateKind.RELAY else None

    @property
    def at_a_nat(self) -> bool:
        """
        The address is a NAT's public one (its own mapping, or a port the
        gateway mapped for us): where a peer's NAT is.
        """
        return self in (CandidateKind.SRFLX, CandidateKind.MAPPED)


@dataclass(frozen=True, slots=True)
class Candidate:
    """
    One transport address a peer may be reached at.
    """

    kind: CandidateKind
    host: str
    port: int

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def __str__(self) -> str:
        return f"{self.kind.label} {format_address(self.address)}"


class ProtocolError(Exception):
    """
    A well-formed STUN message that breaks punchd's rules; C{code} is the
    STUN error code the sender gets back (when it is authenticated).
    """

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def format_address(address: tuple[str, int]) -> str:
    """
    C{host:port}, with brackets around IPv6 hosts.
    """
    host, port = address
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def normalize_address(address: tuple[str, int]) -> tuple[str, int]:
    """
    Canonical text for an address as sockets report it (IPv4-mapped IPv6 unwrapped).
    """
    host, port = address[0], address[1]
    ip = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return (ip.compressed, port)


def decode_name(value: bytes | None, what: str) -> str:
    """
    A PEER / SERVICE / USERNAME value, or L{ProtocolError} 400.
    """
    if value is None:
        raise ProtocolError(400, f"missing {what}")
    try:
        name = value.decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError(400, f"bad {what}") from None
    if not NAME_RE.match(name):
        raise ProtocolError(400, f"bad {what}")
    return name


def encode_candidates(
    candidates: Iterable[Candidate], transaction_id: bytes
) -> list[tuple[int, bytes]]:
    return [
        (Attr.CANDIDATE, stun.encode_candidate(int(c.kind), c.host, c.port, transaction_id))
        for c in candidates
    ]


def decode_candidates(message: stun.Message) -> list[Candidate]:
    """
    The CANDIDATE attributes of C{message}; at most L{MAX_CANDIDATES}.
    """
    values = message.get_all(Attr.CANDIDATE)
    if len(values) > MAX_CANDIDATES:
        raise ProtocolError(400, "too many candidates")
    result = []
    for value in values:
        try:
            kind, host, port = stun.decode_candidate(value, message.transaction_id)
            result.append(Candidate(CandidateKind(kind), host, port))
        except (stun.StunError, ValueError):
            raise ProtocolError(400, "bad candidate") from None
    return result


def decode_tunnel_id(message: stun.Message) -> bytes:
    value = message.get(Attr.TUNNEL_ID)
    if value is None or len(value) != TUNNEL_ID_LENGTH:
        raise ProtocolError(400, "missing or bad tunnel id")
    return value


def decode_tunnel_nonce(message: stun.Message) -> bytes:
    """
    The responder's TUNNEL-NONCE, or L{ProtocolError} 400.
    """
    value = message.get(Attr.TUNNEL_NONCE)
    if value is None or len(value) != TUNNEL_ID_LENGTH:
        raise ProtocolError(400, "missing or bad tunnel nonce")
    return value


def decode_public_key(message: stun.Message) -> PublicKey:
    """
    The PUBLIC-KEY the rendezvous vouches for, or L{ProtocolError} 400.
    """
    value = message.get(Attr.PUBLIC_KEY)
    if value is None or len(value) != KEY_LENGTH:
        raise ProtocolError(400, "missing or bad public key")
    return PublicKey(value)


def timestamp(now: float) -> tuple[int, bytes]:
    """
    A TIMESTAMP attribute: C{now} (seconds) in microseconds.
    """
    return (Attr.TIMESTAMP, stun.encode_u64(int(now * 1_000_000)))


def decode_timestamp(message: stun.Message) -> float:
    """
    The TIMESTAMP of C{message} in seconds, or L{ProtocolError} 400.
    """
    value = message.get(Attr.TIMESTAMP)
    if value is None or len(value) != 8:
        raise ProtocolError(400, "missing or bad timestamp")
    return stun.decode_u64(value) / 1_000_000


def mapped_address(message: stun.Message) -> tuple[str, int] | None:
    """
    The XOR-MAPPED-ADDRESS of an answer, if it has a well-formed one.
    """
    value = message.get(Attr.XOR_MAPPED_ADDRESS)
    if value is None:
        return None
    try:
        return stun.decode_xor_address(value, message.transaction_id)
    except (stun.StunError, ValueError):
        return None


def error_attributes(code: int, reason: str | None = None) -> list[tuple[int, bytes]]:
    return [(Attr.ERROR_CODE, stun.encode_error_code(code, reason or REASONS.get(code, "Error")))]


def signed(
    method: int,
    cls: MessageClass,
    transaction_id: bytes,
    attributes: Sequence[tuple[int, bytes]],
    key: bytes,
) -> bytes:
    """
    A message with MESSAGE-INTEGRITY-SHA256 under C{key} and FINGERPRINT.
    """
    return stun.build(
        method, cls, transaction_id, attributes, integrity_sha256=key, fingerprint=True
    )


def error_of(message: stun.Message) -> tuple[int, str]:
    """
    The ERROR-CODE of an error response, or 500 when it is missing or broken.
    """
    value = message.get(Attr.ERROR_CODE)
    if value is None:
        return (500, "error response without ERROR-CODE")
    try:
        return stun.decode_error_code(value)
    except stun.StunError:
        return (500, "malformed ERROR-CODE")
