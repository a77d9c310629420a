"""
The TLS stream's framing: partial reads, several frames at once, oversize
and garbage.
"""

from __future__ import annotations

import pytest

from punchd.framing import (
    MAX_FRAME,
    Deframer,
    FrameError,
    Relayed,
    Signalling,
    parse_frame,
    relayed_frame,
    stun_frame,
)

MESSAGE = b"\x00\x01\x00\x00" + bytes(16)


def test_a_frame_split_at_every_byte_comes_out_once() -> None:
    stream = stun_frame(MESSAGE) + relayed_frame(50000, b"hello")
    for cut in range(len(stream) + 1):
        deframer = Deframer()
        payloads = deframer.feed(stream[:cut]) + deframer.feed(stream[cut:])
        assert [parse_frame(p) for p in payloads] == [
            Signalling(MESSAGE),
            Relayed(50000, b"hello"),
        ]
        assert deframer.pending == 0


def test_one_byte_at_a_time() -> None:
    deframer = Deframer()
    stream = relayed_frame(1, b"") + stun_frame(MESSAGE) * 3
    payloads = [p for byte in stream for p in deframer.feed(bytes([byte]))]
    assert [parse_frame(p) for p in payloads] == [Relayed(1, b"")] + [Signalling(MESSAGE)] * 3


def test_an_oversize_frame_is_refused_before_it_arrives() -> None:
    deframer = Deframer(max_frame=100)
    with pytest.raises(FrameError):
        deframer.feed(b"\x00\x65")  # 101 bytes announced, none sent


def test_a_zero_length_frame_is_garbage() -> None:
    with pytest.raises(FrameError):
        Deframer().feed(b"\x00\x00")


def test_a_frame_never_holds_more_than_the_length_allows() -> None:
    relayed_frame(65535, bytes(MAX_FRAME - 3))
    with pytest.raises(ValueError):
        relayed_frame(65535, bytes(MAX_FRAME - 2))
    with pytest.raises(ValueError):
        relayed_frame(0, b"x")
    with pytest.raises(ValueError):
        stun_frame(b"\x40not stun")


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\x40",
        b"\x40\x00",
        b"\x40\x00\x00data",
        b"\x41\x00\x01",
        b"\xff" * 20,
        b"GET / HTTP/1.1",
    ],
)
def test_garbage_payloads_are_refused(payload: bytes) -> None:
    with pytest.raises(FrameError):
        parse_frame(payload)
