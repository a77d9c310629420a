"""
The control socket, driven over a real Unix socket with a fake agent core,
by the stdlib client (in threads) and by raw connections.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import re
import socket
import stat
import time
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import gatherResults, maybeDeferred
from twisted.internet.task import deferLater

from punchd import client
from punchd.agent.control import (
    Authorizer,
    ControlLimits,
    ControlProtocol,
    ControlService,
    ControlSocketError,
    PeerCredentials,
)
from punchd.client import Tunnel, TunnelError
from tests.agent import (  # noqa: F401 (the *_fixture names register fixtures)
    FakeCore,
    Held,
    RawConnection,
    agent_socket_fixture,
    core_fixture,
    in_thread,
    open_fds,
    serve,
    sockdir_fixture,
    wait_until,
)


def check_tunnel(core: FakeCore, tunnel: Tunnel, peer: str = "bob", service: str = "chat") -> None:
    """
    The program got a blocking, connected datagram socket to the right peer,
    and datagrams flow both ways.
    """
    assert tunnel.info["peer"] == peer
    assert tunnel.info["service"] == service
    far = core.far_ends[tunnel.info["id"]]
    sock = tunnel.socket
    assert sock.type == socket.SOCK_DGRAM
    assert sock.family == socket.AF_INET
    assert sock.getpeername() == far.getsockname()
    assert not fcntl.fcntl(sock, fcntl.F_GETFL) & os.O_NONBLOCK
    far.send(b"to the program " + tunnel.info["id"].encode())
    assert sock.recv(100) == b"to the program " + tunnel.info["id"].encode()
    sock.send(b"to the peer")
    assert far.recv(100) == b"to the peer"


@pytest_twisted.ensureDeferred
async def test_status_and_peers(core: FakeCore, agent_socket: str) -> None:
    assert await in_thread(client.status, socket_path=agent_socket) == core.status_value
    assert await in_thread(client.peers, socket_path=agent_socket) == [
        {"name": "bob"},
        {"name": "carol"},
    ]


@pytest_twisted.ensureDeferred
async def test_connect_hands_off_the_tunnel_socket(core: FakeCore, agent_socket: str) -> None:
    events: list[dict[str, Any]] = []
    tunnel = await in_thread(
        client.connect,
        "bob",
        "chat",
        socket_path=agent_socket,
        timeout=3.5,
        on_progress=events.append,
    )
    with tunnel:
        assert events == [{"event": "introduced"}, {"event": "probing", "pairs": 2}]
        assert core.connects == [("bob", "chat", 3.5)]
        check_tunnel(core, tunnel)
        assert core.agent_ends[0].fileno() == -1, "the agent's copy must be closed"


@pytest_twisted.ensureDeferred
async def test_connect_timeout_defaults_to_the_configured_one(
    core: FakeCore, agent_socket: str
) -> None:
    def talk() -> list[dict[str, Any]]:
        conn = RawConnection(agent_socket)
        conn.send({"id": "x", "op": "connect", "peer": "bob", "service": "chat"})
        try:
            return [conn.line() for _ in range(3)]
        finally:
            conn.close()

    replies = await in_thread(talk)
    assert core.connects == [("bob", "chat", 7.0)]
    assert replies[0] == {"id": "x", "event": "introduced"}
    assert replies[1] == {"id": "x", "event": "probing", "pairs": 2}
    assert replies[2]["id"] == "x"
    assert replies[2]["ok"] is True
    assert replies[2]["tunnel"]["peer"] == "bob"


@pytest.mark.parametrize(
    "code",
    ["peer-unknown", "peer-offline", "no-listener", "rejected", "timeout", "unreachable", "busy"],
)
@pytest_twisted.ensureDeferred
async def test_connect_failures_carry_the_core_code(
    core: FakeCore, agent_socket: str, code: str
) -> None:
    with pytest.raises(TunnelError) as raised:
        await in_thread(client.connect, code, "chat", socket_path=agent_socket)
    assert raised.value.code == code
    assert raised.value.message == f"failed with {code}"


@pytest_twisted.ensureDeferred
async def test_a_bug_in_the_core_is_an_internal_error(core: FakeCore, agent_socket: str) -> None:
    with pytest.raises(TunnelError) as raised:
        await in_thread(client.connect, "broken", "chat", socket_path=agent_socket)
    assert raised.value.code == "internal"
    assert "bug in the core" not in raised.value.message
    # The connection survived: the agent still answers on it.
    assert await in_thread(client.status, socket_path=agent_socket) == core.status_value


@pytest_twisted.ensureDeferred
async def test_listen_delivers_each_tunnel_with_its_own_descriptor(
    core: FakeCore, agent_socket: str
) -> None:
    listener = await in_thread(client.listen, "chat", socket_path=agent_socket)
    try:
        assert set(core.listeners) == {"chat"}
        core.listeners["chat"](core.tunnel("bob", "chat"))
        core.listeners["chat"](core.tunnel("carol", "chat"))
        first = await in_thread(listener.accept, 5)
        second = await in_thread(listener.accept, 5)
        with first, second:
            check_tunnel(core, first, "bob")
            check_tunnel(core, second, "carol")
        assert all(sock.fileno() == -1 for sock in core.agent_ends)
        with pytest.raises(TunnelError) as raised:
            await in_thread(listener.accept, 0.2)
        assert raised.value.code == "timeout"
    finally:
        listener.close()
    await wait_until(lambda: core.unlistened == ["chat"])
    assert core.listeners == {}


@pytest_twisted.ensureDeferred
async def test_unlisten_and_duplicate_listener_ids(core: FakeCore, agent_socket: str) -> None:
    def talk() -> list[dict[str, Any]]:
        conn = RawConnection(agent_socket)
        try:
            conn.send({"id": 5, "op": "listen", "service": "chat"})
            conn.send({"id": 5, "op": "listen", "service": "other"})
            conn.send({"id": 5, "op": "unlisten"})
            conn.send({"id": 5, "op": "unlisten"})
            return [conn.line() for _ in range(4)]
        finally:
            conn.close()

    replies = await in_thread(talk)
    assert replies[0] == {"id": 5, "ok": True}
    assert replies[1]["error"]["code"] == "bad-request"
    assert replies[2] == {"id": 5, "ok": True}
    assert replies[3]["error"]["code"] == "bad-request"
    assert core.unlistened == ["chat"]


@pytest_twisted.ensureDeferred
async def test_a_tunnel_delivered_during_listen_follows_the_ok(
    core: FakeCore, sockdir: str
) -> None:
    class EagerCore(FakeCore):
        def listen(self, service: str, incoming: Any) -> Any:
            incoming(self.tunnel("bob", service))
            return super().listen(service, incoming)

    eager = EagerCore()
    path = os.path.join(sockdir, "agent.sock")
    service = serve(eager, path)
    try:
        listener = await in_thread(client.listen, "chat", socket_path=path)
        with listener, await in_thread(listener.accept, 5) as tunnel:
            check_tunnel(eager, tunnel)
    finally:
        await maybeDeferred(service.stopService)
        eager.close()


@pytest_twisted.ensureDeferred
async def test_fifty_concurrent_connects_on_one_connection(
    core: FakeCore, agent_socket: str
) -> None:
    channel = client._Channel(agent_socket)
    ids = {
        channel.request("connect", peer=f"hold{i}", service="chat"): f"hold{i}" for i in range(50)
    }

    def collect() -> dict[int, Tunnel]:
        tunnels: dict[int, Tunnel] = {}
        while len(tunnels) < 50:
            reply, sock = channel.read(None)
            if sock is not None:
                assert reply["ok"] is True
                tunnels[reply["id"]] = Tunnel(sock, reply["tunnel"])
        return tunnels

    try:
        await wait_until(lambda: len(core.held) == 50)
        collected = in_thread(collect)
        # All at once: many descriptors ride on bytes of lines queued before theirs.
        for held in random.sample(core.held, len(core.held)):
            core.release(held)
        tunnels = await collected
        assert {rid: t.info["peer"] for rid, t in tunnels.items()} == ids
        for tunnel in tunnels.values():
            with tunnel:
                check_tunnel(core, tunnel, tunnel.info["peer"])
    finally:
        channel.close()
    await wait_until(lambda: all(sock.fileno() == -1 for sock in core.agent_ends))


@pytest_twisted.ensureDeferred
async def test_fifty_concurrent_connects_on_fifty_connections(
    core: FakeCore, agent_socket: str
) -> None:
    results = gatherResults(
        [in_thread(client.connect, f"hold{i}", "chat", socket_path=agent_socket) for i in range(50)]
    )
    await wait_until(lambda: len(core.held) == 50)
    for held in random.sample(core.held, len(core.held)):
        reactor.callLater(random.random() / 20, core.release, held)
    tunnels = await results
    assert [t.info["peer"] for t in tunnels] == [f"hold{i}" for i in range(50)]
    for tunnel in tunnels:
        with tunnel:
            check_tunnel(core, tunnel, tunnel.info["peer"])


GARBAGE = [
    b"\x00\xff\xfe\xfd binary junk \x80",
    b"[1, 2, 3]",
    b'"a string"',
    b"42",
    b"null",
    b"{not json",
    b'{"id": 1, "op": "status", "x": NaN}',
    b'{"id": [1], "op": "status"}',
    b'{"id": {"a": 1}, "op": "status"}',
    b"[" * 20000 + b"]" * 20000,
]

# Requests that parse but are wrong, each with id 7.
BAD_REQUESTS: list[dict[str, Any]] = [
    {},
    {"op": "frobnicate"},
    {"op": 7},
    {"op": "connect", "service": "chat"},
    {"op": "connect", "peer": "bob"},
    {"op": "connect", "peer": "bad name", "service": "chat"},
    {"op": "connect", "peer": "", "service": "chat"},
    {"op": "connect", "peer": "-bob", "service": "chat"},
    {"op": "connect", "peer": "bob\n", "service": "chat"},
    {"op": "connect", "peer": "b" * 65, "service": "chat"},
    {"op": "connect", "peer": 5, "service": "chat"},
    {"op": "connect", "peer": "bob", "service": "chat/x"},
    {"op": "connect", "peer": "bob", "service": "chat", "timeout": 0},
    {"op": "connect", "peer": "bob", "service": "chat", "timeout": -1},
    {"op": "connect", "peer": "bob", "service": "chat", "timeout": 600.5},
    {"op": "connect", "peer": "bob", "service": "chat", "timeout": "10"},
    {"op": "connect", "peer": "bob", "service": "chat", "timeout": True},
    {"op": "connect", "peer": "bob", "service": "chat", "timeout": None},
    {"op": "listen"},
    {"op": "listen", "service": "a b"},
    {"op": "unlisten"},
]


@pytest_twisted.ensureDeferred
async def test_garbage_gets_bad_request_and_the_connection_keeps_working(
    core: FakeCore, agent_socket: str
) -> None:
    def talk() -> list[dict[str, Any]]:
        conn = RawConnection(agent_socket)
        try:
            for line in GARBAGE:
                conn.send(line + b"\n")
            for request in BAD_REQUESTS:
                conn.send({"id": 7, **request})
            conn.send(
                b'{"id": 8, "op": "connect", "peer": "bob", "service": "chat", "timeout": 1e999}\n'
            )
            conn.send(b"\n  \r\n")  # blank lines are skipped
            conn.send({"id": "last", "op": "status"})
            return [conn.line() for _ in range(len(GARBAGE) + len(BAD_REQUESTS) + 2)]
        finally:
            conn.close()

    replies = await in_thread(talk)
    expected_ids = [None] * len(GARBAGE) + [7] * len(BAD_REQUESTS) + [8]
    for reply, rid in zip(replies, expected_ids):
        assert reply["id"] == rid
        assert reply["ok"] is False
        assert reply["error"]["code"] == "bad-request"
        assert reply["error"]["message"]
    assert replies[-1] == {"id": "last", "ok": True, "status": core.status_value}
    assert core.connects == []
    assert core.listeners == {}


@pytest.mark.parametrize("rid", ["abc", 0, -3, 2.5, True, None])
@pytest_twisted.ensureDeferred
async def test_ids_are_echoed(core: FakeCore, agent_socket: str, rid: Any) -> None:
    def talk() -> dict[str, Any]:
        conn = RawConnection(agent_socket)
        try:
            conn.send({"op": "peers"} if rid is None else {"id": rid, "op": "peers"})
            return conn.line()
        finally:
            conn.close()

    assert await in_thread(talk) == {"id": rid, "ok": True, "peers": core.peer_list}


@pytest.mark.parametrize("newline", [b"", b"\n"])
@pytest_twisted.ensureDeferred
async def test_an_overlong_line_is_refused_and_closes(
    core: FakeCore, agent_socket: str, newline: bytes
) -> None:
    def talk() -> tuple[dict[str, Any], bool]:
        conn = RawConnection(agent_socket)
        try:
            conn.send(b"a" * (64 * 1024 + 1) + newline)
            return conn.line(), conn.at_eof()
        finally:
            conn.close()

    reply, closed = await in_thread(talk)
    assert reply["id"] is None
    assert reply["error"]["code"] == "bad-request"
    assert closed
    assert await in_thread(client.status, socket_path=agent_socket) == core.status_value


@pytest_twisted.ensureDeferred
async def test_closing_with_a_descriptor_in_flight(core: FakeCore, agent_socket: str) -> None:
    def talk() -> tuple[list[dict[str, Any]], bool]:
        conn = RawConnection(agent_socket)
        try:
            conn.send({"id": 1, "op": "connect", "peer": "bob", "service": "chat"})
            conn.send(b"a" * (64 * 1024 + 1))
            return [conn.line() for _ in range(4)], conn.at_eof()
        finally:
            conn.close()

    replies, closed = await in_thread(talk)
    assert [r.get("event", r.get("ok")) for r in replies] == ["introduced", "probing", True, False]
    assert replies[3]["error"]["code"] == "bad-request"
    assert closed
    await wait_until(lambda: core.agent_ends[0].fileno() == -1)


@pytest_twisted.ensureDeferred
async def test_a_line_of_exactly_64_kib_is_accepted(core: FakeCore, agent_socket: str) -> None:
    request = b'{"id": 1, "op": "status"}'
    request += b" " * (64 * 1024 - len(request))

    def talk() -> dict[str, Any]:
        conn = RawConnection(agent_socket)
        try:
            conn.send(request + b"\n")
            return conn.line()
        finally:
            conn.close()

    assert (await in_thread(talk))["ok"] is True


@pytest_twisted.ensureDeferred
async def test_leaving_mid_connect_cancels_it(core: FakeCore, agent_socket: str) -> None:
    conn = RawConnection(agent_socket)
    conn.send({"id": 1, "op": "connect", "peer": "hold-me", "service": "chat"})
    await wait_until(lambda: core.held)
    assert core.cancelled == []
    conn.close()
    await wait_until(lambda: core.cancelled == ["hold-me"])


@pytest_twisted.ensureDeferred
async def test_leaving_removes_listeners_and_late_tunnels_are_closed(
    core: FakeCore, agent_socket: str
) -> None:
    conn = RawConnection(agent_socket)
    conn.send({"id": 1, "op": "listen", "service": "chat"})
    await wait_until(lambda: "chat" in core.listeners)
    incoming = core.listeners["chat"]
    conn.close()
    await wait_until(lambda: core.unlistened == ["chat"])
    # A core that raced with the disconnect still delivers: the socket must not leak.
    handoff = core.tunnel("bob", "chat")
    incoming(handoff)
    assert handoff.sock.fileno() == -1


@pytest_twisted.ensureDeferred
async def test_no_descriptor_leaks(core: FakeCore, agent_socket: str) -> None:
    before = open_fds()

    def many() -> None:
        for _ in range(30):
            with client.connect("bob", "chat", socket_path=agent_socket):
                pass
        with client.listen("chat", socket_path=agent_socket) as listener:
            for _ in range(10):
                reactor.callFromThread(core.listeners["chat"], core.tunnel("carol", "chat"))
                listener.accept(5).close()

    await in_thread(many)
    await wait_until(lambda: len(core.agent_ends) == 40)
    assert all(sock.fileno() == -1 for sock in core.agent_ends)
    for far in core.far_ends.values():
        far.close()
    await wait_until(lambda: open_fds() == before)


@pytest_twisted.ensureDeferred
async def test_a_descriptor_stays_open_until_it_has_left(core: FakeCore, agent_socket: str) -> None:
    core.status_value = {"blob": "x" * 50_000}
    channel = client._Channel(agent_socket)
    try:
        # 750 kB of replies nobody reads yet: under the unread limit, so the
        # agent still reads the connect, and its descriptor queues behind them.
        for _ in range(15):
            channel.request("status")
        rid = channel.request("connect", peer="bob", service="chat")
        await wait_until(lambda: core.agent_ends)
        await deferLater(reactor, 0.2)
        assert core.agent_ends[0].fileno() != -1, "closed before it was sent"

        def read_all() -> Tunnel:
            while True:
                reply, sock = channel.read(None)
                if sock is not None:
                    assert reply["id"] == rid
                    return Tunnel(sock, reply["tunnel"])

        with await in_thread(read_all) as tunnel:
            check_tunnel(core, tunnel)
        await wait_until(lambda: core.agent_ends[0].fileno() == -1)
    finally:
        channel.close()


@pytest_twisted.ensureDeferred
async def test_a_stale_socket_file_is_replaced(core: FakeCore, sockdir: str) -> None:
    path = os.path.join(sockdir, "agent.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()
    service = serve(core, path)
    try:
        assert await in_thread(client.status, socket_path=path) == core.status_value
    finally:
        await maybeDeferred(service.stopService)
    assert not os.path.exists(path)


@pytest_twisted.ensureDeferred
async def test_a_live_socket_is_not_replaced(core: FakeCore, agent_socket: str) -> None:
    with pytest.raises(
        ControlSocketError, match=f"another agent is already listening on {re.escape(agent_socket)}"
    ):
        serve(FakeCore(), agent_socket)
    assert await in_thread(client.status, socket_path=agent_socket) == core.status_value


def test_a_file_that_is_not_a_socket_is_left_alone(core: FakeCore, sockdir: str) -> None:
    path = os.path.join(sockdir, "agent.sock")
    with open(path, "w") as f:
        f.write("precious")
    with pytest.raises(ControlSocketError, match="exists and is not a socket"):
        serve(core, path)
    with open(path) as f:
        assert f.read() == "precious"


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077])
@pytest_twisted.ensureDeferred
async def test_socket_mode_is_0660_whatever_the_umask(
    core: FakeCore, sockdir: str, umask: int
) -> None:
    path = os.path.join(sockdir, "agent.sock")
    old = os.umask(umask)
    try:
        service = serve(core, path)
    finally:
        os.umask(old)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
    finally:
        await maybeDeferred(service.stopService)


def no_groups(uid: int, gid: int) -> tuple[int, ...]:
    return (gid,)


def caller(uid: int, gid: int = 3000) -> PeerCredentials:
    return PeerCredentials(pid=1234, uid=uid, gid=gid)


def test_the_agents_own_user_and_root_are_always_allowed() -> None:
    authorizer = Authorizer(own_uid=1000, groups_of=no_groups)
    assert authorizer.allows(caller(1000))
    assert authorizer.allows(caller(0))
    assert not authorizer.allows(caller(1001))
    strict = Authorizer(own_uid=1000, allow_root=False, groups_of=no_groups)
    assert not strict.allows(caller(0))


def test_allowed_users_by_name_or_number() -> None:
    authorizer = Authorizer(["root", "1234"], own_uid=1000, allow_root=False, groups_of=no_groups)
    assert authorizer.allows(caller(0))
    assert authorizer.allows(caller(1234))
    assert not authorizer.allows(caller(1235))


def test_allowed_groups_count_primary_and_supplementary_groups() -> None:
    supplementary = {2000: (2000, 50, 60)}
    authorizer = Authorizer(
        groups=["50"],
        own_uid=1000,
        groups_of=lambda uid, gid: supplementary.get(uid, (gid,)),
    )
    assert authorizer.allows(caller(2000, gid=2000))
    assert authorizer.allows(caller(3000, gid=50))
    assert not authorizer.allows(caller(3000, gid=3000))


def test_group_names_and_the_user_database() -> None:
    authorizer = Authorizer(groups=["nogroup"], own_uid=1000)
    assert authorizer.allows(caller(65534, gid=65534))  # nobody, primary group nogroup
    assert not authorizer.allows(caller(65534, gid=4242))


@pytest.mark.parametrize(
    ("users", "groups", "message"),
    [
        (["no-such-user-punchd"], [], "unknown user 'no-such-user-punchd'"),
        ([], ["no-such-group-punchd"], "unknown group 'no-such-group-punchd'"),
    ],
)
def test_unknown_names_stop_the_agent(users: list[str], groups: list[str], message: str) -> None:
    with pytest.raises(ControlSocketError, match=message):
        Authorizer(users, groups)


@pytest_twisted.ensureDeferred
async def test_a_refused_caller_gets_one_line_and_is_closed(core: FakeCore, sockdir: str) -> None:
    path = os.path.join(sockdir, "agent.sock")
    service = serve(core, path, Authorizer(own_uid=os.getuid() + 4242, allow_root=False))

    def talk() -> tuple[dict[str, Any], bool]:
        conn = RawConnection(path)
        try:
            # The agent may have hung up already: its reason still waits to be read.
            with contextlib.suppress(BrokenPipeError):
                conn.send({"id": 1, "op": "connect", "peer": "bob", "service": "chat"})
            return conn.line(), conn.at_eof()
        finally:
            conn.close()

    try:
        reply, closed = await in_thread(talk)
        assert reply["id"] is None
        assert reply["ok"] is False
        assert reply["error"]["code"] == "unauthorized"
        assert closed
        assert core.connects == []
        with pytest.raises(TunnelError) as raised:
            await in_thread(client.status, socket_path=path)
        assert raised.value.code == "unauthorized"
    finally:
        await maybeDeferred(service.stopService)


def status_as_nobody(path: str) -> dict[str, Any]:
    """
    Ask for status from a forked child that has become nobody:nogroup.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        status = 1
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(5)
            sock.connect(path)
            with contextlib.suppress(BrokenPipeError):
                sock.sendall(b'{"id": 1, "op": "status"}\n')
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
            os.write(w, data)
            status = 0
        finally:
            os._exit(status)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    assert status == 0, data
    reply: dict[str, Any] = json.loads(data)
    return reply


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
@pytest.mark.parametrize(("groups", "allowed"), [((), False), (("nogroup",), True)])
@pytest_twisted.ensureDeferred
async def test_a_real_other_user(
    core: FakeCore, sockdir: str, groups: tuple[str, ...], allowed: bool
) -> None:
    path = os.path.join(sockdir, "agent.sock")
    service = serve(core, path, Authorizer(groups=groups))
    # Let nobody reach the socket file, so SO_PEERCRED alone decides.
    os.chmod(sockdir, 0o755)
    os.chmod(path, 0o666)
    try:
        reply = await in_thread(status_as_nobody, path)
    finally:
        await maybeDeferred(service.stopService)
    if allowed:
        assert reply == {"id": 1, "ok": True, "status": core.status_value}
    else:
        assert reply["error"]["code"] == "unauthorized"
        assert "65534" in reply["error"]["message"]


# -- what one program may cost the agent (limits) ---------------------------


def limited(core: FakeCore, sockdir: str, **limits: Any) -> ControlService:
    return serve(core, os.path.join(sockdir, "agent.sock"), limits=ControlLimits(**limits))


def buffered(protocol: ControlProtocol) -> int:
    """
    Bytes in the agent's user-space write buffer for one connection.
    """
    t: Any = protocol.transport
    return len(t.dataBuffer) - t.offset + t._tempDataLen


def record_protocols(service: ControlService) -> list[ControlProtocol]:
    built: list[ControlProtocol] = []
    build = service.factory.buildProtocol

    def recording(addr: Any) -> ControlProtocol:
        protocol = build(addr)
        built.append(protocol)
        return protocol

    service.factory.buildProtocol = recording  # type: ignore[method-assign]
    return built


@pytest_twisted.ensureDeferred
async def test_a_program_that_never_reads_is_dropped_with_bounded_buffer(
    core: FakeCore, sockdir: str
) -> None:
    core.status_value = {"blob": "x" * 50_000}
    service = limited(core, sockdir, max_unread=256 * 1024, stall_timeout=0.5)
    built = record_protocols(service)
    path = service.path
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    sock.setblocking(False)
    requests = b'{"id": 1, "op": "status"}\n' * 1000  # 50 MB of replies, never read
    peak = 0
    try:
        await wait_until(lambda: service.factory.connections)
        deadline = reactor.seconds() + 5
        while service.factory.connections and reactor.seconds() < deadline:
            with contextlib.suppress(BlockingIOError, BrokenPipeError, ConnectionResetError):
                requests = requests[sock.send(requests) :]
            peak = max([peak, *(buffered(p) for p in built if p.transport is not None)])
            await deferLater(reactor, 0.005)
        assert not service.factory.connections, "the program that never reads is still served"
        assert 0 < peak <= 256 * 1024 + 60_000
        # Everyone else is still served.
        assert await in_thread(client.status, socket_path=path) == core.status_value
    finally:
        sock.close()
        await maybeDeferred(service.stopService)


@pytest_twisted.ensureDeferred
async def test_a_paused_program_that_reads_gets_everything_and_its_tunnel(
    core: FakeCore, sockdir: str
) -> None:
    core.status_value = {"blob": "x" * 50_000}
    service = limited(core, sockdir, max_unread=256 * 1024, stall_timeout=5.0)
    channel = client._Channel(service.path)
    try:
        for _ in range(30):  # 1.5 MB of replies: past the limit, the agent stops reading
            channel.request("status")
        rid = channel.request("connect", peer="bob", service="chat")
        await deferLater(reactor, 0.3)
        assert core.connects == [], "the agent kept reading past the unread limit"

        def read_all() -> tuple[int, Tunnel]:
            statuses = 0
            while True:
                reply, sock = channel.read(time.monotonic() + 5)
                if sock is not None:
                    assert reply["id"] == rid
                    return statuses, Tunnel(sock, reply["tunnel"])
                statuses += "status" in reply

        statuses, tunnel = await in_thread(read_all)
        with tunnel:
            assert statuses == 30
            check_tunnel(core, tunnel)
        await wait_until(lambda: core.agent_ends[0].fileno() == -1)
        assert service.factory.connections, "a program that reads must not be dropped"
    finally:
        channel.close()
        await maybeDeferred(service.stopService)


def refused_after(path: str, opened: list[RawConnection]) -> dict[str, Any]:
    conn = RawConnection(path)
    opened.append(conn)
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        conn.send({"id": 1, "op": "status"})
    reply = conn.line()
    assert conn.at_eof()
    return reply


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        ({"max_per_user": 3}, f"uid {os.getuid()} already has 3 control connections open"),
        ({"max_connections": 3}, "the agent already serves 3 control connections"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_connection_caps_refuse_the_next_one(
    core: FakeCore, sockdir: str, limits: dict[str, int], message: str
) -> None:
    service = limited(core, sockdir, **limits)
    opened: list[RawConnection] = []
    try:
        for i in range(3):
            conn = RawConnection(service.path)
            opened.append(conn)
            conn.send({"id": i, "op": "status"})
            assert (await in_thread(conn.line))["ok"] is True
        reply = await in_thread(refused_after, service.path, opened)
        assert reply["id"] is None
        assert reply["error"]["code"] == "busy"
        assert message in reply["error"]["message"]
        with pytest.raises(TunnelError) as raised:
            await in_thread(client.status, socket_path=service.path)
        assert raised.value.code == "busy"
        opened.pop(0).close()
        await wait_until(lambda: service.factory.connections.total() == 2)
        assert await in_thread(client.status, socket_path=service.path) == core.status_value
    finally:
        for conn in opened:
            conn.close()
        await maybeDeferred(service.stopService)


@pytest_twisted.ensureDeferred
async def test_idle_connections_close_but_listens_and_connects_do_not(
    core: FakeCore, sockdir: str
) -> None:
    service = limited(core, sockdir, idle_timeout=0.3)
    silent, asked, listening, connecting = (RawConnection(service.path) for _ in range(4))
    try:
        asked.send({"id": 1, "op": "status"})
        listening.send({"id": 2, "op": "listen", "service": "chat"})
        connecting.send({"id": 3, "op": "connect", "peer": "hold-it", "service": "chat"})
        assert (await in_thread(asked.line))["ok"] is True
        assert (await in_thread(listening.line))["ok"] is True
        await wait_until(lambda: core.held)
        for conn in silent, asked:
            reply = await in_thread(conn.line)
            assert reply["id"] is None
            assert reply["error"]["code"] == "timeout"
            assert "no request for 0.3 s" in reply["error"]["message"]
            assert await in_thread(conn.at_eof)
        await deferLater(reactor, 0.6)
        assert service.factory.connections.total() == 2
        assert core.cancelled == []
        assert "chat" in core.listeners
        # The connect finishes: now that connection has nothing in flight either.
        core.release(core.held[0])
        replies = [await in_thread(connecting.line) for _ in range(3)]
        assert replies[1]["ok"] is True
        assert replies[2]["error"]["code"] == "timeout"
        assert await in_thread(connecting.at_eof)
        listening.send({"id": 4, "op": "status"})
        assert (await in_thread(listening.line))["ok"] is True
    finally:
        for conn in silent, asked, listening, connecting:
            conn.close()
        await maybeDeferred(service.stopService)


# -- ids and lines no reply could carry -------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        b'{"id": 1e999, "op": "connect", "peer": "bob", "service": "chat"}',
        b'{"id": -1e999, "op": "status"}',
        b'{"id": NaN, "op": "connect", "peer": "bob", "service": "chat"}',
        b'{"id": Infinity, "op": "status"}',
        b'{"id": -Infinity, "op": "listen", "service": "chat"}',
    ],
)
@pytest_twisted.ensureDeferred
async def test_a_non_finite_id_is_a_bad_request(
    core: FakeCore, agent_socket: str, line: bytes
) -> None:
    def talk() -> list[dict[str, Any]]:
        conn = RawConnection(agent_socket)
        try:
            conn.send(line + b"\n")
            conn.send({"id": "next", "op": "status"})
            return [conn.line(), conn.line()]
        finally:
            conn.close()

    refused, status = await in_thread(talk)
    assert refused["id"] is None
    assert refused["error"]["code"] == "bad-request"
    assert status == {"id": "next", "ok": True, "status": core.status_value}
    assert core.connects == []
    assert core.listeners == {}


class UnsendableProgressCore(FakeCore):
    """
    Reports progress no JSON line can carry: at once, or when released.
    """

    def connect(self, peer: str, service: str, timeout: float, progress: Any) -> Any:
        d = super().connect(peer, service, timeout, progress)
        if peer == "hold-now":
            progress({"event": "probing", "rtt_ms": float("nan")})
        return d

    def release(self, held: Held) -> None:
        held.progress({"event": "probing", "rtt_ms": float("inf")})


@pytest_twisted.ensureDeferred
async def test_an_unsendable_progress_line_cancels_the_tunnel(sockdir: str) -> None:
    core = UnsendableProgressCore()
    path = os.path.join(sockdir, "agent.sock")
    service = serve(core, path)
    conn = RawConnection(path)
    try:
        conn.send({"id": 1, "op": "connect", "peer": "hold-now", "service": "chat"})
        conn.send({"id": 2, "op": "connect", "peer": "hold-later", "service": "chat"})
        await wait_until(lambda: len(core.held) == 2)
        core.release(core.held[1])
        replies = {r["id"]: r for r in [await in_thread(conn.line) for _ in range(2)]}
        assert replies[1]["error"]["code"] == "cancelled"
        assert replies[2]["error"]["code"] == "cancelled"
        assert sorted(core.cancelled) == ["hold-later", "hold-now"]
        conn.send({"id": 3, "op": "status"})
        assert (await in_thread(conn.line))["ok"] is True
    finally:
        conn.close()
        await maybeDeferred(service.stopService)
        core.close()
