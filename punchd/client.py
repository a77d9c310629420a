"""
Ask the local punch-agent for tunnels: the module programs import.

Standard library only, so that any Python program can use punchd without
Twisted.  Each call opens its own connection to the agent's control socket
and speaks newline-delimited JSON on it (docs/architecture.rst, "Control
socket"); a tunnel arrives as a connected UDP socket whose descriptor the
agent passes with SCM_RIGHTS.

    with punchd.client.connect("bob", "chat") as tunnel:
        tunnel.socket.send(b"hello")
"""

from __future__ import annotations

import array
import collections
import json
import os
import socket
import struct
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self

__all__ = [
    "DEFAULT_SOCKET_PATH",
    "Listener",
    "Tunnel",
    "TunnelError",
    "connect",
    "listen",
    "peers",
    "status",
]

DEFAULT_SOCKET_PATH = "/run/punchd/agent.sock"
#: How long the agent may take beyond a connect timeout to answer, and how
#: long any other request may take.
REPLY_MARGIN = 5.0
REQUEST_TIMEOUT = 10.0

_READ_SIZE = 65536
# The agent sends one descriptor per byte and the kernel returns at most one
# descriptor-carrying byte per recvmsg: room for a few is plenty.
_ANCILLARY_SIZE = socket.CMSG_SPACE(16 * array.array("i").itemsize)


class TunnelError(Exception):
    """
    The agent refused or failed a request, or could not be reached.

    C{code} is one of the agent's error codes (C{peer-offline}, C{timeout},
    ...) or, for problems on this side, C{agent-unreachable} or C{bad-reply}.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"TunnelError({self.code!r}, {self.message!r})"


class _Closing:
    """
    C{with} closes it.
    """

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Tunnel(_Closing):
    """
    A punched path to a peer: C{socket} is the connected datagram socket and
    belongs to the program now; C{info} describes the path.
    """

    def __init__(self, sock: socket.socket, info: dict[str, Any]) -> None:
        self.socket = sock
        self.info = info

    def close(self) -> None:
        self.socket.close()

    def __repr__(self) -> str:
        return f"<Tunnel {self.info.get('peer', '?')}/{self.info.get('service', '?')}>"


def _socket_path(path: str | None) -> str:
    return path or os.environ.get("PUNCHD_SOCKET") or DEFAULT_SOCKET_PATH


def _unreachable(path: str, error: OSError | None) -> TunnelError:
    if isinstance(error, PermissionError):
        hint = "permission denied; only the agent's user and the socket's group may connect"
    elif error is None:
        hint = "the agent closed the connection"
    else:
        hint = f"{error.strerror or error}; is the punch-agent running?"
    return TunnelError(
        "agent-unreachable",
        f"cannot talk to the punch-agent at {path}: {hint} (PUNCHD_SOCKET chooses another socket)",
    )


def _error(reply: dict[str, Any]) -> TunnelError:
    error = reply.get("error")
    if not isinstance(error, dict):
        return TunnelError("bad-reply", f"the agent sent a malformed error: {reply!r}")
    return TunnelError(str(error.get("code", "bad-reply")), str(error.get("message", "")))


class _Channel(_Closing):
    """
    One connection to the agent.

    Descriptors may arrive with an earlier byte than the line they belong to,
    never a later one, and in order: they wait in a FIFO, and each line that
    carries a C{tunnel} takes the oldest.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # A non-blocking connect fails at once while the agent's backlog is
        # full; a blocking one waits for room, up to SO_SNDTIMEO.
        seconds, fraction = divmod(REQUEST_TIMEOUT, 1)
        self._sock.setsockopt(
            socket.SOL_SOCKET,
            socket.SO_SNDTIMEO,
            struct.pack("ll", int(seconds), int(fraction * 1_000_000)),
        )
        try:
            self._sock.connect(path)
        except BlockingIOError:
            self._sock.close()
            raise TunnelError(
                "agent-unreachable",
                f"the punch-agent at {path} accepts no connections (too busy, or hung)",
            ) from None
        except OSError as e:
            self._sock.close()
            raise _unreachable(path, e) from None
        self._buffer = bytearray()
        self._fds: collections.deque[int] = collections.deque()
        self._last_id = 0

    def fileno(self) -> int:
        return self._sock.fileno()

    def request(self, op: str, **fields: Any) -> int:
        """
        Send a request; returns its id.
        """
        self._last_id += 1
        line = json.dumps({"id": self._last_id, "op": op, **fields}).encode() + b"\n"
        self._sock.settimeout(REQUEST_TIMEOUT)
        try:
            self._sock.sendall(line)
        except OSError as e:
            # A refused caller gets the reason, then the agent hangs up: read it.
            try:
                reply, sock = self.read(time.monotonic() + 1.0)
            except TunnelError:
                raise _unreachable(self.path, None) from e
            if sock is not None:
                sock.close()
            raise _error(reply) from None
        return self._last_id

    def read(self, deadline: float | None) -> tuple[dict[str, Any], socket.socket | None]:
        """
        The next reply line and, if it carries a tunnel, the tunnel's socket.
        """
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                return self._decode(line)
            self._receive(deadline)

    def _receive(self, deadline: float | None) -> None:
        self._sock.settimeout(None if deadline is None else max(0.0, deadline - time.monotonic()))
        try:
            data, ancillary, flags, _ = self._sock.recvmsg(
                _READ_SIZE, _ANCILLARY_SIZE, socket.MSG_CMSG_CLOEXEC
            )
        except (TimeoutError, BlockingIOError):
            raise TunnelError("timeout", "no answer from the punch-agent in time") from None
        except ConnectionResetError:
            data, ancillary, flags = b"", [], 0
        except OSError as e:
            raise _unreachable(self.path, e) from None
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                self._fds.extend(fds)
        if flags & socket.MSG_CTRUNC:
            # The kernel dropped descriptors: the FIFO no longer matches the lines.
            raise TunnelError("bad-reply", "descriptors from the punch-agent were lost")
        if not data:
            raise _unreachable(self.path, None)
        self._buffer += data

    def _decode(self, line: bytes) -> tuple[dict[str, Any], socket.socket | None]:
        try:
            reply = json.loads(line)
        except ValueError:
            reply = None
        if not isinstance(reply, dict):
            raise TunnelError("bad-reply", f"the punch-agent sent a malformed line: {line[:200]!r}")
        if "tunnel" not in reply:
            return reply, None
        if not self._fds:
            raise TunnelError("bad-reply", "a tunnel arrived without its descriptor")
        fd = self._fds.popleft()
        try:
            sock = socket.socket(fileno=fd)
        except OSError as e:
            os.close(fd)
            raise TunnelError("bad-reply", f"the punch-agent passed a bad descriptor: {e}") from e
        # The descriptor keeps the agent's O_NONBLOCK: make the socket what it claims to be.
        sock.setblocking(True)
        return reply, sock

    def result(
        self,
        rid: int,
        deadline: float | None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ) -> tuple[dict[str, Any], socket.socket | None]:
        """
        Read until the final reply to request C{rid}; raise if it is an error.
        """
        while True:
            reply, sock = self.read(deadline)
            final = "ok" in reply and reply.get("id") in (rid, None)
            if final and reply["ok"] is True:
                return reply, sock
            if sock is not None:
                sock.close()
            if final:
                raise _error(reply)
            if reply.get("id") == rid and on_event is not None:
                on_event({k: v for k, v in reply.items() if k != "id"})

    def close(self) -> None:
        self._sock.close()
        while self._fds:
            os.close(self._fds.popleft())


def connect(
    peer: str,
    service: str,
    *,
    socket_path: str | None = None,
    timeout: float = 10.0,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> Tunnel:
    """
    Ask the agent for a tunnel to C{peer}'s C{service}; wait up to C{timeout}
    seconds for it to be punched.

    C{on_progress} is called with each progress event, such as
    C{{"event": "introduced"}}.  Raises L{TunnelError}.
    """
    with _Channel(_socket_path(socket_path)) as channel:
        rid = channel.request("connect", peer=peer, service=service, timeout=timeout)
        reply, sock = channel.result(rid, time.monotonic() + timeout + REPLY_MARGIN, on_progress)
        if sock is None:
            raise TunnelError("bad-reply", "the punch-agent answered connect without a tunnel")
        return Tunnel(sock, reply["tunnel"])


class Listener(_Closing):
    """
    Tunnels peers open to one service of this host, as they come.

    The agent keeps the listener while this object is open; close it (or use
    it as a context manager) to stop.  C{fileno()} lets a program wait for the
    next tunnel with select(); after it is readable, C{accept(0)} returns the
    tunnels already there and raises C{TunnelError("timeout")} when none is left.
    Call C{accept(0)} once before the first select(), too: tunnels that came
    with the listen reply have already been read off the socket.
    """

    def __init__(self, service: str, *, socket_path: str | None = None) -> None:
        self.service = service
        self._channel = _Channel(_socket_path(socket_path))
        try:
            self._rid = self._channel.request("listen", service=service)
            self._channel.result(self._rid, time.monotonic() + REQUEST_TIMEOUT)
        except BaseException:
            self._channel.close()
            raise

    def accept(self, timeout: float | None = None) -> Tunnel:
        """
        The next tunnel opened to this service.  Raises L{TunnelError}, with
        code C{timeout} when none came within C{timeout} seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            reply, sock = self._channel.read(deadline)
            if sock is None:
                if reply.get("ok") is False:
                    raise _error(reply)
            elif reply.get("id") == self._rid and reply.get("event") == "incoming":
                return Tunnel(sock, reply["tunnel"])
            else:
                sock.close()

    def fileno(self) -> int:
        return self._channel.fileno()

    def close(self) -> None:
        self._channel.close()


def listen(service: str, *, socket_path: str | None = None) -> Listener:
    """
    Accept tunnels that peers open to C{service}.  Raises L{TunnelError}.
    """
    return Listener(service, socket_path=socket_path)


def _ask(op: str, key: str, socket_path: str | None, timeout: float) -> Any:
    with _Channel(_socket_path(socket_path)) as channel:
        reply, _ = channel.result(channel.request(op), time.monotonic() + timeout)
    if key not in reply:
        raise TunnelError("bad-reply", f"the punch-agent's {op} reply has no {key!r}")
    return reply[key]


def status(*, socket_path: str | None = None, timeout: float = REQUEST_TIMEOUT) -> dict[str, Any]:
    """
    The agent's name, registration state, rendezvous, mapped address, tunnel counts.
    """
    result: dict[str, Any] = _ask("status", "status", socket_path, timeout)
    return result


def peers(
    *, socket_path: str | None = None, timeout: float = REQUEST_TIMEOUT
) -> list[dict[str, Any]]:
    """
    Peers online in the agent's network, as C{[{"name": ...}, ...]}.
    """
    result: list[dict[str, Any]] = _ask("peers", "peers", socket_path, timeout)
    return result
