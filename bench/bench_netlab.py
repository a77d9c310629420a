"""
Tunnel set-up through the NAT lab's real Linux NATs (docs/architecture.rst,
"The NAT lab"): setup time per scenario, and time to connect under 0%, 10%
and 30% loss.

One lab (L{netlab.scenarios.build_matrix_world}) runs a rendezvous
and an agent per host.  Two ways to open a tunnel are timed:

  - in-process: this process calls L{punchd.client.connect} and
    L{punchd.client.listen} on the agents' control sockets (Unix sockets,
    reachable from the root namespace) while the tunnels' UDP sockets live
    in the hosts' namespaces.  I{setup_ms} is what the initiating agent
    reports (request in to hand-off); I{connect wall} is the whole
    C{client.connect} call here (control socket and descriptor passing too).
    Every tunnel is checked with datagrams both ways, then closed;
  - L{World.tunnel}: the lab program on both hosts, as in the tests.  Its
    wall time includes starting two Python programs, the datagram exchange
    and the accepting program's 1 s quiet period.

Loss is dropped on both cone sites' internet links (L{Site.set_loss}), each
way, so one datagram between the hosts crosses two lossy links.

    python -m bench.bench_netlab [--repeat 20] [--loss-runs 20] [--program-runs 3]
        [--timeout 10] [--budget 420] [--keep-logs DIR]

Needs root.  Every section stops early once C{--budget} seconds have passed.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from netlab.lab import Lab, unavailable_reason
from netlab.scenarios import World, build_matrix_world, matrix_pairs
from punchd import client

NEEDS_ROOT = True
SERVICE = "bench"
#: Labels of L{matrix_pairs} measured, in this order.
SCENARIOS = (
    "public -> cone",
    "cone -> cone",
    "cone -> cgnat",
    "full-cone -> symmetric",
    "public -> symmetric",
    "same-lan",
    "cone(open) -> cone",
    "cone -> symmetric",
    "symmetric -> symmetric",
)
LOSS_LEVELS = (0, 10, 30)
LOSS_SITES = ("conea", "coneb")
LOSS_PAIR = ("conea1", "coneb1")
#: How long the responder's tunnel may lag behind the initiator's.
ACCEPT_TIMEOUT = 5.0
#: Datagrams checked on each in-process tunnel, and the resend interval.
EXCHANGE = 3
LOSS_EXCHANGE = 5
PING_RETRY = 0.05
EXCHANGE_TIMEOUT = 5.0


# -- measurements ------------------------------------------------------------


@dataclass
class Attempt:
    """
    One in-process connect, with the datagrams that crossed the tunnel after.
    """

    wall_ms: float
    stamp: float
    info: dict[str, Any] | None = None
    code: str | None = None
    message: str = ""
    echoed: int = 0
    sent: int = 0
    stale: int = 0

    @property
    def ok(self) -> bool:
        return self.info is not None

    @property
    def setup_ms(self) -> float:
        return float(self.info["setup_ms"]) if self.info else math.nan

    @property
    def rounds(self) -> int:
        return int(self.info.get("rounds", 1)) if self.info else 0

    @property
    def kinds(self) -> str:
        if not self.info:
            return "-"
        return f"{self.info['candidates']['local']}->{self.info['candidates']['remote']}"


class Budget:
    """
    A deadline for the whole benchmark, so that a bad run stays bounded.
    """

    def __init__(self, seconds: float) -> None:
        self.started = time.monotonic()
        self.deadline = self.started + seconds
        self.exhausted = False

    def over(self) -> bool:
        if time.monotonic() >= self.deadline:
            self.exhausted = True
        return self.exhausted

    def elapsed(self) -> float:
        return time.monotonic() - self.started


def percentile(values: Sequence[float], p: float) -> float:
    """
    Nearest-rank percentile: a value that was actually measured.
    """
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def stats(values: Sequence[float]) -> str:
    """
    C{median p95 max}, aligned; dashes when there is nothing to show.
    """
    if not values:
        return " ".join(f"{'-':>8}" for _ in range(3))
    numbers = (statistics.median(values), percentile(values, 95), max(values))
    return " ".join(f"{n:>8.1f}" for n in numbers)


#: Column headings over two L{stats} groups: the agent's setup_ms and the call's wall time.
STATS_GROUPS = f"  {'setup_ms (agent)':^26}  {'connect wall (client)':^26}"
STATS_HEADER = "  " + "  ".join(f"{'median':>8} {'p95':>8} {'max':>8}" for _ in range(2))


def both(attempts: Sequence[Attempt]) -> str:
    """
    The setup_ms and wall-time L{stats} of the successful attempts.
    """
    good = [a for a in attempts if a.ok]
    return f"  {stats([a.setup_ms for a in good])}  {stats([a.wall_ms for a in good])}"


def ping_pong(a: socket.socket, b: socket.socket, count: int, deadline: float) -> tuple[int, int]:
    """
    Send C{count} numbered datagrams from C{a}, each resent until C{b} has
    echoed it back; returns (round trips completed, datagrams C{a} sent).
    """
    done = sent = 0
    for i in range(count):
        payload = b"bench %d" % i
        while time.monotonic() < deadline:
            a.send(payload)
            sent += 1
            if _echo(b) and _expect(a, payload):
                done += 1
                break
    return done, sent


def _echo(sock: socket.socket) -> bool:
    """
    Echo whatever arrives within L{PING_RETRY}; whether anything did.
    """
    echoed = False
    sock.settimeout(PING_RETRY)
    try:
        while True:
            sock.send(sock.recv(2048))
            echoed = True
            sock.settimeout(0)
    except (TimeoutError, BlockingIOError):
        return echoed


def _expect(sock: socket.socket, payload: bytes) -> bool:
    """
    Whether C{payload} comes back within L{PING_RETRY} (older echoes skipped).
    """
    end = time.monotonic() + PING_RETRY
    try:
        while (left := end - time.monotonic()) > 0:
            sock.settimeout(left)
            if sock.recv(2048) == payload:
                return True
    except TimeoutError:
        pass
    return False


def accept_matching(listener: client.Listener, tunnel_id: str) -> tuple[client.Tunnel | None, int]:
    """
    The responder's half of tunnel C{tunnel_id}, and how many stale tunnels
    (halves of earlier failed attempts) were closed on the way.
    """
    stale = 0
    deadline = time.monotonic() + ACCEPT_TIMEOUT
    while (left := deadline - time.monotonic()) > 0:
        try:
            tunnel = listener.accept(timeout=left)
        except client.TunnelError:
            break
        if tunnel.info.get("id") == tunnel_id:
            return tunnel, stale
        tunnel.close()
        stale += 1
    return None, stale


def timed_connect(
    world: World,
    listener: client.Listener,
    initiator: str,
    responder: str,
    timeout: float,
    exchange: int,
) -> Attempt:
    """
    Open one tunnel in-process, check it with datagrams, close both halves.
    """
    socket_path = world.deployment.agents[initiator].socket_path
    stamp = time.time()
    started = time.perf_counter()
    try:
        tunnel = client.connect(responder, SERVICE, socket_path=socket_path, timeout=timeout)
    except client.TunnelError as e:
        wall = (time.perf_counter() - started) * 1000
        return Attempt(wall, stamp, code=e.code, message=e.message)
    attempt = Attempt((time.perf_counter() - started) * 1000, stamp, info=tunnel.info)
    with tunnel:
        other, attempt.stale = accept_matching(listener, str(tunnel.info.get("id")))
        if other is None:
            attempt.message = "the responder's program never got its tunnel"
            return attempt
        with other:
            attempt.echoed, attempt.sent = ping_pong(
                tunnel.socket, other.socket, exchange, time.monotonic() + EXCHANGE_TIMEOUT
            )
    return attempt


def run_attempts(
    world: World,
    initiator: str,
    responder: str,
    runs: int,
    timeout: float,
    exchange: int,
    budget: Budget,
    warm_up: bool = False,
) -> list[Attempt]:
    """
    C{runs} in-process connects one after another (after one uncounted).
    """
    attempts: list[Attempt] = []
    socket_path = world.deployment.agents[responder].socket_path
    with client.listen(SERVICE, socket_path=socket_path) as listener:
        if warm_up:
            timed_connect(world, listener, initiator, responder, timeout, exchange)
        for _ in range(runs):
            if budget.over():
                break
            attempts.append(timed_connect(world, listener, initiator, responder, timeout, exchange))
    return attempts


def describe_failures(attempts: Sequence[Attempt]) -> list[str]:
    """
    Failed attempts, and tunnels that carried no data, one line each.
    """
    lines = []
    for a in attempts:
        when = (
            time.strftime("%H:%M:%S", time.localtime(a.stamp)) + f".{int(a.stamp % 1 * 1000):03d}"
        )
        if not a.ok:
            lines.append(
                f"    started {when}, failed after {a.wall_ms:.0f} ms: {a.code}: {a.message}"
            )
        elif a.message or a.echoed == 0:
            tid = str(a.info.get("id", "?"))[:12] if a.info else "?"
            lines.append(
                f"    started {when}, tunnel {tid}: {a.message or 'no datagram got through'}"
                f" ({a.echoed} echoed of {a.sent} sent)"
            )
    stale = sum(a.stale for a in attempts)
    if stale:
        lines.append(f"    {stale} responder tunnel(s) of earlier failed connects arrived late")
    return lines


def slowest(attempts: Sequence[Attempt], n: int = 3) -> str:
    """
    The C{n} slowest successful setups, with tunnel ids to find in the logs.
    """
    ok = sorted((a for a in attempts if a.ok), key=lambda a: a.setup_ms, reverse=True)[:n]
    parts = []
    for a in ok:
        tid = str(a.info.get("id", "?"))[:12] if a.info else "?"
        parts.append(f"{a.setup_ms:.0f} ms ({tid}, {a.rounds} round{'s' * (a.rounds > 1)})")
    return ", ".join(parts)


# -- sections ------------------------------------------------------------------


def pairs() -> list[tuple[str, str, str]]:
    """
    (label, initiator, responder) of every measured scenario.
    """
    known = {label: (i, r) for label, i, r, _ in matrix_pairs()}
    return [(label, *known[label]) for label in SCENARIOS]


def setup_times(world: World, args: argparse.Namespace, budget: Budget) -> bool:
    """
    Section 1: R in-process connects per scenario.  Returns whether anything failed.
    """
    print(
        f"\n1. setup per scenario, in-process: {args.repeat} connects each"
        f" (after 1 uncounted warm-up), timeout {args.timeout:g} s,"
        f" {EXCHANGE} datagrams echoed per tunnel"
    )
    print(f"   {'':<24} {'':>5} {'':<14} {'':>6}{STATS_GROUPS}")
    print(f"   {'scenario':<24} {'ok':>5} {'path':<14} {'2 rnds':>6}{STATS_HEADER}")
    trouble = False
    notes: list[str] = []
    for label, initiator, responder in pairs():
        if budget.over():
            notes.append(f"   {label}: skipped, time budget spent")
            continue
        attempts = run_attempts(
            world, initiator, responder, args.repeat, args.timeout, EXCHANGE, budget, warm_up=True
        )
        good = [a for a in attempts if a.ok]
        kinds = Counter(a.kinds for a in good).most_common(1)
        path = kinds[0][0] if kinds else "-"
        print(
            f"   {label:<24} {f'{len(good)}/{len(attempts)}':>5} {path:<14}"
            f" {sum(a.rounds > 1 for a in good):>6}{both(attempts)}"
        )
        problems = describe_failures(attempts)
        if problems or len(good) < args.repeat:
            trouble = True
            notes += [f"   {label}:", *problems]
        if len(kinds) and len(Counter(a.kinds for a in good)) > 1:
            notes.append(f"   {label}: paths {dict(Counter(a.kinds for a in good))}")
        notes.append(f"   {label}: slowest {slowest(attempts)}")
    print(
        "   (setup_ms: the initiating agent's own figure, request to hand-off;"
        " connect wall: the client.connect call in this process; ms)"
    )
    for line in notes:
        print(line)
    return trouble


def program_times(world: World, args: argparse.Namespace, budget: Budget) -> bool:
    """
    Section 2: World.tunnel, the lab program on both hosts.  Returns whether anything failed.
    """
    runs = args.program_runs
    print(f"\n2. World.tunnel (two lab programs started per run, 1 datagram): {runs} runs each")
    print(
        f"   {'scenario':<24} {'ok':>5}  {'setup_ms: median':>16} {'max':>8}"
        f"  {'World.tunnel wall s: median':>27} {'max':>6}"
    )
    trouble = False
    for label, initiator, responder in pairs():
        setups: list[float] = []
        walls: list[float] = []
        failed: list[str] = []
        for _ in range(runs):
            if budget.over():
                break
            started = time.perf_counter()
            outcome = world.tunnel(initiator, responder, count=1, timeout=args.timeout)
            walls.append(time.perf_counter() - started)
            if outcome.ok and outcome.setup_ms is not None:
                setups.append(outcome.setup_ms)
            else:
                failed.append(f"{outcome.code}: {outcome.message}")
        if not walls:
            print(f"   {label:<24} skipped, time budget spent")
            continue
        setup_cols = (
            f"{statistics.median(setups):>16.1f} {max(setups):>8.1f}"
            if setups
            else f"{'-':>16} {'-':>8}"
        )
        print(
            f"   {label:<24} {f'{len(setups)}/{len(walls)}':>5}  {setup_cols}"
            f"  {statistics.median(walls):>27.2f} {max(walls):>6.2f}"
        )
        for line in failed:
            trouble = True
            print(f"     failed: {line}")
    print(
        "   (wall: the whole World.tunnel call — Python start-up of both programs, the"
        " control socket, set-up, the exchange, and the accepting program's 1 s quiet period)"
    )
    return trouble


def loss_times(world: World, args: argparse.Namespace, budget: Budget) -> bool:
    """
    Section 3: cone -> cone with loss on both sites' internet links.  Returns
    whether anything failed at 0% or 10%.
    """
    initiator, responder = LOSS_PAIR
    print(
        f"\n3. cone -> cone ({initiator} -> {responder}) with loss on both sites' internet"
        f" links, each way: {args.loss_runs} in-process connects per level,"
        f" timeout {args.timeout:g} s, {LOSS_EXCHANGE} datagrams echoed per tunnel"
    )
    print(f"   {'':>4} {'':>6} {'':>6}{STATS_GROUPS}")
    print(f"   {'loss':>4} {'ok':>6} {'2 rnds':>6}{STATS_HEADER}  {'echoed':>6} {'sent':>6}")
    trouble = False
    notes: list[str] = []
    try:
        for percent in LOSS_LEVELS:
            if budget.over():
                notes.append(f"   {percent}%: skipped, time budget spent")
                continue
            for site in LOSS_SITES:
                world.sites[site].set_loss(percent)
            attempts = run_attempts(
                world, initiator, responder, args.loss_runs, args.timeout, LOSS_EXCHANGE, budget
            )
            good = [a for a in attempts if a.ok]
            echoed = sum(a.echoed for a in good)
            sent = sum(a.sent for a in good)
            print(
                f"   {f'{percent}%':>4} {f'{len(good)}/{len(attempts)}':>6}"
                f" {sum(a.rounds > 1 for a in good):>6}{both(attempts)}"
                f"  {echoed:>6} {sent:>6}"
            )
            problems = describe_failures(attempts)
            if problems:
                trouble = trouble or percent < 30
                notes += [f"   {percent}%:", *problems]
            notes.append(f"   {percent}%: slowest {slowest(attempts)}")
    finally:
        for site in LOSS_SITES:
            world.sites[site].set_loss(0)
    print(
        "   (echoed/sent: round trips completed / datagrams sent, resent every"
        f" {PING_RETRY * 1000:.0f} ms until echoed; a round trip crosses four lossy hops,"
        " so at 30% about 0.7^4 = 24% of sends come back)"
    )
    for line in notes:
        print(line)
    return trouble


# -- running -------------------------------------------------------------------


def save_logs(world: World, dest: Path) -> None:
    """
    Copy the daemons' logs out of the lab before it is torn down.
    """
    dest.mkdir(parents=True, exist_ok=True)
    for log in world.deployment.root.glob("*.log"):
        shutil.copy2(log, dest / log.name)
    print(f"\ndaemon logs copied to {dest}")


def bench(args: argparse.Namespace) -> None:
    budget = Budget(args.budget)
    with Lab() as lab:
        world = build_matrix_world(lab)
        trouble = False
        try:
            started = time.perf_counter()
            world.start()
            print(
                f"lab {lab.prefix}: {len(lab.netns_names)} namespaces, {len(world.hosts)} agents,"
                f" all registered {time.perf_counter() - started:.1f} s after start"
            )
            trouble |= setup_times(world, args, budget)
            trouble |= program_times(world, args, budget)
            trouble |= loss_times(world, args, budget)
        finally:
            try:
                if args.keep_logs or trouble:
                    dest = args.keep_logs or Path(tempfile.mkdtemp(prefix="punchd-netlab-logs-"))
                    save_logs(world, dest)
            finally:
                world.close()
    if budget.exhausted:
        print(f"\nstopped early: the time budget of {args.budget:g} s ran out")
    print(f"\ntotal {budget.elapsed():.0f} s; load average after: {load()}")


def load() -> str:
    return " ".join(f"{n:.2f}" for n in os.getloadavg())


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_netlab", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--repeat", type=int, default=20, help="connects per scenario (20)")
    parser.add_argument("--loss-runs", type=int, default=20, help="connects per loss level (20)")
    parser.add_argument(
        "--program-runs", type=int, default=3, help="World.tunnel runs per scenario (3)"
    )
    parser.add_argument("--timeout", type=float, default=10.0, help="connect timeout, s (10)")
    parser.add_argument(
        "--budget", type=float, default=420.0, help="stop measuring after this many s (420)"
    )
    parser.add_argument("--keep-logs", type=Path, help="copy the daemons' logs here")
    args = parser.parse_args(argv)
    if not (1 <= args.repeat <= 1000 and 1 <= args.loss_runs <= 1000):
        parser.error("--repeat and --loss-runs must be between 1 and 1000")
    if not (0 <= args.program_runs <= 100 and 1 <= args.timeout <= 60 and args.budget > 0):
        parser.error("--program-runs 0..100, --timeout 1..60 s, --budget > 0")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(argv)
    reason = unavailable_reason()
    if reason is not None:
        print(f"bench_netlab skipped: {reason}")
        return
    print(
        f"tunnel set-up through real NATs (network namespaces + nftables):"
        f" {os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()},"
        f" keepalive 2 s"
    )
    print(f"load average before: {load()} (other work on the machine skews every number)")
    try:
        bench(args)
    except KeyboardInterrupt:
        print("\ninterrupted; the lab has been torn down")
        sys.exit(130)
    finally:
        sys.stdout.flush()


if __name__ == "__main__":
    main()
