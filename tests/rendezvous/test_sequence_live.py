"""
The sequence-window lockout, reproduced as it happens: an agent that once
ran with its clock far ahead (booted before the clock was set) leaves the
rendezvous a replay window far in the future; restarted with the right
clock, the real agent must still register.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

from netlab.deployment import Deployment
from punchd import stun, wire
from punchd.keys import derive_rendezvous_key
from punchd.stun import Attr, MessageClass, Method

DAY_US = 86400 * 10**6


def register_raw(d: Deployment, name: str, sequences: list[int]) -> list[int]:
    """
    Send signed Register requests as C{name} with these numbers (after
    fetching a nonce); the error code of each answer (0 for success).
    """
    key = derive_rendezvous_key(d.agents[name].key, d.rendezvous_key.public_key(), name)
    server = (d.rendezvous_host, d.rendezvous_port)
    nonce = bytes(20)
    codes = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(3.0)
        for sequence in [sequences[0] - 1, *sequences]:
            attributes = [
                (Attr.USERNAME, name.encode("ascii")),
                (Attr.SEQUENCE, stun.encode_u64(sequence)),
                (Attr.NONCE, nonce),
                (Attr.LIFETIME, stun.encode_u32(30)),
            ]
            tid = stun.new_transaction_id()
            sock.sendto(
                wire.signed(Method.REGISTER, MessageClass.REQUEST, tid, attributes, key), server
            )
            answer = stun.parse(sock.recv(2048))
            assert answer.transaction_id == tid and stun.verify_integrity_sha256(answer, key)
            code = 0 if answer.cls == MessageClass.SUCCESS else wire.error_of(answer)[0]
            if code == 438:
                nonce = answer.get(Attr.NONCE) or nonce
            else:
                codes.append(code)
    return codes


def test_agent_registers_after_running_with_a_clock_far_ahead(tmp_path: Path) -> None:
    with Deployment(tmp_path, keepalive=2.0) as d:
        d.add_agent("dave")
        d.start_rendezvous()
        now_us = time.time_ns() // 1000
        # A day ahead is refused outright; half an hour ahead is taken and
        # leaves the window there.
        assert register_raw(d, "dave", [now_us + DAY_US, now_us + DAY_US // 48]) == [439, 0]
        d.start_agent("dave", wait=15.0)
        assert d.status("dave")["registration"] == "registered"
        assert "resynchronised our request numbers" in d.agents["dave"].log.read_text()
