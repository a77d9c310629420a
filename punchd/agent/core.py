"""
The agent: its registration, its tunnels, and its listeners.

This is the L{AgentCore} the control socket talks to.  It owns the main UDP
socket (through L{RendezvousClient}), starts a L{Tunnel} for every connect
and every accepted introduction, and hands finished tunnels to programs.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure

from punchd import stun, wire
from punchd.agent.api import HandOff, ProgressCallback, TunnelFailed
from punchd.agent.candidates import host_addresses
from punchd.agent.fallback import PathCore, RendezvousPath, build_path_machine
from punchd.agent.netcheck import NetChecker, gather_both
from punchd.agent.portmap import PortMapper
from punchd.agent.preferred import PreferredCheck
from punchd.agent.puncher import Puncher
from punchd.agent.registration import (
    Registered,
    RegistrationCore,
    build_registration_machine,
)
from punchd.agent.rendezvous_client import (
    IncomingAnswer,
    Refused,
    RendezvousClient,
    RendezvousError,
)
from punchd.agent.stream import RendezvousStream, StreamRefused, connect_stream, trust_root
from punchd.agent.tunnel import SocketFactory, Tunnel
from punchd.config import AgentConfig
from punchd.keys import derive_rendezvous_key
from punchd.metrics import TunnelStats
from punchd.retransmit import Backoff, RequestTimedOut
from punchd.stun import Attr, Method
from punchd.wire import format_address

log = Logger()

SIGN_OFF = Backoff(initial=0.3, maximum=0.3, attempts=2)
#: Keepalives between checks of whether the first rendezvous answers again
#: (once registered with another), and the fewest seconds between them.
PREFERRED_CHECK = 3
PREFERRED_CHECK_MIN = 30.0

FRIENDLY = {
    "peer-unknown": "{peer} is not a peer in this network",
    "peer-offline": "{peer} is not online",
    "no-listener": "nothing on {peer} listens for service {service}",
    "rejected": "{peer} rejected the tunnel",
    "busy": "too many introductions in progress; try again",
    "timeout": "{peer} did not answer the introduction ({reason})",
    "not-registered": "the rendezvous has forgotten this agent; it is registering again",
}


def tls_addresses(
    settings: AgentConfig, servers: tuple[tuple[str, int], ...]
) -> tuple[tuple[str, int], ...] | None:
    """
    The TLS address of each rendezvous node, or None when TLS is off.
    """
    if settings.rendezvous_tls == "off":
        return None
    if settings.rendezvous_tls == "auto":
        return tuple((host, 443) for host, _ in servers)
    host, _, port = settings.rendezvous_tls.rpartition(":")
    return tuple((host.strip("[]"), int(port)) for _ in servers)


def refusal_text(settings: AgentConfig) -> str:
    """
    What to say when the rendezvous refuses our credentials: both causes.
    """
    return (
        "the rendezvous refused our credentials: either its peers file does not list "
        f"agent {settings.name}, or the keys do not match (it must list this agent's "
        f"public key {settings.private_key.public_key().to_base64()}, and "
        "rendezvous_public_key here must be the rendezvous's)"
    )


class Agent:
    """
    One punch-agent: implements L{punchd.agent.api.AgentCore}.
    """

    punch: Puncher

    def __init__(
        self,
        settings: AgentConfig,
        reactor: Any,
        addresses: Callable[[], list[str]] = host_addresses,
        sockets: SocketFactory | None = None,
    ) -> None:
        self.settings = settings
        self.reactor = reactor
        key = derive_rendezvous_key(
            settings.private_key, settings.rendezvous_public_key, settings.name
        )
        self.client = RendezvousClient(settings.name, key, reactor, self._incoming)
        self.punch = Puncher(
            settings,
            reactor,
            self.client,
            key,
            addresses,
            sockets,
            self._tunnel_mapper,
            self._hard_nat,
        )
        # A service of several nodes: the next when the current falls silent.
        self._servers: tuple[tuple[str, int], ...] = getattr(
            settings.rendezvous, "all", (settings.rendezvous,)
        )
        self._server = 0
        self.preferred = PreferredCheck(
            reactor,
            max(PREFERRED_CHECK * settings.keepalive, PREFERRED_CHECK_MIN),
            self._away_from_first,
            lambda: self._answers_udp(self._servers[0]),
            self._back_to_first,
        )
        #: Each node's TLS address, for when UDP to it is blocked (None: never).
        self._tls_servers = tls_addresses(settings, self._servers)
        self.registration_core = RegistrationCore(
            clock=reactor,
            attempt=self._register_once,
            keepalive=settings.keepalive,
            server=lambda: format_address(self.rendezvous),
        )
        self.registration = build_registration_machine(self.registration_core)
        self.path: RendezvousPath | None = None
        if self._tls_servers is not None:
            self.path_core = PathCore(
                clock=reactor,
                connect=self._connect_tls,
                probe_udp=self._answers_udp,
                use=self._use_stream,
                changed=self.registration.reregisterNow,
                recheck=settings.keepalive,
                where=lambda: format_address(self._tls_server),
            )
            self.path = build_path_machine(self.path_core)
        self.refusal = refusal_text(settings)
        self.tunnel_stats = TunnelStats()
        # -- hard NATs: what the network allows, and the gateway's port mappings.
        self.alternate_port = 0
        self.port_mapper = PortMapper(reactor) if settings.port_mapping else None
        self.netchecker = NetChecker(
            reactor,
            settings.name,
            key,
            resolve=self._resolve,
            rendezvous_host=settings.rendezvous[0],
            alternate_port=lambda: self.alternate_port,
            mapper=self.port_mapper,
            addresses=addresses,
            over_tls=lambda: self.client.stream is not None,
        )
        self._port: IListeningPort | None = None
        self.started_at = reactor.seconds()

    @property
    def rendezvous(self) -> tuple[str, int]:
        """
        The rendezvous address in use (one of C{rendezvous}'s list).
        """
        return self._servers[self._server]

    @property
    def _tls_server(self) -> tuple[str, int]:
        assert self._tls_servers is not None
        return self._tls_servers[self._server]

    # -- life cycle -------------------------------------------------------

    def start(self) -> None:
        # The main socket speaks the rendezvous' address family (a name is
        # resolved to IPv4).
        interface = "::" if ":" in self.settings.rendezvous[0] else ""
        self._port = self.reactor.listenUDP(0, self.client, interface=interface, maxPacketSize=2048)
        self.registration.start()

    def _tunnel_mapper(self) -> PortMapper | None:
        """
        The port mapper for a new tunnel: only when the gateway offered a
        protocol at the last netcheck, so that tunnels elsewhere never wait.
        """
        report = self.netchecker.last
        if self.port_mapper is None or report is None or not report.port_mapping:
            return None
        return self.port_mapper

    def _hard_nat(self) -> bool:
        """
        Our NAT maps per destination and the gateway maps no ports: a peer
        behind an easy NAT can reach us directly only by birthday probing.
        """
        report = self.netchecker.last
        return bool(
            report is not None and report.mapping_varies_by_destination and not report.port_mapping
        )

    def stop(self) -> Deferred[None]:
        """
        Cancel every tunnel being set up, sign off at the rendezvous (briefly:
        one try, so that a dead rendezvous does not hold up a shutdown), and
        close the main socket.
        """
        registered = self.registration.describe() == "registered"
        self.registration.stop()
        self.preferred.stop()
        self.client.cancel_all()
        self.punch.cancel_all()
        signed_off: Deferred[object] = succeed(None)
        if registered and self._port is not None:
            signed_off = self.client.request(
                Method.REGISTER, [(Attr.LIFETIME, stun.encode_u32(0))], SIGN_OFF
            ).addErrback(lambda f: None)

        def close(_: object) -> Deferred[None] | None:
            if self.path is not None:
                self.path.stop()
            port, self._port = self._port, None
            return port.stopListening() if port is not None else None

        return signed_off.addBoth(close)

    def _resolve(self, server: tuple[str, int] | None = None) -> Deferred[tuple[str, int]]:
        host, port = server or self.rendezvous
        try:
            ipaddress.ip_address(host)
        except ValueError:
            d: Deferred[str] = self.reactor.resolve(host)
            return d.addCallback(lambda ip: (ip, port))
        return succeed((host, port))

    # -- the way to the rendezvous: UDP, or TLS where UDP is blocked -------

    def _connect_tls(self) -> Deferred[RendezvousStream]:
        try:
            trust = trust_root(self.settings.rendezvous_ca)
        except (OSError, ValueError) as e:
            return fail(StreamRefused(f"cannot use rendezvous_ca: {e}"))

        def lost(reason: str) -> None:
            if self.path is not None:
                self.path.tlsFailed(reason)

        return connect_stream(self.reactor, self._tls_server, trust, self.client.from_stream, lost)

    def _answers_udp(self, server: tuple[str, int] | None = None) -> Deferred[bool]:
        """
        Whether C{server} (the rendezvous in use by default) answers a
        signed gather over UDP, from a fresh socket.
        """

        def probe(address: tuple[str, int]) -> Deferred[bool]:
            d = gather_both(self.reactor, address, 0, self.settings.name, self.punch.key)
            return d.addCallback(lambda gathered: gathered.main is not None)

        return self._resolve(server).addCallback(probe)

    def _away_from_first(self) -> bool:
        on_udp = self.path is None or self.path.describe() == "udp"
        registered = self.registration.describe() == "registered"
        return self._server != 0 and registered and on_udp

    def _back_to_first(self) -> None:
        self._server = 0
        self.registration.reregisterNow()

    def _use_stream(self, stream: RendezvousStream | None) -> None:
        self.client.stream = stream
        if stream is not None:
            # What the network allows has changed: netcheck says so (and
            # tunnels choose from it), not what it found over UDP before.
            self.reactor.callLater(0, self.netchecker.check)

    def _register_once(self) -> Deferred[Registered]:
        path = self.path
        tls_failed = path is None or self.path_core.tls_failures > 0
        if self.registration_core.failures and len(self._servers) > 1 and tls_failed:
            if path is not None:
                self.path_core.tls_failures = 0
            self._server = (self._server + 1) % len(self._servers)
            log.info("trying rendezvous {server}", server=format_address(self.rendezvous))
        if path is not None and path.describe() == "connecting":
            return self.path_core.settled().addCallback(lambda _: self._register_now(True))
        return self._register_now(False)

    def _register_now(self, after_tls: bool) -> Deferred[Registered]:
        """
        One registration attempt, on the way the path machine chose; a TLS
        attempt that just failed fails this one, saying why.
        """
        over_tls = self.client.stream is not None
        if after_tls and not over_tls and self.path_core.last_error:
            return fail(RendezvousError(503, self.path_core.last_error))

        def resolved(server: tuple[str, int]) -> Deferred[stun.Message]:
            self.client.server = wire.normalize_address(server)
            lifetime = int(self.settings.keepalive * 3 + 5)
            return self.client.request(
                Method.REGISTER, [(Attr.LIFETIME, stun.encode_u32(lifetime))]
            )

        def registered(message: stun.Message) -> Registered:
            value = message.get(Attr.XOR_MAPPED_ADDRESS)
            lifetime = message.get(Attr.LIFETIME)
            if value is None or lifetime is None or len(lifetime) != 4:
                raise RendezvousError(500, "registration reply without mapped address")
            mapped = stun.decode_xor_address(value, message.transaction_id)
            try:
                self.punch.rendezvous_clock(wire.decode_timestamp(message))
            except wire.ProtocolError:
                log.warn("the rendezvous' reply carries no time: introductions will be refused")
            self._heard_alternate_port(message)
            if self._server != 0:
                self.preferred.start()
            old = self.registration_core.mapped
            if mapped != old and not over_tls:
                self.reactor.callLater(0, self.netchecker.moved, old, mapped)
            return (mapped, stun.decode_u32(lifetime))

        def explained(failure: Failure) -> Failure:
            if failure.check(RequestTimedOut) and self.path is not None:
                if over_tls:
                    self.path.tlsFailed("the rendezvous did not answer over TLS")
                else:
                    self.path.udpWentSilent()
            failure.trap(Refused)
            return Failure(Refused(self.refusal))

        return self._resolve().addCallback(resolved).addCallback(registered).addErrback(explained)

    def _heard_alternate_port(self, message: stun.Message) -> None:
        value = message.get(Attr.ALTERNATE_PORT)
        port = stun.decode_u32(value) if value is not None and len(value) == 4 else 0
        self.alternate_port = port if 0 < port < 65536 else 0

    # -- AgentCore ------------------------------------------------------

    def netcheck(self) -> Deferred[dict[str, Any]]:
        return self.netchecker.check().addCallback(lambda report: report.to_json())

    def status(self) -> dict[str, Any]:
        core = self.registration_core
        return {
            "name": self.settings.name,
            "registration": self.registration.describe(),
            "rendezvous": format_address(self.rendezvous),
            "rendezvous_address": format_address(self.client.server)
            if self.client.server
            else None,
            "transport": self._transport(),
            "tls_error": self.path_core.last_error if self.path is not None else None,
            "mapped": format_address(core.mapped) if core.mapped else None,
            "registered_at": core.registered_at,
            "last_error": core.last_error,
            "keepalive": self.settings.keepalive,
            "listening": sorted(s for s, ls in self.punch.listeners.items() if ls),
            "tunnels": self.punch.counts(),
            "uptime": round(self.reactor.seconds() - self.started_at, 3),
            "netcheck": self.netchecker.last.summary if self.netchecker.last else None,
        }

    def _transport(self) -> str:
        """
        How we reach the rendezvous, in words.
        """
        way = "udp" if self.path is None else self.path.describe()
        if way == "tls":
            return f"UDP blocked, using TLS to {format_address(self._tls_server)}"
        if way == "connecting":
            return f"UDP unanswered, connecting over TLS to {format_address(self._tls_server)}"
        return "UDP"

    def _refused(self) -> TunnelFailed | None:
        """
        While the rendezvous refuses us, requests fail at once, saying why.
        """
        if self.registration.describe() == "refused":
            return TunnelFailed("unauthorized", self.refusal)
        return None

    def peers(self) -> Deferred[list[dict[str, Any]]]:
        refused = self._refused()
        if refused is not None:
            return fail(refused)
        found: list[dict[str, Any]] = []

        def page(after: str | None) -> Deferred[list[dict[str, Any]]]:
            attributes = [] if after is None else [(Attr.PEER, after.encode("ascii"))]
            return self.client.request(Method.PEERS, attributes).addCallback(got)

        def got(message: stun.Message) -> list[dict[str, Any]] | Deferred[list[dict[str, Any]]]:
            names = [v.decode("ascii", "replace") for v in message.get_all(Attr.PEER)]
            found.extend({"name": n} for n in names)
            if message.has(Attr.MORE) and names:
                return page(names[-1])
            return found

        return page(None).addErrback(self._as_tunnel_failure, "", "")

    def _as_tunnel_failure(self, failure: Failure, peer: str, service: str) -> Failure:
        if failure.check(RendezvousError):
            error: RendezvousError = failure.value  # type: ignore[assignment]
            if error.code in (401, 470):
                self.registration.reregisterNow()
            if isinstance(error, Refused):
                return Failure(TunnelFailed("unauthorized", self.refusal))
            template = FRIENDLY.get(error.name, "the rendezvous said: {reason}")
            message = template.format(peer=peer, service=service, reason=error.reason)
            return Failure(TunnelFailed(error.name, message))
        if failure.check(RequestTimedOut):
            return Failure(
                TunnelFailed(
                    "timeout",
                    f"the rendezvous {format_address(self.rendezvous)} did not answer",
                )
            )
        return failure

    def connect(
        self, peer: str, service: str, timeout: float, progress: ProgressCallback
    ) -> Deferred[HandOff]:
        d = self._connect(peer, service, timeout, progress)
        return d.addBoth(self.tunnel_stats.ended, "initiator")

    def _connect(
        self, peer: str, service: str, timeout: float, progress: ProgressCallback
    ) -> Deferred[HandOff]:
        if peer == self.settings.name:
            return fail(TunnelFailed("bad-request", "cannot open a tunnel to this agent itself"))
        refused = self._refused()
        if refused is not None:
            return fail(refused)
        if self.registration.describe() != "registered":
            error = self.registration_core.last_error
            return fail(
                TunnelFailed(
                    "not-registered",
                    "this agent is not registered with its rendezvous"
                    + (f" (last error: {error})" if error else ""),
                )
            )
        explain = self._explainer(peer, service)
        return self.punch.connect(peer, service, timeout, progress, explain)

    def _explainer(self, peer: str, service: str) -> Callable[[Failure], Failure]:
        return lambda failure: self._as_tunnel_failure(failure, peer, service)

    def listen(self, service: str, incoming: Callable[[HandOff], None]) -> Callable[[], None]:
        def counted(handoff: HandOff) -> None:
            self.tunnel_stats.succeeded("responder", handoff.info)
            incoming(handoff)

        return self.punch.listen(service, counted)

    def _incoming(self, message: stun.Message) -> Deferred[IncomingAnswer]:
        """
        Answer a peer's introduction, counting the answer and, when the
        tunnel it starts fails, the failure (its successes are counted as
        they reach a listener).
        """
        before = set(self.punch.tunnels)
        answer = self.punch.incoming(message)
        for tunnel in [t for i, t in self.punch.tunnels.items() if i not in before]:
            tunnel.result.addBoth(self._responder_ended, tunnel)

        return answer.addCallback(self.tunnel_stats.answered)

    def _responder_ended(self, result: object, tunnel: Tunnel) -> object:
        # The result fires inside the tunnel machine's last transition: ask
        # it where it ended once that is over.
        self.reactor.callLater(0, self._count_responder_failure, tunnel)
        return result

    def _count_responder_failure(self, tunnel: Tunnel) -> None:
        if tunnel.machine.describe() == "failed":
            self.tunnel_stats.failed("responder", "failed")
