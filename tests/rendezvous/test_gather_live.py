"""
The real rendezvous process on loopback, with its default anonymous Binding
limit: a flood of plain Binding requests from the agents' own IP (a
neighbour behind the same CGNAT) drains that IP's budget, and an agent's
authenticated gathers from fresh sockets are still answered.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from netlab.deployment import Deployment
from punchd import stun
from punchd.gather import build_gather_request, parse_gather_answer
from punchd.keys import derive_rendezvous_key
from punchd.stun import MessageClass, Method

FLOOD_RATE = 150  # Binding requests per second, well over the default 50


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    with Deployment(tmp_path, binding_rate=50) as d:
        d.add_agent("alice")
        d.start_rendezvous()
        yield d


def flood(server: tuple[str, int], stop: threading.Event) -> None:
    """
    Plain Binding requests from 127.0.0.1, FLOOD_RATE a second, until C{stop}.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sent = 0
        started = time.monotonic()
        while not stop.is_set():
            request = stun.build(Method.BINDING, MessageClass.REQUEST, stun.new_transaction_id())
            sock.sendto(request, server)
            sent += 1
            pause = started + sent / FLOOD_RATE - time.monotonic()
            if pause > 0:
                time.sleep(pause)


def ask(
    server: tuple[str, int], request: bytes, tid: bytes, tries: int = 3, timeout: float = 0.5
) -> bytes | None:
    """
    One exchange from a fresh socket, as a tunnel gathers: the answer with
    C{tid}, or None after C{tries} sends.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(timeout)
        for _ in range(tries):
            sock.sendto(request, server)
            try:
                answer = sock.recv(2048)
            except TimeoutError:
                continue
            if answer[8:20] == tid:
                return answer
    return None


def test_gathers_are_answered_through_a_binding_flood_from_the_same_ip(
    deployment: Deployment,
) -> None:
    server = (deployment.rendezvous_host, deployment.rendezvous_port)
    alice = deployment.agents["alice"]
    key = derive_rendezvous_key(alice.key, deployment.rendezvous_key.public_key(), "alice")
    stop = threading.Event()
    flooder = threading.Thread(target=flood, args=(server, stop))
    flooder.start()
    try:
        time.sleep(1.5)  # past the anonymous burst
        gathered = anonymous = 0
        for _ in range(20):
            tid, request = build_gather_request("alice", key)
            answer = ask(server, request, tid)
            if answer is not None:
                assert parse_gather_answer(answer, key, tid) is not None
                gathered += 1
            plain_tid = stun.new_transaction_id()
            plain = stun.build(Method.BINDING, MessageClass.REQUEST, plain_tid)
            anonymous += ask(server, plain, plain_tid, tries=1, timeout=0.2) is not None
            time.sleep(0.05)
    finally:
        stop.set()
        flooder.join(10)
    # The flood did starve plain Binding from this IP, not the agent's gathers.
    assert anonymous <= 10, anonymous
    assert gathered == 20
