"""
The relay with one side on a TLS stream (docs/relay.rst, "Relay over TLS")
next to the plain UDP relay, in the same run of one real rendezvous on
loopback: numbers, not pass/fail.

Two relayed tunnels through one rendezvous process (twistd, its TLS port
on): alice on TLS to bob's first UDP socket, carol on UDP to bob's second.
Each tunnel is allocated the real way (Connect with RELAY, Incoming
accepted) and bound by signed RELAY_BINDs.  Then, per tunnel:

* latency: ping-pong round trips of 64-byte datagrams through the relay,
  against the same ping-pong between two plain UDP sockets (no relay):
  median and 95th percentile, and what the relay adds;
* throughput: datagrams one way in windows of 100 (send a window, read
  it back), each direction: datagrams per second at the far end, loss,
  and the rendezvous process's CPU time per relayed datagram.

The client side is this one Python process, so the absolute numbers are
a Python client's; the TLS and UDP rows are comparable with each other.

    .venv/bin/python -m bench.bench_relay_tls [--count 20000] [--rounds 2000] [--size 100]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.tries import percentile
from netlab import certs
from netlab.deployment import Deployment, free_udp_port
from punchd import stun, wire
from punchd.framing import Signalling, relayed_frame, stun_frame
from punchd.relay import build_bind, parse_bind_answer
from punchd.stun import Attr, MessageClass, Method
from tests.rendezvous import accepted
from tests.rendezvous.test_tls_live import TLSAgent, UDPAgent, free_tcp_port

WINDOW = 100
TIMEOUT = 2.0
Address = tuple[str, int]


# -- the two ends of a relayed tunnel ---------------------------------------------


class End:
    """
    One end of a tunnel: sends and receives raw datagrams.
    """

    def send_many(self, datagrams: Sequence[bytes]) -> None:
        raise NotImplementedError

    def receive(self) -> bytes | None:
        raise NotImplementedError


class UDPEnd(End):
    def __init__(self, sock: socket.socket, to: Address) -> None:
        self.sock = sock
        self.to = to
        sock.settimeout(TIMEOUT)

    def send_many(self, datagrams: Sequence[bytes]) -> None:
        for datagram in datagrams:
            self.sock.sendto(datagram, self.to)

    def receive(self) -> bytes | None:
        try:
            return self.sock.recv(65535)
        except TimeoutError:
            return None


class TLSEnd(End):
    def __init__(self, agent: TLSAgent, port: int) -> None:
        self.agent = agent
        self.port = port
        agent.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        agent.sock.settimeout(TIMEOUT)

    def send_many(self, datagrams: Sequence[bytes]) -> None:
        self.agent.sock.sendall(b"".join(relayed_frame(self.port, d) for d in datagrams))

    def receive(self) -> bytes | None:
        try:
            return self.agent.relayed().datagram
        except TimeoutError:
            return None


# -- setting the tunnels up the real way -----------------------------------------


def relay_ports(
    send: Callable[[bytes], None],
    answer: Callable[[], bytes],
    initiator: TLSAgent | UDPAgent,
    bob: UDPAgent,
    tunnel: bytes,
) -> tuple[int, int]:
    """
    (initiator's, bob's) relay ports of a Connect with RELAY that bob accepts.
    """
    attributes = [
        (Attr.PEER, b"bob"),
        (Attr.SERVICE, b"bench"),
        (Attr.TUNNEL_ID, tunnel),
        (Attr.RELAY, b""),
    ]
    tid, connect = initiator.request(Method.CONNECT, attributes)
    send(connect)
    while True:
        incoming = stun.parse(bob.sock.recv(2048))
        if incoming.method == Method.INCOMING and incoming.get(Attr.TUNNEL_ID) == tunnel:
            break
    bob.sock.sendto(accepted(incoming, bob.key), bob.server)
    while True:
        message = initiator.check(answer(), tid)
        if message is not None:
            break
    assert message.cls == MessageClass.SUCCESS, wire.error_of(message)
    ours = stun.decode_u32(message.get(Attr.RELAY_PORT) or b"")
    theirs = stun.decode_u32(incoming.get(Attr.RELAY_PORT) or b"")
    return ours, theirs


def udp_bind(sock: socket.socket, name: str, key: bytes, tunnel: bytes, port: int) -> None:
    _, bind = build_bind(name, key, tunnel)
    sock.sendto(bind, ("127.0.0.1", port))
    sock.settimeout(TIMEOUT)
    assert parse_bind_answer(sock.recv(2048), key) == sock.getsockname()


def fresh_udp() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    sock.bind(("127.0.0.1", 0))
    return sock


@dataclass
class Tunnels:
    tls: tuple[End, End]
    udp: tuple[End, End]
    direct: tuple[End, End]


def tunnels(d: Deployment, tls_port: int, ca: Path) -> Tunnels:
    server = d.rendezvous_key
    lifetime = [(Attr.LIFETIME, stun.encode_u32(600))]
    alice = TLSAgent("alice", d.agents["alice"].key, server, tls_port, ca)
    carol = UDPAgent("carol", d.agents["carol"].key, server, d.rendezvous_port)
    bob = UDPAgent("bob", d.agents["bob"].key, server, d.rendezvous_port)
    for agent in (alice, carol, bob):
        assert agent.ask(Method.REGISTER, lifetime).cls == MessageClass.SUCCESS

    def alice_answer() -> bytes:
        frame = alice.frame()
        assert isinstance(frame, Signalling)
        return frame.message

    tunnel = os.urandom(16)

    def alice_send(message: bytes) -> None:
        alice.sock.sendall(stun_frame(message))

    pa, pb = relay_ports(alice_send, alice_answer, alice, bob, tunnel)
    alice.sock.sendall(relayed_frame(pa, build_bind("alice", alice.key, tunnel)[1]))
    assert parse_bind_answer(alice.relayed().datagram, alice.key) == alice.address
    bob_tls = fresh_udp()
    udp_bind(bob_tls, "bob", bob.key, tunnel, pb)

    tunnel = os.urandom(16)

    def carol_send(message: bytes) -> None:
        carol.sock.sendto(message, carol.server)

    pc, pd = relay_ports(carol_send, lambda: carol.sock.recv(2048), carol, bob, tunnel)
    carol_udp, bob_udp = fresh_udp(), fresh_udp()
    udp_bind(carol_udp, "carol", carol.key, tunnel, pc)
    udp_bind(bob_udp, "bob", bob.key, tunnel, pd)

    one, two = fresh_udp(), fresh_udp()
    return Tunnels(
        tls=(TLSEnd(alice, pa), UDPEnd(bob_tls, ("127.0.0.1", pb))),
        udp=(UDPEnd(carol_udp, ("127.0.0.1", pc)), UDPEnd(bob_udp, ("127.0.0.1", pd))),
        direct=(UDPEnd(one, two.getsockname()), UDPEnd(two, one.getsockname())),
    )


# -- measurements --------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def round_trips(a: End, b: End, rounds: int) -> list[float]:
    """
    Round-trip times in microseconds: a datagram from C{a} to C{b} and back.
    """
    times = []
    payload = os.urandom(56)
    for i in range(rounds):
        datagram = i.to_bytes(8, "big") + payload
        start = time.perf_counter()
        a.send_many([datagram])
        got = b.receive()
        if got is None:
            continue
        b.send_many([got])
        back = a.receive()
        if back == datagram:
            times.append((time.perf_counter() - start) * 1e6)
    return times


@dataclass
class Flow:
    sent: int
    received: int
    seconds: float
    cpu: float

    @property
    def rate(self) -> float:
        return self.received / self.seconds

    @property
    def loss(self) -> float:
        return 1 - self.received / self.sent


def flow(a: End, b: End, count: int, size: int, pid: int) -> Flow:
    """
    C{count} datagrams from C{a} to C{b}, in windows of L{WINDOW}.
    """
    payload = os.urandom(size)
    received = 0
    cpu = cpu_seconds(pid)
    start = time.perf_counter()
    for first in range(0, count, WINDOW):
        window = min(WINDOW, count - first)
        a.send_many([payload] * window)
        for _ in range(window):
            if b.receive() is None:
                break
            received += 1
    seconds = time.perf_counter() - start
    return Flow(count, received, seconds, cpu_seconds(pid) - cpu)


def report(t: Tunnels, pid: int, count: int, rounds: int, size: int) -> None:
    print(f"\nLatency: {rounds:,} round trips of 64-byte datagrams (microseconds)")
    print(
        f"{'path':<34} {'median':>8} {'p95':>8} {'added median':>13} {'added p95':>10} {'lost':>5}"
    )
    direct = round_trips(*t.direct, rounds)
    base = (statistics.median(direct), percentile(direct, 0.95))
    rows = [("direct UDP (no relay)", direct)]
    rows.append(("relay UDP <-> UDP", round_trips(*t.udp, rounds)))
    rows.append(("relay TLS stream <-> UDP", round_trips(*t.tls, rounds)))
    for name, times in rows:
        median, p95 = statistics.median(times), percentile(times, 0.95)
        print(
            f"{name:<34} {median:>8.0f} {p95:>8.0f} {median - base[0]:>13.0f} "
            f"{p95 - base[1]:>10.0f} {rounds - len(times):>5}"
        )

    print(f"\nThroughput: {count:,} datagrams of {size} bytes one way, windows of {WINDOW}")
    print(f"{'path':<34} {'datagrams/s':>12} {'loss %':>7} {'relay CPU us/datagram':>22}")
    flows = [
        ("relay UDP -> UDP", t.udp[0], t.udp[1]),
        ("relay UDP <- UDP", t.udp[1], t.udp[0]),
        ("relay TLS stream -> UDP", t.tls[0], t.tls[1]),
        ("relay UDP -> TLS stream", t.tls[1], t.tls[0]),
    ]
    for name, a, b in flows:
        f = flow(a, b, count, size, pid)
        per = 1e6 * f.cpu / max(f.received, 1)
        print(f"{name:<34} {f.rate:>12,.0f} {100 * f.loss:>7.2f} {per:>22.1f}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--count", type=int, default=20_000, help="datagrams per direction")
    parser.add_argument("--rounds", type=int, default=2_000, help="round trips per path")
    parser.add_argument("--size", type=int, default=100, help="bytes per datagram")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-relay-tls-") as tmp:
        root = Path(tmp)
        made = certs.make_certificates(root / "certs", ["127.0.0.1"])
        tls_port = free_tcp_port()
        low = min(free_udp_port(), 64000)
        extra = (
            f"tls_port = {tls_port}\n"
            f'tls_certificate = "{made.certificate}"\n'
            f'tls_private_key = "{made.private_key}"\n'
            f'relay_ports = "{low}-{low + 1000}"\n'
            "relay_idle_timeout = 3600\n"
            "tls_idle_timeout = 3600\n"
        )
        with Deployment(root / "d", binding_rate=0, rendezvous_extra=extra) as d:
            for name in ("alice", "bob", "carol"):
                d.add_agent(name)
            d.start_rendezvous()
            assert d.rendezvous_process is not None
            t = tunnels(d, tls_port, made.ca)
            report(t, d.rendezvous_process.pid, args.count, args.rounds, args.size)


if __name__ == "__main__":
    main()
