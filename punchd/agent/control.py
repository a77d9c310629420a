"""
The agent's control socket: local programs ask for tunnels here.

Newline-delimited JSON over a Unix stream socket (docs/architecture.rst).
Callers are checked with SO_PEERCRED against the configured users and groups.
A tunnel's descriptor travels by SCM_RIGHTS with the line that describes it;
Twisted may attach it to an earlier buffered byte, never a later one, so
clients keep the descriptors they receive in a FIFO and take one for each line
that carries a C{tunnel}.

Local programs are trusted to use the agent, not to use it well: a program
that never reads its replies, opens thousands of connections or leaves them
idle costs the agent bounded memory and descriptors (L{ControlLimits}).
"""

from __future__ import annotations

import grp
import json
import math
import os
import pwd
import socket
import stat
import struct
from collections import Counter
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, cast

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IAddress, IDelayedCall, IPullProducer, IReactorTime
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from punchd.agent.api import AgentCore, HandOff, TunnelFailed
from punchd.wire import NAME_RE

log = Logger()

#: Longest request line accepted, without its newline.
MAX_LINE = 64 * 1024
#: Longest connect timeout a program may ask for, in seconds.
MAX_TIMEOUT = 600.0
#: Mode of the socket file: owner and group may connect.
SOCKET_MODE = 0o660

_PEERCRED = struct.Struct("3i")

RequestId = str | int | float | bool | None


class _UNIXTransport(Protocol):
    """
    What the control socket uses of Twisted's Unix stream server transport.
    """

    def write(self, data: bytes) -> None: ...
    def loseConnection(self) -> None: ...
    def getHandle(self) -> socket.socket: ...
    def sendFileDescriptor(self, descriptor: int) -> None: ...
    def abortConnection(self) -> None: ...
    def registerProducer(self, producer: object, streaming: bool) -> None: ...
    def unregisterProducer(self) -> None: ...
    def pauseProducing(self) -> None: ...
    def resumeProducing(self) -> None: ...


class _Port(Protocol):
    def stopListening(self) -> Deferred[None] | None: ...


class _UNIXReactor(Protocol):
    def listenUNIX(
        self, address: str, factory: Factory, backlog: int = 50, mode: int = 0o666
    ) -> _Port: ...


class ControlSocketError(Exception):
    """
    The control socket cannot be set up; the message says why, naming the path.
    """


class BadRequest(Exception):
    """
    A request the agent cannot make sense of; answered with C{bad-request}.
    """


@dataclass(frozen=True)
class PeerCredentials:
    """
    Who is at the other end of a Unix socket, as the kernel saw it at connect time.
    """

    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    """
    Read SO_PEERCRED: unforgeable, unlike anything the caller could send.
    """
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    pid, uid, gid = _PEERCRED.unpack(raw)
    return PeerCredentials(pid, uid, gid)


def _user_groups(uid: int, gid: int) -> Collection[int]:
    """
    The supplementary groups of C{uid} in the user database, plus C{gid}.
    """
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        return (gid,)
    return os.getgrouplist(name, gid)


def _resolve(value: str | int, lookup: Callable[[str], int], kind: str) -> int:
    if isinstance(value, int):
        return value
    if value.isdigit():
        return int(value)
    try:
        return lookup(value)
    except KeyError:
        raise ControlSocketError(f"unknown {kind} {value!r} in the allowed {kind}s") from None


class Authorizer:
    """
    Decides which local users may use the agent.

    Names are resolved once, at start, so that a typo stops the agent rather
    than silently refusing everyone; group membership is looked up per
    connection, so that adding a user to a group needs no restart.
    """

    def __init__(
        self,
        users: Iterable[str | int] = (),
        groups: Iterable[str | int] = (),
        *,
        own_uid: int | None = None,
        allow_root: bool = True,
        groups_of: Callable[[int, int], Collection[int]] = _user_groups,
    ) -> None:
        own = os.getuid() if own_uid is None else own_uid
        self._uids = frozenset(
            {
                own,
                *((0,) if allow_root else ()),
                *(_resolve(u, lambda n: pwd.getpwnam(n).pw_uid, "user") for u in users),
            }
        )
        self._gids = frozenset(
            _resolve(g, lambda n: grp.getgrnam(n).gr_gid, "group") for g in groups
        )
        self._groups_of = groups_of

    def allows(self, caller: PeerCredentials) -> bool:
        """
        The caller's uid is allowed, or its primary or a supplementary group is.
        """
        if caller.uid in self._uids:
            return True
        if not self._gids:
            return False
        return caller.gid in self._gids or not self._gids.isdisjoint(
            self._groups_of(caller.uid, caller.gid)
        )


def _encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":"), allow_nan=False).encode() + b"\n"


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _parse(line: bytes) -> tuple[RequestId, dict[str, Any]]:
    """
    Decode one request line into its id and body, or raise L{BadRequest}.
    """
    try:
        request = json.loads(line, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise BadRequest("malformed JSON") from None
    if not isinstance(request, dict):
        raise BadRequest("a request must be a JSON object")
    rid = request.get("id")
    if not (rid is None or isinstance(rid, str | int | float | bool)):
        raise BadRequest("id must be a string, number, boolean or null")
    if isinstance(rid, float) and not math.isfinite(rid):
        # 1e999 parses as infinity, which no reply could carry back.
        raise BadRequest("id must be a finite number")
    return rid, request


def _name(request: dict[str, Any], key: str) -> str:
    value = request.get(key)
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise BadRequest(
            f"{key} must be 1-64 characters of A-Z a-z 0-9 . _ -, not starting with . _ -"
        )
    return value


def _timeout(request: dict[str, Any], default: float) -> float:
    value = request.get("timeout", default)
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0 < value <= MAX_TIMEOUT  # before isfinite: a huge int would overflow it
        or not math.isfinite(value)
    ):
        raise BadRequest(
            f"timeout must be a number of seconds, more than 0 and at most {MAX_TIMEOUT:g}"
        )
    return float(value)


@dataclass(frozen=True)
class ControlLimits:
    """
    What one local program may cost the agent.

    The connection caps stay well under the agent unit's descriptor limit
    (LimitNOFILE=16384), so that programs holding connections open can never
    starve the tunnels of descriptors.
    """

    #: Control connections open at once, all users together.
    max_connections: int = 1024
    #: Control connections open at once for one uid.
    max_per_user: int = 256
    #: Seconds a connection may stay open with no request in flight and no listener.
    idle_timeout: float = 60.0
    #: Reply bytes a program may leave unread before the agent stops reading its requests.
    max_unread: int = 1024 * 1024
    #: Seconds a program may stay over C{max_unread}, or take to read its last
    #: replies once the agent hangs up, before it is dropped.
    stall_timeout: float = 10.0


@implementer(IPullProducer)
class _Output:
    """
    What a program has not read yet, and the descriptors waiting to leave.

    Registered with the transport as a pull producer for the whole
    connection: Twisted calls C{resumeProducing} each time its write buffer
    has drained, the only moment the agent knows what was read.  Then

      - every queued descriptor has left (Twisted sends each with a byte of
        the buffer), so the agent's copies are closed;
      - the unread count starts again from zero: past C{max_unread} the
        program stops being read (no new requests, no new replies), and if
        it stays there for C{stall_timeout} it is dropped.

    If the connection is lost first, C{stopProducing} closes the copies.
    """

    def __init__(
        self,
        transport: _UNIXTransport,
        clock: IReactorTime,
        limits: ControlLimits,
        pause: Callable[[], None],
        resume: Callable[[], None],
    ) -> None:
        self._transport = transport
        self._clock = clock
        self._limits = limits
        self._pause = pause
        self._resume = resume
        self._socks: list[socket.socket] = []
        self.unread = 0
        self._stalled: IDelayedCall | None = None
        self._closing = False
        # A pull producer is asked for data at once: that call finds nothing to do.
        transport.registerProducer(self, False)

    def wrote(self, size: int, sock: socket.socket | None = None) -> None:
        """
        Count C{size} more bytes queued; keep C{sock} open until they have left.
        """
        if sock is not None:
            self._socks.append(sock)
        self.unread += size
        if self.unread > self._limits.max_unread and self._stalled is None:
            self._stalled = self._clock.callLater(self._limits.stall_timeout, self._drop)
            self._pause()

    def close(self) -> None:
        """
        Hang up once the program has read what was sent; drop it if it does not.
        """
        if self._closing:
            return
        self._closing = True
        if self._stalled is None:
            self._stalled = self._clock.callLater(self._limits.stall_timeout, self._drop)
        self._transport.loseConnection()

    def resumeProducing(self) -> None:
        self.unread = 0
        self._close_socks()
        if self._closing:
            # Lets the transport finish the loseConnection it was waiting on.
            self._transport.unregisterProducer()
        elif self._stalled is not None:
            self._stalled.cancel()
            self._stalled = None
            self._resume()

    def stopProducing(self) -> None:
        self._close_socks()
        if self._stalled is not None and self._stalled.active():
            self._stalled.cancel()
        self._stalled = None

    def _drop(self) -> None:
        self._stalled = None
        log.info(
            "control socket: dropping a program that left {unread} bytes unread for {seconds:g} s",
            unread=self.unread,
            seconds=self._limits.stall_timeout,
        )
        self._transport.abortConnection()

    def _close_socks(self) -> None:
        socks, self._socks = self._socks, []
        for sock in socks:
            sock.close()


class ControlProtocol(LineReceiver):
    """
    One program's connection: many requests, each answered as its result comes.
    """

    delimiter = b"\n"
    MAX_LENGTH = MAX_LINE

    def __init__(self, factory: ControlFactory) -> None:
        self._factory = factory
        self._core = factory.core
        self._counters = factory.counters
        self._connect_timeout = factory.connect_timeout
        self._clock = factory.clock
        self._limits = factory.limits
        self._active = False
        self._caller = PeerCredentials(0, -1, -1)
        self._pending: set[Deferred[Any]] = set()
        self._listeners: dict[RequestId, Callable[[], None]] = {}
        self._output: _Output | None = None
        self._idle: IDelayedCall | None = None

    def connectionMade(self) -> None:
        self._caller = peer_credentials(self._transport().getHandle())
        refusal = self._factory.refusal(self._caller)
        if refusal is not None:
            self._counters["refused"] += 1
            code, message = refusal
            log.info(
                "control socket: refused pid {pid} uid {uid} gid {gid}: {message}",
                pid=self._caller.pid,
                uid=self._caller.uid,
                gid=self._caller.gid,
                message=message,
            )
            self._send(_error(None, code, message))
            self._transport().loseConnection()
            return
        self._active = True
        self._counters["accepted"] += 1
        self._factory.opened(self._caller)
        self._output = _Output(
            self._transport(), self._clock, self._limits, self.pauseProducing, self.resumeProducing
        )
        self._touch()
        log.debug(
            "control socket: pid {pid} uid {uid} connected",
            pid=self._caller.pid,
            uid=self._caller.uid,
        )

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._active = False
        self._touch()
        if self._output is not None:
            self._counters["closed"] += 1
            self._factory.closed(self._caller)
            self._output.stopProducing()
        listeners = list(self._listeners.values())
        self._listeners.clear()
        for unregister in listeners:
            unregister()
        for d in list(self._pending):
            d.cancel()

    def lineLengthExceeded(self, line: bytes) -> None:
        self._fail(None, "?", "bad-request", f"request line longer than {MAX_LINE} bytes")
        self._close()

    def lineReceived(self, line: bytes) -> None:
        if not self._active or not line.strip():
            return
        rid: RequestId = None
        op: Any = "?"
        try:
            rid, request = _parse(line)
            op = request.get("op")
            handler = self._ops.get(op) if isinstance(op, str) else None
            if handler is None:
                op = "?"
                raise BadRequest("unknown or missing op")
            self._counters["op-" + op] += 1
            log.debug(
                "control {op} id={rid!r} from uid {uid}", op=op, rid=rid, uid=self._caller.uid
            )
            handler(self, rid, request)
        except BadRequest as e:
            self._fail(rid, op, "bad-request", str(e))
        except TunnelFailed as e:
            self._fail(rid, op, e.code, e.message)
        except Exception:
            log.failure("control {op} id={rid!r} failed", op=op, rid=rid)
            self._fail(rid, op, "internal", "internal error in the agent")
        self._touch()

    def _touch(self) -> None:
        """
        Restart the idle clock: it runs only while nothing is in flight.
        """
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None
        if self._active and not self._pending and not self._listeners:
            self._idle = self._clock.callLater(self._limits.idle_timeout, self._idled)

    def _idled(self) -> None:
        self._idle = None
        message = f"no request for {self._limits.idle_timeout:g} s: closing this connection"
        self._fail(None, "?", "timeout", message)
        self._close()

    def _close(self) -> None:
        self._active = False
        self._touch()
        if self._output is None:
            self._transport().loseConnection()
        else:
            self._output.close()

    def _op_status(self, rid: RequestId, request: dict[str, Any]) -> None:
        self._send({"id": rid, "ok": True, "status": self._core.status()})

    def _op_peers(self, rid: RequestId, request: dict[str, Any]) -> None:
        d = self._track(self._core.peers())
        d.addCallback(lambda peers: self._send({"id": rid, "ok": True, "peers": peers}))
        d.addErrback(self._failed, rid, "peers")

    def _op_netcheck(self, rid: RequestId, request: dict[str, Any]) -> None:
        d = self._track(self._core.netcheck())
        d.addCallback(lambda report: self._send({"id": rid, "ok": True, "netcheck": report}))
        d.addErrback(self._failed, rid, "netcheck")

    def _op_connect(self, rid: RequestId, request: dict[str, Any]) -> None:
        peer = _name(request, "peer")
        service = _name(request, "service")
        timeout = _timeout(request, self._connect_timeout)

        started: list[Deferred[HandOff]] = []
        unsent: list[Exception] = []

        def progress(event: dict[str, Any]) -> None:
            if not self._active or unsent:
                return
            try:
                self._send({"id": rid, **{k: v for k, v in event.items() if k != "id"}})
            except Exception as e:
                # The program would wait for a tunnel it can no longer be told
                # about: give the tunnel up rather than leave it half made.
                log.failure("control connect id={rid!r}: progress line unsendable", rid=rid)
                unsent.append(e)
                for d in started:
                    d.cancel()

        d = self._track(self._core.connect(peer, service, timeout, progress))
        started.append(d)
        if unsent:
            d.cancel()
        d.addCallback(self._hand_off, {"id": rid, "ok": True})
        d.addErrback(self._failed, rid, "connect")

    def _op_listen(self, rid: RequestId, request: dict[str, Any]) -> None:
        service = _name(request, "service")
        if rid in self._listeners:
            raise BadRequest(f"id {rid!r} already names a listener on this connection")
        # A tunnel the core delivers before the ok reply has gone out waits for it.
        early: list[HandOff] = []
        ready = False

        def incoming(handoff: HandOff) -> None:
            if ready:
                self._incoming(rid, handoff)
            else:
                early.append(handoff)

        self._listeners[rid] = self._core.listen(service, incoming)
        self._send({"id": rid, "ok": True})
        ready = True
        for handoff in early:
            self._incoming(rid, handoff)

    def _op_unlisten(self, rid: RequestId, request: dict[str, Any]) -> None:
        unregister = self._listeners.pop(rid, None)
        if unregister is None:
            raise BadRequest(f"no listener with id {rid!r} on this connection")
        unregister()
        self._send({"id": rid, "ok": True})

    _ops: dict[str, Callable[[ControlProtocol, RequestId, dict[str, Any]], None]] = {
        "status": _op_status,
        "peers": _op_peers,
        "connect": _op_connect,
        "listen": _op_listen,
        "unlisten": _op_unlisten,
        "netcheck": _op_netcheck,
    }

    def _incoming(self, rid: RequestId, handoff: HandOff) -> None:
        if rid not in self._listeners:
            handoff.sock.close()
            return
        try:
            self._hand_off(handoff, {"id": rid, "event": "incoming"})
        except Exception:
            log.failure("control listen id={rid!r}: hand-off failed", rid=rid)

    def _hand_off(self, handoff: HandOff, message: dict[str, Any]) -> None:
        """
        Send C{message} with the tunnel's description and its descriptor.
        """
        if not self._active or self._output is None:
            handoff.sock.close()
            return
        try:
            line = _encode({**message, "tunnel": handoff.info})
        except Exception:
            handoff.sock.close()
            raise
        self._transport().sendFileDescriptor(handoff.sock.fileno())
        self._transport().write(line)
        self._output.wrote(len(line), handoff.sock)
        log.debug("control id={rid!r}: tunnel handed off", rid=message["id"])

    def _track(self, d: Deferred[Any]) -> Deferred[Any]:
        """
        Remember C{d} until it fires, to cancel it if the program goes away.
        """
        self._pending.add(d)

        def done(result: object) -> object:
            self._pending.discard(d)
            self._touch()
            return result

        return d.addBoth(done)

    def _failed(self, failure: Failure, rid: RequestId, op: str) -> None:
        if not self._active:
            log.debug("control {op} id={rid!r}: abandoned, the program left", op=op, rid=rid)
        elif isinstance(failure.value, TunnelFailed):
            self._fail(rid, op, failure.value.code, failure.value.message)
        elif isinstance(failure.value, CancelledError):
            self._fail(rid, op, "cancelled", "the agent abandoned the request")
        else:
            log.failure("control {op} id={rid!r} failed", failure, op=op, rid=rid)
            self._fail(rid, op, "internal", "internal error in the agent")

    def _fail(self, rid: RequestId, op: str, code: str, message: str) -> None:
        log.info(
            "control {op} id={rid!r} from uid {uid} failed: {code}: {message}",
            op=op,
            rid=rid,
            uid=self._caller.uid,
            code=code,
            message=message,
        )
        self._send(_error(rid, code, message))

    def _send(self, message: dict[str, Any]) -> None:
        line = _encode(message)
        self._transport().write(line)
        if self._output is not None:
            self._output.wrote(len(line))

    def _transport(self) -> _UNIXTransport:
        assert self.transport is not None
        return cast(_UNIXTransport, self.transport)


def _error(rid: RequestId, code: str, message: str) -> dict[str, Any]:
    return {"id": rid, "ok": False, "error": {"code": code, "message": message}}


class ControlFactory(Factory):
    """
    Builds a L{ControlProtocol} per program, all sharing one agent core, and
    counts the connections against L{ControlLimits}.
    """

    noisy = False

    def __init__(
        self,
        core: AgentCore,
        authorizer: Authorizer,
        *,
        connect_timeout: float = 10.0,
        clock: IReactorTime | None = None,
        limits: ControlLimits = ControlLimits(),
    ) -> None:
        if clock is None:
            from twisted.internet import reactor

            clock = cast(IReactorTime, reactor)
        self.core = core
        self.authorizer = authorizer
        self.connect_timeout = connect_timeout
        #: Connections (accepted, refused, closed) and requests (op-NAME), for metrics.
        self.counters: Counter[str] = Counter()
        self.clock = clock
        self.limits = limits
        self.connections: Counter[int] = Counter()

    def refusal(self, caller: PeerCredentials) -> tuple[str, str] | None:
        """
        Why C{caller} may not have one more connection: an error code and message.
        """
        if not self.authorizer.allows(caller):
            return (
                "unauthorized",
                f"uid {caller.uid} may not use this agent"
                " (allow_users / allow_groups in the agent's config)",
            )
        if self.connections.total() >= self.limits.max_connections:
            return (
                "busy",
                f"the agent already serves {self.limits.max_connections} control connections,"
                " its limit",
            )
        if self.connections[caller.uid] >= self.limits.max_per_user:
            return (
                "busy",
                f"uid {caller.uid} already has {self.limits.max_per_user} control connections"
                " open, the limit for one user",
            )
        return None

    def opened(self, caller: PeerCredentials) -> None:
        self.connections[caller.uid] += 1

    def closed(self, caller: PeerCredentials) -> None:
        self.connections[caller.uid] -= 1
        if self.connections[caller.uid] <= 0:
            del self.connections[caller.uid]

    def buildProtocol(self, addr: IAddress | None) -> ControlProtocol:
        return ControlProtocol(self)


def clear_stale_socket(path: str) -> None:
    """
    Remove a socket file left by an agent that died, and nothing else.

    A socket that still answers belongs to a running agent; a file that is not
    a socket may be anything, maybe a typo in the config: both are errors.
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ControlSocketError(f"{path} exists and is not a socket; not replacing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        try:
            os.unlink(path)
        except OSError as e:
            raise ControlSocketError(
                f"cannot remove the stale control socket {path}: {e.strerror}"
            ) from e
        log.info("removed stale control socket {path}", path=path)
        return
    except FileNotFoundError:
        return
    except TimeoutError:
        pass  # a full backlog: somebody is listening
    except OSError as e:
        raise ControlSocketError(f"cannot check the existing socket {path}: {e.strerror}") from e
    finally:
        probe.close()
    raise ControlSocketError(f"another agent is already listening on {path}")


class ControlService(Service):
    """
    Listens on the control socket while the agent runs.
    """

    def __init__(self, reactor: _UNIXReactor, path: str, factory: ControlFactory) -> None:
        self._reactor = reactor
        self.path = path
        self.factory = factory
        self._port: _Port | None = None

    def startService(self) -> None:
        clear_stale_socket(self.path)
        try:
            # Twisted chmods before listen(): nobody can connect in between,
            # and the mode does not depend on the umask.
            self._port = self._reactor.listenUNIX(
                self.path, self.factory, backlog=socket.SOMAXCONN, mode=SOCKET_MODE
            )
        except CannotListenError as e:
            raise ControlSocketError(f"cannot listen on {self.path}: {e.socketError}") from e
        super().startService()  # type: ignore[no-untyped-call]
        log.info("control socket listening on {path}", path=self.path)

    def stopService(self) -> Deferred[None] | None:
        super().stopService()  # type: ignore[no-untyped-call]
        port, self._port = self._port, None
        if port is None:
            return None
        return port.stopListening()
