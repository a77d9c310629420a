"""
A small Redis client on Twisted: RESP2 over one TCP connection, pipelined.

Why not txredisapi: its commands wait (forever) for a connection while Redis
is down, where the rendezvous must fail a cross-node introduction at once
with a clear error and go on with everything else; it uses the global
reactor (tests drive time with a fake clock) and runs a generator per
command (docs/scale-out.rst has the measurement).  What the rendezvous needs
is small: commands whose replies come back in order, pub/sub pushes, AUTH
and SELECT on every (re)connection, and a blocking variant for the
C{directory} command.  Redis's password never appears in a log line or in
an exception's text.
"""

from __future__ import annotations

import socket
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet.defer import Deferred, fail
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

Arg = bytes | str | int | float
Push = Callable[[list[Any]], None]


class RedisError(Exception):
    """
    Redis answered a command with an error reply.
    """


class RedisUnavailable(Exception):
    """
    There is no connection to Redis now.
    """


@dataclass(frozen=True)
class RedisAddress:
    """
    Where Redis is, and the credentials (from a file, never from the URL).
    """

    host: str
    port: int
    db: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"redis://{host}:{self.port}/{self.db}"


def parse_url(url: str) -> RedisAddress:
    """
    C{redis://HOST:PORT/DB}; ValueError with a one-line reason otherwise.
    A password in the URL is refused: it would show in ps and in logs.
    """
    parts = urlsplit(url)
    if parts.scheme != "redis" or not parts.hostname:
        raise ValueError(f'must be "memory" or "redis://HOST:PORT/DB", got {url!r}')
    if parts.username or parts.password:
        raise ValueError("no credentials in the Redis URL: put them in redis_password_file")
    try:
        port = parts.port or 6379
        db = int(parts.path.strip("/") or "0")
    except ValueError:
        raise ValueError(f'must be "redis://HOST:PORT/DB" with numbers, got {url!r}') from None
    if not 0 <= db <= 65535 or parts.query or parts.fragment:
        raise ValueError(f'must be "redis://HOST:PORT/DB", got {url!r}')
    return RedisAddress(parts.hostname, port, db)


def read_credentials(path: str) -> tuple[str | None, str]:
    """
    A password file: one line, C{PASSWORD} or C{USERNAME:PASSWORD} for an ACL
    user.  The error names the file only, never what it holds.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read the Redis password: {e}") from None
    if not text or "\n" in text:
        raise ValueError(f"{path}: must hold one line, PASSWORD or USERNAME:PASSWORD")
    username, colon, password = text.partition(":")
    return (username, password) if colon else (None, text)


# -- the wire format -------------------------------------------------------------


def encode(args: Sequence[Arg]) -> bytes:
    """
    One command as a RESP array of bulk strings.
    """
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, bytes):
            data = arg
        else:
            data = str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


_INCOMPLETE = object()


def parse(buffer: bytes, pos: int) -> tuple[Any, int]:
    """
    One reply from C{buffer} at C{pos}: (value, next position), or
    (L{_INCOMPLETE}, C{pos}) when more bytes are needed.  An error reply is
    a L{RedisError} value, not raised.
    """
    end = buffer.find(b"\r\n", pos)
    if end < 0:
        return _INCOMPLETE, pos
    kind, line = buffer[pos : pos + 1], buffer[pos + 1 : end]
    if kind == b"+":
        return line, end + 2
    if kind == b"-":
        return RedisError(line.decode("utf-8", "replace")), end + 2
    if kind == b":":
        return int(line), end + 2
    if kind == b"$":
        size = int(line)
        if size < 0:
            return None, end + 2
        if len(buffer) < end + 2 + size + 2:
            return _INCOMPLETE, pos
        return buffer[end + 2 : end + 2 + size], end + 4 + size
    if kind == b"*":
        count = int(line)
        if count < 0:
            return None, end + 2
        items: list[Any] = []
        at = end + 2
        for _ in range(count):
            item, at = parse(buffer, at)
            if item is _INCOMPLETE:
                return _INCOMPLETE, pos
            items.append(item)
        return items, at
    raise RedisError(f"unexpected reply type {kind!r} from Redis")


# -- Twisted ---------------------------------------------------------------------


class RespProtocol(Protocol):
    """
    Commands in, replies out in order.  In pub/sub mode, C{message} pushes
    go to C{on_push} instead of to a waiting command.
    """

    def __init__(self, on_push: Push | None = None) -> None:
        self._buffer = b""
        self._waiting: deque[Deferred[Any]] = deque()
        self._on_push = on_push
        self.lost: Deferred[None] = Deferred()
        self._open = False

    def connectionMade(self) -> None:
        self._open = True
        if self.transport is not None:
            # Pipelined commands go at once, not when Redis acknowledged the last.
            self.transport.setTcpNoDelay(True)  # type: ignore[attr-defined]

    def command(self, *args: Arg) -> Deferred[Any]:
        if not self._open or self.transport is None:
            return fail(RedisUnavailable("not connected to Redis"))
        d: Deferred[Any] = Deferred()
        self._waiting.append(d)
        self.transport.write(encode(args))
        return d

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        pos = 0
        try:
            while pos < len(self._buffer):
                value, pos = parse(self._buffer, pos)
                if value is _INCOMPLETE:
                    break
                self._reply(value)
        except (ValueError, RedisError) as e:
            log.error("bad reply from Redis ({error}); reconnecting", error=str(e))
            self._buffer = b""
            if self.transport is not None:
                self.transport.loseConnection()
            return
        self._buffer = self._buffer[pos:]

    def _reply(self, value: Any) -> None:
        if (
            self._on_push is not None
            and isinstance(value, list)
            and value
            and value[0] in (b"message", b"pmessage")
        ):
            self._on_push(value)
            return
        if not self._waiting:
            return
        d = self._waiting.popleft()
        if isinstance(value, RedisError):
            d.errback(value)
        else:
            d.callback(value)

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        self._open = False
        waiting, self._waiting = self._waiting, deque()
        for d in waiting:
            d.errback(RedisUnavailable("the connection to Redis was lost"))
        self.lost.callback(None)


class _Factory(Factory):
    def __init__(self, on_push: Push | None) -> None:
        self._on_push = on_push

    def buildProtocol(self, addr: Any) -> RespProtocol:
        protocol = RespProtocol(self._on_push)
        protocol.factory = self
        return protocol


class RedisClient:
    """
    One Redis connection kept up for as long as the client runs: AUTH and
    SELECT on each connection, then C{on_ready} (which may subscribe, or
    re-publish what this node holds).  Commands fail at once with
    L{RedisUnavailable} while there is no ready connection.
    """

    def __init__(
        self,
        address: RedisAddress,
        reactor: Any,
        *,
        on_ready: Callable[[RespProtocol], Deferred[Any] | None] = lambda p: None,
        on_push: Push | None = None,
        purpose: str = "commands",
    ) -> None:
        self.address = address
        self._reactor = reactor
        self._on_ready = on_ready
        self._purpose = purpose
        endpoint = HostnameEndpoint(reactor, address.host, address.port, timeout=5)
        self._service = ClientService(
            endpoint,
            _Factory(on_push),
            retryPolicy=backoffPolicy(initialDelay=0.2, maxDelay=5.0),
            clock=reactor,
            prepareConnection=self._prepare,
        )
        self._ready: RespProtocol | None = None
        self._down_since: float | None = reactor.seconds()
        self._said_down = False

    @property
    def ready(self) -> bool:
        return self._ready is not None

    def start(self) -> None:
        self._service.startService()

    def stop(self) -> Deferred[None]:
        d: Deferred[None] = self._service.stopService()
        return d

    def execute(self, *args: Arg) -> Deferred[Any]:
        protocol = self._ready
        if protocol is None:
            return fail(RedisUnavailable(f"Redis at {self.address} is unreachable"))
        return protocol.command(*args)

    def _prepare(self, protocol: Any) -> Deferred[None]:
        """
        Runs on every new connection (a L{RespProtocol}) before it is used.
        """
        d: Deferred[Any]
        if self.address.password is not None:
            auth: list[Arg] = ["AUTH", self.address.password]
            if self.address.username is not None:
                auth.insert(1, self.address.username)
            d = protocol.command(*auth)
        else:
            d = Deferred()
            d.callback(None)
        d.addCallback(lambda _: protocol.command("SELECT", self.address.db))
        d.addCallback(lambda _: self._on_ready(protocol))
        d.addCallbacks(lambda _: self._now_ready(protocol), lambda f: self._not_ready(protocol, f))
        return d

    def _now_ready(self, protocol: RespProtocol) -> None:
        self._ready = protocol
        log.info(
            "connected to {address} ({purpose})", address=str(self.address), purpose=self._purpose
        )
        self._said_down = False
        protocol.lost.addCallback(lambda _: self._lost(protocol))

    def _not_ready(self, protocol: RespProtocol, failure: Failure) -> Failure:
        # Say why once per outage; the password never shows (the error is Redis's).
        if not self._said_down:
            self._said_down = True
            log.error(
                "Redis at {address} refused us: {error}",
                address=str(self.address),
                error=failure.getErrorMessage(),
            )
        if protocol.transport is not None:
            protocol.transport.loseConnection()
        return failure  # ClientService tries again, with backoff

    def _lost(self, protocol: RespProtocol) -> None:
        if self._ready is protocol:
            self._ready = None
            log.warn(
                "lost the connection to {address} ({purpose}); reconnecting",
                address=str(self.address),
                purpose=self._purpose,
            )


# -- blocking, for commands and tests ----------------------------------------------


class BlockingRedis:
    """
    A plain socket client for command-line tools and tests (never in a daemon).
    """

    def __init__(self, address: RedisAddress, timeout: float = 10.0) -> None:
        self._socket = socket.create_connection((address.host, address.port), timeout)
        self._buffer = b""
        if address.password is not None:
            auth: list[Arg] = ["AUTH", address.password]
            if address.username is not None:
                auth.insert(1, address.username)
            self.execute(*auth)
        self.execute("SELECT", address.db)

    def execute(self, *args: Arg) -> Any:
        return self.pipeline([args])[0]

    def pipeline(self, commands: Sequence[Sequence[Arg]]) -> list[Any]:
        """
        Send every command, then read every reply; the first error raises.
        """
        self._socket.sendall(b"".join(encode(c) for c in commands))
        replies: list[Any] = []
        while len(replies) < len(commands):
            value, pos = parse(self._buffer, 0)
            if value is _INCOMPLETE:
                chunk = self._socket.recv(1 << 20)
                if not chunk:
                    raise RedisUnavailable("Redis closed the connection")
                self._buffer += chunk
                continue
            self._buffer = self._buffer[pos:]
            replies.append(value)
        for value in replies:
            if isinstance(value, RedisError):
                raise value
        return replies

    def close(self) -> None:
        self._socket.close()
