"""
What the initiator learns from the rendezvous' answer to its Connect.
"""

from __future__ import annotations

from typing import Any

import pytest

from punchd import stun, wire
from punchd.agent.introducer import RendezvousIntroducer, printable, relay_candidate
from punchd.keys import PrivateKey
from punchd.stun import Attr, MessageClass, Method


class Client:
    server = ("192.0.2.1", 3478)


def introducer() -> RendezvousIntroducer:
    return RendezvousIntroducer(
        Client(),  # type: ignore[arg-type]
        "bob",
        "chat",
        wait=True,
        relay=True,
        hard=False,
        pinned=None,
        explain=lambda failure: failure,
    )


def answer(*extra: tuple[int, bytes]) -> stun.Message:
    attributes: list[tuple[int, bytes]] = [
        (Attr.PUBLIC_KEY, PrivateKey.generate().public_key().raw),
        (Attr.TUNNEL_NONCE, bytes(16)),
        *extra,
    ]
    tid = stun.new_transaction_id()
    return stun.parse(stun.build(Method.CONNECT, MessageClass.SUCCESS, tid, attributes))


def test_a_refused_relay_is_remembered_in_words() -> None:
    asker = introducer()
    candidates, *_rest = asker.answered(answer((Attr.RELAY_REFUSED, b"agent alice has 16")))
    assert candidates == [] and asker.relay_refused == "agent alice has 16"


def test_a_relay_port_leaves_nothing_refused() -> None:
    asker = introducer()
    found: Any = asker.answered(answer((Attr.RELAY_PORT, stun.encode_u32(50000))))
    assert [c.address for c in found[0]] == [("192.0.2.1", 50000)]
    assert asker.relay_refused is None


def test_what_the_rendezvous_says_is_shown_safely() -> None:
    assert printable(b"busy\n\x1b[31m" + "é".encode() + b"\xff") == "busy??[31mé\ufffd"
    assert len(printable(b"x" * 1000)) == 128


def test_a_relay_on_another_node_is_where_the_incoming_says() -> None:
    tid = stun.new_transaction_id()
    attributes = [
        (Attr.RELAY_PORT, stun.encode_u32(50000)),
        (Attr.RELAY_ADDRESS, stun.encode_xor_address("198.51.100.2", 50001, tid)),
    ]
    message = stun.parse(stun.build(Method.INCOMING, MessageClass.REQUEST, tid, attributes))
    (candidate,) = relay_candidate(message, ("192.0.2.1", 3478))
    assert candidate.address == ("198.51.100.2", 50001)
    bad = stun.parse(
        stun.build(Method.INCOMING, MessageClass.REQUEST, tid, [(Attr.RELAY_ADDRESS, b"\x00")])
    )
    with pytest.raises(wire.ProtocolError):
        relay_candidate(bad, ("192.0.2.1", 3478))
