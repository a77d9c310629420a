"""
The agent's control socket: local programs ask for tunnels here.

Newline-delimited JSON over a Unix stream socket (design.md §4).  Callers are
checked with SO_PEERCRED against the configured users and groups.  A tunnel's
descriptor travels by SCM_RIGHTS with the line that describes it; Twisted may
attach it to an earlier buffered byte, never a later one, so clients keep the
descriptors they receive in a FIFO and take one for each line that carries a
C{tunnel}.
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
from twisted.internet.interfaces import IAddress, IPullProducer
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from punchd.agent.api import AgentCore, HandOff, TunnelFailed
from punchd.config import NAME_RE

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
    def registerProducer(self, producer: object, streaming: bool) -> None: ...
    def unregisterProducer(self) -> None: ...


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


@implementer(IPullProducer)
class _HandedOff:
    """
    Sockets whose descriptors are queued on a transport, kept open until sent.

    Twisted sends a queued descriptor with a byte of its write buffer and needs
    it open until then.  So once the buffer has drained, every queued
    descriptor has left: Twisted tells a registered pull producer so by calling
    C{resumeProducing}, and the agent's copies are closed then.  If the
    connection is lost first, C{stopProducing} closes them.
    """

    def __init__(self, transport: _UNIXTransport) -> None:
        self._transport = transport
        self._socks: list[socket.socket] = []
        self._registering = False

    def add(self, sock: socket.socket) -> None:
        self._socks.append(sock)
        if len(self._socks) == 1:
            # registerProducer asks a pull producer for data at once, before
            # anything has drained: that first call means nothing.
            self._registering = True
            try:
                self._transport.registerProducer(self, False)
            finally:
                self._registering = False

    def resumeProducing(self) -> None:
        if not self._registering:
            self._transport.unregisterProducer()
            self.stopProducing()

    def stopProducing(self) -> None:
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
        self._core = factory.core
        self._counters = factory.counters
        self._authorizer = factory.authorizer
        self._connect_timeout = factory.connect_timeout
        self._active = False
        self._caller = PeerCredentials(0, -1, -1)
        self._pending: set[Deferred[Any]] = set()
        self._listeners: dict[RequestId, Callable[[], None]] = {}
        self._handed_off: _HandedOff | None = None

    def connectionMade(self) -> None:
        self._caller = peer_credentials(self._transport().getHandle())
        if not self._authorizer.allows(self._caller):
            self._counters["refused"] += 1
            log.info(
                "control socket: refused pid {pid} uid {uid} gid {gid}",
                pid=self._caller.pid,
                uid=self._caller.uid,
                gid=self._caller.gid,
            )
            self._send(
                _error(
                    None,
                    "unauthorized",
                    f"uid {self._caller.uid} may not use this agent"
                    " (allow_users / allow_groups in the agent's config)",
                )
            )
            self._transport().loseConnection()
            return
        self._active = True
        self._counters["accepted"] += 1
        self._handed_off = _HandedOff(self._transport())
        log.debug(
            "control socket: pid {pid} uid {uid} connected",
            pid=self._caller.pid,
            uid=self._caller.uid,
        )

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._active:
            self._counters["closed"] += 1
        self._active = False
        listeners = list(self._listeners.values())
        self._listeners.clear()
        for unregister in listeners:
            unregister()
        for d in list(self._pending):
            d.cancel()

    def lineLengthExceeded(self, line: bytes) -> None:
        self._fail(None, "?", "bad-request", f"request line longer than {MAX_LINE} bytes")
        self._transport().loseConnection()

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

    def _op_status(self, rid: RequestId, request: dict[str, Any]) -> None:
        self._send({"id": rid, "ok": True, "status": self._core.status()})

    def _op_peers(self, rid: RequestId, request: dict[str, Any]) -> None:
        d = self._track(self._core.peers())
        d.addCallback(lambda peers: self._send({"id": rid, "ok": True, "peers": peers}))
        d.addErrback(self._failed, rid, "peers")

    def _op_connect(self, rid: RequestId, request: dict[str, Any]) -> None:
        peer = _name(request, "peer")
        service = _name(request, "service")
        timeout = _timeout(request, self._connect_timeout)

        def progress(event: dict[str, Any]) -> None:
            if self._active:
                self._send({"id": rid, **{k: v for k, v in event.items() if k != "id"}})

        d = self._track(self._core.connect(peer, service, timeout, progress))
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
        if not self._active or self._handed_off is None:
            handoff.sock.close()
            return
        try:
            line = _encode({**message, "tunnel": handoff.info})
        except Exception:
            handoff.sock.close()
            raise
        self._transport().sendFileDescriptor(handoff.sock.fileno())
        self._transport().write(line)
        self._handed_off.add(handoff.sock)
        log.debug("control id={rid!r}: tunnel handed off", rid=message["id"])

    def _track(self, d: Deferred[Any]) -> Deferred[Any]:
        """
        Remember C{d} until it fires, to cancel it if the program goes away.
        """
        self._pending.add(d)

        def done(result: object) -> object:
            self._pending.discard(d)
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
        self._transport().write(_encode(message))

    def _transport(self) -> _UNIXTransport:
        assert self.transport is not None
        return cast(_UNIXTransport, self.transport)


def _error(rid: RequestId, code: str, message: str) -> dict[str, Any]:
    return {"id": rid, "ok": False, "error": {"code": code, "message": message}}


class ControlFactory(Factory):
    """
    Builds a L{ControlProtocol} per program, all sharing one agent core.
    """

    noisy = False

    def __init__(
        self, core: AgentCore, authorizer: Authorizer, *, connect_timeout: float = 10.0
    ) -> None:
        self.core = core
        self.authorizer = authorizer
        self.connect_timeout = connect_timeout
        #: Connections (accepted, refused, closed) and requests (op-NAME), for metrics.
        self.counters: Counter[str] = Counter()

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
        self._factory = factory
        self._port: _Port | None = None

    def startService(self) -> None:
        clear_stale_socket(self.path)
        try:
            # Twisted chmods before listen(): nobody can connect in between,
            # and the mode does not depend on the umask.
            self._port = self._reactor.listenUNIX(
                self.path, self._factory, backlog=socket.SOMAXCONN, mode=SOCKET_MODE
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
