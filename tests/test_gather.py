"""
Tests for L{punchd.gather}: the agent's half of the authenticated gather.
"""

from __future__ import annotations

import pytest

from punchd import stun
from punchd.gather import build_gather_answer, build_gather_request, parse_gather_answer
from punchd.keys import PrivateKey, derive_rendezvous_key
from punchd.stun import Attr, MessageClass, Method

SERVER = PrivateKey.generate()
AGENT = PrivateKey.generate()
KEY = derive_rendezvous_key(AGENT, SERVER.public_key(), "bob")
OTHER_KEY = derive_rendezvous_key(PrivateKey.generate(), SERVER.public_key(), "bob")


def test_request_is_a_signed_binding_naming_the_agent() -> None:
    tid, request = build_gather_request("bob", KEY)
    message = stun.parse(request)
    assert (message.method, message.cls) == (Method.BINDING, MessageClass.REQUEST)
    assert message.transaction_id == tid
    assert message.attributes[0] == (Attr.USERNAME, b"bob")
    assert stun.verify_integrity_sha256(message, KEY)
    assert message.attributes[-1][0] == Attr.FINGERPRINT
    assert not message.has(Attr.NONCE) and not message.has(Attr.SEQUENCE)
    assert build_gather_request("bob", KEY)[0] != tid


@pytest.mark.parametrize("source", [("192.0.2.1", 1), ("2001:db8::1:2:3:4", 65535)])
@pytest.mark.parametrize("name", ["b", "bob", "a" * 64])
def test_answer_round_trips_and_is_never_larger_than_the_request(
    source: tuple[str, int], name: str
) -> None:
    tid, request = build_gather_request(name, KEY)
    answer = build_gather_answer(tid, source, KEY)
    assert len(answer) <= len(request)
    assert parse_gather_answer(answer, KEY) == source
    assert parse_gather_answer(stun.parse(answer), KEY, tid) == source


def test_anything_but_our_signed_answer_is_refused() -> None:
    tid, _ = build_gather_request("bob", KEY)
    source = ("198.51.100.7", 4000)
    good = build_gather_answer(tid, source, KEY)
    assert parse_gather_answer(good, OTHER_KEY) is None
    assert parse_gather_answer(good, KEY, bytes(12)) is None
    assert parse_gather_answer(good[:-1], KEY) is None
    assert parse_gather_answer(b"junk" * 10, KEY) is None
    # An unsigned standard answer (what a plain STUN server sends) is no gather answer.
    plain = stun.binding_response(stun.build(Method.BINDING, MessageClass.REQUEST, tid), *source)
    assert plain is not None and parse_gather_answer(plain, KEY) is None
    error = stun.build(Method.BINDING, MessageClass.ERROR, tid, integrity_sha256=KEY)
    assert parse_gather_answer(error, KEY) is None
    unsigned_request = stun.build(Method.BINDING, MessageClass.SUCCESS, tid, integrity_sha256=KEY)
    assert parse_gather_answer(unsigned_request, KEY) is None
