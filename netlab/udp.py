"""Plain UDP sockets inside lab hosts, for probing what a NAT does.

Two programs, run in a host with ``python -m netlab.udp``:

``reflect PORT``
    answers every datagram with JSON ``{"seen": [ip, port]}``: the source
    address it arrived from, i.e. the sender's mapping on the internet.
``endpoint [PORT]``
    a socket remote-controlled over stdin/stdout with JSON lines: it prints
    ``{"bound": port}``, sends ``{"to": [ip, port], "data": hex}`` commands
    and prints every datagram it receives as ``{"from": [ip, port], "data":
    hex}``; it exits when stdin closes.

:class:`Reflector` and :class:`UdpEndpoint` drive them from the test process.
Both programs give up after ``--lifetime`` seconds so a leak cannot linger.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Sequence
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, Self

if TYPE_CHECKING:
    from netlab.lab import Host

Address = tuple[str, int]

_LIFETIME = 3600.0


def _reflect(port: int, lifetime: float) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", port))
    print(json.dumps({"bound": sock.getsockname()[1]}), flush=True)
    deadline = time.monotonic() + lifetime
    while (left := deadline - time.monotonic()) > 0:
        if select.select([sock], [], [], left)[0]:
            _, source = sock.recvfrom(2048)
            sock.sendto(json.dumps({"seen": list(source)}).encode(), source)


def _endpoint(port: int, lifetime: float) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", port))
    print(json.dumps({"bound": sock.getsockname()[1]}), flush=True)
    stdin = sys.stdin.fileno()
    pending = b""  # raw reads: a buffered reader would hide lines from select()
    deadline = time.monotonic() + lifetime
    while (left := deadline - time.monotonic()) > 0:
        readable = select.select([sock, stdin], [], [], left)[0]
        if sock in readable:
            data, source = sock.recvfrom(65535)
            print(json.dumps({"from": list(source), "data": data.hex()}), flush=True)
        if stdin in readable:
            chunk = os.read(stdin, 65536)
            if not chunk:
                return
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                command = json.loads(line)
                host, to_port = command["to"]
                sock.sendto(bytes.fromhex(command["data"]), (host, to_port))


def main(argv: Sequence[str] | None = None) -> None:
    """Command line entry point: ``reflect PORT`` or ``endpoint [PORT]``."""
    parser = argparse.ArgumentParser(prog="python -m netlab.udp")
    parser.add_argument("mode", choices=["reflect", "endpoint"])
    parser.add_argument("port", type=int, nargs="?", default=0)
    parser.add_argument("--lifetime", type=float, default=_LIFETIME)
    args = parser.parse_args(argv)
    if args.mode == "reflect":
        _reflect(args.port, args.lifetime)
    else:
        _endpoint(args.port, args.lifetime)


class _LineReader:
    """Read JSON lines from a pipe with a deadline (no thread, no blocking)."""

    def __init__(self, pipe: IO[bytes]) -> None:
        self._fd = pipe.fileno()
        os.set_blocking(self._fd, False)
        self._buffer = b""
        self._eof = False

    def read(self, timeout: float) -> dict[str, Any] | None:
        """The next JSON object, or None after ``timeout`` seconds or at EOF."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if self._eof or left <= 0 or not select.select([self._fd], [], [], left)[0]:
                return None
            chunk = os.read(self._fd, 65536)
            self._eof = not chunk
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        decoded: dict[str, Any] = json.loads(line)
        return decoded


def _start(host: Host, mode: str, port: int) -> tuple[subprocess.Popen[bytes], _LineReader, int]:
    proc: subprocess.Popen[bytes] = host.run(
        [sys.executable, "-m", "netlab.udp", mode, str(port)],
        stdin=subprocess.PIPE if mode == "endpoint" else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    reader = _LineReader(proc.stdout)
    ready = reader.read(10.0)
    if ready is None:
        _stop(proc)
        raise RuntimeError(f"udp {mode} did not start in {host.name}")
    return proc, reader, int(ready["bound"])


def _stop(proc: subprocess.Popen[bytes]) -> None:
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            pipe.close()
    proc.terminate()
    try:
        proc.wait(2.0)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(2.0)


class _Helper:
    """
    A helper process inside a lab host; closing (or leaving C{with}) stops it.
    """

    _proc: subprocess.Popen[bytes]

    def close(self) -> None:
        _stop(self._proc)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Reflector(_Helper):
    """``reflect`` running on ``host``; ``address`` is where to send to."""

    def __init__(self, host: Host, port: int = 0) -> None:
        self._proc, _, bound = _start(host, "reflect", port)
        self.address: Address = (host.address, bound)


class UdpEndpoint(_Helper):
    """A UDP socket bound to ``port`` (0: any) inside ``host``, driven from here."""

    def __init__(self, host: Host, port: int = 0) -> None:
        self.host = host
        self._proc, self._reader, self.port = _start(host, "endpoint", port)
        self._backlog: deque[tuple[Address, bytes]] = deque()

    def send(self, to: Address, data: bytes = b"ping") -> None:
        """Send one datagram from the endpoint's socket."""
        assert self._proc.stdin is not None
        line = json.dumps({"to": list(to), "data": data.hex()}) + "\n"
        self._proc.stdin.write(line.encode())
        self._proc.stdin.flush()

    def recv(self, timeout: float = 1.0) -> tuple[Address, bytes] | None:
        """The next datagram received (source, payload), or None after ``timeout``."""
        if self._backlog:
            return self._backlog.popleft()
        event = self._reader.read(timeout)
        if event is None:
            return None
        source_host, source_port = event["from"]
        return (source_host, source_port), bytes.fromhex(event["data"])

    def recv_all(self, quiet: float = 0.5) -> list[tuple[Address, bytes]]:
        """Everything received until nothing more arrives for ``quiet`` seconds."""
        received = []
        while (datagram := self.recv(quiet)) is not None:
            received.append(datagram)
        return received

    def mapped_address(self, reflector: Address, attempts: int = 3) -> Address:
        """Where ``reflector`` sees this socket come from, retrying on loss.

        Other datagrams arriving meanwhile are kept for :meth:`recv`.
        """
        others: list[tuple[Address, bytes]] = []
        try:
            for _ in range(attempts):
                self.send(reflector, b"where")
                deadline = time.monotonic() + 1.0
                while (left := deadline - time.monotonic()) > 0 and (got := self.recv(left)):
                    source, data = got
                    if source != reflector:
                        others.append(got)
                        continue
                    seen_host, seen_port = json.loads(data)["seen"]
                    return seen_host, seen_port
        finally:
            self._backlog.extend(others)
        raise TimeoutError(f"no answer from reflector {reflector} to {self.host.name}")


if __name__ == "__main__":
    main()
