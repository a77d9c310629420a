"""
A small punchd deployment in a directory: keys, config files, and the real
daemons as processes.  Tests, benchmarks and the demo all use it, on
loopback or (through a C{launch} function) inside the NAT lab's namespaces.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from netlab import child_env
from punchd import client
from punchd.keys import PrivateKey, write_private_key
from punchd.wire import format_address

#: How the daemons run here: under twist, logging text lines to the log file.
TWIST = [sys.executable, "-m", "twisted", "--log-format", "text"]

#: Starts a process: argv, and keyword arguments for subprocess.Popen.
Launch = Callable[..., "subprocess.Popen[bytes]"]


def local_launch(argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen(list(argv), **kwargs)


def free_udp_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class AgentHandle:
    name: str
    network: str
    key: PrivateKey
    config: Path
    socket_path: str
    log: Path
    process: subprocess.Popen[bytes] | None = None


@dataclass
class Deployment:
    """
    One rendezvous and any number of agents, laid out under C{root}.
    """

    root: Path
    rendezvous_host: str = "127.0.0.1"
    rendezvous_port: int = 0
    listen_interface: str | None = None
    keepalive: float = 5.0
    binding_rate: float = 0.0
    #: More lines for rendezvous.toml, such as C{relay_ports = "..."}.
    rendezvous_extra: str = ""
    #: The rendezvous's second Binding port (netcheck); 0 for none.
    alternate_port: int = 0
    #: More lines for every agent's config, such as C{rendezvous_tls = "..."}.
    agent_extra: str = ""
    agents: dict[str, AgentHandle] = field(default_factory=dict)
    rendezvous_process: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if not self.rendezvous_port:
            self.rendezvous_port = free_udp_port(self.rendezvous_host)
        self.rendezvous_key = PrivateKey.generate()
        self._write_key("rendezvous.key", self.rendezvous_key)
        self.rendezvous_log = self.root / "rendezvous.log"
        self._write_rendezvous_config()

    def _write_key(self, name: str, key: PrivateKey) -> Path:
        path = self.root / name
        if path.exists():
            path.unlink()
        write_private_key(path, key)
        return path

    def _write_rendezvous_config(self) -> None:
        interface = self.listen_interface
        if interface is None:
            interface = self.rendezvous_host
        (self.root / "rendezvous.toml").write_text(
            f"port = {self.rendezvous_port}\n"
            f'interface = "{interface}"\n'
            'private_key = "rendezvous.key"\n'
            'peers = "peers.toml"\n'
            f"binding_rate = {self.binding_rate}\n"
            f"{self.rendezvous_extra}"
            f"alternate_port = {self.alternate_port}\n"
        )
        self._write_peers()

    def _write_peers(self) -> None:
        lines = []
        for agent in self.agents.values():
            lines += [
                f"[peers.{agent.name}]",
                f'public_key = "{agent.key.public_key().to_base64()}"',
                f'network = "{agent.network}"',
                "",
            ]
        (self.root / "peers.toml").write_text("\n".join(lines))

    def add_agent(
        self, name: str, network: str = "default", socket_dir: Path | None = None
    ) -> AgentHandle:
        key = PrivateKey.generate()
        self._write_key(f"{name}.key", key)
        socket_path = str((socket_dir or self.root) / f"{name}.sock")
        config = self.root / f"{name}.toml"
        config.write_text(
            f'name = "{name}"\n'
            f'private_key = "{name}.key"\n'
            f'rendezvous = "{format_address((self.rendezvous_host, self.rendezvous_port))}"\n'
            f'rendezvous_public_key = "{self.rendezvous_key.public_key().to_base64()}"\n'
            f'control_socket = "{socket_path}"\n'
            f"keepalive = {self.keepalive}\n"
            f"{self.agent_extra}"
        )
        agent = AgentHandle(name, network, key, config, socket_path, self.root / f"{name}.log")
        self.agents[name] = agent
        self._write_peers()
        return agent

    # -- processes ----------------------------------------------------------

    def _spawn(self, argv: list[str], log: Path, launch: Launch) -> subprocess.Popen[bytes]:
        out = open(log, "ab")  # the child gets its own copy; ours closes below
        try:
            env = child_env(dict(os.environ, PYTHONUNBUFFERED="1"))
            return launch(argv, cwd=str(self.root), stdout=out, stderr=subprocess.STDOUT, env=env)
        finally:
            out.close()

    def start_rendezvous(self, launch: Launch = local_launch, wait: float = 15.0) -> None:
        argv = [*TWIST, "rendezvous", "--config", "rendezvous.toml"]
        self.rendezvous_process = self._spawn(argv, self.rendezvous_log, launch)
        if wait:
            self._wait_for(
                lambda: "rendezvous listening" in self.rendezvous_log.read_text(errors="replace"),
                wait,
                "the rendezvous to listen",
                self.rendezvous_process,
                self.rendezvous_log,
            )

    def start_agent(
        self, name: str, launch: Launch = local_launch, wait: float = 15.0
    ) -> AgentHandle:
        agent = self.agents[name]
        argv = [*TWIST, "punch-agent", "--config", agent.config.name]
        agent.process = self._spawn(argv, agent.log, launch)
        if wait:
            self.wait_registered(name, wait)
        return agent

    def status(self, name: str) -> dict[str, Any]:
        return client.status(socket_path=self.agents[name].socket_path)

    def wait_registered(self, name: str, timeout: float = 15.0) -> None:
        agent = self.agents[name]

        def registered() -> bool:
            try:
                return self.status(name).get("registration") == "registered"
            except client.TunnelError:
                return False

        self._wait_for(registered, timeout, f"agent {name} to register", agent.process, agent.log)

    def _wait_for(
        self,
        condition: Callable[[], bool],
        timeout: float,
        what: str,
        process: subprocess.Popen[bytes] | None,
        log: Path,
    ) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            if process is not None and process.poll() is not None:
                break
            time.sleep(0.05)
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else "(no log)"
        raise TimeoutError(f"timed out waiting for {what}; log:\n{tail}")

    @staticmethod
    def _stop(process: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> None:
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)

    def stop_agent(self, name: str) -> None:
        self._stop(self.agents[name].process)

    def stop_rendezvous(self) -> None:
        self._stop(self.rendezvous_process)

    def close(self) -> None:
        for agent in self.agents.values():
            self._stop(agent.process)
        self.stop_rendezvous()

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
