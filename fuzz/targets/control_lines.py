"""
The control socket's line parser and request handling: the bytes a local
program sends, fed to a C{ControlProtocol} over a fake Unix transport, with
a fake agent core.

Whatever comes in, every line the agent sends back must be a JSON object
with an C{id}, nothing may be an internal error, and after the program goes
away every tunnel socket the core handed over must be closed.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from fuzz.harness import Crash, no_logged_failures
from punchd.agent.api import ERROR_CODES, HandOff, ProgressCallback, TunnelFailed
from punchd.agent.control import Authorizer, ControlFactory, ControlLimits

AUTHORIZER = Authorizer()
LIMITS = ControlLimits(max_unread=4096, stall_timeout=5.0, idle_timeout=30.0)


class FakeSocket:
    """
    Stands for a tunnel socket: only its descriptor number and closing matter.
    """

    def __init__(self) -> None:
        self.closed = False

    def fileno(self) -> int:
        return -1 if self.closed else 1000

    def close(self) -> None:
        self.closed = True


class FakeHandle:
    def getsockopt(self, level: int, option: int, size: int) -> bytes:
        return struct.pack("3i", os.getpid(), os.getuid(), os.getgid())


class FakeUNIXTransport(StringTransport):
    def __init__(self) -> None:
        super().__init__()
        self.descriptors: list[int] = []
        self.reading = True

    def getHandle(self) -> FakeHandle:
        return FakeHandle()

    def sendFileDescriptor(self, descriptor: int) -> None:
        if descriptor < 0:
            raise Crash("sent the descriptor of a closed socket")
        self.descriptors.append(descriptor)

    def pauseProducing(self) -> None:
        self.reading = False

    def resumeProducing(self) -> None:
        self.reading = True

    def abortConnection(self) -> None:
        self.disconnecting = True


class FakeCore:
    """
    connect() to a peer named after an error code fails with it; to C{hold...}
    waits; to anyone else succeeds after two progress events.
    """

    def __init__(self) -> None:
        self.socks: list[FakeSocket] = []
        self.held: list[Deferred[HandOff]] = []
        self.listeners: dict[str, Callable[[HandOff], None]] = {}

    def handoff(self, peer: str, service: str) -> HandOff:
        sock = FakeSocket()
        self.socks.append(sock)
        info = {"id": f"t{len(self.socks)}", "peer": peer, "service": service, "rtt_ms": 0.5}
        return HandOff(sock, info)  # type: ignore[arg-type]

    def status(self) -> dict[str, Any]:
        return {"name": "alice", "registered": True, "tunnels": {"pending": len(self.held)}}

    def peers(self) -> Deferred[list[dict[str, Any]]]:
        return succeed([{"name": "bob"}])

    def connect(
        self, peer: str, service: str, timeout: float, progress: ProgressCallback
    ) -> Deferred[HandOff]:
        if peer in ERROR_CODES:
            return fail(TunnelFailed(peer, f"failed with {peer}"))
        if peer.startswith("hold"):
            d: Deferred[HandOff] = Deferred()
            self.held.append(d)
            return d
        progress({"event": "introduced"})
        progress({"event": "probing", "pairs": 2})
        return succeed(self.handoff(peer, service))

    def listen(self, service: str, incoming: Callable[[HandOff], None]) -> Callable[[], None]:
        self.listeners[service] = incoming
        return lambda: self.listeners.pop(service, None) and None


def _check_replies(output: bytes) -> None:
    for line in output.split(b"\n")[:-1]:
        try:
            reply = json.loads(line, parse_constant=_constant)
        except ValueError as e:
            raise Crash(f"the agent sent a line that is not JSON: {line!r}") from e
        if not isinstance(reply, dict) or "id" not in reply:
            raise Crash(f"the agent sent a line without an id: {line!r}")
        if reply.get("error", {}).get("code") == "internal":
            raise Crash(f"internal error: {line!r}")


def _constant(name: str) -> None:
    raise ValueError(name)


def one_input(data: bytes) -> None:
    with no_logged_failures():
        core = FakeCore()
        clock = Clock()
        factory = ControlFactory(core, AUTHORIZER, clock=clock, limits=LIMITS)  # type: ignore[arg-type]
        protocol = factory.buildProtocol(None)
        transport = FakeUNIXTransport()
        protocol.makeConnection(transport)
        half = len(data) // 2
        for chunk in (data[:half], data[half:]):
            if transport.reading and not transport.disconnecting:
                protocol.dataReceived(chunk)
        for i, d in enumerate(core.held):
            if i % 2:
                d.callback(core.handoff("bob", "chat"))
        for incoming in list(core.listeners.values()):
            incoming(core.handoff("carol", "chat"))
        if transport.producer is not None:
            transport.producer.resumeProducing()  # everything was read
        clock.advance(LIMITS.idle_timeout)
        _check_replies(transport.value())
        protocol.connectionLost()
        if transport.producer is not None:
            transport.producer.stopProducing()
        open_socks = [s for s in core.socks if not s.closed]
        if open_socks:
            raise Crash(f"{len(open_socks)} tunnel sockets left open")
        if factory.connections:
            raise Crash(f"connections still counted: {factory.connections}")


def seeds() -> Iterable[bytes]:
    requests: list[dict[str, Any]] = [
        {"id": 1, "op": "status"},
        {"id": 2, "op": "peers"},
        {"id": 3, "op": "connect", "peer": "bob", "service": "chat", "timeout": 10},
        {"id": "x", "op": "connect", "peer": "hold-1", "service": "chat"},
        {"id": 4.5, "op": "connect", "peer": "peer-offline", "service": "chat", "timeout": 0.5},
        {"id": 5, "op": "listen", "service": "chat"},
        {"id": None, "op": "unlisten"},
        {"id": True, "op": "frobnicate"},
    ]
    lines = [json.dumps(r).encode() + b"\n" for r in requests]
    yield from lines
    yield b"".join(lines)
    yield lines[5] + b'{"id": 5, "op": "unlisten"}\n' + lines[0]
    yield lines[3] + lines[3].replace(b"hold-1", b"hold-2")
    yield b'{"id": 1, "op": "status", "x": NaN}\n'
    yield b'{"id": 1e999, "op": "status"}\n'
    yield b"[" * 100 + b"]" * 100 + b"\n"
    yield b"\x00\xff binary \x80\n\n  \r\n"
    yield b'{"id": 1, "op": "status"}'  # no newline: never a request
