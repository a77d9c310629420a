"""
The agent's side of an introduction: what it takes from the rendezvous.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from twisted.internet.task import Clock

from punchd import stun, wire
from punchd.agent.puncher import FRESH_INTRODUCTION, Puncher
from punchd.config import AgentConfig
from punchd.keys import PrivateKey
from punchd.stun import Attr, MessageClass, Method

#: All the puncher asks of the rendezvous client here: where it is.
CLIENT = SimpleNamespace(server=("192.0.2.1", 3478), stream=None)


def settings() -> AgentConfig:
    key = PrivateKey.generate()
    return AgentConfig(
        name="bob",
        private_key_path="bob.key",
        rendezvous=("192.0.2.1", 3478),
        rendezvous_public_key=PrivateKey.generate().public_key(),
        private_key=key,
    )


def incoming(sent_at: float) -> stun.Message:
    tid = stun.new_transaction_id()
    data = wire.signed(
        Method.INCOMING,
        MessageClass.REQUEST,
        tid,
        [
            (Attr.PEER, b"alice"),
            (Attr.SERVICE, b"chat"),
            (Attr.TUNNEL_ID, bytes(16)),
            (Attr.PUBLIC_KEY, PrivateKey.generate().public_key().raw),
            wire.timestamp(sent_at),
        ],
        b"k" * 32,
    )
    return stun.parse(data)


def answer_code(puncher: Puncher, message: stun.Message) -> int:
    results: list[Any] = []
    puncher.incoming(message).addCallback(results.append)
    cls, attributes = results[0]
    assert cls == MessageClass.ERROR
    (value,) = [v for a, v in attributes if a == Attr.ERROR_CODE]
    return stun.decode_error_code(value)[0]


@pytest.mark.parametrize(
    ("age", "fresh"),
    [(0.0, True), (8.75, True), (-5.0, True), (80.0, False), (-FRESH_INTRODUCTION - 1, False)],
)
def test_introductions_are_judged_by_the_rendezvous_clock(age: float, fresh: bool) -> None:
    """
    Our own clock is an hour off: what counts is the rendezvous' time, as its
    last Register reply gave it.  An old Incoming (replayed to a restarted
    agent, say) is refused before anything is set up.
    """
    clock = Clock()
    clock.advance(1_000_000)
    puncher = Puncher(settings(), clock, CLIENT, b"k" * 32, lambda: [])  # type: ignore[arg-type]
    rendezvous_now = clock.seconds() + 3600.0
    puncher.rendezvous_clock(rendezvous_now)
    clock.advance(2.0)
    # Nothing listens: a fresh introduction gets "no listener", a stale one "rejected".
    code = answer_code(puncher, incoming(rendezvous_now + 2.0 - age))
    assert code == (460 if fresh else 403)


def test_no_introduction_before_the_rendezvous_said_its_time() -> None:
    puncher = Puncher(settings(), Clock(), CLIENT, b"k" * 32, lambda: [])  # type: ignore[arg-type]
    puncher.listen("chat", lambda hand_off: None)
    assert answer_code(puncher, incoming(0.0)) == 403


KEPT = (Attr.PEER, Attr.SERVICE, Attr.TUNNEL_ID, Attr.PUBLIC_KEY)


def test_an_incoming_without_a_time_is_a_bad_request() -> None:
    puncher = Puncher(settings(), Clock(), CLIENT, b"k" * 32, lambda: [])  # type: ignore[arg-type]
    puncher.rendezvous_clock(0.0)
    message = incoming(0.0)
    stripped = stun.parse(
        wire.signed(
            Method.INCOMING,
            MessageClass.REQUEST,
            message.transaction_id,
            [
                (a, v)
                for a, v in message.attributes
                if a in (Attr.PEER, Attr.SERVICE, Attr.TUNNEL_ID, Attr.PUBLIC_KEY)
            ],
            b"k" * 32,
        )
    )
    assert answer_code(puncher, stripped) == 400
