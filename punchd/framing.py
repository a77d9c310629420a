"""
Datagrams on a TLS stream, where UDP is blocked (docs/protocol.rst, "TLS").

RFC 4571 framing: each frame is a 2-byte big-endian length and that many
bytes.  One length check comes before anything is parsed, for both kinds
of frame a stream carries, which RFC 8489's own TCP framing (the STUN
header's length, plus TURN ChannelData with its own length and padding)
would not give.  A frame's first byte says what it carries:

  - 0x00-0x3F: a STUN message, exactly what a UDP datagram to or from the
    rendezvous would be (same signatures, same checks);
  - 0x40: a relayed datagram: the 2-byte relay port it goes to (from the
    agent) or comes from (from the relay), then the datagram unchanged.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = [
    "MAX_FRAME",
    "RELAYED",
    "Deframer",
    "FrameError",
    "Relayed",
    "Signalling",
    "parse_frame",
    "relayed_frame",
    "stun_frame",
]

#: The largest payload a 2-byte length can announce.
MAX_FRAME = 0xFFFF
#: The first byte of a relayed datagram's frame.
RELAYED = 0x40
_LENGTH = struct.Struct("!H")
_RELAYED_HEADER = struct.Struct("!BH")


class FrameError(Exception):
    """
    The stream carries something that is not a frame of ours: the
    connection is closed, since nothing after it can be trusted to align.
    """


@dataclass(frozen=True)
class Signalling:
    "A STUN message for (or from) the rendezvous."

    message: bytes


@dataclass(frozen=True)
class Relayed:
    "A datagram to (or from) relay port C{port}."

    port: int
    datagram: bytes


def stun_frame(message: bytes) -> bytes:
    if not message or message[0] >= RELAYED:
        raise ValueError("not a STUN message")
    return _frame(message)


def relayed_frame(port: int, datagram: bytes) -> bytes:
    if not 0 < port < 65536:
        raise ValueError(f"bad relay port {port}")
    return _frame(_RELAYED_HEADER.pack(RELAYED, port) + datagram)


def _frame(payload: bytes) -> bytes:
    if len(payload) > MAX_FRAME:
        raise ValueError(f"a frame holds at most {MAX_FRAME} bytes")
    return _LENGTH.pack(len(payload)) + payload


def parse_frame(payload: bytes) -> Signalling | Relayed:
    """
    What one frame's payload carries; L{FrameError} for anything else.
    """
    if not payload:
        raise FrameError("empty frame")
    kind = payload[0]
    if kind < RELAYED:
        return Signalling(payload)
    if kind == RELAYED:
        if len(payload) < _RELAYED_HEADER.size:
            raise FrameError("relayed frame without a port")
        _, port = _RELAYED_HEADER.unpack_from(payload)
        if port == 0:
            raise FrameError("relayed frame for port 0")
        return Relayed(port, payload[_RELAYED_HEADER.size :])
    raise FrameError(f"unknown frame type 0x{kind:02x}")


class Deframer:
    """
    Cuts a byte stream into frame payloads, however the bytes arrive.

    At most one frame (C{max_frame} bytes) plus its length is ever held: a
    peer announcing more gets L{FrameError} before it has sent it.
    """

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buffer = bytearray()

    @property
    def pending(self) -> int:
        "Bytes held for a frame not yet complete."
        return len(self._buffer)

    def feed(self, data: bytes) -> list[bytes]:
        """
        Add C{data}; return the payloads it completed, in order.
        """
        buffer = self._buffer
        buffer += data
        payloads = []
        offset = 0
        while len(buffer) - offset >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(buffer, offset)
            if length == 0 or length > self.max_frame:
                raise FrameError(f"a frame of {length} bytes (at most {self.max_frame})")
            end = offset + _LENGTH.size + length
            if end > len(buffer):
                break
            payloads.append(bytes(buffer[offset + _LENGTH.size : end]))
            offset = end
        del buffer[:offset]
        return payloads
