"""
The agent's tunnels: punching them for local programs, answering peers'
introductions, and handing finished tunnels to listeners.

A connect reads as one straight line: the control socket asks L{Puncher.connect},
which runs one or two rounds (L{Puncher._punch}), each one L{Tunnel} whose
initiator role introduces itself through a L{RendezvousIntroducer}; the
tunnel's result is the control socket's answer.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from punchd import stun, wire
from punchd.agent import hops
from punchd.agent.api import HandOff, ProgressCallback, TunnelFailed
from punchd.agent.birthday import MAX_AGENT_SPRAYS, BirthdayPlan, SocketBudget
from punchd.agent.gatherers import RelayBinder, SignedGather
from punchd.agent.introducer import RendezvousIntroducer, relay_candidate
from punchd.agent.mappings import KeptMappings
from punchd.agent.portmap import PortMapper
from punchd.agent.rendezvous_client import IncomingAnswer, RendezvousClient
from punchd.agent.roles import Initiator, Responder, Role
from punchd.agent.stream import RendezvousStream
from punchd.agent.stream_relay import StreamChannel
from punchd.agent.tunnel import ChannelFactory, SocketFactory, Tunnel, new_tunnel_id
from punchd.agent.tunnel_socket import TunnelSocket
from punchd.config import AgentConfig
from punchd.keys import TUNNEL_ID_LENGTH
from punchd.stun import Attr, MessageClass
from punchd.wire import Candidate, CandidateKind

RELAY = CandidateKind.RELAY

log = Logger()

MAX_TUNNELS = 1024
MAX_TUNNELS_PER_PEER = 512
FIRST_ROUND = 1.5
MIN_SECOND_ROUND = 1.0
#: How far an Incoming's time may be from the rendezvous' (as we estimate
#: it): well past its retransmissions, well short of a replay after a restart.
FRESH_INTRODUCTION = 30.0

#: Turns a failure from the rendezvous into a L{TunnelFailed} for the program.
Explain = Callable[[Failure], Failure]


class Puncher:
    """
    The tunnels of one agent, being set up, and the listeners they go to.
    """

    def __init__(
        self,
        settings: AgentConfig,
        reactor: Any,
        client: RendezvousClient,
        key: bytes,
        addresses: Callable[[], list[str]],
        sockets: SocketFactory | None = None,
        port_mapper: Callable[[], PortMapper | None] = lambda: None,
        hard: Callable[[], bool] = lambda: False,
    ) -> None:
        self.settings = settings
        #: Whether our NAT maps per destination, as the last netcheck found.
        self._hard = hard
        self.birthday_sockets = SocketBudget()
        #: Birthday sprays (the easy side's) this agent runs at once.
        self.birthday_sprays = SocketBudget(MAX_AGENT_SPRAYS)
        self.birthday = (
            BirthdayPlan(
                settings.hard_nat_sockets, settings.hard_nat_probe_rate, settings.hard_nat_budget
            )
            if settings.hard_nat_sockets and settings.hard_nat_budget
            else None
        )
        #: The gateway's port mapper, when it offers a protocol.
        self._port_mapper = port_mapper
        self.mappings = KeptMappings(reactor)
        self.reactor = reactor
        self.client = client
        self.name = settings.name
        #: Our rendezvous message key: signs our gathers.
        self.key = key
        self._addresses = addresses
        self._sockets = sockets or self._tunnel_socket
        self.tunnels: dict[bytes, Tunnel] = {}
        self.listeners: dict[str, list[Callable[[HandOff], None]]] = {}
        self.established = 0
        #: Of those established, how many go through the relay.
        self.relayed = 0
        self.failed = 0
        self._rendezvous_offset: float | None = None
        #: The traces of responders told to wait (L{hops.Tracer}).
        self.tracer = hops.Tracer(reactor)

    def _tunnel_socket(
        self,
        family: socket.AddressFamily,
        received: Callable[[bytes, tuple[str, int]], None],
        keep: Callable[[bytes, tuple[str, int]], bool],
    ) -> TunnelSocket:
        return TunnelSocket(self.reactor, received, keep, family=family)

    def rendezvous_clock(self, now: float) -> None:
        """
        The rendezvous' time, as its latest Register reply said: introductions
        are checked against it, not against our own clock (which may be off).
        """
        self._rendezvous_offset = now - self.reactor.seconds()

    def _fresh(self, sent_at: float) -> bool:
        if self._rendezvous_offset is None:
            return False
        rendezvous_now: float = self.reactor.seconds() + self._rendezvous_offset
        return abs(rendezvous_now - sent_at) <= FRESH_INTRODUCTION

    def counts(self) -> dict[str, int]:
        return {
            "in_progress": len(self.tunnels),
            "established": self.established,
            "relayed": self.relayed,
            "failed": self.failed,
        }

    def _settle_mapping(self, tunnel: Tunnel, result: object) -> None:
        """
        Keep the tunnel's port mapping while its path goes through it;
        delete it at once otherwise.
        """
        mapping = tunnel.core.mapping
        if mapping is None:
            return
        used = isinstance(result, HandOff) and result.info["candidates"]["local"] == "mapped"
        if used:
            self.mappings.keep(mapping)
        else:
            mapping.delete()

    def cancel_all(self) -> None:
        for tunnel in list(self.tunnels.values()):
            tunnel.machine.cancel()

    def connect(
        self,
        peer: str,
        service: str,
        timeout: float,
        progress: ProgressCallback,
        explain: Explain,
    ) -> Deferred[HandOff]:
        if len(self.tunnels) >= MAX_TUNNELS:
            return fail(TunnelFailed("busy", "too many tunnels being set up"))
        return Deferred.fromCoroutine(self._punch(peer, service, timeout, progress, explain))

    async def _punch(
        self,
        peer: str,
        service: str,
        timeout: float,
        progress: ProgressCallback,
        explain: Explain,
    ) -> HandOff:
        """
        Punch with both sides probing at once; if nothing gets through, try
        again on fresh sockets with the peer waiting for our first check.

        A NAT that accepts unsolicited traffic on its WAN side lets the
        peer's early probe claim our mapping, which pushes our own traffic
        to another port (docs/architecture.rst, "NATs in the lab"); the
        second round, in the other order, gets past a NAT like that on
        either side.  Round one gives up early only if nothing at all got
        through, so that round two has time.
        """
        started = self.reactor.seconds()
        first = min(timeout / 2, FIRST_ROUND)
        try:
            return await self._round(peer, service, timeout, progress, explain, budget=first)
        except TunnelFailed as e:
            left = started + timeout - self.reactor.seconds()
            if e.code != "unreachable" or left < MIN_SECOND_ROUND:
                raise
        progress({"event": "retrying", "reason": "no check got through; we probe first now"})
        try:
            hand_off = await self._round(peer, service, left, progress, explain, wait=True)
        except TunnelFailed as e:
            if e.code != "unreachable":
                raise
            note = "a second round with this side probing first failed too"
            raise TunnelFailed(e.code, f"{e.message}; {note}") from None
        hand_off.info["setup_ms"] = round((self.reactor.seconds() - started) * 1000, 3)
        hand_off.info["rounds"] = 2
        return hand_off

    def _round(
        self,
        peer: str,
        service: str,
        timeout: float,
        progress: ProgressCallback,
        explain: Explain,
        wait: bool = False,
        budget: float | None = None,
    ) -> Deferred[HandOff]:
        introducer = RendezvousIntroducer(
            self.client,
            peer,
            service,
            wait=wait,
            # Round two is the last: a relay too, in case nothing direct works.
            # Over TLS (UDP blocked), the relay is the likely path from the start.
            relay=wait or self._over_tls(),
            # Birthday probing is for round one; round two has the relay.
            hard=self._hard() and not wait,
            pinned=self.settings.pinned_peers.get(peer),
            explain=explain,
        )
        tunnel = self._tunnel(
            Initiator(introducer),
            peer,
            service,
            new_tunnel_id(),
            timeout,
            progress,
            budget,
            hard=introducer.hard,
        )

        def no_relay_either(failure: Failure) -> Failure:
            # Nothing direct worked, and the relay we asked for was refused: say why.
            error = failure.value
            refused = introducer.relay_refused
            if isinstance(error, TunnelFailed) and error.code == "unreachable" and refused:
                return Failure(TunnelFailed(error.code, f"{error.message}; no relay: {refused}"))
            return failure

        return tunnel.result.addErrback(no_relay_either)

    def _tunnel(
        self,
        role: Role,
        peer: str,
        service: str,
        tunnel_id: bytes,
        timeout: float,
        progress: ProgressCallback = lambda event: None,
        budget: float | None = None,
        hard: bool = False,
    ) -> Tunnel:
        server = self.client.server
        stream = self.client.stream if self._over_tls() else None
        tunnel = Tunnel(
            clock=self.reactor,
            sockets=self._sockets,
            role=role,
            peer=peer,
            service=service,
            tunnel_id=tunnel_id,
            own_key=self.settings.private_key,
            timeout=timeout,
            host_addresses=self._addresses(),
            # UDP to the rendezvous is blocked when we speak TLS: no answer would come.
            gatherer=None
            if server is None or stream is not None
            else SignedGather(server, self.name, self.key),
            relay_channel=None if stream is None else self._channel_factory(stream),
            relay_binder=RelayBinder(self.name, self.key),
            port_mapper=self._port_mapper(),
            birthday=self.birthday,
            birthday_sockets=self.birthday_sockets,
            birthday_sprays=self.birthday_sprays,
            hard=hard,
            progress=progress,
            check_budget=budget,
        )
        self.tunnels[tunnel_id] = tunnel

        def done(result: object) -> object:
            self.tunnels.pop(tunnel_id, None)
            self._settle_mapping(tunnel, result)
            if isinstance(result, Failure):
                self.failed += 1
            else:
                self.established += 1
                self.relayed += isinstance(result, HandOff) and result.info["path"] != "direct"
            return result

        tunnel.result.addBoth(done)
        return tunnel

    def _over_tls(self) -> bool:
        stream = self.client.stream
        return stream is not None and stream.open

    def _channel_factory(self, stream: RendezvousStream) -> ChannelFactory:
        def channel(
            relay: tuple[str, int],
            received: Callable[[bytes, tuple[str, int]], None],
            keep: Callable[[bytes, tuple[str, int]], bool],
        ) -> StreamChannel:
            return StreamChannel(self.reactor, self.reactor, stream, relay, received, keep)

        return channel

    def listen(self, service: str, incoming: Callable[[HandOff], None]) -> Callable[[], None]:
        listeners = self.listeners.setdefault(service, [])
        listeners.append(incoming)

        def unlisten() -> None:
            if incoming in listeners:
                listeners.remove(incoming)

        return unlisten

    # -- introductions from peers ------------------------------------------

    def incoming(self, message: stun.Message) -> Deferred[IncomingAnswer]:
        try:
            peer = wire.decode_name(message.get(Attr.PEER), "peer")
            service = wire.decode_name(message.get(Attr.SERVICE), "service")
            tunnel_id = wire.decode_tunnel_id(message)
            # A relay candidate comes only from the rendezvous' RELAY-PORT.
            candidates = [c for c in wire.decode_candidates(message) if c.kind != RELAY]
            # Another node's relay (RELAY-ADDRESS) is out of reach of our
            # TLS stream, which only reaches the node (the worker) we talk to.
            if not (self._over_tls() and message.has(Attr.RELAY_ADDRESS)):
                candidates += relay_candidate(message, self.client.server)
            peer_key = wire.decode_public_key(message)
            sent_at = wire.decode_timestamp(message)
        except wire.ProtocolError as e:
            return succeed((MessageClass.ERROR, wire.error_attributes(e.code, e.reason)))

        def refuse(code: int, why: str) -> Deferred[IncomingAnswer]:
            log.info(
                "refused a tunnel from {peer} for {service}: {why}",
                peer=peer,
                service=service,
                why=why,
            )
            return succeed((MessageClass.ERROR, wire.error_attributes(code)))

        if not self._fresh(sent_at):
            return refuse(403, "the introduction is stale (a replay?)")
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
        role = Responder(
            peer_key,
            candidates,
            nonce=os.urandom(TUNNEL_ID_LENGTH),
            holds_first_checks=message.has(Attr.WAIT),
            peer_hard=message.has(Attr.HARD_NAT) and not message.has(Attr.WAIT),
            # A primer opens a NAT that maps per destination on a port the
            # peer never hears of: only an easy NAT is worth the trace.
            trace=None if self._over_tls() or self._hard() else self.tracer,
        )
        hard = self._hard() and not message.has(Attr.WAIT)
        tunnel = self._tunnel(
            role, peer, service, tunnel_id, self.settings.connect_timeout, hard=hard
        )
        tunnel.result.addCallbacks(self._deliver(service), lambda f: None)

        def accept(ours: list[Candidate]) -> IncomingAnswer:
            return (
                MessageClass.SUCCESS,
                [
                    (Attr.TUNNEL_NONCE, role.nonce),
                    *wire.encode_candidates(ours, message.transaction_id),
                    *([(Attr.HARD_NAT, b"")] if hard else []),
                ],
            )

        def gave_up(failure: Failure) -> IncomingAnswer:
            return (MessageClass.ERROR, wire.error_attributes(486))

        return role.answer.addCallbacks(accept, gave_up)

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
