"""
Rendezvous throughput on loopback, next to coturn: numbers, not pass/fail.

Each measurement is a ladder of offered rates, each held for C{--duration}
seconds by an open-loop generator written in C (bench/loadgen.c, compiled
with C{cc -O2} into a temporary directory at run time): it sends at the
target rate whatever the server does, so an overloaded server shows up as
loss instead of as a politely slower client.  At each rate every server
takes its turn, so that they share whatever else the machine is doing.

* Binding requests: punchd's rendezvous (the real C{python -m twisted
  rendezvous} process, binding_rate 0) and coturn's turnserver (STUN only,
  one relay thread) in the same run, and a C reflector that shows what the
  generator itself can drive: a ceiling below the reflector's is the
  server's, not the generator's.
* Authenticated REGISTER keepalives: signed like an agent signs them, with
  a nonce fetched first, spread round-robin over many agents of the peers file.

"Without loss" is the highest offered rate with less than 0.1 % loss;
"saturation" the most answers per second seen at any step.  The kernel's
drop counters of both sockets (/proc/net/udp) say where the losses happened,
and the server's CPU time per step says whether it had its CPU to itself.
With two or more CPUs the generator (and this script) run on the first and
the server on the second.  Other load on the machine shows up as loss, so a
step with loss is run again (C{--repeat}) and its better trial is kept.

    .venv/bin/python -m bench.bench_rendezvous [--duration 2] [--quick] [--profile]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import pstats
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from netlab.deployment import Deployment, free_udp_port
from punchd import stun, wire
from punchd.keys import PrivateKey, derive_rendezvous_key
from punchd.stun import Attr, MessageClass, Method

LOSS_FREE = 0.001
BINDING_RATES = [5_000, 10_000, 20_000, 30_000, 40_000, 50_000, 60_000, 80_000, 100_000]
BINDING_RATES += [120_000, 140_000, 160_000, 200_000]
REGISTER_RATES = [2_000, 5_000, 10_000, 15_000, 20_000, 25_000, 30_000, 40_000, 60_000]
QUICK_RATES = [10_000, 30_000, 60_000, 120_000]
QUICK_REGISTER_RATES = [5_000, 15_000, 30_000]
AGENTS = 1000
BINDING_SUCCESS = 0x0101
REGISTER_SUCCESS = int.from_bytes(
    stun.build(Method.REGISTER, MessageClass.SUCCESS, bytes(12))[:2], "big"
)
LOADGEN = Path(__file__).with_name("loadgen.c")


# -- processes, CPUs and kernel counters ------------------------------------------


def cpus() -> tuple[int | None, int | None]:
    """
    (generator CPU, server CPU), or Nones on a single-CPU machine.
    """
    available = sorted(os.sched_getaffinity(0))
    if len(available) < 2:
        return None, None
    return available[0], available[1]


def pin(cpu: int | None) -> Callable[[], None] | None:
    if cpu is None:
        return None
    return lambda: os.sched_setaffinity(0, {cpu})


def compile_loadgen(directory: Path) -> Path:
    binary = directory / "loadgen"
    subprocess.run(["cc", "-O2", "-Wall", "-o", str(binary), str(LOADGEN)], check=True, timeout=120)
    return binary


def udp_counters(port: int) -> tuple[int, int]:
    """
    (bytes queued to read, datagrams dropped) over the IPv4 UDP sockets on C{port}.
    """
    queued = dropped = 0
    with open("/proc/net/udp") as table:
        for line in list(table)[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port:
                queued += int(fields[4].split(":")[1], 16)
                dropped += int(fields[-1])
    return queued, dropped


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_idle(port: int, limit: float = 5.0) -> None:
    """
    Let the server finish its backlog from an overloaded step.
    """
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and udp_counters(port)[0] > 0:
        time.sleep(0.05)
    time.sleep(0.2)


def stop(process: subprocess.Popen[Any] | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


def wait_for_binding(server: tuple[str, int], limit: float = 15.0) -> None:
    deadline = time.monotonic() + limit
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.2)
        while time.monotonic() < deadline:
            sock.sendto(stun.build(Method.BINDING, MessageClass.REQUEST, os.urandom(12)), server)
            try:
                sock.recv(2048)
                return
            except TimeoutError:
                continue
    raise TimeoutError(f"no STUN server answers on {server}")


# -- one step of a ladder --------------------------------------------------------


@dataclass
class Step:
    target: int
    sent: int
    answered: int
    errors: int
    send_seconds: float
    server_drops: int
    client_drops: int
    server_cpu: float

    @property
    def loss(self) -> float:
        return (self.sent - self.answered) / self.sent if self.sent else 1.0

    @property
    def offered(self) -> float:
        return self.sent / self.send_seconds if self.send_seconds else 0.0

    @property
    def throughput(self) -> float:
        return self.answered / self.send_seconds if self.send_seconds else 0.0

    @property
    def per_cpu_second(self) -> float:
        """
        Answers per second of server CPU: what the server costs, even when
        other load on the machine takes CPU time from it.
        """
        busy = self.server_cpu * self.send_seconds
        return self.answered / busy if busy > 0 else 0.0

    @property
    def generator_limited(self) -> bool:
        return self.offered < 0.97 * self.target

    @property
    def starved(self) -> bool:
        """
        Lost datagrams while the server had CPU time to spare: other load on
        the machine took its CPU, so the loss is not the server's limit.
        """
        return self.server_drops > 0 and self.server_cpu < 0.85


@dataclass
class Target:
    """
    A server under load: where it listens and which process to bill for CPU.
    """

    name: str
    address: tuple[str, int]
    pid: int


class Generator:
    def __init__(self, binary: Path, cpu: int | None, duration: float) -> None:
        self.binary = binary
        self.cpu = cpu
        self.duration = duration

    def run(
        self,
        target: Target,
        rate: int,
        *,
        sock: socket.socket | None = None,
        records: Path | None = None,
        run_id: bytes | None = None,
        expect: int = BINDING_SUCCESS,
    ) -> Step:
        own = sock is None
        if sock is None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("127.0.0.1", 0))
        try:
            port = sock.getsockname()[1]
            argv = [
                str(self.binary),
                "send",
                "--target",
                f"{target.address[0]}:{target.address[1]}",
                "--rate",
                str(rate),
                "--duration",
                str(self.duration),
                "--fd",
                str(sock.fileno()),
                "--run-id",
                (run_id or os.urandom(4)).hex(),
                "--expect",
                hex(expect),
            ]
            if records is not None:
                argv += ["--file", str(records)]
            server_before = udp_counters(target.address[1])[1]
            client_before = udp_counters(port)[1]
            cpu_before = cpu_seconds(target.pid)
            result = subprocess.run(
                argv,
                pass_fds=(sock.fileno(),),
                preexec_fn=pin(self.cpu),
                capture_output=True,
                text=True,
                timeout=self.duration * 3 + 30,
                check=True,
            )
            cpu_after = cpu_seconds(target.pid)
            report = json.loads(result.stdout)
            step = Step(
                target=rate,
                sent=report["sent"],
                answered=report["answered"],
                errors=report["errors"],
                send_seconds=report["send_seconds"],
                server_drops=udp_counters(target.address[1])[1] - server_before,
                client_drops=udp_counters(port)[1] - client_before,
                server_cpu=(cpu_after - cpu_before) / max(report["send_seconds"], 1e-9),
            )
        finally:
            if own:
                sock.close()
        wait_idle(target.address[1])
        return step


def best_of(run: Callable[[int], Step], rate: int, repeat: int) -> Step:
    """
    One step; run again while it shows loss, keeping the better trial.
    """
    best = run(rate)
    for _ in range(max(1, repeat) - 1):
        if best.loss < LOSS_FREE:
            break
        trial = run(rate)
        if trial.loss < best.loss:
            best = trial
    return best


def ladders(
    runs: dict[str, Callable[[int], Step]],
    rates: Sequence[int],
    repeat: int,
    results: dict[str, list[Step]],
) -> None:
    """
    Climb the rates with every server in turn at each rate (so that they
    share whatever else the machine is doing), dropping a server after two
    steps in a row that lose more than 30 %.  Steps are appended to
    C{results[name]} as they finish, so an interrupted run still reports them.
    """
    overloaded = dict.fromkeys(runs, 0)
    for rate in rates:
        active = [name for name in runs if overloaded[name] < 2]
        if not active:
            break
        print(f"  {rate:>9,}/s:", end="", flush=True)
        for name in active:
            step = best_of(runs[name], rate, repeat)
            results[name].append(step)
            overloaded[name] = overloaded[name] + 1 if step.loss > 0.3 else 0
            print(f"  {name} {100 * step.loss:.2f}% lost", end="", flush=True)
        print()


def without_loss(steps: Sequence[Step]) -> float | None:
    clean = [s.offered for s in steps if s.loss < LOSS_FREE]
    return max(clean) if clean else None


def saturation(steps: Sequence[Step]) -> float:
    return max((s.throughput for s in steps), default=0.0)


# -- servers --------------------------------------------------------------------


def write_peers(root: Path, count: int) -> dict[str, PrivateKey]:
    """
    A peers file of C{count} agents, replacing the empty one Deployment wrote.
    """
    agents = {f"agent{i:05d}": PrivateKey.generate() for i in range(count)}
    lines = []
    for name, key in agents.items():
        lines += [f"[peers.{name}]", f'public_key = "{key.public_key().to_base64()}"', ""]
    (root / "peers.toml").write_text("\n".join(lines))
    return agents


def pinned_launch(cpu: int | None) -> Callable[..., subprocess.Popen[bytes]]:
    def launch(argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen(list(argv), preexec_fn=pin(cpu), **kwargs)

    return launch


def profiled_launch(cpu: int | None, output: Path) -> Callable[..., subprocess.Popen[bytes]]:
    """
    The same server under twistd's cProfile support: C{twist} re-raises
    SIGTERM on exit, which would lose the profile; twistd writes it first.
    """

    def launch(argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        twistd = [
            argv[0],
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "-n",
            "--pidfile=",
            f"--profile={output}",
            "--profiler=cprofile",
            "--savestats",
        ]
        plugin = list(argv[argv.index("rendezvous") :])  # twist's own options stay behind
        return subprocess.Popen([*twistd, *plugin], preexec_fn=pin(cpu), **kwargs)

    return launch


@contextlib.contextmanager
def punchd_server(
    root: Path, cpu: int | None, launch: Callable[..., subprocess.Popen[bytes]] | None = None
) -> Iterator[tuple[Deployment, dict[str, PrivateKey]]]:
    with Deployment(root, binding_rate=0) as d:
        agents = write_peers(root, AGENTS)
        d.start_rendezvous(launch=launch or pinned_launch(cpu), wait=30)
        wait_for_binding((d.rendezvous_host, d.rendezvous_port))
        yield d, agents


@contextlib.contextmanager
def coturn_server(root: Path, cpu: int | None) -> Iterator[Target | None]:
    turnserver = shutil.which("turnserver")
    if turnserver is None:
        yield None
        return
    port = free_udp_port()
    # -n: not /etc/turnserver.conf (Debian's sends the log to syslog); its STUN
    # settings are repeated here so that coturn answers as Debian ships it.
    argv = [
        turnserver,
        "-n",
        "--stun-only",
        "--listening-ip=127.0.0.1",
        f"--listening-port={port}",
        "--relay-threads=1",
        "--no-cli",
        "--no-tls",
        "--no-dtls",
        "--no-tcp",
        "--no-rfc5780",
        "--no-stun-backward-compatibility",
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
        wait_for_binding(("127.0.0.1", port))
        yield Target("coturn", ("127.0.0.1", port), process.pid)
    finally:
        stop(process)


@contextlib.contextmanager
def reflector(binary: Path, cpu: int | None, seconds: float) -> Iterator[Target]:
    port = free_udp_port()
    process = subprocess.Popen(
        [str(binary), "reflect", "--port", str(port), "--duration", str(seconds)],
        stdout=subprocess.DEVNULL,
        preexec_fn=pin(cpu),
    )
    try:
        wait_for_binding(("127.0.0.1", port))
        yield Target("C reflector", ("127.0.0.1", port), process.pid)
    finally:
        stop(process)


# -- REGISTER keepalives ----------------------------------------------------------


class Keepalives:
    """
    Signed REGISTER requests from one socket for many agents, numbered like
    the agent numbers them, under the nonce the server gave this socket.
    """

    def __init__(self, d: Deployment, agents: dict[str, PrivateKey], sock: socket.socket) -> None:
        server_key = d.rendezvous_key.public_key()
        self.keys = {n: derive_rendezvous_key(k, server_key, n) for n, k in agents.items()}
        self.names = sorted(agents)
        start = time.time_ns() // 1000
        self.sequence = dict.fromkeys(self.names, start)
        self.server = (d.rendezvous_host, d.rendezvous_port)
        self.sock = sock
        self.nonce: bytes | None = None
        self._next = 0

    def request(self, name: str, tid: bytes) -> bytes:
        self.sequence[name] += 1
        attributes = [
            (Attr.USERNAME, name.encode("ascii")),
            (Attr.SEQUENCE, stun.encode_u64(self.sequence[name])),
            (Attr.LIFETIME, stun.encode_u32(600)),
        ]
        # Blank until the server issued one, as the agent does it.
        attributes.append((Attr.NONCE, self.nonce if self.nonce is not None else bytes(20)))
        return wire.signed(Method.REGISTER, MessageClass.REQUEST, tid, attributes, self.keys[name])

    def ask(self, name: str) -> stun.Message:
        """
        One exchange by hand, verified as the agent verifies it.
        """
        tid = os.urandom(12)
        self.sock.settimeout(2.0)
        self.sock.sendto(self.request(name, tid), self.server)
        for _ in range(100):
            message = stun.parse(self.sock.recv(2048))
            if message.transaction_id == tid:
                assert stun.verify_integrity_sha256(message, self.keys[name])
                return message
        raise AssertionError("no answer for the request")

    def fetch_nonce(self) -> None:
        answer = self.ask(self.names[0])
        code, reason = wire.error_of(answer)
        assert answer.cls == MessageClass.ERROR and code == 438, (code, reason)
        self.nonce = answer.get(Attr.NONCE)

    def check(self) -> tuple[str, int]:
        answer = self.ask(self.names[0])
        assert answer.cls == MessageClass.SUCCESS, wire.error_of(answer)
        value = answer.get(Attr.XOR_MAPPED_ADDRESS)
        assert value is not None
        mapped = stun.decode_xor_address(value, answer.transaction_id)
        assert mapped == self.sock.getsockname(), (mapped, self.sock.getsockname())
        return mapped

    def records(self, count: int, run_id: bytes, path: Path) -> Path:
        """
        C{count} requests, round-robin over the agents, as loadgen's record file.
        """
        out = bytearray()
        for _ in range(count):
            name = self.names[self._next % len(self.names)]
            self._next += 1
            data = self.request(name, run_id + os.urandom(8))
            out += len(data).to_bytes(2, "big") + data
        path.write_bytes(out)
        return path


# -- the report --------------------------------------------------------------------


def print_table(title: str, steps: Sequence[Step]) -> None:
    print(f"\n{title}")
    print(
        f"{'target/s':>9} {'offered/s':>10} {'sent':>9} {'answered':>9} {'loss %':>7} "
        f"{'answers/s':>10} {'srv drops':>9} {'gen drops':>9} {'srv cpu':>7} {'per cpu-s':>10}"
    )
    for s in steps:
        mark = "*" if s.generator_limited else "!" if s.starved else " "
        print(
            f"{s.target:>9,} {s.offered:>9,.0f}{mark} {s.sent:>9,} {s.answered:>9,} "
            f"{100 * s.loss:>7.2f} {s.throughput:>10,.0f} {s.server_drops:>9,} "
            f"{s.client_drops:>9,} {100 * s.server_cpu:>6.0f}% {s.per_cpu_second:>10,.0f}"
        )
    if any(s.generator_limited for s in steps):
        print("  * the generator could not offer the target rate (a generator limit)")
    if any(s.starved and not s.generator_limited for s in steps):
        print("  ! losses while the server got < 85 % of its CPU: other load took it")


def side_by_side(results: dict[str, list[Step]]) -> None:
    names = [name for name in results if name.endswith(" Binding")]
    if len(names) < 2:
        return
    print("\nBinding side by side: loss % / answers per second / server CPU")
    print(f"{'offered':>9} |" + " |".join(f"{n.removesuffix(' Binding'):^26}" for n in names))
    rates = sorted({s.target for name in names for s in results[name]})
    for rate in rates:
        cells = []
        for name in names:
            step = next((s for s in results[name] if s.target == rate), None)
            if step is None:
                cells.append(f"{'-':^26}")
            else:
                mark = "*" if step.generator_limited else "!" if step.starved else " "
                loss, cpu = 100 * step.loss, 100 * step.server_cpu
                cells.append(f"{loss:>7.2f}% {step.throughput:>9,.0f} {cpu:>5.0f}%{mark}")
        print(f"{rate:>9,} |" + " |".join(cells))


def rate_text(value: float | None) -> str:
    return "none" if value is None else f"{value:,.0f}/s"


def summary(results: dict[str, list[Step]]) -> None:
    print("\nSummary (without loss = highest offered rate with < 0.1 % loss)")
    for name, steps in results.items():
        print(
            f"  {name:<24} without loss {rate_text(without_loss(steps)):>12}   "
            f"saturation {rate_text(saturation(steps)):>12}"
        )
    if "C reflector Binding" in results:
        print("  (the C reflector's numbers are the ceiling of this generator on this machine)")
    punchd, coturn = results.get("punchd Binding"), results.get("coturn Binding")
    if punchd and coturn:
        # Had coturn no loss at all, its real figures are higher than measured.
        bound = "" if any(s.loss >= LOSS_FREE for s in coturn) else "<= "
        clean_p, clean_c = without_loss(punchd), without_loss(coturn)
        if clean_p and clean_c:
            print(f"  punchd/coturn without loss: {bound}{clean_p / clean_c:.2f}")
        if saturation(coturn):
            ratio = saturation(punchd) / saturation(coturn)
            print(f"  punchd/coturn at saturation: {bound}{ratio:.2f}")
        if bound:
            print("  (coturn lost nothing at any offered rate: its limit is above the ladder)")


def print_profile(path: Path, top: int = 18) -> None:
    if not path.exists():
        print(f"no profile written at {path}")
        return
    stats = pstats.Stats(str(path))
    stats.sort_stats("tottime").print_stats(top)


# -- main -----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per step")
    parser.add_argument("--repeat", type=int, default=3, help="trials for a step with loss")
    parser.add_argument("--quick", action="store_true", help="fewer, shorter steps")
    parser.add_argument("--profile", action="store_true", help="cProfile punchd at saturation")
    parser.add_argument("--rates", help="comma-separated Binding rates, instead of the ladder")
    parser.add_argument("--no-coturn", action="store_true")
    parser.add_argument("--no-reflector", action="store_true")
    parser.add_argument("--no-register", action="store_true")
    args = parser.parse_args(argv)
    duration = 1.0 if args.quick else args.duration
    rates = QUICK_RATES if args.quick else BINDING_RATES
    if args.rates:
        rates = [int(float(r)) for r in args.rates.split(",")]
    register_rates = QUICK_REGISTER_RATES if args.quick else REGISTER_RATES

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    # bench.run_all calls main() in its own process: leave it as found.
    previous_handler = signal.signal(signal.SIGTERM, interrupted)
    previous_cpus = os.sched_getaffinity(0)
    try:
        run(args, duration, rates, register_rates)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        os.sched_setaffinity(0, previous_cpus)


def run(
    args: argparse.Namespace,
    duration: float,
    rates: Sequence[int],
    register_rates: Sequence[int],
) -> None:
    generator_cpu, server_cpu = cpus()
    if generator_cpu is not None:
        os.sched_setaffinity(0, {generator_cpu})
    load = os.getloadavg()[0]
    print(
        f"rendezvous benchmark: {duration:g} s per step, open-loop C generator (sendmmsg/"
        f"recvmmsg) on CPU {generator_cpu}, servers on CPU {server_cpu}; "
        f"load average {load:.2f} at start"
    )
    if load > 0.5:
        print("  (the machine is busy: expect noisy numbers)")
    results: dict[str, list[Step]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-rendezvous-") as tmp:
        root = Path(tmp)
        generator = Generator(compile_loadgen(root), generator_cpu, duration)
        try:
            run_ladders(args, root, generator, server_cpu, rates, register_rates, results)
        except KeyboardInterrupt:
            print("\ninterrupted: every process was stopped")
            raise
        finally:
            for name, steps in results.items():
                print_table(name, steps)
            side_by_side(results)
            summary(results)
            print(f"load average at the end: {os.getloadavg()[0]:.2f}")


def run_ladders(
    args: argparse.Namespace,
    root: Path,
    generator: Generator,
    server_cpu: int | None,
    rates: Sequence[int],
    register_rates: Sequence[int],
    results: dict[str, list[Step]],
) -> None:
    with contextlib.ExitStack() as stack:
        runs: dict[str, Callable[[int], Step]] = {}
        if not args.no_reflector:
            reflected = stack.enter_context(reflector(generator.binary, server_cpu, 3600))
            runs["C reflector"] = functools.partial(generator.run, reflected)
        if not args.no_coturn:
            (root / "coturn").mkdir()
            coturn = stack.enter_context(coturn_server(root / "coturn", server_cpu))
            if coturn is None:
                print("coturn: turnserver not installed (Debian package coturn), skipped")
            else:
                runs["coturn"] = functools.partial(generator.run, coturn)
        d, agents = stack.enter_context(punchd_server(root / "punchd", server_cpu))
        assert d.rendezvous_process is not None
        punchd = Target("punchd", (d.rendezvous_host, d.rendezvous_port), d.rendezvous_process.pid)
        runs["punchd"] = functools.partial(generator.run, punchd)
        for run in runs.values():  # first-datagram costs stay out of the ladder
            run(min(rates))
        print("Binding ladder (loss per server at each offered rate):")
        ladders(runs, rates, args.repeat, {n: results.setdefault(f"{n} Binding", []) for n in runs})
        if not args.no_register:
            print("REGISTER keepalive ladder:")
            register_ladder(
                d,
                agents,
                punchd,
                generator,
                register_rates,
                args.repeat,
                root,
                results.setdefault("punchd REGISTER keepalive", []),
            )
    if args.profile:
        profile_punchd(root, generator, server_cpu, results["punchd Binding"])


def register_ladder(
    d: Deployment,
    agents: dict[str, PrivateKey],
    target: Target,
    generator: Generator,
    rates: Sequence[int],
    repeat: int,
    root: Path,
    steps: list[Step],
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        keepalives = Keepalives(d, agents, sock)
        keepalives.fetch_nonce()
        records = root / "register.records"
        for _ in range(2):  # the first pass derives every agent's key: slow, may lose some
            run_id = os.urandom(4)
            warmup = generator.run(
                target,
                1_000,
                sock=sock,
                records=keepalives.records(len(agents), run_id, records),
                run_id=run_id,
                expect=REGISTER_SUCCESS,
            )
        mapped = keepalives.check()
        print(
            f"  {warmup.answered}/{len(agents)} agents registered from one socket, "
            f"mapped address {mapped[0]}:{mapped[1]} verified"
        )

        def run(rate: int) -> Step:
            run_id = os.urandom(4)
            count = int(rate * generator.duration)
            return generator.run(
                target,
                rate,
                sock=sock,
                records=keepalives.records(count, run_id, records),
                run_id=run_id,
                expect=REGISTER_SUCCESS,
            )

        ladders({"punchd": run}, rates, repeat, {"punchd": steps})


def profile_punchd(
    root: Path, generator: Generator, server_cpu: int | None, binding: Sequence[Step]
) -> None:
    """
    Drive a fresh rendezvous under cProfile a little above its saturation.
    """
    output = root / "rendezvous.prof"
    rate = int(max(saturation(binding), 10_000) * 1.5)
    with punchd_server(root / "profiled", server_cpu, profiled_launch(server_cpu, output)) as (
        d,
        _,
    ):
        assert d.rendezvous_process is not None
        target = Target(
            "profiled", (d.rendezvous_host, d.rendezvous_port), d.rendezvous_process.pid
        )
        step = generator.run(target, rate)
        d.stop_rendezvous()
    print(
        f"\nprofile of punchd's rendezvous offered {rate:,}/s (answered {step.throughput:,.0f}/s "
        "under the profiler), by own time:"
    )
    print_profile(output)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except KeyboardInterrupt:
        sys.exit(130)
