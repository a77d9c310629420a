"""
Prometheus metrics for both daemons, on the address of their C{metrics} setting.

The daemons already count what they do in plain C{collections.Counter}s (the
rendezvous's drops and introductions, the agent's registration outcomes...).
Collectors here read those at scrape time and turn them into metric
families, so that the hot paths only ever do C{counter[key] += 1}.  Each
daemon has its own L{CollectorRegistry} (never the global one), served by
C{prometheus_client}'s Twisted resource at C{/metrics} on that address only.

A new part (the relay, say) adds its counters by listing L{FromCounter}
families over its C{Counter} and yielding L{read_counter} from a collector.
"""

from __future__ import annotations

import ipaddress
import socket
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from twisted.application.service import Service
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure

from punchd import checks, stun, wire
from punchd.config import refuse_to_start
from punchd.stun import Attr, MessageClass

if TYPE_CHECKING:
    from punchd.agent.core import Agent
    from punchd.rendezvous.server import RendezvousProtocol

log = Logger()

PREFIX = "punchd_"
#: Tunnel set-up time buckets, in seconds: a LAN path takes milliseconds, a
#: second round or a slow peer seconds.
SETUP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Collector(Protocol):
    def collect(self) -> Iterable[Metric]: ...


# -- reading counters ------------------------------------------------------


@dataclass(frozen=True)
class FromCounter:
    """
    One counter family read from a C{Counter}: either the given C{keys}
    (counter key -> label value, reported even while 0), or every key that
    starts with C{prefix} (the rest of the key is the label value, with
    C{-} written C{_}).  Without a C{label}, C{keys} has one entry.
    """

    name: str
    help: str
    label: str = ""
    keys: Mapping[str, str] = field(default_factory=dict)
    prefix: str = ""

    def samples(self, counter: Mapping[str, int]) -> dict[str, int]:
        found = {value: counter.get(key, 0) for key, value in self.keys.items()}
        if self.prefix:
            for key, count in counter.items():
                if key.startswith(self.prefix):
                    found[key[len(self.prefix) :].replace("-", "_")] = count
        return found

    def covers(self, key: str) -> bool:
        return key in self.keys or (bool(self.prefix) and key.startswith(self.prefix))


def read_counter(
    counter: Mapping[str, int], families: Sequence[FromCounter], other: str
) -> Iterator[Metric]:
    """
    The C{families} as read from C{counter} now, and every key none of them
    covers as C{PREFIX + other}C{_total{event=...}}: nothing counted is hidden.
    """
    for spec in families:
        family = CounterMetricFamily(
            PREFIX + spec.name, spec.help, labels=[spec.label] if spec.label else []
        )
        for value, count in sorted(spec.samples(counter).items()):
            family.add_metric([value] if spec.label else [], count)
        yield family
    rest = CounterMetricFamily(
        PREFIX + other, "Other events, by the daemon's own name for them.", labels=["event"]
    )
    for key, count in sorted(counter.items()):
        if not any(spec.covers(key) for spec in families):
            rest.add_metric([key], count)
    if rest.samples:
        yield rest


def gauge(name: str, help: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, help, value=value)


# -- tunnels ---------------------------------------------------------------


@dataclass
class Durations:
    """
    A histogram kept in plain Python: observed cheaply, read at scrape time.
    """

    buckets: tuple[float, ...] = SETUP_BUCKETS
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.buckets) + 1)
        index = next((i for i, b in enumerate(self.buckets) if seconds <= b), len(self.buckets))
        self.counts[index] += 1
        self.total += seconds

    def cumulative(self) -> list[tuple[str, float]]:
        counts = self.counts or [0] * (len(self.buckets) + 1)
        bounds = [*(f"{b:g}" for b in self.buckets), "+Inf"]
        running, out = 0, []
        for bound, count in zip(bounds, counts):
            running += count
            out.append((bound, float(running)))
        return out


@dataclass
class TunnelStats:
    """
    What became of the agent's tunnels: by role, path and outcome (C{ok} or
    the error code the program saw), and how long the good ones took.
    """

    outcomes: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    setup: dict[str, Durations] = field(default_factory=dict)
    #: Introductions from peers, by our answer.
    introductions: Counter[str] = field(default_factory=Counter)

    def succeeded(self, role: str, info: Mapping[str, Any]) -> None:
        self.outcomes[(role, str(info.get("path", "direct")), "ok")] += 1
        setup_ms = info.get("setup_ms")
        if isinstance(setup_ms, int | float):
            self.setup.setdefault(role, Durations()).observe(setup_ms / 1000)

    def failed(self, role: str, code: str) -> None:
        self.outcomes[(role, "none", code)] += 1

    def ended(self, result: Any, role: str) -> Any:
        """
        Count a tunnel's result (a L{HandOff} or a L{Failure}) and pass it on.
        """
        if isinstance(result, Failure):
            self.failed(role, str(getattr(result.value, "code", "cancelled")))
        else:
            self.succeeded(role, result.info)
        return result

    def answered(self, answer: tuple[int, Sequence[tuple[int, bytes]]]) -> Any:
        """
        Count our answer to a peer's introduction (class, attributes) and pass it on.
        """
        cls, attributes = answer
        outcome = "accepted"
        if cls == MessageClass.ERROR:
            codes = [stun.decode_error_code(v)[0] for a, v in attributes if a == Attr.ERROR_CODE]
            outcome = wire.ERROR_NAMES.get(codes[0] if codes else 403, "rejected")
        self.introductions[outcome.replace("-", "_")] += 1
        return answer

    def families(self) -> Iterator[Metric]:
        tunnels = CounterMetricFamily(
            PREFIX + "tunnels",
            "Tunnels set up (outcome ok) or not (the error code), by role and path.",
            labels=["role", "path", "outcome"],
        )
        for labels, count in sorted(self.outcomes.items()):
            tunnels.add_metric(list(labels), count)
        yield tunnels
        setup = HistogramMetricFamily(
            PREFIX + "tunnel_setup_seconds",
            "Time from a tunnel's start to its hand-off, by role.",
            labels=["role"],
        )
        for role in ("initiator", "responder"):
            durations = self.setup.get(role, Durations())
            setup.add_metric([role], durations.cumulative(), durations.total)
        yield setup
        introductions = CounterMetricFamily(
            PREFIX + "introductions_received",
            "Introductions from peers, by this agent's answer.",
            labels=["outcome"],
        )
        for outcome, count in sorted(self.introductions.items()):
            introductions.add_metric([outcome], count)
        yield introductions


# -- serving -----------------------------------------------------------------


class FunctionCollector:
    """
    A collector that yields what C{collect} returns, for a daemon's parts.
    """

    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Metric]:
        return list(self._collect())


def parse_address(text: str) -> tuple[str, int]:
    """
    C{"IP:port"} or C{"[IPv6]:port"}, checked by the config loader already.
    """
    host, port = checks.address(text, checks.Place(None, ""))
    ipaddress.ip_address(host)
    return host, port


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(socket.SOMAXCONN)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


class MetricsService(Service):
    """
    Serves C{registry} at C{/metrics} on an already bound socket: bound when
    the daemon is made, so that an address in use stops it with one line.
    """

    def __init__(self, sock: socket.socket, registry: CollectorRegistry, reactor: Any) -> None:
        self._socket = sock
        self.registry = registry
        self._reactor = reactor
        self._port: IListeningPort | None = None

    def startService(self) -> None:
        from prometheus_client.twisted import MetricsResource
        from twisted.web.resource import Resource
        from twisted.web.server import Site

        super().startService()  # type: ignore[no-untyped-call]
        root = Resource()
        root.putChild(b"metrics", MetricsResource(registry=self.registry))
        site = Site(root)
        site.log = lambda request: None  # type: ignore[method-assign]  # a line per scrape
        self._port = self._reactor.adoptStreamPort(self._socket.fileno(), self._socket.family, site)
        address = self._socket.getsockname()
        self._socket.close()  # the port holds its own duplicate
        log.info(
            "metrics at http://{host}:{port}/metrics",
            host=f"[{address[0]}]" if ":" in address[0] else address[0],
            port=address[1],
        )

    def stopService(self) -> Any:
        super().stopService()  # type: ignore[no-untyped-call]
        port, self._port = self._port, None
        return None if port is None else port.stopListening()


def metrics_service(
    address: str, program: str, collector: Collector, reactor: Any
) -> MetricsService | None:
    """
    The daemon's metrics service for its C{metrics} setting (None when it
    is empty), with its own registry; refuses to start if the address
    cannot be had.
    """
    if not address:
        return None
    host, port = parse_address(address)
    try:
        sock = _bind(host, port)
    except OSError as e:
        refuse_to_start(program, f"cannot serve metrics on TCP {address}: {e.strerror}")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)  # type: ignore[arg-type]
    return MetricsService(sock, registry, reactor)


# -- what each daemon reports ------------------------------------------------

RENDEZVOUS_COUNTERS = (
    FromCounter(
        "registrations", "Agents that registered (refreshes not included).", keys={"registered": ""}
    ),
    FromCounter(
        "keepalives", "Registrations accepted, refreshes included.", keys={"keepalive": ""}
    ),
    FromCounter("signoffs", "Agents that signed off on stopping.", keys={"signed-off": ""}),
    FromCounter(
        "introductions_requested", "Connects forwarded to their target.", keys={"introduction": ""}
    ),
    FromCounter(
        "introductions",
        "Connects by outcome: the target's answer, or why none was forwarded.",
        "outcome",
        keys={
            "introduction-accepted": "accepted",
            "introduction-refused": "refused",
            "introduction-timeout": "timeout",
            "introduction-bad-answer": "bad_answer",
            "introduction-peer-unknown": "peer_unknown",
            "introduction-peer-offline": "peer_offline",
            "introduction-busy": "busy",
            "introduction-bad-request": "bad_request",
        },
    ),
    FromCounter(
        "bindings_answered",
        "Binding requests answered: anonymous (plain STUN) or signed agent gathers.",
        "kind",
        keys={"binding": "anonymous", "gather": "agent"},
    ),
    FromCounter(
        "bindings_rate_limited",
        "Binding requests left unanswered by the per-source rate limit.",
        "kind",
        keys={"binding-rate-limited": "anonymous", "gather-rate-limited": "agent"},
    ),
    FromCounter("dropped", "Datagrams dropped, by reason.", "reason", prefix="dropped-"),
    FromCounter(
        "refused",
        "Agent requests refused (answered 401 at most), by reason.",
        "reason",
        prefix="refused-",
    ),
    FromCounter(
        "tls_events",
        "TLS port events: connections accepted, refused, authenticated, backed up,"
        " closed (by why), frames dropped.",
        "event",
        prefix="tls-",
    ),
)

AGENT_COUNTERS = (
    FromCounter(
        "dropped", "Datagrams on the main socket dropped, by reason.", "reason", prefix="dropped-"
    ),
    FromCounter(
        "rendezvous_refusals",
        "Unsigned 401 answers from the rendezvous: a wrong name or key (or a forgery).",
        keys={"refused": ""},
    ),
)
REGISTRATION_COUNTERS = (
    FromCounter(
        "registrations",
        "Registration attempts (refreshes not included) by outcome.",
        "outcome",
        keys={"registered": "ok", "failed": "failed", "refused": "refused"},
    ),
    FromCounter("keepalives", "Registrations refreshed.", keys={"refreshed": ""}),
)
CONTROL_COUNTERS = (
    FromCounter(
        "control_connections",
        "Connections to the control socket, by whether the caller was allowed.",
        "outcome",
        keys={"accepted": "accepted", "refused": "refused"},
    ),
    FromCounter("control_requests", "Control socket requests, by op.", "op", prefix="op-"),
    FromCounter(
        "control_connections_closed", "Accepted control connections closed.", keys={"closed": ""}
    ),
)
RELAY_COUNTERS = (
    FromCounter(
        "relay_allocations", "Relay allocations made (two ports each).", keys={"allocations": ""}
    ),
    FromCounter(
        "relay_allocations_refused", "Relay allocations refused.", keys={"allocations-refused": ""}
    ),
    FromCounter("relay_freed", "Relay allocations freed, by why.", "why", prefix="freed-"),
    FromCounter("relay_binds", "Signed binds of relay ports accepted.", keys={"binds": ""}),
    FromCounter("relay_datagrams", "Datagrams forwarded by the relay.", keys={"forwarded": ""}),
    FromCounter("relay_bytes", "Bytes forwarded by the relay.", keys={"forwarded-bytes": ""}),
    FromCounter(
        "relay_dropped", "Datagrams the relay dropped, by reason.", "reason", prefix="dropped-"
    ),
)
#: Relay counter keys that hold a level, not a count.
RELAY_GAUGES = {"allocations-active": ("relay_allocations_active", "Relay allocations now.")}
REGISTRATION_STATES = ("registering", "registered", "retrying", "refused", "stopped")


def rendezvous_metrics(protocol: RendezvousProtocol) -> Iterator[Metric]:
    yield from read_counter(protocol.counters, RENDEZVOUS_COUNTERS, "rendezvous_events")
    count = getattr(protocol.registry, "count", None)  # a shared registry may not know
    if isinstance(count, int):
        yield gauge("agents_registered", "Agents registered now.", count)
    relay = getattr(protocol, "relay", None)
    if relay is not None:
        yield from relay_metrics(relay.counters)
    yield gauge(
        "tls_connections_open", "Agents' TLS connections open now.", protocol.streams_open()
    )
    yield gauge(
        "introductions_pending",
        "Introductions waiting for their target.",
        protocol.pending_introductions(),
    )


def relay_metrics(counters: Mapping[str, int]) -> Iterator[Metric]:
    counts = {k: v for k, v in counters.items() if k not in RELAY_GAUGES}
    yield from read_counter(counts, RELAY_COUNTERS, "relay_events")
    for key, (name, help) in RELAY_GAUGES.items():
        yield gauge(name, help, counters.get(key, 0))


def agent_metrics(agent: Agent, control: Mapping[str, int]) -> Iterator[Metric]:
    state = agent.registration.describe()
    states = GaugeMetricFamily(
        PREFIX + "registration_state", "1 for the agent's registration state now.", labels=["state"]
    )
    for name in REGISTRATION_STATES:
        states.add_metric([name], 1.0 if name == state else 0.0)
    yield states
    yield from read_counter(
        agent.registration_core.outcomes, REGISTRATION_COUNTERS, "registration_events"
    )
    yield from read_counter(agent.client.counters, AGENT_COUNTERS, "agent_events")
    yield from agent.tunnel_stats.families()
    yield gauge("tunnels_in_progress", "Tunnels being set up now.", len(agent.punch.tunnels))
    rounds = CounterMetricFamily(
        PREFIX + "tunnel_rounds",
        "Punching rounds (a connect may take two), by outcome.",
        labels=["outcome"],
    )
    rounds.add_metric(["established"], agent.punch.established)
    rounds.add_metric(["failed"], agent.punch.failed)
    yield rounds
    yield from read_counter(control, CONTROL_COUNTERS, "control_events")
    open_now = control.get("accepted", 0) - control.get("closed", 0)
    yield gauge(
        "control_connections_open", "Programs connected to the control socket now.", open_now
    )
