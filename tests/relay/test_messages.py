"""
Tests for L{punchd.relay.messages}: the bind an agent sends and the answer
it gets, as bytes on the wire.
"""

from __future__ import annotations

import os

import pytest

from punchd import stun
from punchd.relay import build_bind, parse_bind_answer
from punchd.relay.messages import BIND_TYPE, bind_answer, parse_bind
from punchd.stun import Attr, MessageClass, Method

KEY = os.urandom(32)
TUNNEL = os.urandom(16)


def test_relay_bind_is_its_own_method() -> None:
    assert Method.RELAY_BIND == 0x0F7
    assert len({int(m) for m in Method}) == len(list(Method))


@pytest.mark.parametrize("release", [False, True])
def test_a_bind_round_trips(release: bool) -> None:
    tid, data = build_bind("alice", KEY, TUNNEL, release=release)
    assert data[:2] == BIND_TYPE
    bind = parse_bind(data)
    assert bind is not None
    assert (bind.name, bind.tunnel_id, bind.release) == ("alice", TUNNEL, release)
    assert bind.message.transaction_id == tid
    assert bind.verify(KEY) and not bind.verify(os.urandom(32))
    message = stun.parse(data)
    assert message.has(Attr.MESSAGE_INTEGRITY_SHA256) and message.has(Attr.FINGERPRINT)


@pytest.mark.parametrize("name", ["a", "x" * 64])
@pytest.mark.parametrize("address", [("192.0.2.1", 1), ("2001:db8::ffff:1", 65535)])
@pytest.mark.parametrize("release", [False, True])
def test_the_answer_is_never_bigger_than_the_bind(
    name: str, address: tuple[str, int], release: bool
) -> None:
    _, data = build_bind(name, KEY, TUNNEL, release=release)
    bind = parse_bind(data)
    assert bind is not None
    answer = bind_answer(bind, address, KEY)
    assert len(answer) <= len(data)
    assert parse_bind_answer(answer, KEY) == address
    assert parse_bind_answer(stun.parse(answer), KEY) == address


def test_answers_that_are_not_the_relays_are_refused() -> None:
    _, data = build_bind("alice", KEY, TUNNEL)
    bind = parse_bind(data)
    assert bind is not None
    answer = bind_answer(bind, ("192.0.2.1", 5), KEY)
    assert parse_bind_answer(answer, os.urandom(32)) is None
    assert parse_bind_answer(data, KEY) is None  # a request, not an answer
    assert parse_bind_answer(b"junk", KEY) is None
    tampered = bytearray(answer)
    tampered[30] ^= 1
    assert parse_bind_answer(bytes(tampered), KEY) is None
    other = stun.build(
        Method.REGISTER, MessageClass.SUCCESS, bytes(12), integrity_sha256=KEY, fingerprint=True
    )
    assert parse_bind_answer(other, KEY) is None


def test_malformed_binds_parse_as_nothing() -> None:
    tid = os.urandom(12)
    good = [(Attr.USERNAME, b"alice"), (Attr.TUNNEL_ID, TUNNEL)]

    def bind(attributes: list[tuple[int, bytes]], fingerprint: bool = True) -> bytes:
        return stun.build(
            Method.RELAY_BIND,
            MessageClass.REQUEST,
            tid,
            attributes,
            integrity_sha256=KEY,
            fingerprint=fingerprint,
        )

    assert parse_bind(bind(good)) is not None
    for data in [
        b"",
        BIND_TYPE + bytes(18),
        bind(good, fingerprint=False),
        bind(good[:1]),
        bind(good[1:]),
        bind([(Attr.USERNAME, b"bad name!"), (Attr.TUNNEL_ID, TUNNEL)]),
        bind([(Attr.USERNAME, b"alice"), (Attr.TUNNEL_ID, TUNNEL[:8])]),
        bind([*good, (Attr.LIFETIME, b"\x00")]),
        bind([*good, (0x4DFF, b"unknown, comprehension required")]),
        stun.build(Method.RELAY_BIND, MessageClass.INDICATION, tid, good, fingerprint=True),
    ]:
        assert parse_bind(data) is None, data


def test_a_tunnel_id_must_be_sixteen_bytes() -> None:
    with pytest.raises(ValueError):
        build_bind("alice", KEY, b"short")
