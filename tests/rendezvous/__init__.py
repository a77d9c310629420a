"""
Tests for L{punchd.rendezvous}: the protocol under a fake clock and
transport, and the real server process on loopback.
"""

from __future__ import annotations

import os

from punchd import stun, wire
from punchd.stun import Attr, MessageClass, Method


def accepted(incoming: stun.Message, key: bytes) -> bytes:
    """
    A responder's yes to an Incoming: a fresh tunnel nonce and no
    candidates, signed with its rendezvous key.
    """
    return wire.signed(
        Method.INCOMING,
        MessageClass.SUCCESS,
        incoming.transaction_id,
        [(Attr.TUNNEL_NONCE, os.urandom(16))],
        key,
    )
