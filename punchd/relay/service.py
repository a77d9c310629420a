"""
The relay service: allocations for the rendezvous, binds from agents,
timers, limits and counters (docs/relay.rst).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any, NoReturn

from twisted.application import service
from twisted.internet.interfaces import IReactorFDSet, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from punchd import wire
from punchd.relay.addresses import bindable, is_loopback_interface
from punchd.relay.allocation import Address, Allocation, RelayPort, StreamSide, TokenBucket
from punchd.relay.messages import BIND_TYPE, Bind, bind_answer, parse_bind
from punchd.relay.ports import NoPort, PortOpener, open_in_range, udp_opener
from punchd.relay.shortcut import open_shortcuts

__all__ = ["BIND_TIMEOUT", "SWEEP_INTERVAL", "RelayRefused", "RelayService"]

log = Logger()

#: Seconds an allocation may wait for both sides to bind.
BIND_TIMEOUT = 30.0
#: Seconds between checks of the bind and idle timeouts.
SWEEP_INTERVAL = 1.0


class RelayRefused(Exception):
    """
    No allocation: C{code} is the error code the program gets (C{"busy"}:
    a quota or the port range is exhausted; C{"rejected"}: the tunnel id
    belongs to another pair of agents).
    """

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


class RelayService(service.Service):
    """
    Relays raw datagrams between two agents that bound their relay ports.

    @ivar counters: allocations (active, total, refused), binds, datagrams
        and bytes forwarded, and drops by reason.
    """

    def __init__(
        self,
        keys: Callable[[str], bytes | None],
        *,
        clock: IReactorTime,
        interface: str = "",
        ports: tuple[int, int] = (49152, 65535),
        idle_timeout: float = 120.0,
        max_per_agent: int = 16,
        rate: float = 0.0,
        open_port: PortOpener | None = None,
        bind_timeout: float = BIND_TIMEOUT,
    ) -> None:
        self.keys = keys
        self.clock = clock
        self.interface = interface
        self.ports = ports
        self.idle_timeout = idle_timeout
        self.max_per_agent = max_per_agent
        self.rate = rate
        self.bind_timeout = bind_timeout
        self.counters: Counter[str] = Counter()
        self._open = open_port or udp_opener(clock, interface)
        self._allow_loopback = is_loopback_interface(interface)
        self._allocations: dict[bytes, Allocation] = {}
        self._in_use: set[int] = set()
        #: Every allocated relay port, by number: where a stream's frames go.
        self._ports: dict[int, RelayPort] = {}
        #: The allocations a side of which each TLS stream bound.
        self._streams: dict[StreamSide, set[Allocation]] = {}
        self._per_agent: Counter[str] = Counter()
        #: Where the fast path's sockets are read: the reactor, if C{clock} is one.
        self._readers = clock if IReactorFDSet.providedBy(clock) else None
        self._sweeper = LoopingCall(self.sweep)
        self._sweeper.clock = clock

    # -- the rendezvous's API -------------------------------------------------

    def allocate(self, tunnel_id: bytes, initiator: str, responder: str) -> tuple[int, int]:
        """
        (initiator's port, responder's port) for a new relayed tunnel, the
        same again for a tunnel id already allocated to this pair.
        """
        existing = self._allocations.get(tunnel_id)
        if existing is not None:
            if existing.names != (initiator, responder):
                self._refuse("rejected", "tunnel id in use by other agents")
            return existing.ports
        for name in (initiator, responder):
            if self._per_agent[name] >= self.max_per_agent:
                self._refuse("busy", f"agent {name} has {self.max_per_agent} relayed tunnels")
        bucket = TokenBucket(self.rate, self.clock.seconds) if self.rate > 0 else None
        allocation = Allocation(tunnel_id, initiator, responder, self, self.clock.seconds(), bucket)
        try:
            for side in allocation.sides:
                self._listen(side)
        except NoPort as e:
            allocation.close()
            self._forget_ports(allocation)
            self._refuse("busy", str(e))
        self._allocations[tunnel_id] = allocation
        self._per_agent.update((initiator, responder))
        self.counters["allocations"] += 1
        self.counters["allocations-active"] = len(self._allocations)
        log.debug(
            "relay {tunnel} allocated: {initiator} on port {a}, {responder} on port {b}",
            tunnel=tunnel_id.hex()[:8],
            initiator=initiator,
            responder=responder,
            a=allocation.sides[0].port,
            b=allocation.sides[1].port,
        )
        return allocation.ports

    def release(self, tunnel_id: bytes) -> None:
        """
        Free both ports of C{tunnel_id}'s allocation, if it has one.
        """
        allocation = self._allocations.get(tunnel_id)
        if allocation is not None:
            self._free(allocation, "released")

    # -- ports ---------------------------------------------------------------

    def _listen(self, side: RelayPort) -> None:
        low, high = self.ports
        if len(self._in_use) >= high - low + 1:
            raise NoPort(f"all {high - low + 1} relay ports in use")
        side.port, side.listening = open_in_range(self._open, side, low, high, self._in_use)
        self._in_use.add(side.port)
        self._ports[side.port] = side

    def _forget_ports(self, allocation: Allocation) -> None:
        for side in allocation.sides:
            self._in_use.discard(side.port)
            if self._ports.get(side.port) is side:
                del self._ports[side.port]

    def _refuse(self, code: str, reason: str) -> NoReturn:
        self.counters["allocations-refused"] += 1
        log.info("relay allocation refused ({code}): {reason}", code=code, reason=reason)
        raise RelayRefused(code, reason)

    def _free(self, allocation: Allocation, why: str) -> None:
        if allocation.freed:
            return
        for side in allocation.sides:
            if side.stream is not None:
                self._stream_freed(side.stream, allocation)
        allocation.close()
        self._forget_ports(allocation)
        del self._allocations[allocation.tunnel_id]
        self._per_agent.subtract(allocation.names)
        self._per_agent += Counter()  # drop agents at zero
        self.counters[f"freed-{why}"] += 1
        self.counters["allocations-active"] = len(self._allocations)
        log.debug("relay {tunnel} freed: {why}", tunnel=allocation.tunnel_id.hex()[:8], why=why)

    # -- TLS streams -------------------------------------------------------------

    def stream_received(self, stream: StreamSide, port_number: int, data: bytes) -> None:
        """
        A datagram for relay port C{port_number} framed on C{stream}: the
        same as a UDP datagram to that port from the stream's address.
        """
        port = self._ports.get(port_number)
        if port is None:
            self.counters["dropped-stream-no-port"] += 1
        elif port.stream is stream and data[:2] != BIND_TYPE:
            port.forward(data)
        else:
            self.received(port, data, stream.address, stream)

    def stream_closed(self, stream: StreamSide) -> None:
        """
        Free the allocations C{stream} bound a side of: a tunnel relayed
        over TLS ends with its agent's connection.
        """
        for allocation in list(self._streams.get(stream, ())):
            self._free(allocation, "stream-closed")

    def _stream_freed(self, stream: StreamSide, allocation: Allocation) -> None:
        bound = self._streams.get(stream)
        if bound is not None:
            bound.discard(allocation)
            if not bound:
                del self._streams[stream]

    # -- what the ports do not forward at once ------------------------------------

    def received(
        self, port: RelayPort, data: bytes, source: Address, stream: StreamSide | None = None
    ) -> None:
        """
        A bind, or a datagram to drop: from a stranger, to a side not yet
        bound, or to an allocation already freed.  From the bound address
        (and the stream that bound it, if one did), whatever is not that
        side's authenticated bind is the program's and is forwarded.
        """
        if port.allocation.freed:
            self.counters["dropped-freed"] += 1
            return
        from_bound = source == port.bound and stream is port.stream
        bind = parse_bind(data)
        refusal = "not-a-bind" if bind is None else self._refusal(port, bind)
        if refusal is None and port.bound is not None and not from_bound:
            # No rebind: a bind replayed from elsewhere must not hijack the side.
            refusal = "rebind"
        if refusal is None:
            assert bind is not None
            self._bound(port, bind, source, stream)
        elif from_bound:
            port.forward(data)
        elif refusal == "not-a-bind":
            self.counters["dropped-unbound" if port.bound is None else "dropped-stranger"] += 1
        else:
            self.counters[f"dropped-{refusal}"] += 1

    def _refusal(self, port: RelayPort, bind: Bind) -> str | None:
        """
        Why C{bind} is not this side's agent's own bind for this tunnel, or None.
        """
        if bind.name != port.name or self.keys(bind.name) is None:
            return "bind-wrong-name"
        if bind.tunnel_id != port.allocation.tunnel_id:
            return "bind-wrong-tunnel"
        key = self.keys(bind.name)
        if key is None or not bind.verify(key):
            return "bind-unauthenticated"
        return None

    def _bound(
        self, port: RelayPort, bind: Bind, source: Address, stream: StreamSide | None
    ) -> None:
        """
        Record C{source} as the side's bound address (the first time) and
        answer; free the allocation when the bind was a release.
        """
        allocation = port.allocation
        key = self.keys(bind.name)
        host = bindable(source[0], allow_loopback=self._allow_loopback)
        if key is None or host is None:
            self.counters["dropped-bind-address"] += 1
            return
        answer = bind_answer(bind, (host, source[1]), key)
        if len(answer) > len(bind.message.raw):  # never answer bigger than asked
            self.counters["dropped-bind-too-small"] += 1
            return
        if port.bound is None:
            port.bound = source
            self.counters["binds"] += 1
            if stream is not None:
                port.bind_stream(stream)
                self._streams.setdefault(stream, set()).add(allocation)
                stream.accepted(bind.name)
            if allocation.forwarding:
                allocation.last_active = self.clock.seconds()
                # The fast path is UDP to UDP: a stream's side takes the slow one.
                streamed = any(side.stream is not None for side in allocation.sides)
                if self._readers is not None and not streamed:
                    allocation.shortcuts = list(open_shortcuts(allocation, self._readers))
            log.debug(
                "relay {tunnel}: {name} bound {address}",
                tunnel=allocation.tunnel_id.hex()[:8],
                name=port.name,
                address=wire.format_address((host, source[1])),
            )
        else:
            self.counters["bind-retransmissions"] += 1
        try:
            port.send(answer, source)
        except OSError as e:  # a full buffer: the agent retransmits its bind
            self.counters[f"send-error-{e.errno}"] += 1
        if bind.release:
            self._free(allocation, "released-by-agent")

    # -- timers ----------------------------------------------------------------------

    def sweep(self) -> None:
        """
        Free allocations never bound by both sides within the bind timeout,
        and those silent for the idle timeout.
        """
        now = self.clock.seconds()
        for allocation in list(self._allocations.values()):
            if allocation.active:
                allocation.active = False
                allocation.last_active = now
            elif not allocation.forwarding:
                if now - allocation.created >= self.bind_timeout:
                    self._free(allocation, "bind-timeout")
            elif now - allocation.last_active >= self.idle_timeout:
                self._free(allocation, "idle")

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._sweeper.start(SWEEP_INTERVAL, now=False)

    def stopService(self) -> Any:
        """
        Free every allocation: relayed tunnels end with the rendezvous.
        """
        super().stopService()  # type: ignore[no-untyped-call]
        if self._sweeper.running:
            self._sweeper.stop()
        for allocation in list(self._allocations.values()):
            self._free(allocation, "stopped")
        return None

    def active(self) -> int:
        return len(self._allocations)
