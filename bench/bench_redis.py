"""
The rendezvous as a service on Redis: numbers, not pass/fail.

Same-run comparisons on loopback, with a real redis-server in a temporary
directory (docs/scale-out.rst discusses the results):

* Signed REGISTER keepalives (the open-loop C generator of
  bench_rendezvous): the in-memory registry vs the Redis registry, one
  process each on the same CPU; then a node of two workers (SO_REUSEPORT)
  fed from two sockets that the kernel gave to different workers.
* A simulated population (C{--agents}, 100,000 by default; a million
  takes about 9 minutes and 4 GiB here) on two nodes, its directory imported into Redis:
  first registrations paced at C{--register-rate}, then keepalive rounds of
  20 s; RSS per node, Redis memory per agent, keepalive loss and where it
  happened (each process's CPU, the kernel's receive-buffer drops).  Keys
  and signed datagrams are made beforehand on every CPU (bench/population.py).
* Introduction latency, initiator and target on the same node vs on two
  nodes (median, p95), answered by simulated agents.
* Time per peers page in a network of 10,000 agents and of the whole
  population: constant in the network's size.

    .venv/bin/python -m bench.bench_redis [--agents 100000] [--quick] [--only-population]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import resource
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import population as population_mod
from bench.bench_rendezvous import (
    REGISTER_SUCCESS,
    Generator,
    Keepalives,
    Step,
    Target,
    compile_loadgen,
    cpu_seconds,
    cpus,
    print_table,
    saturation,
    without_loss,
    write_peers,
)
from netlab.deployment import Deployment
from punchd import stun, wire
from punchd.keys import PrivateKey
from punchd.rendezvous import directory
from punchd.rendezvous.resp import BlockingRedis
from punchd.stun import Attr, MessageClass, Method
from tests import wait_for
from tests.rendezvous import accepted
from tests.rendezvous.redis_helpers import Launch, RedisServer, Service

RATES = [5_000, 10_000, 15_000, 20_000, 25_000, 30_000, 35_000, 40_000]
QUICK_RATES = [10_000, 20_000, 30_000]
KEEPALIVE = 20.0
#: Registrations signed under one nonce are sent within this many seconds.
NONCE_SECONDS = 180


# -- keepalives per second per core ------------------------------------------------


def process_tree(pid: int) -> list[int]:
    pids = [pid]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                pids.append(int(entry))
    return pids


def used_memory(client: BlockingRedis) -> int:
    info = client.execute("INFO", "memory").decode()
    for line in info.splitlines():
        if line.startswith("used_memory:"):
            return int(line.split(":")[1])
    return 0


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def ladder(name: str, run: object, rates: Sequence[int], results: dict[str, list[Step]]) -> None:
    steps = results.setdefault(name, [])
    for rate in rates:
        step = run(rate)  # type: ignore[operator]
        steps.append(step)
        print(f"  {name}: {rate:>7,}/s offered, {100 * step.loss:.2f}% lost", flush=True)
        if step.loss > 0.3:
            break


def keepalive_runner(
    d: Deployment,
    agents: dict[str, PrivateKey],
    server: tuple[str, int],
    target: Target,
    generator: Generator,
    root: Path,
    sock: socket.socket,
) -> object:
    keepalives = Keepalives(d, agents, sock)
    keepalives.server = server
    keepalives.fetch_nonce()
    records = root / f"records-{sock.getsockname()[1]}"
    for _ in range(2):
        run_id = os.urandom(4)
        generator.run(
            target,
            1_000,
            sock=sock,
            records=keepalives.records(len(agents), run_id, records),
            run_id=run_id,
            expect=REGISTER_SUCCESS,
        )
    keepalives.check()

    def run(rate: int) -> Step:
        run_id = os.urandom(4)
        return generator.run(
            target,
            rate,
            sock=sock,
            records=keepalives.records(int(rate * generator.duration), run_id, records),
            run_id=run_id,
            expect=REGISTER_SUCCESS,
        )

    return run


def keepalive_ladders(
    root: Path, redis: RedisServer, generator: Generator, cpu: int | None, rates: Sequence[int]
) -> dict[str, list[Step]]:
    results: dict[str, list[Step]] = {}
    d = Deployment(root / "keepalive", binding_rate=0)
    service = Service(d, redis)
    try:
        agents = write_peers(d.root, 1000)
        d.start_rendezvous(launch=pinned(cpu), wait=60)
        service.add_node("redis1")
        service.start_node("redis1")
        pin_tree(service, "redis1", cpu)
        servers = {
            "memory registry": ((d.rendezvous_host, d.rendezvous_port), d.rendezvous_process),
            "redis registry": (("127.0.0.1", service.nodes["redis1"].port), None),
        }
        runs = {}
        for name, (address, process) in servers.items():
            pid = process.pid if process else service.nodes["redis1"].process.pid  # type: ignore[union-attr]
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("127.0.0.1", 0))
            target = Target(name, address, pid)
            runs[name] = keepalive_runner(d, agents, address, target, generator, root, sock)
        for rate in rates:  # each server in turn at each rate
            for name, run in runs.items():
                ladder(name, run, [rate], results)
    finally:
        service.close()
    return results


def pinned(cpu: int | None) -> object:

    def launch(argv: Sequence[str], **kwargs: object) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(list(argv), **kwargs)  # type: ignore[call-overload]
        if cpu is not None:
            os.sched_setaffinity(process.pid, {cpu})
        return process  # type: ignore[no-any-return]

    return launch


def pin_tree(service: Service, node: str, cpu: int | None) -> None:
    process = service.nodes[node].process
    if cpu is not None and process is not None:
        for pid in process_tree(process.pid):
            os.sched_setaffinity(pid, {cpu})


def two_workers(
    root: Path, redis: RedisServer, generator: Generator, rates: Sequence[int]
) -> list[tuple[int, float, float, float]]:
    """
    A node of two workers fed from two sockets the kernel gave to different
    workers: (offered per second, answered per second, loss, answers per CPU-second).
    """
    d = Deployment(root / "workers", binding_rate=0)
    service = Service(d, redis)
    rows = []
    try:
        agents = write_peers(d.root, 1000)
        names = sorted(agents)
        service.add_node("pair", workers=2)
        service.start_node("pair")
        node = service.nodes["pair"]
        assert node.process is not None
        client = redis.client()
        wait_for(lambda: len(process_tree(node.process.pid)) >= 2, 30, "the second worker")  # type: ignore[union-attr]
        time.sleep(2)
        address = ("127.0.0.1", node.port)
        halves = [
            dict((n, agents[n]) for n in names[:500]),
            dict((n, agents[n]) for n in names[500:]),
        ]
        feeds: list[tuple[socket.socket, object]] = []
        holders: set[bytes] = set()
        for _ in range(16):  # sockets until two land on different workers
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("127.0.0.1", 0))
            half = halves[len(feeds)]
            target = Target("workers", address, node.process.pid)
            run = keepalive_runner(d, half, address, target, generator, root, sock)
            holder = client.execute("HGET", f"punchd:agent:{sorted(half)[0]}", "node")
            if holder in holders:
                sock.close()
                continue
            holders.add(holder)
            feeds.append((sock, run))
            if len(feeds) == 2:
                break
        if len(feeds) < 2:
            print("  the kernel gave every socket to one worker: skipped")
            return rows
        pids = process_tree(node.process.pid)
        for rate in rates:
            steps: list[Step] = []
            before = sum(cpu_seconds(p) for p in pids)

            def feed(run: Any, rate: int = rate, steps: list[Step] = steps) -> None:
                steps.append(run(rate // 2))

            threads = [threading.Thread(target=feed, args=(r,)) for _, r in feeds]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            cpu = sum(cpu_seconds(p) for p in pids) - before
            sent = sum(s.sent for s in steps)
            answered = sum(s.answered for s in steps)
            seconds = max(s.send_seconds for s in steps)
            loss = (sent - answered) / sent if sent else 1.0
            rows.append((rate, answered / seconds, loss, answered / cpu if cpu else 0.0))
            print(f"  two workers: {rate:>7,}/s offered, {100 * loss:.2f}% lost", flush=True)
            if loss > 0.3:
                break
    finally:
        service.close()
    return rows


# -- a simulated population ----------------------------------------------------------


def one_node(
    root: Path, redis: RedisServer, generator: Generator, count: int, registry: str, cpu: int | None
) -> None:
    """
    C{count} agents (a peers file) kept alive at 20 s by one rendezvous
    process, in memory or on Redis: the same load, one after the other.
    """
    d = Deployment(root / f"one-{registry}", binding_rate=0)
    try:
        agents = write_peers(d.root, count)
        if registry == "redis":
            redis.client().execute("FLUSHDB")
            with open(d.root / "rendezvous.toml", "a") as f:
                f.write(f'registry = "{redis.url}"\n')
                f.write(f'redis_password_file = "{redis.password_file}"\n')
        d.start_rendezvous(launch=pinned(cpu), wait=120)
        assert d.rendezvous_process is not None
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.1", 0))
            keepalives = Keepalives(d, agents, sock)
            keepalives.fetch_nonce()
            target = Target(
                registry, (d.rendezvous_host, d.rendezvous_port), d.rendezvous_process.pid
            )
            slow = Generator(generator.binary, generator.cpu, KEEPALIVE)
            for rnd in range(2):
                run_id = os.urandom(4)
                records = keepalives.records(count, run_id, root / "one.records")
                step = slow.run(
                    target,
                    int(count / KEEPALIVE),
                    sock=sock,
                    records=records,
                    run_id=run_id,
                    expect=REGISTER_SUCCESS,
                )
                print(
                    f"  {registry:<6} round {rnd + 1}: {count:,} agents, lost "
                    f"{100 * step.loss:.3f}%, process CPU {100 * step.server_cpu:.0f}%, "
                    f"RSS {rss_mib(d.rendezvous_process.pid):.0f} MiB",
                    flush=True,
                )
    finally:
        d.close()


class SimAgent:
    """
    Signed requests by hand, as an agent makes them, from a shared socket.
    """

    def __init__(self, name: str, key: bytes, sock: socket.socket, server: tuple[str, int]) -> None:
        self.name, self.key, self.sock, self.server = name, key, sock, server
        self.sequence = time.time_ns() // 1000
        self.nonce = bytes(20)

    def request(self, method: int, attributes: list[tuple[int, bytes]], tid: bytes) -> bytes:
        self.sequence += 1
        header = [
            (Attr.USERNAME, self.name.encode()),
            (Attr.SEQUENCE, stun.encode_u64(self.sequence)),
            (Attr.NONCE, self.nonce),
        ]
        return wire.signed(method, MessageClass.REQUEST, tid, header + attributes, self.key)

    def ask(self, method: int, attributes: list[tuple[int, bytes]]) -> stun.Message:
        for _ in range(3):
            tid = os.urandom(12)
            self.sock.sendto(self.request(method, attributes, tid), self.server)
            answer = self.wait(tid)
            if answer.cls == MessageClass.ERROR and wire.error_of(answer)[0] == 438:
                nonce = answer.get(Attr.NONCE)
                assert nonce is not None
                self.nonce = nonce
                continue
            return answer
        raise AssertionError("no fresh nonce")

    def wait(self, tid: bytes, timeout: float = 5.0) -> stun.Message:
        self.sock.settimeout(timeout)
        while True:
            message = stun.parse(self.sock.recv(4096))
            if message.transaction_id == tid:
                return message


def all_cpus() -> Launch:
    """
    Start a process free to use every CPU, whatever this one is pinned to.
    """
    cpus = range(os.cpu_count() or 1)

    def launch(argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen(argv, preexec_fn=lambda: os.sched_setaffinity(0, cpus), **kwargs)

    return launch


def udp_receive_errors() -> int:
    """
    Datagrams the kernel dropped for a full socket receive buffer, machine-wide.
    """
    lines = [line.split() for line in Path("/proc/net/snmp").read_text().splitlines()]
    names, values = [line for line in lines if line[0] == "Udp:"][:2]
    return int(values[names.index("RcvbufErrors")])


def fetch_nonce(sock: socket.socket, server: tuple[str, int], name: str, key: bytes) -> bytes:
    """
    The nonce the node gives this socket: the 438 answer to a request with
    a blank one (refused before its number is looked at).
    """
    agent = SimAgent(name, key, sock, server)
    tid = os.urandom(12)
    sock.sendto(agent.request(Method.REGISTER, [], tid), server)
    answer = agent.wait(tid)
    nonce = answer.get(Attr.NONCE)
    assert wire.error_of(answer)[0] == 438 and nonce is not None, wire.error_of(answer)
    return nonce


@dataclass
class Phase:
    """
    Part C{part} of C{parts} of a pass over the population (keepalive
    round C{number}, 0 for the first registrations): every agent of that
    part sends one REGISTER, spread evenly at C{rate} per second.
    """

    label: str
    rate: float
    number: int
    part: int = 0
    parts: int = 1

    def members(self, indices: range) -> range:
        size = len(indices)
        return indices[self.part * size // self.parts : (self.part + 1) * size // self.parts]


def population(
    root: Path,
    redis: RedisServer,
    binary: Path,
    count: int,
    rounds: int,
    register_rate: float,
) -> None:
    """
    C{count} agents registered across two nodes (directory in Redis), then
    kept alive at 20 s: every agent sends one REGISTER per round.
    """
    d = Deployment(root / "population", binding_rate=0, keepalive=KEEPALIVE)
    service = Service(d, redis)
    client = redis.client()
    with contextlib.ExitStack() as stack:
        stack.callback(service.close)
        client.execute("FLUSHDB")
        base_memory = used_memory(client)
        started = time.monotonic()
        agents = population_mod.make(count, d.rendezvous_key.public_key())
        print(
            f"  {count:,} agents' keys made and derived in {time.monotonic() - started:.0f} s "
            f"on {os.cpu_count()} CPUs",
            flush=True,
        )
        started = time.monotonic()
        directory.add(client, agents.entries())
        dir_memory = used_memory(client)
        print(
            f"  directory of {count:,} imported in {time.monotonic() - started:.0f} s: "
            f"{(dir_memory - base_memory) / count:.0f} bytes per agent in Redis",
            flush=True,
        )
        nodes = ("n1", "n2")
        for name in nodes:
            service.add_node(name, directory="redis")
            service.start_node(name, launch=all_cpus())
        pids = {n: service.nodes[n].process.pid for n in nodes}  # type: ignore[union-attr]
        started = time.monotonic()
        wait_for(
            lambda: all("directory loaded from Redis" in service.tail(n) for n in pids),
            60 + count / 2_000,
            "the directory to load",
        )
        print(f"  both nodes loaded the directory in {time.monotonic() - started:.0f} s")
        idle = {n: rss_mib(p) for n, p in pids.items()}
        members = {"n1": range(0, count // 2), "n2": range(count // 2, count)}
        addresses = {n: ("127.0.0.1", service.nodes[n].port) for n in nodes}
        # A nonce lasts four minutes at least: registrations go in parts.
        parts = math.ceil(count / register_rate / NONCE_SECONDS)
        phases = [
            Phase(f"registration {p + 1}/{parts}", register_rate, 0, p, parts) for p in range(parts)
        ]
        rate = count / KEEPALIVE
        phases += [Phase(f"keepalive round {r}", rate, r) for r in range(1, rounds + 1)]
        # One socket per node for the whole run: an agent whose source
        # address changed would be a move (a claim in Redis and a log line).
        sockets = {n: stack.enter_context(udp_socket()) for n in nodes}
        for phase in phases:
            feeds = {
                n: (sockets[n], Target(n, addresses[n], pids[n]), phase.members(members[n]))
                for n in nodes
            }
            run_phase(root, redis, binary, agents, phase, feeds)
        report_population(service, client, agents, pids, idle, base_memory, dir_memory)
        keys = agents.key_map()
        halves = {n: [agents.names[i] for i in members[n]] for n in nodes}
        latency(addresses, keys, halves)
        pages(addresses, keys, halves, count)


def udp_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    return sock


def run_phase(
    root: Path,
    redis: RedisServer,
    binary: Path,
    agents: population_mod.Population,
    phase: Phase,
    feeds: dict[str, tuple[socket.socket, Target, range]],
) -> None:
    """
    Both nodes' halves at once, one C generator each, with what says where
    losses happened: the nodes' and Redis's CPU, the generators' CPU, and
    the kernel's receive-buffer drops.
    """
    prepared = {}
    started = time.monotonic()
    for node, (sock, target, indices) in feeds.items():
        first = agents.names[indices[0]]
        nonce = fetch_nonce(sock, target.address, first, agents.keys[indices[0]])
        run_id = os.urandom(4)
        records = population_mod.keepalives(
            agents, indices, phase.number, nonce, run_id, root / f"pop-{node}"
        )
        prepared[node] = (sock, target, records, run_id, len(indices))
    signing = time.monotonic() - started
    rate = phase.rate / len(feeds)
    steps: dict[str, Step] = {}

    def one(node: str) -> None:
        sock, target, records, run_id, size = prepared[node]
        generator = Generator(binary, None, size / rate)
        steps[node] = generator.run(
            target, int(rate), sock=sock, records=records, run_id=run_id, expect=REGISTER_SUCCESS
        )

    watched = {n: t.pid for n, (_, t, _) in feeds.items()}
    watched["redis"] = redis.process.pid  # type: ignore[union-attr]
    cpu_before = {n: cpu_seconds(p) for n, p in watched.items()}
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    drops_before = udp_receive_errors()
    wall = time.monotonic()
    threads = [threading.Thread(target=one, args=(n,)) for n in feeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - wall
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    generators = (children.ru_utime + children.ru_stime) - (
        children_before.ru_utime + children_before.ru_stime
    )
    cpu = {n: 100 * (cpu_seconds(p) - cpu_before[n]) / wall for n, p in watched.items()}
    seconds = max(s.send_seconds for s in steps.values())
    print(
        f"  {phase.label}: {phase.rate:,.0f}/s offered for {seconds:.0f} s "
        f"(signed in {signing:.0f} s beforehand); UDP receive-buffer drops "
        f"{udp_receive_errors() - drops_before:,}; CPU: redis {cpu['redis']:.0f}%, "
        f"generators {100 * generators / wall:.0f}%, load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    for node, s in steps.items():
        print(
            f"    {node}: sent {s.sent:,}, answered {s.answered:,}, lost {100 * s.loss:.3f}% "
            f"(dropped at the node's socket {s.server_drops:,}, at the generator's "
            f"{s.client_drops:,}), node CPU {cpu[node]:.0f}%",
            flush=True,
        )


def report_population(
    service: Service,
    client: BlockingRedis,
    agents: population_mod.Population,
    pids: dict[str, int],
    idle: dict[str, float],
    base_memory: int,
    dir_memory: int,
) -> None:
    count = len(agents.names)
    registered = int(client.execute("ZCARD", "punchd:net:default"))
    for node in pids:
        for line in service.tail(node).splitlines():
            if "could not" in line or "Traceback" in line or "rror" in line:
                print("   ", node, line)
    memory = used_memory(client)
    print(f"  registered in Redis: {registered:,} agents")
    print(
        f"  Redis memory: {memory / 2**20:.0f} MiB in all; per agent "
        f"{(memory - dir_memory) / max(registered, 1):.0f} bytes of registration + "
        f"{(dir_memory - base_memory) / count:.0f} bytes of directory"
    )
    for node, pid in pids.items():
        now = rss_mib(pid)
        held = count // len(pids)
        print(
            f"  node {node}: RSS {now:.0f} MiB ({idle[node]:.0f} MiB with the directory "
            f"loaded, before registrations: {(now - idle[node]) * 2**20 / held:.0f} bytes "
            f"per registered agent)"
        )


def latency(
    addresses: dict[str, tuple[str, int]],
    keys: dict[str, bytes],
    halves: dict[str, list[str]],
    samples: int = 200,
) -> None:
    """
    Connect from an agent of n1 to an agent of n1 (same node) or n2 (cross).
    """
    lifetime = [(Attr.LIFETIME, stun.encode_u32(600))]
    with contextlib.ExitStack() as stack:
        # One socket per role, so that one nonce each serves every sample
        # (a 438 for each fresh socket would hit the error-reply limit).
        sockets = {}
        for role in ("initiator", "n1", "n2"):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
            sock.bind(("127.0.0.1", 0))
            sockets[role] = sock
        nonces: dict[str, bytes] = {}
        for label, target_node in (("same node", "n1"), ("cross node", "n2")):
            times = []
            failures = 0
            for i in range(samples):
                init_name = halves["n1"][i]
                targ_name = halves[target_node][-1 - i]
                initiator = SimAgent(
                    init_name, keys[init_name], sockets["initiator"], addresses["n1"]
                )
                target = SimAgent(
                    targ_name, keys[targ_name], sockets[target_node], addresses[target_node]
                )
                for role, agent in (("initiator", initiator), (target_node, target)):
                    agent.nonce = nonces.get(role, agent.nonce)
                    assert agent.ask(Method.REGISTER, lifetime).cls == MessageClass.SUCCESS
                    nonces[role] = agent.nonce
                time.sleep(0.02)  # the target's new claim reaches Redis
                elapsed = introduce(initiator, target)
                if elapsed is None:
                    failures += 1
                else:
                    times.append(elapsed * 1000)
            times.sort()
            p95 = times[int(len(times) * 0.95) - 1] if times else float("nan")
            print(
                f"  introduction {label}: median {statistics.median(times):.2f} ms, "
                f"p95 {p95:.2f} ms over {len(times)} ({failures} failed)"
            )


def introduce(initiator: SimAgent, target: SimAgent) -> float | None:
    tid = os.urandom(12)
    request = initiator.request(
        Method.CONNECT,
        [
            (Attr.PEER, target.name.encode()),
            (Attr.SERVICE, b"bench"),
            (Attr.TUNNEL_ID, os.urandom(16)),
        ],
        tid,
    )
    started = time.perf_counter()
    initiator.sock.sendto(request, initiator.server)
    deadline = started + 5
    while time.perf_counter() < deadline:
        ready, _, _ = select.select([initiator.sock, target.sock], [], [], 0.5)
        for sock in ready:
            message = stun.parse(sock.recv(4096))
            if sock is target.sock and message.method == Method.INCOMING:
                target.sock.sendto(accepted(message, target.key), target.server)
            elif sock is initiator.sock and message.transaction_id == tid:
                if message.cls == MessageClass.SUCCESS:
                    return time.perf_counter() - started
                print(f"    connect refused: {wire.error_of(message)}")
                return None
    return None


def pages(
    addresses: dict[str, tuple[str, int]],
    keys: dict[str, bytes],
    halves: dict[str, list[str]],
    count: int,
) -> None:
    """
    Time per peers page, early and late in the list of the whole population.
    """
    name = halves["n1"][0]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        agent = SimAgent(name, keys[name], sock, addresses["n1"])
        agent.ask(Method.REGISTER, [(Attr.LIFETIME, stun.encode_u32(600))])
        names = halves["n1"] + halves["n2"]
        for label, after in (
            ("first page", ""),
            ("at 10%", names[len(names) // 10]),
            ("at 50%", names[len(names) // 2]),
            ("last pages", names[-300]),
        ):
            times = []
            got = 0
            for _ in range(50):
                attributes = [(Attr.PEER, after.encode())] if after else []
                started = time.perf_counter()
                answer = agent.ask(Method.PEERS, attributes)
                times.append((time.perf_counter() - started) * 1000)
                got = len(answer.get_all(Attr.PEER))
            print(
                f"  peers page {label} of {count:,}: median {statistics.median(times):.2f} ms "
                f"({got} names per page)"
            )


# -- main ---------------------------------------------------------------------------


@contextlib.contextmanager
def redis_server(root: Path) -> Iterator[RedisServer]:
    redis = RedisServer(root / "redis")
    redis.start()
    try:
        yield redis
    finally:
        redis.stop()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--agents", type=int, default=100_000, help="simulated population")
    parser.add_argument("--rounds", type=int, default=2, help="keepalive rounds of 20 s")
    parser.add_argument(
        "--register-rate",
        type=float,
        default=5_000,
        help="first registrations per second, over both nodes",
    )
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per step")
    parser.add_argument("--quick", action="store_true", help="fewer steps, 20,000 agents")
    parser.add_argument("--skip-rates", action="store_true")
    parser.add_argument("--only-population", action="store_true")
    args = parser.parse_args(argv)
    rates = QUICK_RATES if args.quick else RATES
    count = 20_000 if args.quick else args.agents
    generator_cpu, server_cpu = cpus()
    print(
        f"rendezvous on Redis: {os.cpu_count()} CPUs; "
        f"load average {os.getloadavg()[0]:.2f} at start"
    )
    with tempfile.TemporaryDirectory(prefix="bench-redis-") as tmp:
        root = Path(tmp)
        binary = compile_loadgen(root)
        generator = Generator(binary, generator_cpu, args.duration)
        with redis_server(root) as redis:
            if not (args.skip_rates or args.only_population):
                print(f"Generator on CPU {generator_cpu}, servers on CPU {server_cpu}.")
                print("Signed keepalives, memory vs Redis registry (same CPU, in turn):")
                with pinned_self(generator_cpu):
                    results = keepalive_ladders(root, redis, generator, server_cpu, rates)
                for name, steps in results.items():
                    print_table(name, steps)
                report_ratio(results)
                print("\nTwo workers of one node (both CPUs, generator included):")
                with pinned_self(generator_cpu):
                    rows = two_workers(root, redis, generator, rates)
                for rate, answered, loss, per_cpu in rows:
                    print(
                        f"  {rate:>7,}/s offered: {answered:>8,.0f} answered/s, "
                        f"{100 * loss:.2f}% lost, {per_cpu:,.0f} per CPU-second"
                    )
            if not args.only_population:
                half = count // 2
                print(
                    f"\n{half:,} agents on one process, memory vs Redis registry "
                    f"(process on CPU {server_cpu}, generator on CPU {generator_cpu}):"
                )
                for registry in ("memory", "redis"):
                    one_node(root, redis, generator, half, registry, server_cpu)
            print(
                f"\nA population of {count:,} agents on two nodes (nothing pinned: nodes, "
                "Redis and the two generators share both CPUs):"
            )
            population(root, redis, binary, count, args.rounds, args.register_rate)


@contextlib.contextmanager
def pinned_self(cpu: int | None) -> Iterator[None]:
    """
    This process (and what it starts) on C{cpu} for a while.
    """
    previous = os.sched_getaffinity(0)
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, previous)


def report_ratio(results: dict[str, list[Step]]) -> None:
    memory, shared = results.get("memory registry"), results.get("redis registry")
    if not memory or not shared:
        return
    print("\nSummary")
    for name, steps in results.items():
        clean = without_loss(steps)
        per_cpu = max((s.per_cpu_second for s in steps if s.loss < 0.001), default=0.0)
        print(
            f"  {name:<16} without loss {clean or 0:>9,.0f}/s  saturation "
            f"{saturation(steps):>9,.0f}/s  {per_cpu:>9,.0f} per CPU-second"
        )
    m = max((s.per_cpu_second for s in memory if s.loss < 0.001), default=0.0)
    r = max((s.per_cpu_second for s in shared if s.loss < 0.001), default=0.0)
    if m:
        print(f"  Redis/memory keepalives per CPU-second: {r / m:.2f}")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except KeyboardInterrupt:
        sys.exit(130)
