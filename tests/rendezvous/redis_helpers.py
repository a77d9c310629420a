"""
A real redis-server in a temporary directory, and a rendezvous service of
several nodes on it: what the scale-out tests and benchmarks run against.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from netlab import child_env
from netlab.deployment import Deployment, free_udp_port
from punchd.rendezvous.resp import BlockingRedis, RedisAddress
from punchd.wire import format_address
from tests import wait_for

TWIST = [sys.executable, "-m", "twisted", "--log-format", "text"]
PASSWORD = "s3cret-for-tests-only"


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


Launch = Callable[..., "subprocess.Popen[bytes]"]


def local_launch(argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, **kwargs)


@dataclass
class RedisServer:
    """
    redis-server on a free loopback port (or C{host}, inside the NAT lab
    through C{launch}), with a password, no persistence.
    """

    root: Path
    port: int = 0
    password: str | None = PASSWORD
    process: subprocess.Popen[bytes] | None = None
    host: str = "127.0.0.1"
    launch: Launch = local_launch

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = free_tcp_port()
        self.password_file = self.root / "redis.password"
        self.password_file.write_text((self.password or "") + "\n")
        self.password_file.chmod(0o600)

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def address(self) -> RedisAddress:
        return RedisAddress(self.host, self.port, 0, None, self.password)

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        argv = [binary, "--port", str(self.port), "--bind", self.host, "--save", ""]
        argv += ["--appendonly", "no", "--dir", str(self.root), "--daemonize", "no"]
        if self.password:
            argv += ["--requirepass", self.password]
        log = self.root / "redis.log"
        seen = log.read_text().count("Ready to accept") if log.exists() else 0
        out = open(log, "ab")
        try:
            self.process = self.launch(argv, stdout=out, stderr=subprocess.STDOUT)
        finally:
            out.close()
        wait_for(
            lambda: log.read_text().count("Ready to accept") > seen, 20, "redis-server to start"
        )

    def client(self) -> BlockingRedis:
        return BlockingRedis(self.address)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None


@dataclass
class Node:
    name: str
    port: int
    config: Path
    log: Path
    process: subprocess.Popen[bytes] | None = None
    host: str = "127.0.0.1"


@dataclass
class Service:
    """
    A Deployment (keys, peers file, agents) whose rendezvous is several
    nodes sharing one Redis and one key pair.
    """

    deployment: Deployment
    redis: RedisServer
    nodes: dict[str, Node] = field(default_factory=dict)

    def add_node(
        self,
        name: str,
        workers: int = 1,
        directory: str = "file",
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> Node:
        port = port or free_udp_port()
        config = self.deployment.root / f"{name}.toml"
        config.write_text(
            f"port = {port}\n"
            f'interface = "{host}"\n'
            'private_key = "rendezvous.key"\n'
            'peers = "peers.toml"\n'
            "binding_rate = 0.0\n"
            f'registry = "{self.redis.url}"\n'
            f'redis_password_file = "{self.redis.password_file}"\n'
            f"workers = {workers}\n"
            f'directory = "{directory}"\n'
        )
        node = Node(name, port, config, self.deployment.root / f"{name}.log", host=host)
        self.nodes[name] = node
        return node

    def point(self, agent: str, *nodes: str) -> None:
        """
        Give C{agent} the list of C{nodes}' addresses, in that order.
        """
        handle = self.deployment.agents[agent]
        addresses = ", ".join(
            f'"{format_address((self.nodes[n].host, self.nodes[n].port))}"' for n in nodes
        )
        lines = [
            f"rendezvous = [{addresses}]" if line.startswith("rendezvous = ") else line
            for line in handle.config.read_text().splitlines()
        ]
        handle.config.write_text("\n".join(lines) + "\n")

    def start_node(self, name: str, wait: float = 60.0, launch: Launch = local_launch) -> None:
        node = self.nodes[name]
        out = open(node.log, "ab")
        try:
            node.process = launch(
                [*TWIST, "rendezvous", "--config", node.config.name],
                cwd=str(self.deployment.root),
                stdout=out,
                stderr=subprocess.STDOUT,
                env=child_env(dict(os.environ, PYTHONUNBUFFERED="1")),
            )
        finally:
            out.close()
        wait_for(
            lambda: (
                "connected to redis" in node.log.read_text(errors="replace")
                and "rendezvous listening" in node.log.read_text(errors="replace")
            ),
            wait,
            f"node {name} to start; log:\n{self.tail(name)}",
        )

    def tail(self, name: str) -> str:
        log = self.nodes[name].log
        return log.read_text(errors="replace")[-3000:] if log.exists() else "(no log)"

    def kill_node(self, name: str) -> None:
        process = self.nodes[name].process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(10)

    def stop_node(self, name: str) -> None:
        process = self.nodes[name].process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)

    def close(self) -> None:
        self.deployment.close()
        for name in self.nodes:
            self.stop_node(name)
