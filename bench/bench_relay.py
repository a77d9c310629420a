"""
Relay forwarding on loopback, next to coturn relaying the same load as a
TURN server, and next to the generator's ceiling: numbers, not pass/fail.

The open-loop C generator of bench_rendezvous (bench/loadgen.c) sends
20-byte datagrams at a fixed rate from one socket; an echo server
(coturn's C{turnutils_peer}) sends each back; the generator counts what
returns.  Every answer is two relayed datagrams, one each way:

* punchd: a real relay process (the rendezvous's RelayService on the real
  reactor, tests/relay/standalone.py) with one allocation; the generator's
  socket bound one side with a signed RELAY_BIND, the echo server's
  address the other.  Raw datagrams both ways.
* coturn: C{turnserver} (no auth, one relay thread, loopback peers
  allowed); the generator's socket holds a TURN allocation with a channel
  bound to the echo server, so its datagrams are ChannelData (4 bytes
  more) and coturn relays them raw to the peer and back.
* ceilings: the generator against the echo server directly (the chain
  without a relay), and against the C reflector of bench_rendezvous.

Relays and reflectors run on one CPU, the generator and the echo server on
another.  "Without loss" is the highest offered rate with < 0.1 % loss;
"per CPU-second" counts relayed datagrams per second of the relay
process's own CPU time, so other load on this shared machine matters less.

    .venv/bin/python -m bench.bench_relay [--duration 2] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from bench.bench_rendezvous import (
    LOSS_FREE,
    Generator,
    Step,
    Target,
    compile_loadgen,
    cpus,
    ladders,
    pin,
    print_table,
    rate_text,
    reflector,
    saturation,
    stop,
    without_loss,
)
from netlab.deployment import free_udp_port
from punchd import stun
from punchd.relay import build_bind, parse_bind_answer

RATES = [5_000, 10_000, 20_000, 30_000, 40_000, 50_000, 60_000, 80_000, 100_000, 120_000]
QUICK_RATES = [10_000, 30_000, 60_000]
KEYS = {"alice": os.urandom(32), "bob": os.urandom(32)}
TUNNEL = os.urandom(16)
ECHOED_BINDING = 0x0001
CHANNEL = 0x4000
# TURN (RFC 8656) methods and attributes the coturn client below needs.
ALLOCATE, CHANNEL_BIND = 0x003, 0x009
CHANNEL_NUMBER, XOR_PEER_ADDRESS, XOR_RELAYED_ADDRESS = 0x000C, 0x0012, 0x0016
REQUESTED_TRANSPORT = 0x0019


def ask(sock: socket.socket, request: bytes, server: tuple[str, int]) -> bytes:
    """
    The answer to C{request}, retransmitted until one comes.
    """
    sock.settimeout(0.3)
    for _ in range(30):
        sock.sendto(request, server)
        try:
            return sock.recv(2048)
        except TimeoutError:
            continue
    raise TimeoutError(f"no answer from {server}")


# -- the echo server ------------------------------------------------------------------


@contextlib.contextmanager
def echo_peer(port: int, cpu: int | None) -> Iterator[Target]:
    process = subprocess.Popen(
        ["turnutils_peer", "-L", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=pin(cpu),
    )
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.1", 0))
            assert ask(sock, b"ping", ("127.0.0.1", port)) == b"ping"
        yield Target("echo", ("127.0.0.1", port), process.pid)
    finally:
        stop(process)


# -- punchd's relay ------------------------------------------------------------------------


def bind(sock: socket.socket, name: str, port: int) -> None:
    _, request = build_bind(name, KEYS[name], TUNNEL)
    answer = ask(sock, request, ("127.0.0.1", port))
    assert parse_bind_answer(answer, KEYS[name]) == sock.getsockname()


@contextlib.contextmanager
def punchd_relay(
    cpu: int | None, echo_cpu: int | None, sock: socket.socket
) -> Iterator[tuple[Target, Callable[[], dict[str, int]]]]:
    """
    A relay process with one allocation: C{sock} bound as one side, the
    echo server (started on the address that bound) as the other.
    """
    low = 20000 + os.getpid() % 20000
    settings = {
        "interface": "127.0.0.1",
        "ports": f"{low}-{low + 2000}",
        "keys": {name: key.hex() for name, key in KEYS.items()},
        "tunnels": [[TUNNEL.hex(), "alice", "bob"]],
        "idle_timeout": 3600,
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.relay.standalone"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=pin(cpu),
    )
    assert process.stdin is not None and process.stdout is not None
    process.stdin.write(json.dumps(settings) + "\n")
    process.stdin.close()
    try:
        pa, pb = json.loads(process.stdout.readline())["allocations"][0]
        bind(sock, "alice", pa)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as far:
            far.bind(("127.0.0.1", 0))
            bind(far, "bob", pb)
            echo_port = far.getsockname()[1]
        with echo_peer(echo_port, echo_cpu):

            def counters() -> dict[str, int]:
                process.send_signal(signal.SIGTERM)
                process.wait(30)
                assert process.stdout is not None
                last = json.loads(process.stdout.read().splitlines()[-1])
                result: dict[str, int] = last["counters"]
                return result

            yield Target("punchd relay", ("127.0.0.1", pa), process.pid), counters
    finally:
        stop(process)


# -- coturn -----------------------------------------------------------------------------------


@contextlib.contextmanager
def coturn(root: Path, cpu: int | None) -> Iterator[Target | None]:
    turnserver = shutil.which("turnserver")
    if turnserver is None:
        yield None
        return
    port = free_udp_port()
    low = 40000 + os.getpid() % 10000
    argv = [
        turnserver,
        "-n",
        "--no-auth",
        "--listening-ip=127.0.0.1",
        "--relay-ip=127.0.0.1",
        f"--listening-port={port}",
        f"--min-port={low}",
        f"--max-port={low + 2000}",
        "--allow-loopback-peers",
        "--relay-threads=1",
        "--no-cli",
        "--no-tls",
        "--no-dtls",
        "--no-tcp",
        "--no-tcp-relay",
        "--log-file=stdout",
        "--simple-log",
        f"--pidfile={root / 'turnserver.pid'}",
        f"--userdb={root / 'turndb'}",
    ]
    with open(root / "turnserver.log", "wb") as log:
        process = subprocess.Popen(
            argv, cwd=root, stdout=log, stderr=subprocess.STDOUT, preexec_fn=pin(cpu)
        )
    try:
        yield Target("coturn", ("127.0.0.1", port), process.pid)
    finally:
        stop(process)


def turn_channel(sock: socket.socket, server: tuple[str, int], peer: tuple[str, int]) -> None:
    """
    Allocate on C{server} from C{sock} and bind channel 0x4000 to C{peer}.
    """
    tid = os.urandom(12)
    allocate = stun.build(
        ALLOCATE, stun.MessageClass.REQUEST, tid, [(REQUESTED_TRANSPORT, bytes([17, 0, 0, 0]))]
    )
    answer = stun.parse(ask(sock, allocate, server))
    assert answer.cls == stun.MessageClass.SUCCESS and answer.get(XOR_RELAYED_ADDRESS), answer
    tid = os.urandom(12)
    attributes = [
        (CHANNEL_NUMBER, CHANNEL.to_bytes(2, "big") + bytes(2)),
        (XOR_PEER_ADDRESS, stun.encode_xor_address(*peer, tid)),
    ]
    answer = stun.parse(
        ask(sock, stun.build(CHANNEL_BIND, stun.MessageClass.REQUEST, tid, attributes), server)
    )
    assert answer.cls == stun.MessageClass.SUCCESS, answer


def channel_records(count: int, run_id: bytes, path: Path) -> Path:
    """
    C{count} ChannelData datagrams whose echo the generator counts: the
    run id sits where it looks for a transaction id (byte 8 on).
    """
    out = bytearray()
    for k in range(count):
        payload = b"\x00\x01\x00\x00" + run_id + k.to_bytes(12, "big")
        data = CHANNEL.to_bytes(2, "big") + len(payload).to_bytes(2, "big") + payload
        out += len(data).to_bytes(2, "big") + data
    path.write_bytes(out)
    return path


# -- the report -----------------------------------------------------------------------------------


def summary(results: dict[str, list[Step]]) -> None:
    print("\nSummary: round trips (= 2 relayed datagrams) per second")
    for name, steps in results.items():
        best = max(steps, key=lambda s: s.answered / max(s.server_cpu * s.send_seconds, 1e-9))
        per_cpu = best.per_cpu_second
        print(
            f"  {name:<22} without loss {rate_text(without_loss(steps)):>11}  "
            f"saturation {rate_text(saturation(steps)):>11}  "
            f"relayed datagrams per CPU-second {2 * per_cpu:>10,.0f}"
        )
    punchd, turn = results.get("punchd relay"), results.get("coturn")
    if punchd and turn:
        clean_p, clean_c = without_loss(punchd), without_loss(turn)
        if clean_p and clean_c:
            print(f"  punchd/coturn without loss: {clean_p / clean_c:.2f}")
        print(f"  punchd/coturn at saturation: {saturation(punchd) / saturation(turn):.2f}")
        if not any(s.loss >= LOSS_FREE for s in turn):
            print("  (coturn lost nothing at any offered rate: its limit is above the ladder)")
    print("  (per CPU-second is best over the ladder; the echo server and the generator")
    print("   are the ceiling: see the two ceiling rows)")


# -- main -----------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per step")
    parser.add_argument("--repeat", type=int, default=2, help="trials for a step with loss")
    parser.add_argument("--quick", action="store_true", help="fewer, shorter steps")
    parser.add_argument("--rates", help="comma-separated round-trip rates, instead of the ladder")
    parser.add_argument("--no-coturn", action="store_true")
    args = parser.parse_args(argv)
    duration = 1.0 if args.quick else args.duration
    rates = QUICK_RATES if args.quick else RATES
    if args.rates:
        rates = [int(float(r)) for r in args.rates.split(",")]
    previous_cpus = os.sched_getaffinity(0)
    try:
        run(args, duration, rates)
    finally:
        os.sched_setaffinity(0, previous_cpus)


def run(args: argparse.Namespace, duration: float, rates: Sequence[int]) -> None:
    generator_cpu, server_cpu = cpus()
    if generator_cpu is not None:
        os.sched_setaffinity(0, {generator_cpu})
    print(
        f"relay benchmark: {duration:g} s per step, open-loop C generator and echo server on "
        f"CPU {generator_cpu}, relays on CPU {server_cpu}; "
        f"load average {os.getloadavg()[0]:.2f} at start"
    )
    results: dict[str, list[Step]] = {}
    counters: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="bench-relay-") as tmp:
        root = Path(tmp)
        generator = Generator(compile_loadgen(root), generator_cpu, duration)
        try:
            run_ladders(args, root, generator, server_cpu, rates, results, counters)
        finally:
            for name, steps in results.items():
                print_table(name, steps)
            if counters:
                shown = {k: v for k, v in sorted(counters.items()) if k != "forwarded-bytes"}
                print(f"\npunchd relay counters: {shown}")
            summary(results)
            print(f"load average at the end: {os.getloadavg()[0]:.2f}")


def run_ladders(
    args: argparse.Namespace,
    root: Path,
    generator: Generator,
    server_cpu: int | None,
    rates: Sequence[int],
    results: dict[str, list[Step]],
    counters: dict[str, int],
) -> None:
    with contextlib.ExitStack() as stack:
        runs: dict[str, Callable[[int], Step]] = {}
        reflected = stack.enter_context(reflector(generator.binary, server_cpu, 3600))
        runs["ceiling: C reflector"] = functools.partial(generator.run, reflected)
        echo = stack.enter_context(echo_peer(free_udp_port(), generator.cpu))
        runs["ceiling: echo direct"] = functools.partial(generator.run, echo, expect=ECHOED_BINDING)
        relay_sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        relay_sock.bind(("127.0.0.1", 0))
        relay, relay_counters = stack.enter_context(
            punchd_relay(server_cpu, generator.cpu, relay_sock)
        )
        runs["punchd relay"] = functools.partial(
            generator.run, relay, sock=relay_sock, expect=ECHOED_BINDING
        )
        if not args.no_coturn:
            (root / "coturn").mkdir()
            turn = stack.enter_context(coturn(root / "coturn", server_cpu))
            if turn is None:
                print("coturn: turnserver not installed (Debian package coturn), skipped")
            else:
                turn_sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
                turn_sock.bind(("127.0.0.1", 0))
                turn_channel(turn_sock, turn.address, echo.address)
                runs["coturn"] = functools.partial(coturn_step, generator, turn, turn_sock, root)
        for step in runs.values():  # first-datagram costs stay out of the ladder
            step(min(rates))
        print("Round-trip ladder (loss at each offered rate):")
        ladders(runs, rates, args.repeat, {n: results.setdefault(n, []) for n in runs})
        counters.update(relay_counters())


def coturn_step(
    generator: Generator, target: Target, sock: socket.socket, root: Path, rate: int
) -> Step:
    run_id = os.urandom(4)
    records = channel_records(int(rate * generator.duration), run_id, root / "channel.records")
    return generator.run(target, rate, sock=sock, records=records, run_id=run_id, expect=CHANNEL)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except KeyboardInterrupt:
        sys.exit(130)
