"""
C{make demo}: the main job, shown on one machine.

As root it builds the NAT lab with alice behind a home NAT and bob behind a
home NAT that is itself behind a carrier-grade NAT, starts the rendezvous
and both agents inside it, and has two C{punchctl} chat programs talk
across the punched tunnel, then stops the daemons and shows the tunnel
still works.  Without root it says why and does the same over loopback.
"""

from __future__ import annotations

import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, cast

from netlab.deployment import Deployment, Launch, local_launch


def say(text: str = "") -> None:
    print(text, flush=True)


def _pump(stream: IO[str], lines: queue.Queue[str]) -> None:
    for line in stream:
        lines.put(line.rstrip("\n"))


class Program:
    """
    A running punchctl whose stdin we write and whose output we read.
    """

    def __init__(self, name: str, argv: list[str], launch: Launch) -> None:
        self.name = name
        self.process = launch(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self.out: queue.Queue[str] = queue.Queue()
        self.err: queue.Queue[str] = queue.Queue()
        for stream, lines in ((self.process.stdout, self.out), (self.process.stderr, self.err)):
            assert stream is not None
            threading.Thread(target=_pump, args=(stream, lines), daemon=True).start()

    def expect(self, lines: queue.Queue[str], pattern: str, timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = lines.get(timeout=min(0.2, max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                if self.process.poll() not in (None, 0) and lines.empty():
                    raise RuntimeError(f"{self.name}: punchctl failed") from None
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"{self.name}: nothing matching {pattern!r}") from None
                continue
            if re.search(pattern, line):
                return line

    def progress_until(self, pattern: str, show: Callable[[str], None]) -> str:
        """
        Show progress lines until one matches; punchctl exiting (its error
        line shown last) ends the wait at once.
        """
        while True:
            line = self.expect(self.err, r".")
            show(line)
            if re.search(pattern, line):
                return line

    def type(self, line: str) -> None:
        stdin = cast("IO[str] | None", self.process.stdin)  # text=True above
        assert stdin is not None
        stdin.write(line + "\n")
        stdin.flush()

    def finish(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


def punchctl(socket_path: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "punchd.cli", "--socket", socket_path, *args]


def chat(deployment: Deployment, launch_alice: Launch, launch_bob: Launch, route: str) -> None:
    """
    Two punchctl programs: bob listens for "chat", alice connects to it.
    """
    bob = Program(
        "bob", punchctl(deployment.agents["bob"].socket_path, "listen", "chat"), launch_bob
    )
    bob.expect(bob.err, "listening")
    say("bob$ punchctl listen chat")
    say("alice$ punchctl connect bob chat")
    alice = Program(
        "alice",
        punchctl(deployment.agents["alice"].socket_path, "connect", "bob", "chat"),
        launch_alice,
    )
    try:
        alice.progress_until(r"connected to", lambda line: say(f"  alice: {line}"))
        say(f"  bob:   {bob.expect(bob.err, 'connected to')}")
        tunnel_line = _tunnel_log(deployment.agents["alice"].log)
        if tunnel_line:
            say(f"  alice's agent logged: {tunnel_line}")
        say()
        say("chat across the tunnel:")
        for speaker, listener, text in (
            (alice, bob, "hello bob, it's alice"),
            (bob, alice, "hi alice! no relay between us"),
            (alice, bob, route),
        ):
            speaker.type(text)
            heard = listener.expect(listener.out, re.escape(text))
            say(f"  {speaker.name:>5} > {text}")
            say(f"  {listener.name:>5} < {heard}")
        say()
        say("stopping both agents and the rendezvous; the tunnel belongs to the programs now")
        for name in ("alice", "bob"):
            deployment.stop_agent(name)
        deployment.stop_rendezvous()
        alice.type("still there?")
        say(f"    bob < {bob.expect(bob.out, 'still there')}")
        bob.type("yes, no daemon needed")
        say(f"  alice < {alice.expect(alice.out, 'no daemon')}")
    finally:
        alice.finish()
        bob.finish()


def _tunnel_log(log: Path) -> str | None:
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if "direct via" in line:
                return line.split("] ", 1)[-1]
        time.sleep(0.1)
    return None


def lab_demo() -> None:
    from netlab.lab import Lab
    from netlab.scenarios import World

    with Lab() as lab:
        world = World(lab)
        try:
            alice = world.add("alice", "cone", agents=["alice"])[0]
            bob = world.add("bob", "cgnat", agents=["bob"])[0]
            deployment = world.deployment
            say("the NAT lab (network namespaces, nftables; isolated from this host's network):")
            say("  internet       203.0.113.0/24, rendezvous at 203.0.113.10:3478")
            say(
                f"  alice {alice.address:<14} behind a home NAT "
                f"(public {world.sites['alice'].public_address})"
            )
            say(
                f"  bob   {bob.address:<14} behind a home NAT behind a carrier-grade NAT "
                f"(public {world.sites['bob'].public_address})"
            )
            say()
            world.start()
            _registered(deployment)
            chat(deployment, alice.run, bob.run, "straight through two NATs")
        finally:
            world.close()
    say()
    say("lab torn down: namespaces, processes and files are gone")


def _registered(deployment: Deployment) -> None:
    for name in ("alice", "bob"):
        status: dict[str, Any] = deployment.status(name)
        say(f"{name}'s agent registered; the rendezvous sees it at {status['mapped']}")
    say()


def loopback_demo() -> None:
    with tempfile.TemporaryDirectory(prefix="punchd-demo-") as root:
        with Deployment(Path(root)) as deployment:
            deployment.add_agent("alice")
            deployment.add_agent("bob")
            say(f"rendezvous on 127.0.0.1:{deployment.rendezvous_port}, agents alice and bob")
            deployment.start_rendezvous()
            deployment.start_agent("alice")
            deployment.start_agent("bob")
            _registered(deployment)
            chat(deployment, local_launch, local_launch, "over loopback, the same way")


def main() -> int:
    say("punchd demo: two programs get a direct UDP path through their NATs")
    say()
    from netlab.lab import unavailable_reason

    reason = unavailable_reason()
    try:
        if reason is None:
            lab_demo()
        else:
            say(f"(no NAT lab: {reason}; showing the same over loopback instead)")
            say()
            loopback_demo()
    except (TimeoutError, RuntimeError) as e:
        say(f"demo failed: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
