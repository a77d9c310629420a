"""
Tests for L{punchd.wire}: the attribute decoders every side shares.
"""

from __future__ import annotations

import pytest

from punchd import stun, wire
from punchd.keys import KEY_LENGTH, TUNNEL_ID_LENGTH, PrivateKey
from punchd.stun import Attr, MessageClass, Method
from punchd.wire import Candidate, CandidateKind

TID = bytes(range(12))


def message(attributes: list[tuple[int, bytes]]) -> stun.Message:
    data = stun.build(Method.CONNECT, MessageClass.SUCCESS, TID, attributes)
    return stun.parse(data)


def test_public_key_decodes() -> None:
    key = PrivateKey.generate().public_key()
    assert wire.decode_public_key(message([(Attr.PUBLIC_KEY, key.raw)])) == key


@pytest.mark.parametrize("value", [None, b"", bytes(KEY_LENGTH - 1), bytes(KEY_LENGTH + 4)])
def test_public_key_missing_or_wrong_length(value: bytes | None) -> None:
    attributes = [] if value is None else [(Attr.PUBLIC_KEY, value)]
    with pytest.raises(wire.ProtocolError) as caught:
        wire.decode_public_key(message(attributes))
    assert caught.value.code == 400
    assert "public key" in caught.value.reason


def test_tunnel_nonce_decodes() -> None:
    nonce = bytes(range(TUNNEL_ID_LENGTH))
    assert wire.decode_tunnel_nonce(message([(Attr.TUNNEL_NONCE, nonce)])) == nonce


@pytest.mark.parametrize("value", [None, bytes(TUNNEL_ID_LENGTH - 4), bytes(TUNNEL_ID_LENGTH + 4)])
def test_tunnel_nonce_missing_or_wrong_length(value: bytes | None) -> None:
    attributes = [] if value is None else [(Attr.TUNNEL_NONCE, value)]
    with pytest.raises(wire.ProtocolError) as caught:
        wire.decode_tunnel_nonce(message(attributes))
    assert caught.value.code == 400


def test_candidates_round_trip() -> None:
    candidates = [Candidate(kind, "192.0.2.1", 1000 + kind) for kind in CandidateKind]
    decoded = wire.decode_candidates(message(wire.encode_candidates(candidates, TID)))
    assert decoded == candidates


def test_unknown_candidate_kind_is_a_bad_request() -> None:
    value = stun.encode_candidate(len(CandidateKind), "192.0.2.1", 1, TID)
    with pytest.raises(wire.ProtocolError) as caught:
        wire.decode_candidates(message([(Attr.CANDIDATE, value)]))
    assert caught.value.code == 400
