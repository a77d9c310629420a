"""
Tests of the punch-agent.

The package also holds a fake agent core serving a real control socket, and
fixtures for it, shared by the control-socket, client and punchctl tests.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from punchd.agent.api import ERROR_CODES, HandOff, ProgressCallback, TunnelFailed
from punchd.agent.control import Authorizer, ControlFactory, ControlLimits, ControlService

T = TypeVar("T")


@dataclass
class Held:
    """
    A connect the fake core keeps waiting until the test releases it.
    """

    peer: str
    service: str
    progress: ProgressCallback
    deferred: Deferred[HandOff]


class FakeCore:
    """
    An agent core whose tunnels are real connected UDP socket pairs on 127.0.0.1.

    connect() to a peer named after an error code fails with that code; to
    C{broken} raises a plain exception; to a peer named C{hold...} waits for
    L{release}; to anyone else it succeeds at once, after two progress events.
    """

    def __init__(self) -> None:
        self.status_value: dict[str, Any] = {
            "name": "alice",
            "registered": True,
            "rendezvous": "192.0.2.1:3478",
            "mapped": "198.51.100.7:40000",
            "tunnels": {"pending": 0, "handed_off": 3},
        }
        self.peer_list: list[dict[str, Any]] = [{"name": "bob"}, {"name": "carol"}]
        #: What the peer of each new tunnel says at once, before the hand-off.
        self.greetings: tuple[bytes, ...] = ()
        self.connects: list[tuple[str, str, float]] = []
        self.held: list[Held] = []
        self.cancelled: list[str] = []
        self.listeners: dict[str, Callable[[HandOff], None]] = {}
        self.unlistened: list[str] = []
        #: The agent's copy of every socket handed off: each must end closed.
        self.agent_ends: list[socket.socket] = []
        #: The peer's end of each tunnel, by tunnel id.
        self.far_ends: dict[str, socket.socket] = {}

    def tunnel(self, peer: str, service: str) -> HandOff:
        agent_end = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        far_end = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for sock in agent_end, far_end:
            sock.bind(("127.0.0.1", 0))
        agent_end.connect(far_end.getsockname())
        far_end.connect(agent_end.getsockname())
        agent_end.setblocking(False)  # as the agent's own sockets are
        far_end.settimeout(5)
        for greeting in self.greetings:
            far_end.send(greeting)
        tid = f"t{len(self.agent_ends)}"
        self.agent_ends.append(agent_end)
        self.far_ends[tid] = far_end
        info = {
            "id": tid,
            "peer": peer,
            "service": service,
            "local": f"127.0.0.1:{agent_end.getsockname()[1]}",
            "remote": f"127.0.0.1:{far_end.getsockname()[1]}",
            "path": "direct",
            "candidates": ["host", "host"],
            "rtt_ms": 0.1,
            "setup_ms": 42,
        }
        return HandOff(agent_end, info)

    def status(self) -> dict[str, Any]:
        return self.status_value

    def peers(self) -> Deferred[list[dict[str, Any]]]:
        return succeed(self.peer_list)

    def connect(
        self, peer: str, service: str, timeout: float, progress: ProgressCallback
    ) -> Deferred[HandOff]:
        self.connects.append((peer, service, timeout))
        if peer in ERROR_CODES:
            return fail(TunnelFailed(peer, f"failed with {peer}"))
        if peer == "broken":
            return fail(RuntimeError("bug in the core"))
        if peer.startswith("hold"):
            d: Deferred[HandOff] = Deferred(lambda _: self.cancelled.append(peer))
            self.held.append(Held(peer, service, progress, d))
            return d
        progress({"event": "introduced"})
        progress({"event": "probing", "pairs": 2})
        return succeed(self.tunnel(peer, service))

    def release(self, held: Held) -> None:
        held.progress({"event": "introduced"})
        held.deferred.callback(self.tunnel(held.peer, held.service))

    def listen(self, service: str, incoming: Callable[[HandOff], None]) -> Callable[[], None]:
        self.listeners[service] = incoming

        def unregister() -> None:
            del self.listeners[service]
            self.unlistened.append(service)

        return unregister

    def close(self) -> None:
        for sock in [*self.agent_ends, *self.far_ends.values()]:
            sock.close()


# Fixtures are named apart from their functions so that test modules can
# import them without the import clashing with test parameters.


@pytest.fixture(name="core")
def core_fixture() -> Iterator[FakeCore]:
    core = FakeCore()
    yield core
    core.close()


@pytest.fixture(name="sockdir")
def sockdir_fixture() -> Iterator[str]:
    path = short_tempdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(name="agent_socket")
def agent_socket_fixture(core: FakeCore, sockdir: str) -> Iterator[str]:
    """
    The path of a control socket served by C{core}, connect timeout 7 s.
    """
    path = os.path.join(sockdir, "agent.sock")
    service = serve(core, path, connect_timeout=7.0)
    yield path
    pytest_twisted.blockon(maybeDeferred(service.stopService))


def short_tempdir() -> str:
    """
    A fresh directory with a short path: sun_path holds 107 bytes only.
    """
    return tempfile.mkdtemp(prefix="punchd-", dir="/tmp")


def serve(
    core: FakeCore,
    path: str,
    authorizer: Authorizer | None = None,
    connect_timeout: float = 10.0,
    limits: ControlLimits | None = None,
) -> ControlService:
    factory = ControlFactory(
        core,
        authorizer or Authorizer(),
        connect_timeout=connect_timeout,
        clock=reactor,
        limits=limits or ControlLimits(),
    )
    service = ControlService(reactor, path, factory)
    service.startService()
    return service


def in_thread(f: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
    """
    Run blocking client code in its own thread while the reactor serves it.
    """
    d: Deferred[T] = Deferred()

    def run() -> None:
        try:
            result = f(*args, **kwargs)
        except BaseException:
            reactor.callFromThread(d.errback, Failure())
        else:
            reactor.callFromThread(d.callback, result)

    threading.Thread(target=run, daemon=True).start()
    return d


async def wait_until(
    condition: Callable[[], object], timeout: float = 5.0, what: str | None = None
) -> None:
    """
    Let the reactor run until C{condition()} is true; fail after C{timeout}.
    """
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await deferLater(reactor, 0.01)
    raise AssertionError(f"timed out waiting for {what or condition}")


class RawConnection:
    """
    A blocking control-socket connection that shows the bytes the agent sends.
    """

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(path)
        self._buffer = b""

    def send(self, data: bytes | dict[str, Any]) -> None:
        if isinstance(data, dict):
            data = json.dumps(data).encode() + b"\n"
        self.sock.sendall(data)

    def line(self) -> dict[str, Any]:
        while b"\n" not in self._buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        reply: dict[str, Any] = json.loads(line)
        return reply

    def at_eof(self) -> bool:
        """
        True once the agent has closed the connection (after what it sent).
        """
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))
