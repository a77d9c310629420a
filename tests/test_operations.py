"""
Running punchd for real: the systemd units, the example configs, start-up
errors, peers reload on SIGHUP, and what the daemons log.

The daemons run as processes on loopback.  The example deployment runs the
units' own command lines with as much of their confinement as a test can
apply without a service manager (see L{Confinement}).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import mmap
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from twisted.logger import eventFromJSON, formatEvent

from netlab.deployment import Deployment, free_udp_port
from punchd import client
from punchd.config import AgentConfig, RendezvousConfig, load_peers
from punchd.config import settings as settings_of
from punchd.keys import PrivateKey, write_private_key
from tests import wait_for

REPO = Path(__file__).resolve().parent.parent
ETC = REPO / "etc"
UNITS = {
    "rendezvous": ETC / "systemd" / "punchd-rendezvous.service",
    "punch-agent": ETC / "systemd" / "punchd-agent.service",
}
BIN = Path(sys.executable).parent
TWISTD = [str(BIN / "twistd"), "-n", "--pidfile="]
TWIST = [str(BIN / "twist")]
IN_CI = os.environ.get("CI") == "true"
#: Seconds a daemon may take to start, or to refuse to: generous, for a busy machine.
STARTING = 60
#: Environment variables that change how the daemons log.
LOG_ENV = ("JOURNAL_STREAM", "PUNCHD_DEBUG")


def unavailable(what: str) -> None:
    """
    Skip the calling test for lack of C{what}; under C{CI=true} fail instead.
    """
    if IN_CI:
        pytest.fail(f"CI=true, so this test must run, but {what}", pytrace=False)
    pytest.skip(what)


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        unavailable(f"{name} is not installed (Debian package systemd)")
    assert path is not None
    return path


def unit_settings(path: Path) -> dict[str, list[str]]:
    """
    C{Key=value} lines of a unit file; a key set twice keeps both values.
    """
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line[0] in "#;[":
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not a Key=value line: {line!r}"
        settings.setdefault(key, []).append(value)
    return settings


def unit_argv(daemon: str) -> list[str]:
    (command,) = unit_settings(UNITS[daemon])["ExecStart"]
    return shlex.split(command)


def messages(path: Path) -> list[str]:
    """
    The messages of a daemon's log, whichever way it was written: punchd's
    text or JSON lines, twistd's text, or the JSON events of C{twist}.
    """
    found = []
    for line in path.read_text(errors="replace").split("\n"):
        line = line.lstrip("\x1e")  # twist's JSON events are RFC 7464 text sequences
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict) and "log_namespace" in record:
            found.append(formatEvent(eventFromJSON(line)))
        elif isinstance(record, dict) and "message" in record:
            found.append(str(record["message"]))
        else:
            found.append(re.sub(r"^(?:\d{4}-\S+ )?\[[^\]]*\] ", "", line))
    return found


def peer_names(d: Deployment, name: str) -> list[str]:
    return [p["name"] for p in client.peers(socket_path=d.agents[name].socket_path)]


def key_texts(key: PrivateKey) -> list[str]:
    """
    Ways a private key could show up in a log.
    """
    return [key.to_base64(), key.raw.hex()]


# -- launching daemons -----------------------------------------------------


class _ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


_ALLOW = 0x7FFF0000
_KILL_PROCESS = 0x80000000
_CMP_EQ, _CMP_GE, _CMP_MASKED_EQ = 4, 5, 7
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_MDWE, _PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
_SHM_EXEC = 0o100000
_AF_LIMIT = 64


def _errno_action(number: int) -> int:
    return 0x00050000 | number


def _syscall_sets(analyze: str) -> dict[str, list[str]]:
    """
    systemd's named system call sets (C{@system-service} ...), as this
    systemd defines them.
    """
    output = subprocess.run(
        [analyze, "syscall-filter"], capture_output=True, text=True, check=True
    ).stdout
    sets: dict[str, list[str]] = {}
    current: list[str] = []
    for line in output.splitlines():
        if line.startswith("@"):
            current = sets.setdefault(line.strip(), [])
        elif line.startswith(" ") and not line.strip().startswith("#") and line.strip():
            current.append(line.strip())
    return sets


def _expand(names: Sequence[str], sets: dict[str, list[str]]) -> set[str]:
    calls: set[str] = set()
    for name in names:
        calls |= _expand(sets[name], sets) if name.startswith("@") else {name}
    return calls


class Confinement:
    """
    The parts of a unit's [Service] sandbox that apply to a child process
    without a service manager, the way systemd applies them:
    C{NoNewPrivileges=}, C{UMask=}, C{SystemCallFilter=} (killing the
    process on any other call), C{RestrictAddressFamilies=} (EAFNOSUPPORT)
    and C{MemoryDenyWriteExecute=} (EPERM for W+X mappings and for making
    memory executable; also the kernel's PR_SET_MDWE where it exists).
    C{User=} becomes C{nobody}, or root when nobody cannot run the venv's
    Python; C{CapabilityBoundingSet=} (empty) leaves root powerless too.
    Mount namespaces (C{ProtectSystem=} and friends) are not emulated.
    """

    def __init__(self, unit: Path, uid: int, gid: int) -> None:
        settings = unit_settings(unit)
        self.uid, self.gid = uid, gid
        self.umask = int(settings["UMask"][0], 8)
        assert settings["NoNewPrivileges"] == ["yes"]
        assert settings["MemoryDenyWriteExecute"] == ["yes"]
        sets = _syscall_sets(tool("systemd-analyze"))
        allowed, denied = _expand(["@default"], sets), set()
        for value in settings["SystemCallFilter"]:
            if value.startswith("~"):
                denied |= _expand(value[1:].split(), sets)
            else:
                allowed |= _expand(value.split(), sets)
        self.syscalls = allowed - denied
        (families,) = settings["RestrictAddressFamilies"]
        self.families = {getattr(socket, name) for name in families.split()}
        path = ctypes.util.find_library("seccomp")
        if path is None:
            unavailable("libseccomp is not installed (Debian package libseccomp2)")
        self._seccomp = ctypes.CDLL(path, use_errno=True)
        self._seccomp.seccomp_init.restype = ctypes.c_void_p
        self._seccomp.seccomp_init.argtypes = [ctypes.c_uint32]
        self._seccomp.seccomp_rule_add_array.argtypes = [
            ctypes.c_void_p,
            ctypes.c_uint32,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.POINTER(_ArgCmp),
        ]
        self._seccomp.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
        self._seccomp.seccomp_load.argtypes = [ctypes.c_void_p]
        self._seccomp.seccomp_release.argtypes = [ctypes.c_void_p]
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.prctl.argtypes = [ctypes.c_int, *[ctypes.c_ulong] * 4]

    def _filter(self, default: int, rules: list[tuple[int, str, list[_ArgCmp]]]) -> int:
        ctx = self._seccomp.seccomp_init(default)
        assert ctx
        for action, name, conditions in rules:
            number = self._seccomp.seccomp_syscall_resolve_name(name.encode())
            if number < 0:  # not a system call of this architecture
                continue
            array = (_ArgCmp * max(1, len(conditions)))(*conditions)
            result = self._seccomp.seccomp_rule_add_array(
                ctx, action, number, len(conditions), array
            )
            assert result == 0, f"seccomp rule for {name}: {os.strerror(-result)}"
        return int(ctx)

    def _filters(self) -> list[int]:
        exec_bits = mmap.PROT_EXEC | mmap.PROT_WRITE
        no_wx = _errno_action(errno.EPERM)
        no_family = _errno_action(errno.EAFNOSUPPORT)
        return [
            self._filter(
                _ALLOW,
                [
                    (no_family, "socket", [_ArgCmp(0, _CMP_EQ, family, 0)])
                    for family in range(_AF_LIMIT)
                    if family not in self.families
                ]
                + [(no_family, "socket", [_ArgCmp(0, _CMP_GE, _AF_LIMIT, 0)])],
            ),
            self._filter(
                _ALLOW,
                [
                    (no_wx, "mmap", [_ArgCmp(2, _CMP_MASKED_EQ, exec_bits, exec_bits)]),
                    (
                        no_wx,
                        "mprotect",
                        [_ArgCmp(2, _CMP_MASKED_EQ, mmap.PROT_EXEC, mmap.PROT_EXEC)],
                    ),
                    (
                        no_wx,
                        "pkey_mprotect",
                        [_ArgCmp(2, _CMP_MASKED_EQ, mmap.PROT_EXEC, mmap.PROT_EXEC)],
                    ),
                    (no_wx, "shmat", [_ArgCmp(2, _CMP_MASKED_EQ, _SHM_EXEC, _SHM_EXEC)]),
                ],
            ),
            # Last: it does not allow seccomp() itself.
            self._filter(_KILL_PROCESS, [(_ALLOW, name, []) for name in sorted(self.syscalls)]),
        ]

    def popen(self, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        filters = self._filters()
        libc, seccomp = self._libc, self._seccomp

        def confine() -> None:
            if os.getuid() == 0:  # CapabilityBoundingSet=: root keeps no capability
                for capability in range(64):
                    libc.prctl(_PR_CAPBSET_DROP, capability, 0, 0, 0)
            if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
            libc.prctl(_PR_SET_MDWE, _PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0)  # Linux >= 6.3
            for ctx in filters:
                if seccomp.seccomp_load(ctx) != 0:
                    raise OSError("seccomp_load failed")

        if os.getuid() == 0:
            kwargs.update(user=self.uid, group=self.gid, extra_groups=[])
        try:
            return subprocess.Popen(argv, umask=self.umask, preexec_fn=confine, **kwargs)
        finally:
            for ctx in filters:
                seccomp.seccomp_release(ctx)


Launch = Callable[..., "subprocess.Popen[bytes]"]


def _plugin_args(argv: list[str]) -> list[str]:
    """
    The part of a Deployment's command line from the plugin name on.
    """
    (at,) = [i for i, arg in enumerate(argv) if arg in UNITS]
    return argv[at:]


def _environment(kwargs: dict[str, Any]) -> dict[str, str]:
    given: dict[str, str] = kwargs.pop("env", None) or dict(os.environ)
    return {k: v for k, v in given.items() if k not in LOG_ENV}


def launcher(prefix: Sequence[str], *, extra: Sequence[str] = ()) -> Launch:
    """
    A Deployment launch function that runs the daemon as C{prefix PLUGIN
    OPTIONS... extra}, with none of the environment variables that change
    its logging.
    """

    def launch(argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        command = [*prefix, *_plugin_args(argv), *extra]
        return subprocess.Popen(command, env=_environment(kwargs), **kwargs)

    return launch


def unit_launcher(daemon: str, confinement: Confinement | None) -> Launch:
    """
    Run a daemon with its unit's ExecStart command line, its config path
    replaced, as systemd would: JOURNAL_STREAM set, confined.
    """
    argv = unit_argv(daemon)
    argv[0] = TWISTD[0]
    at = argv.index("--config") + 1

    def launch(deployment_argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        plugin_args = _plugin_args(deployment_argv)
        assert plugin_args[0] == daemon
        command = [*argv]
        command[at] = plugin_args[plugin_args.index("--config") + 1]
        environment = _environment(kwargs)
        environment["JOURNAL_STREAM"] = "x"
        if confinement is not None:
            return confinement.popen(command, env=environment, **kwargs)
        return subprocess.Popen(command, env=environment, **kwargs)

    return launch


def open_pair(
    d: Deployment, initiator: str, target: str, service: str = "chat"
) -> tuple[client.Tunnel, client.Tunnel]:
    with client.listen(service, socket_path=d.agents[target].socket_path) as listener:
        accepted: list[client.Tunnel] = []
        thread = threading.Thread(target=lambda: accepted.append(listener.accept(timeout=10)))
        thread.start()
        try:
            ours = client.connect(
                target, service, socket_path=d.agents[initiator].socket_path, timeout=10
            )
        finally:
            thread.join(15)
    assert accepted, f"{target}'s listener got no tunnel"
    return ours, accepted[0]


# -- the units ---------------------------------------------------------------


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = tool("systemd-analyze")
    copies = []
    for path in UNITS.values():
        text = path.read_text()
        assert "ExecStart=/usr/bin/twistd " in text
        # verify insists that the binary exists: point it at the venv's.
        (tmp_path / path.name).write_text(text.replace("=/usr/bin/twistd ", f"={TWISTD[0]} "))
        copies.append(str(tmp_path / path.name))
    result = subprocess.run(
        [analyze, "verify", "--man=no", *copies],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    output = result.stdout + result.stderr
    # Other units of this host may get warnings too; ours must get none.
    ours = [line for line in output.splitlines() if any(Path(c).name in line for c in copies)]
    assert ours == []
    assert result.returncode == 0, output


def test_units_are_hardened(tmp_path: Path) -> None:
    """
    systemd's own exposure score (0 = locked down, 10 = unprotected) rates
    both units "OK" or better.
    """
    analyze = tool("systemd-analyze")
    for path in UNITS.values():
        copy = tmp_path / path.name
        copy.write_text(path.read_text().replace("=/usr/bin/twistd ", f"={TWISTD[0]} "))
        result = subprocess.run(
            [analyze, "security", "--offline=true", "--no-pager", str(copy)],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=60,
        )
        found = re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout)
        assert found, result.stdout + result.stderr
        assert float(found.group(1)) <= 2.0, result.stdout


def test_units_match_the_daemons() -> None:
    """
    The units run the right plugins with the config files punchd ships, as
    the user the sysusers snippet creates, with the control socket's
    default directory as the agent's runtime directory.
    """
    rendezvous = unit_settings(UNITS["rendezvous"])
    agent = unit_settings(UNITS["punch-agent"])
    for daemon, settings in (("rendezvous", rendezvous), ("punch-agent", agent)):
        argv = unit_argv(daemon)
        assert argv[:4] == ["/usr/bin/twistd", "-n", "--pidfile=", daemon]
        config = Path(argv[argv.index("--config") + 1])
        assert config.parent == Path("/etc/punchd")
        assert (ETC / "punchd" / config.name).is_file()
        assert settings["User"] == settings["Group"] == ["punchd"]
        assert settings["ConfigurationDirectory"] == ["punchd"]
        assert settings["Restart"] == ["on-failure"]
        assert settings["CapabilityBoundingSet"] == settings["AmbientCapabilities"] == [""]
        assert "DynamicUser" not in settings
    assert rendezvous["ExecReload"] == ["kill -HUP $MAINPID"]
    assert RendezvousConfig.port > 1024  # no CAP_NET_BIND_SERVICE needed
    socket_path = Path(AgentConfig.control_socket)
    assert socket_path.parent == Path("/run") / agent["RuntimeDirectory"][0]
    assert agent["RuntimeDirectoryMode"] == ["0750"]
    assert "AF_UNIX" in agent["RestrictAddressFamilies"][0].split()


def test_sysusers_creates_the_units_user(tmp_path: Path) -> None:
    sysusers = tool("systemd-sysusers")
    (tmp_path / "etc").mkdir()
    result = subprocess.run(
        [sysusers, f"--root={tmp_path}", str(ETC / "sysusers.d" / "punchd.conf")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    users = {line.split(":")[0]: line.split(":") for line in (tmp_path / "etc/passwd").open()}
    groups = {line.split(":")[0]: line.split(":") for line in (tmp_path / "etc/group").open()}
    assert users["punchd"][3] == groups["punchd"][2]  # primary group punchd
    assert users["punchd"][6].strip().endswith("nologin")


# -- reloading the peers file --------------------------------------------------


@dataclass
class Reload:
    deployment: Deployment
    peers_before: list[str]
    peers_after: list[str]
    old_peers: str
    new_peers: str
    #: time.time() when the rendezvous got SIGHUP.
    signalled_at: float


def _peers_text_without(text: str, name: str) -> str:
    blocks = text.split("\n\n")
    kept = [b for b in blocks if not b.startswith(f"[peers.{name}]")]
    assert len(kept) == len(blocks) - 1
    return "\n\n".join(kept)


def _wait_logged(path: Path, text: str, count: int = 1, timeout: float = 10) -> None:
    wait_for(
        lambda: sum(text in m for m in messages(path)) >= count,
        timeout,
        f"{text!r} in {path.name}",
    )


@pytest.fixture(scope="module")
def reloaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Reload]:
    """
    A rendezvous (JSON logs) with alice, bob and carol registered; then
    carol is removed from the peers file and the rendezvous gets SIGHUP.
    """
    with Deployment(tmp_path_factory.mktemp("reload"), keepalive=5.0) as d:
        d.add_agent("alice")
        d.add_agent("bob")
        d.keepalive = 1.0  # carol finds out quickly that she is gone
        d.add_agent("carol")
        d.start_rendezvous(launch=launcher(TWISTD, extra=["--log-format", "json"]))
        d.start_agent("alice")
        d.start_agent("bob")
        d.start_agent("carol", launch=launcher(TWISTD))
        before = peer_names(d, "alice")
        peers_file = d.root / "peers.toml"
        old = peers_file.read_text()
        new = _peers_text_without(old, "carol")
        peers_file.write_text(new)
        assert d.rendezvous_process is not None
        signalled_at = time.time()
        d.rendezvous_process.send_signal(signal.SIGHUP)
        _wait_logged(d.rendezvous_log, "peers file reloaded: 2 peers")
        yield Reload(d, before, peer_names(d, "alice"), old, new, signalled_at)


def test_reload_drops_only_the_removed_agent(reloaded: Reload, tmp_path: Path) -> None:
    d = reloaded.deployment
    # The new peers file is the old one without carol, nothing else changed.
    (tmp_path / "old.toml").write_text(reloaded.old_peers)
    old = load_peers(tmp_path / "old.toml")
    assert load_peers(d.root / "peers.toml") == {k: v for k, v in old.items() if k != "carol"}
    assert reloaded.peers_before == ["bob", "carol"]
    assert reloaded.peers_after == ["bob"]
    log = messages(d.rendezvous_log)
    assert [m for m in log if "dropped" in m] == ["agent carol dropped: peers file changed"]
    # bob was not dropped, so it did not have to register again.
    assert sum(m.startswith("agent bob registered from ") for m in log) == 1
    assert d.status("bob")["registration"] == "registered"
    assert peer_names(d, "bob") == ["alice"]


def test_broken_peers_file_on_sighup_keeps_the_old_list(reloaded: Reload) -> None:
    d = reloaded.deployment
    assert d.rendezvous_process is not None
    (d.root / "peers.toml").write_text(reloaded.new_peers.replace("public_key =", "publickey =", 1))
    d.rendezvous_process.send_signal(signal.SIGHUP)
    _wait_logged(d.rendezvous_log, "peers file not reloaded")
    records = [json.loads(line) for line in d.rendezvous_log.read_text().splitlines()]
    (error,) = [r for r in records if "not reloaded" in r["message"]]
    assert error["level"] == "error"
    assert "peers.toml: unknown key 'peers.alice.publickey'" in error["message"]
    assert peer_names(d, "alice") == ["bob"]
    assert d.status("bob")["registration"] == "registered"
    assert d.rendezvous_process.poll() is None


# -- the example configs, with the units' command lines --------------------------

_PROBE = """
import errno, mmap, os, socket
for family in ("AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK", "AF_PACKET"):
    try:
        socket.socket(getattr(socket, family), socket.SOCK_DGRAM).close()
        print(family, "ok")
    except OSError as e:
        print(family, errno.errorcode[e.errno])
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    print("W+X ok")
except OSError as e:
    print("W+X", errno.errorcode[e.errno])
print(flush=True)
os.setuid(os.getuid())  # @privileged: the filter kills the process
print("setuid ok")
"""


def test_confinement_refuses_what_the_units_forbid(tmp_path: Path) -> None:
    """
    The emulation of the units' sandbox that the example daemons run in
    really confines: address families, W+X memory, system calls.
    """
    tool("systemd-analyze")
    for daemon, unix in (("rendezvous", "EAFNOSUPPORT"), ("punch-agent", "ok")):
        confinement = Confinement(UNITS[daemon], os.getuid(), os.getgid())
        process = confinement.popen(
            [sys.executable, "-c", _PROBE], stdout=subprocess.PIPE, cwd=tmp_path
        )
        output, _ = process.communicate(timeout=30)
        assert output.decode().split("\n") == [
            f"AF_UNIX {unix}",
            "AF_INET ok",
            "AF_INET6 ok",
            "AF_NETLINK EAFNOSUPPORT",
            "AF_PACKET EAFNOSUPPORT",
            "W+X EPERM",
            "",
            "",
        ], daemon
        assert process.returncode == -signal.SIGSYS, daemon


@dataclass
class Examples:
    deployment: Deployment
    adjusted: dict[str, dict[str, object]]
    confinement: Confinement | None
    uid: int
    tunnels: tuple[client.Tunnel, client.Tunnel]


def _set(text: str, key: str, value: object) -> str:
    """
    Set C{key} in an example TOML file, on the line that shows it (commented
    out when it is optional).
    """
    line = f"{key} = {json.dumps(value)}"
    text, count = re.subn(rf"^(?:# )?{re.escape(key)} = .*$", line, text, flags=re.M)
    assert count == 1, f"{key} is on {count} lines"
    return text


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _daemon_user(root: Path) -> tuple[int, int]:
    """
    nobody stands in for the units' punchd user, when it can run the
    venv's Python; else (and when not root) the tests' own user.
    """
    if os.getuid() != 0:
        return os.getuid(), os.getgid()
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        return 0, 0
    try:
        subprocess.run(
            [*TWISTD[:1], "--version"],
            user=nobody.pw_uid,
            group=nobody.pw_gid,
            extra_groups=[],
            cwd=root,
            capture_output=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return 0, 0
    return nobody.pw_uid, nobody.pw_gid


@pytest.fixture(scope="module")
def examples() -> Iterator[Examples]:
    """
    The example configs with only ports, addresses, keys and paths adjusted;
    the rendezvous and alice run by their units' command lines, confined,
    bob by C{twist}; a tunnel from alice to bob.
    """
    # Not under pytest's tmp_path: the daemons' user must reach it.
    root = Path(tempfile.mkdtemp(prefix="punchd-examples-"))
    try:
        yield from _run_examples(root)
    finally:
        shutil.rmtree(root)


def _run_examples(root: Path) -> Iterator[Examples]:
    root.chmod(0o755)
    uid, gid = _daemon_user(root)
    confinement = None
    if sys.platform == "linux" and shutil.which("systemd-analyze"):
        confinement = Confinement(UNITS["rendezvous"], uid, gid)
    agent_confinement = None
    if confinement is not None:
        agent_confinement = Confinement(UNITS["punch-agent"], uid, gid)
    with Deployment(root) as d:
        run = root / "run"  # as RuntimeDirectory=punchd, RuntimeDirectoryMode=0750
        run.mkdir(mode=0o750)
        os.chown(run, uid, gid)
        d.add_agent("alice", socket_dir=run)
        d.add_agent("bob")
        originals = {p.name: p.read_text() for p in (ETC / "punchd").glob("*.toml")}
        files: dict[str, str] = {}
        text = _set(originals["rendezvous.toml"], "port", d.rendezvous_port)
        files["rendezvous.toml"] = _set(text, "interface", "127.0.0.1")
        peers = originals["peers.toml"]
        example_peers = tomllib.loads(peers)["peers"]
        for name in ("alice", "bob"):
            old = example_peers[name]["public_key"]
            assert peers.count(old) == 1
            peers = peers.replace(old, d.agents[name].key.public_key().to_base64())
        files["peers.toml"] = peers
        for name, agent in d.agents.items():
            text = originals["agent.toml"]
            if name != tomllib.loads(text)["name"]:
                text = _set(text, "name", name)
            text = _set(text, "private_key", f"{name}.key")
            # A name, as in the example: resolved in a thread, under the filter.
            text = _set(text, "rendezvous", f"localhost:{d.rendezvous_port}")
            text = _set(text, "rendezvous_public_key", d.rendezvous_key.public_key().to_base64())
            text = _set(text, "control_socket", agent.socket_path)
            # The tests' user talks to alice, which runs as another.
            files[f"{name}.toml"] = _set(text, "allow_users", [os.getuid()])
        for name, text in files.items():
            (root / name).write_text(text)
        for key in ("rendezvous.key", "alice.key"):
            os.chown(root / key, uid, gid)
        example = {"alice.toml": "agent.toml", "bob.toml": "agent.toml"}
        adjusted = {}
        for name, text in files.items():
            before = _flatten(tomllib.loads(originals[example.get(name, name)]))
            after = _flatten(tomllib.loads(text))
            adjusted[name] = {
                k: after.get(k)
                for k in before.keys() | after.keys()
                if before.get(k) != after.get(k)
            }
        d.start_rendezvous(launch=unit_launcher("rendezvous", confinement))
        d.start_agent("alice", launch=unit_launcher("punch-agent", agent_confinement))
        d.start_agent("bob", launch=launcher(TWIST))
        tunnels = open_pair(d, "alice", "bob")
        try:
            yield Examples(d, adjusted, confinement, uid, tunnels)
        finally:
            for tunnel in tunnels:
                tunnel.close()


def test_examples_are_used_as_shipped(examples: Examples) -> None:
    """
    Only what must differ on this machine differs from the example files.
    """
    port = examples.deployment.rendezvous_port
    agent = {
        "private_key",
        "rendezvous",
        "rendezvous_public_key",
        "control_socket",
        "allow_users",
    }
    assert examples.adjusted["rendezvous.toml"] == {"port": port, "interface": "127.0.0.1"}
    assert set(examples.adjusted["peers.toml"]) == {
        "peers.alice.public_key",
        "peers.bob.public_key",
    }
    assert set(examples.adjusted["alice.toml"]) == agent
    assert set(examples.adjusted["bob.toml"]) == agent | {"name"}


def test_examples_register_list_peers_and_make_a_tunnel(examples: Examples) -> None:
    d = examples.deployment
    for name in ("alice", "bob"):
        assert d.status(name)["registration"] == "registered"
    # carol is listed in the example peers file, but in another network.
    assert peer_names(d, "alice") == ["bob"]
    assert peer_names(d, "bob") == ["alice"]
    ours, theirs = examples.tunnels
    assert ours.info["peer"] == "bob" and theirs.info["peer"] == "alice"
    ours.socket.settimeout(5)
    theirs.socket.settimeout(5)
    for i in range(20):
        ours.socket.send(b"ping %d" % i)
        assert theirs.socket.recv(100) == b"ping %d" % i
        theirs.socket.send(b"pong %d" % i)
        assert ours.socket.recv(100) == b"pong %d" % i


def test_examples_ran_confined_like_the_units(examples: Examples) -> None:
    """
    The rendezvous and alice ran, and served, under the units' system call
    filter, address families, W^X memory, umask, without capabilities and,
    where nobody can run the venv's Python, as nobody.
    """
    if examples.confinement is None:
        unavailable("systemd-analyze is needed to read systemd's system call sets")
    d = examples.deployment
    for process in (d.rendezvous_process, d.agents["alice"].process):
        assert process is not None and process.poll() is None
        status = dict(
            line.split(":\t", 1)
            for line in Path(f"/proc/{process.pid}/status").read_text().splitlines()
        )
        assert status["Seccomp"] == "2"
        assert status["Seccomp_filters"] == "3"
        assert status["NoNewPrivs"] == "1"
        assert status["Umask"] == "0077"
        assert status["Uid"].split()[0] == str(examples.uid)
        assert status["CapEff"] == status["CapPrm"] == status["CapBnd"] == "0" * 16
    sock = os.stat(d.agents["alice"].socket_path)
    assert stat.S_ISSOCK(sock.st_mode)
    assert stat.S_IMODE(sock.st_mode) == 0o660  # whatever UMask=
    assert sock.st_uid == examples.uid


# -- configuration errors ----------------------------------------------------


def _valid_rendezvous(root: Path, port: int) -> Path:
    write_private_key(root / "rendezvous.key", PrivateKey.generate())
    alice = PrivateKey.generate().public_key()
    (root / "peers.toml").write_text(f'[peers.alice]\npublic_key = "{alice}"\n')
    config = root / "rendezvous.toml"
    config.write_text(
        f'port = {port}\ninterface = "127.0.0.1"\n'
        'private_key = "rendezvous.key"\npeers = "peers.toml"\n'
    )
    return config


def _valid_agent(root: Path) -> Path:
    write_private_key(root / "agent.key", PrivateKey.generate())
    server = PrivateKey.generate().public_key()
    config = root / "agent.toml"
    config.write_text(
        f'name = "alice"\nprivate_key = "agent.key"\n'
        f'rendezvous = "127.0.0.1:{free_udp_port()}"\n'
        f'rendezvous_public_key = "{server}"\ncontrol_socket = "agent.sock"\n'
    )
    return config


def _replace(config: Path, key: str, line: str) -> None:
    text, count = re.subn(rf"^{key} = .*$", line, config.read_text(), flags=re.M)
    assert count == 1
    config.write_text(text)


def _append(config: Path, text: str) -> None:
    config.write_text(config.read_text() + text)


def _chmod_key(config: Path, name: str) -> None:
    (config.parent / name).chmod(0o644)


def _unbroken(config: Path) -> None:
    """
    Leave a valid setup as it is.
    """


def _key_directory(config: Path, key: str) -> None:
    (config.parent / "keys.d").mkdir()
    _replace(config, key, 'private_key = "keys.d"')


#: daemon, case, how to break a valid setup, the file and key the error must name.
CONFIG_ERRORS: list[tuple[str, str, Callable[[Path], object], str, str]] = [
    ("rendezvous", "unknown key", lambda c: _append(c, "prot = 3478\n"), "rendezvous.toml", "prot"),
    (
        "rendezvous",
        "wrong type",
        lambda c: _replace(c, "port", 'port = "3478"'),
        "rendezvous.toml",
        "port",
    ),
    (
        "rendezvous",
        "missing key file",
        lambda c: _replace(c, "private_key", 'private_key = "missing.key"'),
        "rendezvous.toml",
        "private_key",
    ),
    (
        "rendezvous",
        "key file mode 0644",
        lambda c: _chmod_key(c, "rendezvous.key"),
        "rendezvous.toml",
        "private_key",
    ),
    (
        "rendezvous",
        "key file is a directory",
        lambda c: _key_directory(c, "private_key"),
        "rendezvous.toml",
        "private_key",
    ),
    (
        "rendezvous",
        "bad address",
        lambda c: _replace(c, "interface", 'interface = "127.0.0.300"'),
        "rendezvous.toml",
        "interface",
    ),
    (
        "rendezvous",
        "bad peers file",
        lambda c: (c.parent / "peers.toml").write_text('[peers.alice]\npublic_key = "AAAA"\n'),
        "peers.toml",
        "peers.alice.public_key",
    ),
    (
        "punch-agent",
        "unknown key",
        lambda c: _append(c, "keepalives = 5\n"),
        "agent.toml",
        "keepalives",
    ),
    (
        "punch-agent",
        "wrong type",
        lambda c: _append(c, 'keepalive = "5"\n'),
        "agent.toml",
        "keepalive",
    ),
    (
        "punch-agent",
        "missing key file",
        lambda c: _replace(c, "private_key", 'private_key = "missing.key"'),
        "agent.toml",
        "private_key",
    ),
    (
        "punch-agent",
        "key file mode 0644",
        lambda c: _chmod_key(c, "agent.key"),
        "agent.toml",
        "private_key",
    ),
    (
        "punch-agent",
        "key file is a directory",
        lambda c: _key_directory(c, "private_key"),
        "agent.toml",
        "private_key",
    ),
    (
        "punch-agent",
        "bad address",
        lambda c: _replace(c, "rendezvous", 'rendezvous = "127.0.0.1"'),
        "agent.toml",
        "rendezvous",
    ),
    (
        "punch-agent",
        "a group this system lacks",
        lambda c: _append(c, 'allow_groups = ["punchd-no-such-group"]\n'),
        "agent.toml",
        "allow_groups",
    ),
    (
        "punch-agent",
        "bad pinned peers",
        lambda c: _append(c, '[peers.bob]\npublic_key = "not-a-key"\n'),
        "agent.toml",
        "peers.bob.public_key",
    ),
]


def _listening(daemon: str, config: Path, port: int) -> bool:
    """
    Whether the daemon set up in C{config}'s directory has its socket: the
    rendezvous's UDP C{port} is taken, or the agent's control socket exists.
    """
    if daemon == "punch-agent":
        return (config.parent / "agent.sock").exists()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def test_config_errors_stop_the_daemons_with_one_line(tmp_path: Path) -> None:
    """
    Every case runs C{twistd -n --pidfile= DAEMON --config FILE} at once.
    The unbroken setups start and listen, which shows that each broken one
    fails for its own mistake.
    """
    runs = []
    env = {k: v for k, v in os.environ.items() if k not in LOG_ENV}
    cases = [(daemon, "valid", _unbroken, "", "") for daemon in UNITS] + CONFIG_ERRORS
    for number, (daemon, case, breaks, file, key) in enumerate(cases):
        root = tmp_path / f"case{number}"
        root.mkdir()
        port = free_udp_port()
        config = _valid_rendezvous(root, port) if daemon == "rendezvous" else _valid_agent(root)
        key_file = root / ("rendezvous.key" if daemon == "rendezvous" else "agent.key")
        secret = PrivateKey.from_base64(key_file.read_text().strip())
        breaks(config)
        out = root / "output"
        with out.open("wb") as output:
            process = subprocess.Popen(
                [*TWISTD, daemon, "--config", str(config)],
                cwd=root,
                stdout=output,
                stderr=subprocess.STDOUT,
                env=env,
            )
        runs.append((daemon, case, file, key, config, port, out, secret, process, time.monotonic()))
    try:
        for daemon, case, file, key, config, port, out, secret, process, started in runs:
            what = f"{daemon}, {case}"
            if case == "valid":
                wait_for(lambda: _listening(daemon, config, port), STARTING, f"{what} to listen")  # noqa: B023
                assert process.poll() is None, what
                continue
            try:
                # Generous for a loaded machine: a daemon that got past its
                # config would run on and fail this.
                process.wait(max(0.1, started + STARTING - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"{what}: still running after {STARTING} s: {out.read_text()}")
            text = out.read_text()
            lines = [line for line in text.splitlines() if line.strip()]
            assert process.returncode == 78, f"{what}: exit {process.returncode} is not EX_CONFIG"
            assert "Traceback" not in text, what
            assert len(lines) == 1, f"{what}: {text}"
            (line,) = lines
            assert line.startswith(f"{daemon}: "), f"{what}: {line}"
            assert file in line and f"'{key}'" in line, f"{what}: {line}"
            assert all(k not in text for k in key_texts(secret)), what
            assert not _listening(daemon, config, port), what
    finally:
        for run in runs:
            process = run[8]
            if process.poll() is None:
                process.terminate()
                process.wait(10)


# -- starting up -------------------------------------------------------------


def _daemon(argv: list[str], cwd: Path, out: Path | None = None) -> subprocess.Popen[bytes]:
    """
    Start C{twistd -n ARGV} in C{cwd}, as a user would: no --pidfile.  Its
    output goes to C{out} (stdout and stderr together) or to C{cwd}/out and
    C{cwd}/err.
    """
    env = {k: v for k, v in os.environ.items() if k not in LOG_ENV}
    if out is not None:
        with out.open("wb") as both:
            return subprocess.Popen(
                [str(BIN / "twistd"), "-n", *argv], cwd=cwd, stdout=both, stderr=both, env=env
            )
    with (cwd / "out").open("wb") as stdout, (cwd / "err").open("wb") as stderr:
        return subprocess.Popen(
            [str(BIN / "twistd"), "-n", *argv], cwd=cwd, stdout=stdout, stderr=stderr, env=env
        )


def _stop(*processes: subprocess.Popen[bytes]) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        process.wait(STARTING)


def _refused(process: subprocess.Popen[bytes], output: Path) -> str:
    """
    The one line a daemon that refused to start printed, checked to have
    come with EX_CONFIG and no traceback.
    """
    try:
        process.wait(STARTING)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after {STARTING} s: {output.read_text()}")
    text = output.read_text()
    assert process.returncode == 78, f"exit {process.returncode}, not EX_CONFIG: {text}"
    assert "Traceback" not in text
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


def test_two_foreground_daemons_run_from_one_directory(tmp_path: Path) -> None:
    """
    The README's two commands, as printed, from one directory: each daemon
    has a pid file of its own, and removes it when it stops.
    """
    port = free_udp_port()
    _valid_rendezvous(tmp_path, port)
    _valid_agent(tmp_path)
    _replace(tmp_path / "agent.toml", "rendezvous", f'rendezvous = "127.0.0.1:{port}"')
    rendezvous = _daemon(["rendezvous", "--config", "rendezvous.toml"], tmp_path, tmp_path / "r")
    agent = _daemon(["punch-agent", "--config", "agent.toml"], tmp_path, tmp_path / "a")
    pidfiles = {rendezvous: tmp_path / "rendezvous.pid", agent: tmp_path / "punch-agent.pid"}
    try:
        for process, pidfile in pidfiles.items():
            written = lambda p=pidfile: p.exists() and bool(p.read_text().strip())  # noqa: E731
            wait_for(written, STARTING, str(pidfile))
            assert pidfile.read_text().strip() == str(process.pid)
        wait_for(
            lambda: _listening("rendezvous", tmp_path / "rendezvous.toml", port), STARTING, "UDP"
        )
        wait_for(
            lambda: _listening("punch-agent", tmp_path / "agent.toml", port), STARTING, "socket"
        )
        assert rendezvous.poll() is None, (tmp_path / "r").read_text()
        assert agent.poll() is None, (tmp_path / "a").read_text()
        assert not (tmp_path / "twistd.pid").exists()
    finally:
        _stop(rendezvous, agent)
    # twistd ends by re-raising the signal that stopped it.
    assert {rendezvous.returncode, agent.returncode} <= {0, -signal.SIGTERM}
    assert not [p for p in pidfiles.values() if p.exists()]


@pytest.mark.parametrize(
    ("daemon", "cls"), [("rendezvous", RendezvousConfig), ("punch-agent", AgentConfig)]
)
def test_help_shows_every_option_and_its_default(daemon: str, cls: type) -> None:
    """
    C{twistd DAEMON --help} lists an option for each setting that has one
    (allow_users and allow_groups included), with its default.
    """
    text = subprocess.run(
        [str(BIN / "twistd"), daemon, "--help"], capture_output=True, text=True, check=True
    ).stdout
    flat = " ".join(text.split())
    for s in settings_of(cls).values():
        if not s.option:
            assert s.option_name not in text
            continue
        assert re.search(rf"^ +(-\w, )?{s.option_name}=", text, re.MULTILINE), s.option_name
        if not s.required:
            shown = f"{s.default:g}" if isinstance(s.default, float) else str(s.default)
            shown = '""' if s.default in ("", None, ()) else shown
            assert f"{' '.join(s.help.split())} Default: {shown}" in flat, s.option_name
    if daemon == "punch-agent":
        assert "--allow-users=" in text and "--allow-groups=" in text


def test_a_udp_port_in_use_stops_the_rendezvous_with_one_line(tmp_path: Path) -> None:
    port = free_udp_port()
    config = _valid_rendezvous(tmp_path, port)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", port))
        process = _daemon(["rendezvous", "--config", str(config)], tmp_path, tmp_path / "out")
        line = _refused(process, tmp_path / "out")
    assert line == f"rendezvous: cannot listen on UDP 127.0.0.1:{port}: Address already in use"
    assert not (tmp_path / "rendezvous.pid").exists()


def test_a_live_agents_socket_stops_another_agent_with_one_line(tmp_path: Path) -> None:
    """
    A second agent with the same config (from another directory, so that
    the pid files differ) finds the first one's control socket taken.
    """
    config = _valid_agent(tmp_path)
    first = _daemon(["punch-agent", "--config", str(config)], tmp_path, tmp_path / "first")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    try:
        wait_for(lambda: _listening("punch-agent", config, 0), STARTING, "the first agent")
        second = _daemon(["punch-agent", "--config", str(config)], elsewhere, elsewhere / "out")
        line = _refused(second, elsewhere / "out")
        assert first.poll() is None
    finally:
        _stop(first)
    assert line == f"punch-agent: another agent is already listening on {tmp_path / 'agent.sock'}"
    assert not (elsewhere / "punch-agent.pid").exists()


def test_a_socket_that_cannot_be_made_stops_the_agent_with_one_line(tmp_path: Path) -> None:
    """
    Where the control socket cannot be made shows only when the agent
    starts listening, after twistd wrote its pid file and started logging:
    still one error line (on stderr), EX_CONFIG, and no pid file left.
    """
    config = _valid_agent(tmp_path)
    _replace(config, "control_socket", 'control_socket = "/sys/punchd-test.sock"')
    process = _daemon(["punch-agent", "--config", str(config)], tmp_path)
    try:
        process.wait(STARTING)
    except subprocess.TimeoutExpired:
        _stop(process)
        pytest.fail(f"still running after {STARTING} s")
    err = (tmp_path / "err").read_text()
    assert "Traceback" not in err + (tmp_path / "out").read_text()
    assert process.returncode == 78, err
    (line,) = err.splitlines()
    assert line.startswith("punch-agent: cannot listen on /sys/punchd-test.sock: "), line
    assert not (tmp_path / "punch-agent.pid").exists()


# -- logs ------------------------------------------------------------------------


def test_rendezvous_json_log_lines(reloaded: Reload) -> None:
    lines = reloaded.deployment.rendezvous_log.read_text().splitlines()
    assert len(lines) >= 5
    for line in lines:
        record = json.loads(line)
        assert isinstance(record["time"], float)
        assert record["level"] in {"debug", "info", "warn", "error", "critical"}
        assert isinstance(record["namespace"], str) and record["namespace"]
        assert isinstance(record["message"], str) and record["message"]
    namespaces = {json.loads(line)["namespace"] for line in lines}
    assert "punchd.rendezvous.server" in namespaces


def test_journald_lines_have_no_timestamps(examples: Examples, reloaded: Reload) -> None:
    """
    Under JOURNAL_STREAM (the example rendezvous and alice), text lines
    start with the source; without it (twistd running carol), with the time.
    """
    stamp = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d")
    d = examples.deployment
    for log in (d.rendezvous_log, d.agents["alice"].log):
        lines = [line for line in log.read_text().splitlines() if line.strip()]
        assert len(lines) >= 3
        for line in lines:
            assert re.match(r"\[[\w.#-]+\] \S", line), f"{log.name}: {line!r}"
    carol = reloaded.deployment.agents["carol"].log.read_text().splitlines()
    assert carol and all(stamp.match(line) for line in carol if line.strip())


def test_tunnel_setup_is_logged_once_per_agent(examples: Examples) -> None:
    """
    alice logs in punchd's text, bob in twist's JSON events: each says once
    which peer, which path, how long.
    """
    d = examples.deployment
    for tunnel, name in zip(examples.tunnels, ("alice", "bob")):
        info = tunnel.info
        lines = [m for m in messages(d.agents[name].log) if info["id"][:12] in m]
        assert len(lines) == 1, lines
        expected = (
            f"tunnel {info['id'][:12]} to {info['peer']} for chat: "
            f"{info['path']} via {info['remote']} "
        )
        assert lines[0].startswith(expected), lines
        assert lines[0].endswith(f" in {info['setup_ms']} ms"), lines


def test_twist_writes_punchd_json_lines(tmp_path: Path) -> None:
    port = free_udp_port()
    config = _valid_rendezvous(tmp_path, port)
    out = tmp_path / "output"
    env = {k: v for k, v in os.environ.items() if k not in LOG_ENV}
    env["PYTHONUNBUFFERED"] = "1"
    with out.open("wb") as output:
        process = subprocess.Popen(
            [*TWIST, "rendezvous", "--config", str(config), "--log-format", "json"],
            cwd=tmp_path,
            stdout=output,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        # Its port is bound before anything is logged: wait for the log line,
        # so that the reactor (and its SIGTERM handler) is running.
        wait_for(lambda: b"listening" in out.read_bytes(), 60, "the rendezvous to log")
    finally:
        process.terminate()
        process.wait(10)
    lines = [line for line in out.read_text().split("\n") if line.strip()]
    assert lines
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            pytest.fail(f"not a JSON line: {line!r}")
        assert {"time", "level", "namespace", "message"} <= record.keys(), line


def test_no_private_key_in_any_log(examples: Examples, reloaded: Reload) -> None:
    secrets = []
    for d in (examples.deployment, reloaded.deployment):
        secrets += key_texts(d.rendezvous_key)
        secrets += [text for agent in d.agents.values() for text in key_texts(agent.key)]
    logs = [
        log
        for d in (examples.deployment, reloaded.deployment)
        for log in (d.rendezvous_log, *(a.log for a in d.agents.values()))
    ]
    assert len(secrets) == 14 and len(logs) == 7
    for log in logs:
        text = log.read_text(errors="replace")
        assert text
        for secret in secrets:
            assert secret not in text, log.name


def test_removed_agent_is_refused(reloaded: Reload) -> None:
    """
    carol, dropped by the reload, is refused when she next registers.
    (Last in this file: her refresh takes a while to time out.)
    """
    d = reloaded.deployment
    _wait_logged(d.agents["carol"].log, "the rendezvous refused our credentials")
    wait_for(
        lambda: d.status("carol")["registration"] != "registered",
        30,
        "carol's registration to lapse",
    )
    status = d.status("carol")
    assert status["registration"] == "refused"
    assert status["last_error"].startswith("the rendezvous refused our credentials")
    assert "carol" not in peer_names(d, "alice")
    # Meanwhile bob refreshed his registration, still the one from before the reload.
    assert d.status("bob")["registered_at"] > reloaded.signalled_at
    log = messages(d.rendezvous_log)
    assert sum(m.startswith("agent bob registered from ") for m in log) == 1
    assert not [m for m in log if m.startswith(("agent bob", "agent alice")) and "dropped" in m]


def test_daemons_tell_systemd_they_are_ready(tmp_path: Path) -> None:
    """
    The units are Type=notify: READY=1 must reach NOTIFY_SOCKET once the
    daemon listens and its SIGHUP handler is in place.
    """
    port = free_udp_port()
    config = _valid_rendezvous(tmp_path, port)
    notify_path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(notify_path)
        notify.settimeout(20)
        env = {k: v for k, v in os.environ.items() if k not in LOG_ENV}
        env["NOTIFY_SOCKET"] = notify_path
        process = subprocess.Popen(
            [*TWISTD, "rendezvous", "--config", str(config)],
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        try:
            assert notify.recv(64) == b"READY=1"
            assert _listening("rendezvous", config, port)
            process.send_signal(signal.SIGHUP)
            time.sleep(0.5)
            assert process.poll() is None, "SIGHUP after READY=1 must reload, not kill"
        finally:
            process.terminate()
            process.wait(10)
