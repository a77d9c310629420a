"""
PCP (RFC 6887) and NAT-PMP (RFC 6886) packets: pure encoders and decoders,
no I/O, like L{punchd.stun}.

Both protocols ask the default gateway, on UDP port 5351, to forward an
external port to an internal one.  Only what punchd uses is here: NAT-PMP's
external address and UDP mapping requests, and PCP's ANNOUNCE and MAP for
UDP over IPv4.  A decoder returns None for anything that is not a well-formed
answer of the kind asked for, so that stray datagrams are simply ignored.
"""

from __future__ import annotations

import ipaddress
import os
import struct
from dataclasses import dataclass

SERVER_PORT = 5351

PMP_VERSION = 0
PMP_OP_ADDRESS = 0
PMP_OP_MAP_UDP = 1
PMP_REPLY = 128

PCP_VERSION = 2
PCP_OP_ANNOUNCE = 0
PCP_OP_MAP = 1
PCP_REPLY = 0x80
PCP_HEADER = 24
PCP_MAP_BODY = 36
PROTOCOL_UDP = 17
#: A NAT-PMP-only gateway's answer to a PCP request (RFC 6887 section 9).
UNSUPPORTED_VERSION = 1

PCP_RESULTS = {
    0: "success",
    1: "unsupported version",
    2: "not authorized",
    3: "malformed request",
    4: "unsupported opcode",
    5: "unsupported option",
    6: "malformed option",
    7: "network failure",
    8: "no resources",
    9: "unsupported protocol",
    10: "user exceeded quota",
    11: "cannot provide external",
    12: "address mismatch",
    13: "excessive remote peers",
}
PMP_RESULTS = {
    0: "success",
    1: "unsupported version",
    2: "not authorized",
    3: "network failure",
    4: "out of resources",
    5: "unsupported opcode",
}


@dataclass(frozen=True)
class PmpAddress:
    """A NAT-PMP external address answer."""

    result: int
    epoch: int
    address: str


@dataclass(frozen=True)
class PmpMapping:
    """A NAT-PMP mapping answer: C{lifetime} 0 confirms a deletion."""

    result: int
    epoch: int
    internal_port: int
    external_port: int
    lifetime: int


@dataclass(frozen=True)
class PcpAnswer:
    """
    A PCP answer.  For MAP, the nonce, ports and external address; for an
    ANNOUNCE (or an error without a body) those are empty.
    """

    opcode: int
    result: int
    lifetime: int
    epoch: int
    nonce: bytes = b""
    internal_port: int = 0
    external_port: int = 0
    external_address: str = ""


def pmp_address_request() -> bytes:
    return struct.pack("!BB", PMP_VERSION, PMP_OP_ADDRESS)


def pmp_map_request(internal_port: int, external_port: int, lifetime: int) -> bytes:
    """
    Map (or, with C{lifetime} 0 and C{external_port} 0, delete) a UDP port.
    """
    return struct.pack(
        "!BBHHHI", PMP_VERSION, PMP_OP_MAP_UDP, 0, internal_port, external_port, lifetime
    )


def parse_pmp_address(data: bytes) -> PmpAddress | None:
    if len(data) < 12 or data[0] != PMP_VERSION or data[1] != PMP_REPLY + PMP_OP_ADDRESS:
        return None
    result, epoch = struct.unpack_from("!HI", data, 2)
    return PmpAddress(result, epoch, str(ipaddress.IPv4Address(data[8:12])))


def parse_pmp_mapping(data: bytes) -> PmpMapping | None:
    if len(data) < 16 or data[0] != PMP_VERSION or data[1] != PMP_REPLY + PMP_OP_MAP_UDP:
        return None
    return PmpMapping(*struct.unpack_from("!HIHHI", data, 2))


def is_pmp_answer(data: bytes) -> bool:
    """
    Any NAT-PMP answer (version 0, reply bit set): what a NAT-PMP gateway
    sends back to a PCP request it does not understand.
    """
    return len(data) >= 4 and data[0] == PMP_VERSION and data[1] >= PMP_REPLY


def _mapped_v6(address: str) -> bytes:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv4Address):
        return ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + ip.packed).packed
    return ip.packed


def _unmapped(packed: bytes) -> str:
    ip = ipaddress.IPv6Address(packed)
    return str(ip.ipv4_mapped or ip)


def _pcp_header(opcode: int, lifetime: int, client: str) -> bytes:
    return struct.pack("!BBHI", PCP_VERSION, opcode, 0, lifetime) + _mapped_v6(client)


def pcp_announce_request(client: str) -> bytes:
    """
    ANNOUNCE: answered by any PCP server, so it tells whether one is there.
    """
    return _pcp_header(PCP_OP_ANNOUNCE, 0, client)


def new_nonce() -> bytes:
    return os.urandom(12)


def pcp_map_request(
    client: str,
    nonce: bytes,
    internal_port: int,
    lifetime: int,
    external: tuple[str, int] = ("0.0.0.0", 0),
) -> bytes:
    """
    MAP a UDP port of C{client} (renew or, with C{lifetime} 0, delete it with
    the same C{nonce}); C{external} is the suggestion, if any.
    """
    if len(nonce) != 12:
        raise ValueError("a PCP mapping nonce is 12 bytes")
    body = nonce + struct.pack("!B3xHH", PROTOCOL_UDP, internal_port, external[1])
    return _pcp_header(PCP_OP_MAP, lifetime, client) + body + _mapped_v6(external[0])


def parse_pcp(data: bytes) -> PcpAnswer | None:
    """
    A PCP answer; a MAP answer without its body is returned without one
    (errors may be short), anything else that is not PCP is None.
    """
    if len(data) < PCP_HEADER or data[0] != PCP_VERSION or not data[1] & PCP_REPLY:
        return None
    opcode = data[1] & 0x7F
    result = data[3]
    lifetime, epoch = struct.unpack_from("!II", data, 4)
    if opcode != PCP_OP_MAP or len(data) < PCP_HEADER + PCP_MAP_BODY:
        return PcpAnswer(opcode, result, lifetime, epoch)
    body = data[PCP_HEADER : PCP_HEADER + PCP_MAP_BODY]
    protocol, internal, external = struct.unpack_from("!B3xHH", body, 12)
    if protocol != PROTOCOL_UDP:
        return None
    return PcpAnswer(
        opcode, result, lifetime, epoch, body[:12], internal, external, _unmapped(body[20:36])
    )
