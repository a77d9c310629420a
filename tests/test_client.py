"""
punchd.client against scripted stdlib agents: descriptor bookkeeping, errors,
timeouts.  The real control socket serving the client is in
tests/agent/test_control.py.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from punchd import client
from punchd.client import TunnelError
from tests.agent import open_fds, short_tempdir


@pytest.fixture
def path() -> Iterator[str]:
    directory = short_tempdir()
    yield os.path.join(directory, "agent.sock")
    shutil.rmtree(directory, ignore_errors=True)


def udp_pair() -> tuple[socket.socket, socket.socket]:
    a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for sock in a, b:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(5)
    a.connect(b.getsockname())
    b.connect(a.getsockname())
    return a, b


def line(message: dict[str, Any]) -> bytes:
    return json.dumps(message).encode() + b"\n"


def read_request(conn: socket.socket) -> dict[str, Any]:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(4096)
        assert chunk, "the client hung up before asking"
        data += chunk
    request: dict[str, Any] = json.loads(data)
    return request


class ScriptedAgent:
    """
    Accepts one connection on C{path} and plays C{script} on it in a thread.
    """

    def __init__(self, path: str, script: Callable[[socket.socket], None]) -> None:
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(path)
        self._server.listen(1)
        self.error: BaseException | None = None
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(script,), daemon=True)
        self._thread.start()

    def _run(self, script: Callable[[socket.socket], None]) -> None:
        try:
            conn, _ = self._server.accept()
            with conn:
                script(conn)
        except BaseException as e:
            self.error = e
        finally:
            self._server.close()
            self.done.set()

    def join(self) -> None:
        self._thread.join(10)
        if self.error is not None:
            raise self.error


def test_the_client_does_not_import_twisted() -> None:
    code = (
        "import sys, punchd.client\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('twisted', 'zope')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_socket_path_argument_then_environment_then_default(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PUNCHD_SOCKET", path + ".env")
    with pytest.raises(TunnelError) as raised:
        client.status(socket_path=path)
    assert raised.value.code == "agent-unreachable"
    assert f"at {path}:" in raised.value.message
    with pytest.raises(TunnelError) as raised:
        client.peers()
    assert f"at {path}.env:" in raised.value.message
    monkeypatch.delenv("PUNCHD_SOCKET")
    assert client._socket_path(None) == "/run/punchd/agent.sock"


def test_an_absent_agent_is_unreachable(path: str) -> None:
    with pytest.raises(TunnelError) as raised:
        client.connect("bob", "chat", socket_path=path)
    assert raised.value.code == "agent-unreachable"
    assert path in raised.value.message
    assert "is the punch-agent running?" in raised.value.message


def test_a_file_that_is_not_a_socket_is_unreachable(path: str) -> None:
    with open(path, "w"):
        pass
    with pytest.raises(TunnelError) as raised:
        client.listen("chat", socket_path=path)
    assert raised.value.code == "agent-unreachable"


def test_a_descriptor_that_came_early_goes_with_its_line(path: str) -> None:
    agent_end, far_end = udp_pair()

    def script(conn: socket.socket) -> None:
        request = read_request(conn)
        assert request == {"id": 1, "op": "connect", "peer": "bob", "service": "chat", "timeout": 4}
        progress = line({"id": 1, "event": "introduced"})
        # The descriptor rides on the first byte of the progress line.
        socket.send_fds(conn, [progress[:1]], [agent_end.fileno()])
        agent_end.close()
        conn.sendall(progress[1:])
        conn.sendall(line({"id": 1, "event": "probing", "pairs": 3}))
        conn.sendall(line({"id": 1, "ok": True, "tunnel": {"peer": "bob"}}))

    agent = ScriptedAgent(path, script)
    events: list[dict[str, Any]] = []
    with (
        far_end,
        client.connect(
            "bob", "chat", socket_path=path, timeout=4, on_progress=events.append
        ) as tunnel,
    ):
        agent.join()
        assert events == [{"event": "introduced"}, {"event": "probing", "pairs": 3}]
        assert tunnel.info == {"peer": "bob"}
        assert tunnel.socket.getpeername() == far_end.getsockname()
        far_end.send(b"hi")
        assert tunnel.socket.recv(10) == b"hi"


def test_listener_pairs_descriptors_in_order(path: str) -> None:
    pairs = [udp_pair(), udp_pair()]

    def script(conn: socket.socket) -> None:
        rid = read_request(conn)["id"]
        ok = line({"id": rid, "ok": True})
        # Both descriptors arrive before either line that claims them.
        socket.send_fds(conn, [ok[:1]], [pairs[0][0].fileno()])
        socket.send_fds(conn, [ok[1:2]], [pairs[1][0].fileno()])
        conn.sendall(ok[2:])
        for n in range(2):
            pairs[n][0].close()
            conn.sendall(line({"id": rid, "event": "incoming", "tunnel": {"n": n}}))
        conn.recv(1)  # until the client hangs up

    agent = ScriptedAgent(path, script)
    try:
        with client.listen("chat", socket_path=path) as listener:
            for n in range(2):
                with listener.accept(5) as tunnel:
                    assert tunnel.info == {"n": n}
                    assert tunnel.socket.getpeername() == pairs[n][1].getsockname()
    finally:
        for _, far in pairs:
            far.close()
    agent.join()


def test_unclaimed_descriptors_are_closed(path: str) -> None:
    agent_end, far_end = udp_pair()
    before = open_fds()

    def script(conn: socket.socket) -> None:
        rid = read_request(conn)["id"]
        # A tunnel for another request, then the refusal of ours with a stray descriptor.
        socket.send_fds(conn, [line({"id": 99, "ok": True, "tunnel": {}})], [agent_end.fileno()])
        socket.send_fds(
            conn,
            [line({"id": rid, "ok": False, "error": {"code": "busy", "message": "later"}})],
            [agent_end.fileno()],
        )

    agent = ScriptedAgent(path, script)
    with pytest.raises(TunnelError) as raised:
        client.connect("bob", "chat", socket_path=path)
    agent.join()
    assert (raised.value.code, raised.value.message) == ("busy", "later")
    agent_end.close()
    far_end.close()
    assert open_fds() == before - 2


@pytest.mark.parametrize(
    ("reply", "code"),
    [
        (b'{"id": 1, "ok": true, "tunnel": {}}\n', "bad-reply"),  # no descriptor
        (b"not json\n", "bad-reply"),
        (b"[1]\n", "bad-reply"),
        (b'{"id": 1, "ok": false}\n', "bad-reply"),
        (b'{"id": 1, "ok": true}\n', "bad-reply"),  # connect without a tunnel
        (b'{"id": 1, "event": "intro', "agent-unreachable"),  # hung up mid-line
    ],
)
def test_bad_replies(path: str, reply: bytes, code: str) -> None:
    def script(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(reply)

    agent = ScriptedAgent(path, script)
    with pytest.raises(TunnelError) as raised:
        client.connect("bob", "chat", socket_path=path)
    agent.join()
    assert raised.value.code == code


def test_status_without_its_field_is_a_bad_reply(path: str) -> None:
    def script(conn: socket.socket) -> None:
        conn.sendall(line({"id": read_request(conn)["id"], "ok": True}))

    agent = ScriptedAgent(path, script)
    with pytest.raises(TunnelError) as raised:
        client.status(socket_path=path)
    agent.join()
    assert raised.value.code == "bad-reply"


def test_a_refusal_sent_before_the_request_is_reported(path: str) -> None:
    def script(conn: socket.socket) -> None:
        refusal = {"id": None, "ok": False, "error": {"code": "unauthorized", "message": "no"}}
        conn.sendall(line(refusal))

    agent = ScriptedAgent(path, script)
    channel = client._Channel(path)
    try:
        assert agent.done.wait(5)
        with pytest.raises(TunnelError) as raised:
            channel.result(channel.request("status"), time.monotonic() + 5)
    finally:
        channel.close()
    agent.join()
    assert raised.value.code == "unauthorized"


def test_connect_waits_for_its_timeout_plus_a_margin(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client, "REPLY_MARGIN", 0.2)

    def script(conn: socket.socket) -> None:
        read_request(conn)
        conn.recv(1)  # until the client gives up

    agent = ScriptedAgent(path, script)
    start = time.monotonic()
    with pytest.raises(TunnelError) as raised:
        client.connect("bob", "chat", socket_path=path, timeout=0.3)
    elapsed = time.monotonic() - start
    agent.join()
    assert raised.value.code == "timeout"
    assert 0.5 <= elapsed < 3


def test_status_timeout(path: str) -> None:
    def script(conn: socket.socket) -> None:
        read_request(conn)
        conn.recv(1)

    agent = ScriptedAgent(path, script)
    with pytest.raises(TunnelError) as raised:
        client.status(socket_path=path, timeout=0.2)
    agent.join()
    assert raised.value.code == "timeout"


def test_accept_polls_and_works_with_select(path: str) -> None:
    agent_end, far_end = udp_pair()
    go = threading.Event()

    def script(conn: socket.socket) -> None:
        conn.sendall(line({"id": read_request(conn)["id"], "ok": True}))
        assert go.wait(5)
        socket.send_fds(
            conn, [line({"id": 1, "event": "incoming", "tunnel": {}})], [agent_end.fileno()]
        )
        conn.recv(1)

    agent = ScriptedAgent(path, script)
    with far_end, client.listen("chat", socket_path=path) as listener:
        with pytest.raises(TunnelError) as raised:
            listener.accept(0)
        assert raised.value.code == "timeout"
        assert select.select([listener], [], [], 0.1)[0] == []
        go.set()
        assert select.select([listener], [], [], 5)[0] == [listener]
        with listener.accept(0) as tunnel:
            assert tunnel.socket.getpeername() == far_end.getsockname()
    agent.join()
    agent_end.close()


def test_a_full_backlog_makes_the_client_wait(path: str) -> None:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(0)
    first = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    first.connect(path)  # the backlog is full now
    result: dict[str, Any] = {}
    waiting = threading.Thread(target=lambda: result.update(client.status(socket_path=path)))
    waiting.start()
    try:
        time.sleep(0.3)
        assert waiting.is_alive(), f"gave up at once: {result}"
        server.accept()[0].close()
        first.close()
        conn, _ = server.accept()
        with conn:
            request = read_request(conn)
            conn.sendall(line({"id": request["id"], "ok": True, "status": {"name": "x"}}))
            waiting.join(30)
    finally:
        server.close()
    assert result == {"name": "x"}


def test_an_agent_that_never_accepts(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client, "REQUEST_TIMEOUT", 0.3)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(0)
    first = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    first.connect(path)
    start = time.monotonic()
    try:
        with pytest.raises(TunnelError) as raised:
            client.status(socket_path=path)
    finally:
        first.close()
        server.close()
    assert raised.value.code == "agent-unreachable"
    assert "accepts no connections" in raised.value.message
    assert 0.25 <= time.monotonic() - start < 3
