"""
Tunnel set-up between two agents on loopback: latency and tunnels per second.

A rendezvous and two agents (alice, bob) run as real processes
(L{netlab.deployment.Deployment}); bob's program listens with
L{punchd.client.listen} and closes every tunnel it gets, alice's program
opens tunnels with L{punchd.client.connect}.  Numbers, not pass/fail:

  - baselines: a bare C{status} round trip (the control socket alone) and a
    connect that bob refuses with C{no-listener} (control socket, gathering
    and the introduction through the rendezvous, but no punching);
  - sequential connects: wall-clock from the call to the descriptor in hand,
    the agent's own C{setup_ms}, and where the time goes (from the progress
    events as the program sees them);
  - throughput with K concurrent programs, each opening tunnels back to back,
    with the kernel's UDP receive-buffer drops meanwhile;
  - RSS and open descriptors of every daemon along the way, so leaks show.

    python -m bench.bench_tunnels [--count 200] [--total 400]
        [--concurrency 1,8,32,100] [--keep] [--debug]

With C{--debug} the daemons log at debug level; C{--keep} (or any failure)
keeps the deployment directory and its NAME.log files.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import twisted
from netlab.deployment import Deployment
from punchd import client

SERVICE = "bench"
REFUSED_SERVICE = "nobody-listens"
CONNECT_TIMEOUT = 10.0
#: How long bob's program may lag behind alice's before a phase ends anyway.
DRAIN_TIMEOUT = 10.0
#: How long the daemons get to give back descriptors after the last tunnel.
SETTLE_TIMEOUT = 5.0
#: Progress events of a connect, in the order the agent sends them.
PHASES = (
    ("gathered", "control socket + gather (srflx Binding)"),
    ("introduced", "introduction via rendezvous"),
    ("nominating", "connectivity checks"),
    (None, "nomination, confirm, linger, hand-off"),
)


# -- measurements ------------------------------------------------------------


@dataclass
class Attempt:
    """
    One C{connect} (or C{status}) call as the program saw it.
    """

    seconds: float
    info: dict[str, Any] | None = None
    code: str | None = None
    message: str = ""
    events: dict[str, float] = field(default_factory=dict)
    #: time.time() at the call, to find the tunnel in the daemons' logs.
    wall: float = 0.0

    @property
    def ok(self) -> bool:
        return self.code is None


def percentile(values: Sequence[float], p: float) -> float:
    """
    Nearest-rank percentile: a value that was actually measured.
    """
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def summary(values: Sequence[float]) -> str:
    """
    C{min / median / p95 / max} in milliseconds, aligned.
    """
    if not values:
        return f"{'(none)':>10}"
    return (
        f"{min(values):8.2f} {statistics.median(values):8.2f} "
        f"{percentile(values, 95):8.2f} {max(values):8.2f}"
    )


SUMMARY_HEADER = f"  {'':40} {'min':>8} {'median':>8} {'p95':>8} {'max':>8}  (ms)"


def row(label: str, values: Sequence[float]) -> str:
    return f"  {label:40} {summary(values)}"


def timed_connect(socket_path: str, service: str, timeout: float) -> Attempt:
    """
    Open one tunnel, close it at once, and say how long it took.
    """
    events: dict[str, float] = {}
    wall = time.time()
    started = time.perf_counter()

    def progress(event: dict[str, Any]) -> None:
        name = event.get("event")
        if isinstance(name, str) and name not in events:
            events[name] = (time.perf_counter() - started) * 1000

    try:
        tunnel = client.connect(
            "bob", service, socket_path=socket_path, timeout=timeout, on_progress=progress
        )
    except client.TunnelError as e:
        return Attempt(time.perf_counter() - started, code=e.code, message=e.message, wall=wall)
    elapsed = time.perf_counter() - started
    tunnel.close()
    return Attempt(elapsed, info=tunnel.info, events=events, wall=wall)


def timed_status(socket_path: str) -> Attempt:
    started = time.perf_counter()
    try:
        client.status(socket_path=socket_path)
    except client.TunnelError as e:
        return Attempt(time.perf_counter() - started, code=e.code, message=e.message)
    return Attempt(time.perf_counter() - started)


def failures(attempts: Sequence[Attempt]) -> str:
    """
    Failed attempts by error code, with the first message of each code.
    """
    counts = Counter(a.code for a in attempts if not a.ok)
    if not counts:
        return ""
    first = {}
    for a in attempts:
        if not a.ok and a.code not in first:
            first[a.code] = a.message
    return "; ".join(f"{n} x {code}: {first[code]}" for code, n in counts.most_common())


# -- the daemons as the kernel sees them -------------------------------------


def udp_drops() -> int:
    """
    Datagrams the kernel dropped for a full receive buffer, in this whole
    network namespace (so other programs' count too).
    """
    with open("/proc/net/snmp") as snmp:
        rows = [line.split() for line in snmp if line.startswith("Udp:")]
    return int(dict(zip(rows[0], rows[1], strict=True))["RcvbufErrors"])


def socket_drops(pids: Iterable[int]) -> int:
    """
    Datagrams dropped on the UDP sockets these processes hold now (their
    main sockets, and tunnels not yet handed off), from /proc/net/udp.
    """
    inodes = set()
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    total = 0
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        with open(table) as rows:
            next(rows)
            for row in rows:
                fields = row.split()
                if fields[9] in inodes:
                    total += int(fields[12])
    return total


def process_usage(pid: int) -> tuple[float, int]:
    """
    Resident memory in MiB (VmRSS) and the number of open descriptors.
    """
    rss_kb = 0
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                rss_kb = int(line.split()[1])
                break
    return rss_kb / 1024, len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid: int) -> float:
    """
    User plus system CPU time the process has used so far.
    """
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Usage:
    """
    Snapshots of every daemon (and of this process, the programs' side).
    """

    def __init__(self, deployment: Deployment) -> None:
        self.pids: dict[str, int] = {}
        for name, agent in deployment.agents.items():
            assert agent.process is not None
            self.pids[name] = agent.process.pid
        assert deployment.rendezvous_process is not None
        self.pids["rendezvous"] = deployment.rendezvous_process.pid
        self.pids["programs"] = os.getpid()
        self.rows: list[tuple[str, dict[str, tuple[float, int]]]] = []

    def cpu(self) -> dict[str, float]:
        return {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    def now(self) -> dict[str, tuple[float, int]]:
        return {name: process_usage(pid) for name, pid in self.pids.items()}

    def record(self, label: str) -> None:
        self.rows.append((label, self.now()))

    def settle(self, label: str, timeout: float = SETTLE_TIMEOUT) -> float:
        """
        Wait (bounded) until every descriptor count is back at its first
        value, then record; returns how long that took.
        """
        baseline = {name: fds for name, (_, fds) in self.rows[0][1].items()}
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if all(fds == baseline[name] for name, (_, fds) in self.now().items()):
                break
            time.sleep(0.05)
        waited = time.monotonic() - started
        self.record(f"{label} (+{waited:.1f} s)")
        return waited

    def table(self) -> list[str]:
        names = list(self.pids)
        lines = [
            f"{'':30}" + "".join(f"{n:>18}" for n in names),
            f"{'':30}" + "".join(f"{'RSS MiB   fds':>18}" for _ in names),
        ]
        for label, usage in self.rows:
            cells = "".join(f"{usage[n][0]:>12.1f}{usage[n][1]:>6}" for n in names)
            lines.append(f"{label:30}{cells}")
        return lines


# -- bob's program -----------------------------------------------------------


class Acceptor:
    """
    A program on bob's side that accepts every tunnel to a service and
    closes it at once, in its own thread.
    """

    def __init__(self, socket_path: str, service: str) -> None:
        self.listener = client.listen(service, socket_path=socket_path)
        self.accepted = 0
        self.setup_ms: list[float] = []
        self.error: client.TunnelError | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="acceptor", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                tunnel = self.listener.accept(timeout=0.2)
            except client.TunnelError as e:
                if e.code == "timeout":
                    continue
                self.error = e
                return
            tunnel.close()
            self.setup_ms.append(float(tunnel.info.get("setup_ms", math.nan)))
            self.accepted += 1

    def wait_for(self, count: int, timeout: float = DRAIN_TIMEOUT) -> bool:
        deadline = time.monotonic() + timeout
        while self.accepted < count and time.monotonic() < deadline and self.error is None:
            time.sleep(0.01)
        return self.accepted >= count

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2.0)
        self.listener.close()


# -- the runs ----------------------------------------------------------------


def run_concurrently(
    concurrency: int, total: int, call: Callable[[], Attempt], stop: threading.Event
) -> tuple[list[Attempt], float]:
    """
    C{total} calls spread over C{concurrency} threads that each make theirs
    back to back; returns the attempts and the wall-clock time of the lot.
    """
    attempts: list[Attempt] = []
    start = threading.Barrier(concurrency + 1)

    def worker(count: int) -> None:
        try:
            start.wait(10)
        except threading.BrokenBarrierError:
            return
        for _ in range(count):
            if stop.is_set():
                return
            attempts.append(call())

    base, extra = divmod(total, concurrency)
    threads = [
        threading.Thread(target=worker, args=(base + (i < extra),), daemon=True)
        for i in range(concurrency)
    ]
    for thread in threads:
        thread.start()
    start.wait(10)
    began = time.perf_counter()
    deadline = time.monotonic() + (base + 1) * (CONNECT_TIMEOUT + client.REPLY_MARGIN) + 10
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return attempts, time.perf_counter() - began


def ms(attempts: Sequence[Attempt]) -> list[float]:
    return [a.seconds * 1000 for a in attempts if a.ok]


def setup_ms(attempts: Sequence[Attempt]) -> list[float]:
    return [float(a.info["setup_ms"]) for a in attempts if a.info is not None]


def phase_lines(attempts: Sequence[Attempt]) -> list[str]:
    """
    Where a connect's time goes, from the progress events' arrival times.
    """
    lines = []
    complete = [a for a in attempts if a.ok and all(e in a.events for e, _ in PHASES if e)]
    previous: dict[int, float] = dict.fromkeys(range(len(complete)), 0.0)
    for event, label in PHASES:
        spans = []
        for i, a in enumerate(complete):
            at = a.events[event] if event else a.seconds * 1000
            spans.append(at - previous[i])
            previous[i] = at
        lines.append(row(label, spans))
    return lines


def slowest(attempts: Sequence[Attempt], count: int = 3) -> list[str]:
    """
    The slowest successful connects, with what to look for in the logs.
    """
    lines = []
    for a in sorted((a for a in attempts if a.ok), key=lambda a: -a.seconds)[:count]:
        assert a.info is not None
        marks = " ".join(f"{e}@{t:.1f}" for e, t in a.events.items())
        lines.append(
            f"  {a.seconds * 1000:8.2f} ms  at {a.wall:.3f}  tunnel {a.info['id'][:12]}"
            f"  setup_ms {a.info['setup_ms']}  rtt_ms {a.info.get('rtt_ms')}"
            f"  {a.info.get('candidates')}  [{marks}]"
        )
    return lines


def debug_launch(argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    """
    Start a daemon under C{twist} at debug level (a twist option, so it
    goes before the plugin name).
    """
    argv = list(argv)
    at = argv.index("twisted") + 1
    argv[at:at] = ["--log-level", "debug"]
    kwargs["env"] = dict(kwargs.get("env") or os.environ, PUNCHD_DEBUG="1")
    return subprocess.Popen(argv, **kwargs)


@contextmanager
def interruptible() -> Iterator[None]:
    """
    Turn SIGTERM into KeyboardInterrupt while the daemons run, so that the
    deployment is torn down either way.
    """

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass
class Run:
    """
    What every part of one benchmark run shares.
    """

    args: argparse.Namespace
    alice: str
    acceptor: Acceptor
    usage: Usage
    stop: threading.Event = field(default_factory=threading.Event)
    trouble: bool = False

    def connect(self, service: str = SERVICE) -> Attempt:
        return timed_connect(self.alice, service, CONNECT_TIMEOUT)


def baselines(run: Run) -> None:
    count = run.args.count
    print(f"\nbaselines, {count} calls each, one after another")
    print(SUMMARY_HEADER)
    statuses = [timed_status(run.alice) for _ in range(count)]
    print(row("status round trip (control socket)", ms(statuses)))
    refusals = [run.connect(REFUSED_SERVICE) for _ in range(count)]
    print(
        row(
            "connect refused by bob (no-listener)",
            [a.seconds * 1000 for a in refusals if a.code == "no-listener"],
        )
    )
    odd = [a for a in statuses if not a.ok] + [a for a in refusals if a.code != "no-listener"]
    if odd:
        run.trouble = True
        print(f"  unexpected: {failures(odd) or 'a refused connect succeeded'}")
    run.usage.record("after baselines")


def sequential(run: Run) -> None:
    print(f"\nsequential connects: {run.args.count}, one after another")
    before = run.acceptor.accepted
    attempts = [run.connect() for _ in range(run.args.count)]
    ok = sum(a.ok for a in attempts)
    drained = run.acceptor.wait_for(before + ok)
    print(SUMMARY_HEADER)
    print(row("connect() call to descriptor in hand", ms(attempts)))
    print(row("setup_ms reported by alice (initiator)", setup_ms(attempts)))
    print(row("setup_ms reported by bob (responder)", run.acceptor.setup_ms[before:]))
    print("  where a connect's time goes (progress events as the program sees them):")
    for line in phase_lines(attempts):
        print(line)
    print("  slowest:")
    for line in slowest(attempts):
        print(line)
    if ok < len(attempts) or not drained:
        run.trouble = True
        print(f"  FAILED: {failures(attempts)}")
        print(f"  bob accepted {run.acceptor.accepted - before} of {ok}")
    run.usage.record("after sequential")


def throughput(run: Run) -> None:
    total = run.args.total
    print(f"\nthroughput: {total} tunnels per row, K programs opening back to back")
    print(
        f"  {'K':>4} {'ok':>5} {'fail':>5} {'seconds':>8} {'tunnels/s':>10}"
        f"  {'median':>8} {'p95':>8} {'max':>8} {'setup p95':>10}  (ms)"
        f"  {'UDP drops ours/all':>18}"
    )
    daemons = [pid for name, pid in run.usage.pids.items() if name != "programs"]
    notes = []
    for k in run.args.concurrency:
        before = run.acceptor.accepted
        drops, ours = udp_drops(), socket_drops(daemons)
        cpu = run.usage.cpu()
        attempts, elapsed = run_concurrently(k, total, run.connect, run.stop)
        used = {name: seconds - cpu[name] for name, seconds in run.usage.cpu().items()}
        latencies = ms(attempts)
        ok = len(latencies)
        drained = run.acceptor.wait_for(before + ok)
        setups = setup_ms(attempts)
        print(
            f"  {k:>4} {ok:>5} {len(attempts) - ok:>5} {elapsed:>8.2f} {ok / elapsed:>10.1f}"
            f"  {statistics.median(latencies) if latencies else math.nan:>8.2f}"
            f" {percentile(latencies, 95) if latencies else math.nan:>8.2f}"
            f" {max(latencies, default=math.nan):>8.2f}"
            f" {percentile(setups, 95) if setups else math.nan:>10.2f}"
            f"  {'':6}{f'{socket_drops(daemons) - ours}/{udp_drops() - drops}':>18}"
        )
        busy = ", ".join(f"{name} {seconds / elapsed:.0%}" for name, seconds in used.items())
        notes += [f"  K={k}: CPU busy {busy}; slowest:", *slowest(attempts, 1)]
        if ok < total or not drained:
            run.trouble = True
            notes.append(f"  K={k}: {failures(attempts) or 'all connects returned'}")
            notes.append(f"  K={k}: bob accepted {run.acceptor.accepted - before} of {ok}")
        run.usage.record(f"after K={k}")
    print(
        "  (setup p95: alice's setup_ms; UDP drops: receive-buffer drops on the daemons'"
        " sockets / in the whole network namespace, other programs' included)"
    )
    for line in notes:
        print(line)


def bench(root: Path, args: argparse.Namespace) -> bool:
    """
    Run every measurement; returns whether anything failed.
    """
    launch = debug_launch if args.debug else subprocess.Popen
    with Deployment(root, keepalive=5.0) as d:
        d.add_agent("alice")
        d.add_agent("bob")
        d.start_rendezvous(launch=launch)
        d.start_agent("alice", launch=launch)
        d.start_agent("bob", launch=launch)
        acceptor = Acceptor(d.agents["bob"].socket_path, SERVICE)
        run = Run(args, d.agents["alice"].socket_path, acceptor, Usage(d))
        run.usage.record("start (registered, listening)")
        try:
            # Warm up: imports, first-time code paths, the kernel's caches.
            for _ in range(5):
                run.connect()
            acceptor.wait_for(5)
            baselines(run)
            sequential(run)
            throughput(run)
            if run.usage.settle("end, settled") >= SETTLE_TIMEOUT:
                run.trouble = True
        finally:
            run.stop.set()
            acceptor.close()
        counts = {name: d.status(name)["tunnels"] for name in ("alice", "bob")}
        print("\nmemory (VmRSS) and open descriptors")
        for line in run.usage.table():
            print(f"  {line}")
        print("  (programs = this benchmark process, where the client side runs)")
        for name, tunnels in counts.items():
            print(f"  {name} status: {tunnels}")
    return run.trouble


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_tunnels", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--count", type=int, default=200, help="sequential connects (200)")
    parser.add_argument(
        "--total", type=int, default=400, help="tunnels per concurrency level (400)"
    )
    parser.add_argument(
        "--concurrency",
        type=lambda text: [int(k) for k in text.split(",")],
        default=[1, 8, 32, 100],
        help="comma-separated numbers of concurrent programs (1,8,32,100)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the directory and its logs")
    parser.add_argument("--debug", action="store_true", help="daemons log at debug level")
    args = parser.parse_args(argv)
    if args.count < 1 or args.total < 1 or not all(1 <= k <= 100 for k in args.concurrency):
        parser.error("counts must be positive and concurrency between 1 and 100")
    return args


def load() -> str:
    return " ".join(f"{n:.2f}" for n in os.getloadavg())


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(argv)
    print(
        f"tunnel set-up on loopback: {os.cpu_count()} cores, {platform.machine()},"
        f" Python {platform.python_version()}, Twisted {twisted.__version__},"
        f" keepalive 5 s{', daemons at debug level' if args.debug else ''}"
    )
    print(f"load average before: {load()} (other work on the machine skews every number)")
    root = Path(tempfile.mkdtemp(prefix="punchd-bench-"))
    trouble = True
    try:
        with interruptible():
            trouble = bench(root, args)
        print(f"\nload average after: {load()}")
    finally:
        if args.keep or trouble:
            print(f"\ndeployment and logs kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
