"""
The agent: its registration, its tunnels, and its listeners.

This is the L{AgentCore} the control socket talks to.  It owns the main UDP
socket (through L{RendezvousClient}), starts a L{Tunnel} for every connect
and every accepted introduction, and hands finished tunnels to programs.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any, cast

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure

from punchd import stun, wire
from punchd.agent.api import HandOff, ProgressCallback, TunnelFailed
from punchd.agent.candidates import host_addresses
from punchd.agent.registration import (
    Registered,
    RegistrationCore,
    build_registration_machine,
)
from punchd.agent.rendezvous_client import IncomingAnswer, RendezvousClient, RendezvousError
from punchd.agent.tunnel import Introduced, Tunnel, new_tunnel_id
from punchd.config import AgentConfig
from punchd.keys import PublicKey, derive_rendezvous_key
from punchd.retransmit import Backoff, RequestTimedOut
from punchd.stun import Attr, MessageClass, Method
from punchd.wire import Candidate, format_address

log = Logger()

MAX_TUNNELS = 1024
MAX_TUNNELS_PER_PEER = 512
FIRST_ROUND = 1.5
SIGN_OFF = Backoff(initial=0.3, maximum=0.3, attempts=2)
MIN_SECOND_ROUND = 1.0

FRIENDLY = {
    "peer-unknown": "{peer} is not a peer in this network",
    "peer-offline": "{peer} is not online",
    "no-listener": "nothing on {peer} listens for service {service}",
    "rejected": "{peer} rejected the tunnel",
    "busy": "too many introductions in progress; try again",
    "timeout": "{peer} did not answer the introduction",
    "not-registered": "the rendezvous has forgotten this agent; it is registering again",
}


class Agent:
    """
    One punch-agent: implements L{punchd.agent.api.AgentCore}.
    """

    def __init__(
        self,
        settings: AgentConfig,
        reactor: Any,
        addresses: Callable[[], list[str]] = host_addresses,
    ) -> None:
        self.settings = settings
        self.reactor = reactor
        self._addresses = addresses
        key = derive_rendezvous_key(
            settings.private_key, settings.rendezvous_public_key, settings.name
        )
        self.client = RendezvousClient(settings.name, key, reactor, self._incoming)
        self.registration_core = RegistrationCore(
            clock=reactor,
            attempt=self._register_once,
            keepalive=settings.keepalive,
            server=lambda: format_address(settings.rendezvous),
        )
        self.registration = build_registration_machine(self.registration_core)
        self.tunnels: dict[bytes, Tunnel] = {}
        self.listeners: dict[str, list[Callable[[HandOff], None]]] = {}
        self.established = 0
        self.failed = 0
        self._port: IListeningPort | None = None
        self.started_at = reactor.seconds()

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
        for tunnel in list(self.tunnels.values()):
            tunnel.machine.cancel()
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
        host, port = self.settings.rendezvous
        try:
            ipaddress.ip_address(host)
        except ValueError:
            d: Deferred[str] = self.reactor.resolve(host)
            return d.addCallback(lambda ip: (ip, port))
        return succeed((host, port))

    def _register_once(self) -> Deferred[Registered]:
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
            "rendezvous": format_address(self.settings.rendezvous),
            "rendezvous_address": format_address(self.client.server)
            if self.client.server
            else None,
            "mapped": format_address(core.mapped) if core.mapped else None,
            "registered_at": core.registered_at,
            "last_error": core.last_error,
            "keepalive": self.settings.keepalive,
            "listening": sorted(s for s, ls in self.listeners.items() if ls),
            "tunnels": {
                "in_progress": len(self.tunnels),
                "established": self.established,
                "failed": self.failed,
            },
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
                    f"the rendezvous {format_address(self.settings.rendezvous)} did not answer",
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
        if len(self.tunnels) >= MAX_TUNNELS:
            return _failed("busy", "too many tunnels being set up")
        return self._two_rounds(peer, service, timeout, progress)

    def _two_rounds(
        self, peer: str, service: str, timeout: float, progress: ProgressCallback
    ) -> Deferred[HandOff]:
        """
        Punch with both sides probing at once; if nothing gets through, try
        again on fresh sockets with the peer waiting for our first check.

        A NAT that accepts unsolicited traffic on its WAN side lets the
        peer's early probe claim our mapping, which pushes our own traffic
        to another port (design.md §6); the second round, in the other
        order, gets past a NAT like that on either side.
        """
        started = self.reactor.seconds()
        deadline = started + timeout
        first = min(timeout / 2, FIRST_ROUND)
        # Round one gives up `first` seconds into probing if nothing at all
        # got through, so that round two has time; a slow introduction, or a
        # lossy path that lets something through, may use the rest.
        current: list[Deferred[HandOff]] = []
        result: Deferred[HandOff] = Deferred(lambda d: current[-1].cancel())

        def second(failure: Failure) -> Deferred[HandOff] | Failure:
            left = deadline - self.reactor.seconds()
            error = failure.value
            if not isinstance(error, TunnelFailed) or error.code != "unreachable":
                return failure
            if left < MIN_SECOND_ROUND:
                return failure
            progress({"event": "retrying", "reason": "no check got through; we probe first now"})
            attempt = self._attempt(peer, service, left, progress, wait=True)
            current.append(attempt)

            def whole(hand_off: HandOff) -> HandOff:
                hand_off.info["setup_ms"] = round((self.reactor.seconds() - started) * 1000, 3)
                hand_off.info["rounds"] = 2
                return hand_off

            return attempt.addCallbacks(
                whole,
                lambda f: _annotate(f, "a second round with this side probing first failed too"),
            )

        attempt = self._attempt(peer, service, timeout, progress, wait=False, checks=first)
        current.append(attempt)
        chained = cast("Deferred[HandOff]", attempt.addErrback(second))
        chained.addCallbacks(result.callback, result.errback)
        return result

    def _attempt(
        self,
        peer: str,
        service: str,
        timeout: float,
        progress: ProgressCallback,
        wait: bool,
        checks: float | None = None,
    ) -> Deferred[HandOff]:
        tunnel_id = new_tunnel_id()

        def introduce(candidates: list[Candidate]) -> Deferred[Introduced]:
            def attributes(transaction_id: bytes) -> list[tuple[int, bytes]]:
                return [
                    (Attr.PEER, peer.encode("ascii")),
                    (Attr.SERVICE, service.encode("ascii")),
                    (Attr.TUNNEL_ID, tunnel_id),
                    *wire.encode_candidates(candidates, transaction_id),
                    *([(Attr.WAIT, b"")] if wait else []),
                ]

            d = self.client.request(Method.CONNECT, attributes)
            return d.addCallback(self._introduced, peer).addErrback(
                self._as_tunnel_failure, peer, service
            )

        tunnel = self._tunnel(
            role="initiator",
            peer=peer,
            service=service,
            tunnel_id=tunnel_id,
            timeout=timeout,
            progress=progress,
            introduce=introduce,
            check_budget=checks,
        )
        return tunnel.result

    def _introduced(self, message: stun.Message, peer: str) -> Introduced:
        raw = message.get(Attr.PUBLIC_KEY)
        nonce = message.get(Attr.TUNNEL_NONCE)
        if raw is None or len(raw) != 32:
            raise TunnelFailed("internal", "the rendezvous sent no usable key for the peer")
        if nonce is None or len(nonce) != wire.TUNNEL_ID_LENGTH:
            raise TunnelFailed("internal", "the peer's answer carried no tunnel nonce")
        key = PublicKey(raw)
        pinned = self.settings.pinned_peers.get(peer)
        if pinned is not None and pinned != key:
            log.error(
                "the rendezvous vouched for a key of {peer} that differs from the pinned one",
                peer=peer,
            )
            raise TunnelFailed("unauthorized", f"{peer}'s key does not match the pinned key")
        try:
            candidates = wire.decode_candidates(message)
        except wire.ProtocolError as e:
            raise TunnelFailed("internal", f"bad candidates from the rendezvous: {e}") from None
        return candidates, key, nonce

    def _tunnel(self, **kwargs: Any) -> Tunnel:
        tunnel = Tunnel(
            reactor=self.reactor,
            own_key=self.settings.private_key,
            rendezvous=self.client.server,
            host_addresses=self._addresses(),
            **kwargs,
        )
        self.tunnels[tunnel.tunnel_id] = tunnel

        def done(result: object) -> object:
            self.tunnels.pop(tunnel.tunnel_id, None)
            if isinstance(result, Failure):
                self.failed += 1
            else:
                self.established += 1
            return result

        tunnel.result.addBoth(done)
        return tunnel

    def listen(self, service: str, incoming: Callable[[HandOff], None]) -> Callable[[], None]:
        listeners = self.listeners.setdefault(service, [])
        listeners.append(incoming)

        def unlisten() -> None:
            if incoming in listeners:
                listeners.remove(incoming)

        return unlisten

    # -- introductions from peers ------------------------------------------

    def _incoming(self, message: stun.Message) -> Deferred[IncomingAnswer]:
        try:
            peer = wire.decode_name(message.get(Attr.PEER), "peer")
            service = wire.decode_name(message.get(Attr.SERVICE), "service")
            tunnel_id = wire.decode_tunnel_id(message)
            candidates = wire.decode_candidates(message)
            raw_key = message.get(Attr.PUBLIC_KEY)
            if raw_key is None or len(raw_key) != 32:
                raise wire.ProtocolError(400, "missing public key")
        except wire.ProtocolError as e:
            return succeed((MessageClass.ERROR, wire.error_attributes(e.code, e.reason)))
        peer_key = PublicKey(raw_key)

        def refuse(code: int, why: str) -> Deferred[IncomingAnswer]:
            log.info(
                "refused a tunnel from {peer} for {service}: {why}",
                peer=peer,
                service=service,
                why=why,
            )
            return succeed((MessageClass.ERROR, wire.error_attributes(code)))

        if not self.listeners.get(service):
            return refuse(460, "nothing listens for it")
        pinned = self.settings.pinned_peers.get(peer)
        if pinned is not None and pinned != peer_key:
            return refuse(403, "the peer's key does not match the pinned key")
        if tunnel_id in self.tunnels:
            return refuse(403, "duplicate tunnel id")
        if len(self.tunnels) >= MAX_TUNNELS:
            return refuse(486, "too many tunnels being set up")
        if sum(t.peer == peer for t in self.tunnels.values()) >= MAX_TUNNELS_PER_PEER:
            return refuse(486, "too many tunnels from this peer being set up")
        tunnel = self._tunnel(
            role="responder",
            peer=peer,
            service=service,
            tunnel_id=tunnel_id,
            timeout=self.settings.connect_timeout,
            peer_key=peer_key,
            remote_candidates=candidates,
            wait_for_peer=message.has(Attr.WAIT),
        )
        tunnel.result.addCallbacks(self._deliver(service), lambda f: None)

        def accept(ours: list[Candidate]) -> IncomingAnswer:
            return (
                MessageClass.SUCCESS,
                [
                    (Attr.TUNNEL_NONCE, tunnel.nonce),
                    *wire.encode_candidates(ours, message.transaction_id),
                ],
            )

        def gave_up(failure: Failure) -> IncomingAnswer:
            return (MessageClass.ERROR, wire.error_attributes(486))

        return tunnel.gathered_result.addCallbacks(accept, gave_up)

    def _deliver(self, service: str) -> Callable[[HandOff], None]:
        def deliver(hand_off: HandOff) -> None:
            listeners = self.listeners.get(service)
            if not listeners:
                log.info(
                    "tunnel {id} for {service} arrived after its listener left; closed",
                    id=hand_off.info.get("id"),
                    service=service,
                )
                hand_off.sock.close()
                return
            listener = listeners.pop(0)
            listeners.append(listener)
            listener(hand_off)

        return deliver


def _annotate(failure: Failure, note: str) -> Failure:
    if isinstance(failure.value, TunnelFailed) and failure.value.code == "unreachable":
        error = failure.value
        return Failure(TunnelFailed(error.code, f"{error.message}; {note}"))
    return failure


def _failed(code: str, message: str) -> Deferred[HandOff]:
    d: Deferred[HandOff] = Deferred()
    d.errback(TunnelFailed(code, message))
    return d
