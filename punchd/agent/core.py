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

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure

from punchd import stun, wire
from punchd.agent.api import HandOff, ProgressCallback, TunnelFailed
from punchd.agent.candidates import host_addresses
from punchd.agent.puncher import Puncher
from punchd.agent.registration import (
    Registered,
    RegistrationCore,
    build_registration_machine,
)
from punchd.agent.rendezvous_client import RendezvousClient, RendezvousError
from punchd.agent.tunnel import SocketFactory
from punchd.config import AgentConfig
from punchd.keys import derive_rendezvous_key
from punchd.retransmit import Backoff, RequestTimedOut
from punchd.stun import Attr, Method
from punchd.wire import format_address

log = Logger()

SIGN_OFF = Backoff(initial=0.3, maximum=0.3, attempts=2)

FRIENDLY = {
    "peer-unknown": "{peer} is not a peer in this network",
    "peer-offline": "{peer} is not online",
    "no-listener": "nothing on {peer} listens for service {service}",
    "rejected": "{peer} rejected the tunnel",
    "busy": "too many introductions in progress; try again",
    "timeout": "{peer} did not answer the introduction ({reason})",
    "not-registered": "the rendezvous has forgotten this agent; it is registering again",
}


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
        self.client = RendezvousClient(
            settings.name, key, reactor, lambda message: self.punch.incoming(message)
        )
        self.punch = Puncher(settings, reactor, self.client, key, addresses, sockets)
        # A service of several nodes: the next when the current falls silent.
        self._servers: tuple[tuple[str, int], ...] = getattr(
            settings.rendezvous, "all", (settings.rendezvous,)
        )
        self._server = 0
        self.registration_core = RegistrationCore(
            clock=reactor,
            attempt=self._register_once,
            keepalive=settings.keepalive,
            server=lambda: format_address(self.rendezvous),
        )
        self.registration = build_registration_machine(self.registration_core)
        self._port: IListeningPort | None = None
        self.started_at = reactor.seconds()

    @property
    def rendezvous(self) -> tuple[str, int]:
        """
        The rendezvous address in use (one of C{rendezvous}'s list).
        """
        return self._servers[self._server]

    # -- life cycle -------------------------------------------------------

    def start(self) -> None:
        # The main socket speaks the rendezvous' address family (a name is
        # resolved to IPv4).
        interface = "::" if ":" in self.settings.rendezvous[0] else ""
        self._port = self.reactor.listenUDP(0, self.client, interface=interface, maxPacketSize=2048)
        self.registration.start()

    def stop(self) -> Deferred[None]:
        """
        Cancel every tunnel being set up, sign off at the rendezvous (briefly:
        one try, so that a dead rendezvous does not hold up a shutdown), and
        close the main socket.
        """
        registered = self.registration.describe() == "registered"
        self.registration.stop()
        self.client.cancel_all()
        self.punch.cancel_all()
        signed_off: Deferred[object] = succeed(None)
        if registered and self._port is not None:
            signed_off = self.client.request(
                Method.REGISTER, [(Attr.LIFETIME, stun.encode_u32(0))], SIGN_OFF
            ).addErrback(lambda f: None)

        def close(_: object) -> Deferred[None] | None:
            port, self._port = self._port, None
            return port.stopListening() if port is not None else None

        return signed_off.addBoth(close)

    def _resolve(self) -> Deferred[tuple[str, int]]:
        host, port = self.rendezvous
        try:
            ipaddress.ip_address(host)
        except ValueError:
            d: Deferred[str] = self.reactor.resolve(host)
            return d.addCallback(lambda ip: (ip, port))
        return succeed((host, port))

    def _register_once(self) -> Deferred[Registered]:
        if self.registration_core.failures and len(self._servers) > 1:
            self._server = (self._server + 1) % len(self._servers)
            log.info("trying rendezvous {server}", server=format_address(self.rendezvous))

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
            return (mapped, stun.decode_u32(lifetime))

        return self._resolve().addCallback(resolved).addCallback(registered)

    # -- AgentCore ------------------------------------------------------

    def status(self) -> dict[str, Any]:
        core = self.registration_core
        return {
            "name": self.settings.name,
            "registration": self.registration.describe(),
            "rendezvous": format_address(self.rendezvous),
            "rendezvous_address": format_address(self.client.server)
            if self.client.server
            else None,
            "mapped": format_address(core.mapped) if core.mapped else None,
            "registered_at": core.registered_at,
            "last_error": core.last_error,
            "keepalive": self.settings.keepalive,
            "listening": sorted(s for s, ls in self.punch.listeners.items() if ls),
            "tunnels": self.punch.counts(),
            "uptime": round(self.reactor.seconds() - self.started_at, 3),
        }

    def peers(self) -> Deferred[list[dict[str, Any]]]:
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
            if error.code == 470:
                self.registration.reregisterNow()
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
        if peer == self.settings.name:
            return _failed("bad-request", "cannot open a tunnel to this agent itself")
        if self.registration.describe() != "registered":
            error = self.registration_core.last_error
            return _failed(
                "not-registered",
                "this agent is not registered with its rendezvous"
                + (f" (last error: {error})" if error else ""),
            )
        explain = self._explainer(peer, service)
        return self.punch.connect(peer, service, timeout, progress, explain)

    def _explainer(self, peer: str, service: str) -> Callable[[Failure], Failure]:
        return lambda failure: self._as_tunnel_failure(failure, peer, service)

    def listen(self, service: str, incoming: Callable[[HandOff], None]) -> Callable[[], None]:
        return self.punch.listen(service, incoming)


def _failed(code: str, message: str) -> Deferred[HandOff]:
    d: Deferred[HandOff] = Deferred()
    d.errback(TunnelFailed(code, message))
    return d
