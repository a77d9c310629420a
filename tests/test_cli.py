"""
punchctl: key files in-process; agent commands and chats as real
subprocesses against a control socket served by the fake agent core.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from typing import Any

import pytest
import pytest_twisted

from punchd.cli import main
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
    assert "(agent-unreachable)" in line


def test_socket_option_wins_over_the_environment(sockdir: str) -> None:
    chosen = os.path.join(sockdir, "chosen.sock")
    result = punchctl(os.path.join(sockdir, "env.sock"), "--socket", chosen, "status")
    assert result.returncode == 1
    assert chosen in one_error_line(result.stderr)


@pytest_twisted.ensureDeferred
async def test_status_and_peers(core: FakeCore, agent_socket: str) -> None:
    result = await in_thread(punchctl, agent_socket, "status")
    assert result.returncode == 0
    lines = result.stdout.decode().splitlines()
    assert "name: alice" in lines
    assert "registered: true" in lines
    assert 'tunnels: {"pending": 0, "handed_off": 3}' in lines
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
        arrived = {await in_thread(proc.stdout.readline) for _ in range(2)}
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
