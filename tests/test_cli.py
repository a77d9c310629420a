"""
punchctl: key files in-process; agent commands and chats as real
subprocesses against a control socket served by the fake agent core.
"""

from __future__ import annotations

import json
import os
import select
import signal
import stat
import subprocess
import sys
import time
from typing import Any

import pytest
import pytest_twisted

from punchd import __version__
from punchd.cli import describe_status, duration, main
from punchd.keys import PublicKey, load_private_key
from tests.agent import (  # noqa: F401 (the *_fixture names register fixtures)
    FakeCore,
    agent_socket_fixture,
    core_fixture,
    in_thread,
    sockdir_fixture,
    wait_until,
)


def punchctl(
    socket_path: str, *args: str, stdin: bytes = b"", timeout: float = 30
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "punchd.cli", *args],
        input=stdin,
        capture_output=True,
        env={**os.environ, "PUNCHD_SOCKET": socket_path},
        timeout=timeout,
        check=False,
    )


def start_punchctl(socket_path: str, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "punchd.cli", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PUNCHD_SOCKET": socket_path},
    )


def read_lines(stream: Any, count: int, timeout: float = 20.0) -> list[bytes]:
    """
    C{count} lines from a child's pipe, or an error after C{timeout}: a read
    that never returns would hang the reactor the test runs in.
    """
    data = b""
    deadline = time.monotonic() + timeout
    while data.count(b"\n") < count:
        ready, _, _ = select.select([stream.fileno()], [], [], deadline - time.monotonic())
        if not ready:
            raise TimeoutError(f"punchctl printed only {data!r}")
        chunk = os.read(stream.fileno(), 4096)
        if not chunk:
            break
        data += chunk
    return data.splitlines(keepends=True)[:count]


def received(core: FakeCore, tid: str, count: int) -> list[bytes]:
    return [core.far_ends[tid].recv(65535) for _ in range(count)]


def one_error_line(stderr: bytes) -> str:
    text = stderr.decode()
    assert "Traceback" not in text
    assert text.count("\n") == 1, text
    assert text.startswith("punchctl: ")
    return text


def test_keygen_writes_a_private_key_and_pubkey_prints_its_public_key(
    tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    key_file = str(tmp_path / "agent.key")
    assert main(["keygen", key_file]) == 0
    public = capsys.readouterr().out.strip()
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    assert PublicKey.from_base64(public) == load_private_key(key_file).public_key()
    assert main(["pubkey", key_file]) == 0
    assert capsys.readouterr().out.strip() == public


def test_keygen_refuses_to_overwrite(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    key_file = tmp_path / "agent.key"
    assert main(["keygen", str(key_file)]) == 0
    before = key_file.read_bytes()
    capsys.readouterr()
    assert main(["keygen", str(key_file)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert "already exists" in one_error_line(err.encode())
    assert key_file.read_bytes() == before


def test_pubkey_of_a_missing_file(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pubkey", str(tmp_path / "nope.key")]) == 1
    assert "nope.key" in one_error_line(capsys.readouterr().err.encode())


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["connect", "bob"],
        ["connect", "bob", "chat", "--timeout", "0"],
        ["connect", "bob", "chat", "--linger", "soon"],
        ["listen"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert "usage: punchctl" in capsys.readouterr().err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "keygen" in capsys.readouterr().out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"punchctl {__version__}\n"


@pytest.mark.parametrize(
    ("command", "words"), [("keygen", "refused if it exists"), ("pubkey", "private key file")]
)
def test_key_commands_describe_their_file(
    command: str, words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([command, "--help"]) == 0
    (line,) = [
        line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("FILE")
    ]
    assert words in line


@pytest.mark.parametrize(
    "args", [["status"], ["peers"], ["connect", "bob", "chat"], ["listen", "chat"]]
)
def test_an_absent_agent_is_one_clear_line(sockdir: str, args: list[str]) -> None:
    absent = os.path.join(sockdir, "absent.sock")
    result = punchctl(absent, *args)
    assert result.returncode == 1
    assert result.stdout == b""
    line = one_error_line(result.stderr)
    assert absent in line
    assert "$PUNCHD_SOCKET named it; --socket PATH chooses another" in line
    assert line.endswith("(agent-unreachable)\n")


def test_socket_option_wins_over_the_environment(sockdir: str) -> None:
    chosen = os.path.join(sockdir, "chosen.sock")
    result = punchctl(os.path.join(sockdir, "env.sock"), "--socket", chosen, "status")
    assert result.returncode == 1
    line = one_error_line(result.stderr)
    assert f"at {chosen}: " in line
    assert "(--socket named it)" in line
    assert "PUNCHD_SOCKET" not in line


def test_the_default_socket_is_named_as_such(
    sockdir: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    default = os.path.join(sockdir, "default.sock")
    monkeypatch.setattr("punchd.cli.DEFAULT_SOCKET_PATH", default)
    monkeypatch.delenv("PUNCHD_SOCKET", raising=False)
    assert main(["status"]) == 1
    line = one_error_line(capsys.readouterr().err.encode())
    assert f"at {default}: " in line
    assert "(the default; --socket PATH or $PUNCHD_SOCKET chooses another)" in line


#: What a real agent's status says, some time after it started.
STATUS = {
    "name": "alice",
    "registration": "registered",
    "rendezvous": "rendezvous.example.net:3478",
    "rendezvous_address": "203.0.113.10:3478",
    "mapped": "203.0.113.11:39705",
    "registered_at": 1_000_000.0,
    "last_error": None,
    "keepalive": 20.0,
    "listening": ["chat", "files"],
    "tunnels": {"in_progress": 1, "established": 12, "failed": 2},
    "uptime": 7500.4,
}


def test_status_reads_as_words() -> None:
    text = describe_status(STATUS, now=1_000_000.0 + 190)
    assert text.splitlines() == [
        "agent           alice, up 2h 5m",
        "state           registered 3m ago, refreshed every 20s",
        "rendezvous      rendezvous.example.net:3478 (203.0.113.10:3478)",
        "public address  203.0.113.11:39705",
        "tunnels         1 in progress, 12 established, 2 failed",
        "listening for   chat, files",
    ]


def test_status_of_an_agent_that_lost_its_registration() -> None:
    status = {
        **STATUS,
        "registration": "retrying",
        "rendezvous_address": "rendezvous.example.net:3478",
        "last_error": "the rendezvous did not answer",
        "listening": [],
        "refused": True,  # a field this punchctl does not know yet
    }
    lines = describe_status(status, now=1_000_000.0 + 3 * 86400 + 4 * 3600).splitlines()
    assert (
        "state           not registered, retrying (see last error); last registered 3d 4h ago"
        in lines
    )
    assert "rendezvous      rendezvous.example.net:3478" in lines
    assert "last error      the rendezvous did not answer" in lines
    assert "refused         yes" in lines
    assert not any(line.startswith("listening") for line in lines)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.2, "0s"),
        (45, "45s"),
        (59.6, "1m"),
        (190, "3m"),
        (3600, "1h"),
        (7500, "2h 5m"),
        (86400, "1d"),
        (90000, "1d 1h"),
    ],
)
def test_durations(seconds: float, text: str) -> None:
    assert duration(seconds) == text


@pytest_twisted.ensureDeferred
async def test_status_and_peers(core: FakeCore, agent_socket: str) -> None:
    core.status_value = {**STATUS, "registered_at": time.time() - 125}
    result = await in_thread(punchctl, agent_socket, "status")
    assert result.returncode == 0
    lines = result.stdout.decode().splitlines()
    assert lines[:2] == [
        "agent           alice, up 2h 5m",
        "state           registered 2m ago, refreshed every 20s",
    ]
    result = await in_thread(punchctl, agent_socket, "status", "--json")
    assert json.loads(result.stdout) == core.status_value
    result = await in_thread(punchctl, agent_socket, "peers")
    assert (result.returncode, result.stdout) == (0, b"bob\ncarol\n")
    core.peer_list = []
    result = await in_thread(punchctl, agent_socket, "peers")
    assert (result.returncode, result.stdout) == (0, b"")
    assert b"no peers online" in result.stderr


@pytest_twisted.ensureDeferred
async def test_connect_chats(core: FakeCore, agent_socket: str) -> None:
    core.greetings = (b"hello from bob", b"second line")
    start = time.monotonic()
    result = await in_thread(
        punchctl,
        agent_socket,
        "connect",
        "bob",
        "chat",
        "--timeout",
        "4",
        "--linger",
        "0.5",
        stdin=b"hi bob\n\nhow are you",
    )
    elapsed = time.monotonic() - start
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"hello from bob\nsecond line\n"
    assert received(core, "t0", 3) == [b"hi bob", b"", b"how are you"]
    assert core.connects == [("bob", "chat", 4.0)]
    progress = result.stderr.decode().splitlines()
    assert progress[:2] == ["punchctl: introduced", "punchctl: probing 2 pairs"]
    remote = core.far_ends["t0"].getsockname()[1]
    assert progress[2] == f"punchctl: connected to bob via direct (127.0.0.1:{remote}) in 42 ms"
    assert elapsed >= 0.5


@pytest.mark.parametrize(
    ("peer", "status", "code"),
    [("bad name", 2, "bad-request"), ("peer-offline", 1, "peer-offline")],
)
@pytest_twisted.ensureDeferred
async def test_connect_failures(agent_socket: str, peer: str, status: int, code: str) -> None:
    result = await in_thread(punchctl, agent_socket, "connect", peer, "chat")
    assert result.returncode == status
    assert f"({code})" in one_error_line(result.stderr)


@pytest_twisted.ensureDeferred
async def test_listen_accepts_one_tunnel_and_chats(core: FakeCore, agent_socket: str) -> None:
    result = in_thread(punchctl, agent_socket, "listen", "chat", "--linger", "0.5", stdin=b"hi\n")
    await wait_until(lambda: "chat" in core.listeners)
    core.greetings = (b"knock knock",)
    core.listeners["chat"](core.tunnel("bob", "chat"))
    # One tunnel only: the listener goes as soon as it has arrived.
    await wait_until(lambda: core.unlistened == ["chat"])
    done = await result
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"knock knock\n"
    assert received(core, "t0", 1) == [b"hi"]
    assert done.stderr.decode().splitlines()[0] == "punchctl: listening for chat"


@pytest_twisted.ensureDeferred
async def test_listen_keep_serves_several_tunnels_until_interrupted(
    core: FakeCore, agent_socket: str
) -> None:
    proc = start_punchctl(agent_socket, "listen", "chat", "--keep")
    assert proc.stdin is not None and proc.stdout is not None
    try:
        await wait_until(lambda: "chat" in core.listeners, timeout=10)
        for peer in "bob", "carol":
            core.greetings = (f"from {peer}".encode(),)
            core.listeners["chat"](core.tunnel(peer, "chat"))
        arrived = set(await in_thread(read_lines, proc.stdout, 2))
        assert arrived == {b"from bob\n", b"from carol\n"}
        proc.stdin.write(b"to everyone\n")
        proc.stdin.flush()
        assert await in_thread(received, core, "t0", 1) == [b"to everyone"]
        assert await in_thread(received, core, "t1", 1) == [b"to everyone"]
        proc.send_signal(signal.SIGINT)
        assert await in_thread(proc.wait, 10) == 130
        assert b"Traceback" not in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()
        for pipe in proc.stdin, proc.stdout, proc.stderr:
            pipe.close()
    await wait_until(lambda: core.unlistened == ["chat"])


@pytest_twisted.ensureDeferred
async def test_interrupting_connect_is_quiet_and_cancels(core: FakeCore, agent_socket: str) -> None:
    proc = start_punchctl(agent_socket, "connect", "hold-bob", "chat")
    try:
        await wait_until(lambda: core.held, timeout=10)
        proc.send_signal(signal.SIGINT)
        assert await in_thread(proc.wait, 10) == 130
        assert proc.stderr is not None
        assert proc.stderr.read() == b""
    finally:
        proc.kill()
        proc.wait()
        for pipe in proc.stdin, proc.stdout, proc.stderr:
            pipe.close()
    await wait_until(lambda: core.cancelled == ["hold-bob"])


@pytest_twisted.ensureDeferred
async def test_an_idle_chat_sends_keepalives_and_prints_none(
    core: FakeCore, agent_socket: str
) -> None:
    """
    With stdin open and quiet, punchctl sends empty datagrams; those that
    arrive (the peer punchctl's keepalives) are not printed.
    """
    proc = start_punchctl(agent_socket, "connect", "bob", "chat", "--keepalive", "0.2")
    assert proc.stdin is not None and proc.stdout is not None
    try:
        await wait_until(lambda: "t0" in core.far_ends, timeout=10)
        far = core.far_ends["t0"]
        far.settimeout(10)
        assert await in_thread(received, core, "t0", 2) == [b"", b""]
        far.send(b"")
        far.send(b"after a keepalive")
        proc.stdin.write(b"bye\n")
        proc.stdin.close()
        assert await in_thread(proc.wait, 10) == 0
        assert proc.stdout.read() == b"after a keepalive\n"
    finally:
        proc.kill()
        proc.wait()
        for pipe in proc.stdin, proc.stdout, proc.stderr:
            pipe.close()
    rest = []
    far.settimeout(0)
    while True:
        try:
            rest.append(far.recv(65535))
        except BlockingIOError:
            break
    assert b"bye" in rest and set(rest) <= {b"", b"bye"}
