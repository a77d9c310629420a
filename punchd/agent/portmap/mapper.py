"""
The port mapper: which mapping protocols the gateway offers, and a mapping
of a local UDP port with the best of them.

Discovery asks the gateway all three ways at once (a PCP ANNOUNCE, a
NAT-PMP external address request and an SSDP search), as Tailscale's
portmapper does, and is over in under a second whatever answers.  Mapping
then tries PCP, NAT-PMP and UPnP-IGD in that order, among those offered.
Nothing here raises into the caller: a gateway that says no, says nothing
or says nonsense yields None (or an empty list), and the reason is logged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.logger import Logger

from punchd.agent.portmap import codec, upnp
from punchd.agent.portmap.exchange import ask
from punchd.agent.portmap.gateway import default_gateway, local_address
from punchd.agent.portmap.mapping import Address, Mapping, Renewed, quiet

log = Logger()

PCP, NAT_PMP, UPNP = "pcp", "nat-pmp", "upnp"
PROTOCOLS = (PCP, NAT_PMP, UPNP)
#: How long what discovery found is trusted before asking again.
PROBE_TRUST = 60.0


@dataclass
class _Found:
    """What discovery learned, and when."""

    at: float
    gateway: str
    local: str
    pcp: bool = False
    pmp_address: str | None = None
    location: str | None = None
    igd: upnp.Igd | None = None

    def names(self) -> list[str]:
        offered = (self.pcp, self.pmp_address is not None, self.location is not None)
        return [name for name, yes in zip(PROTOCOLS, offered, strict=True) if yes]


class PortMapper:
    """
    Port mappings from the default gateway (or C{gateway}), for one agent,
    by the first of C{protocols} (in that order) that the gateway offers.
    """

    def __init__(
        self,
        reactor: Any,
        gateway: str | None = None,
        *,
        find_gateway: Callable[[], str | None] = default_gateway,
        protocols: tuple[str, ...] = PROTOCOLS,
    ) -> None:
        self._reactor = reactor
        self._protocols = protocols
        self._gateway = gateway
        self._find_gateway = find_gateway
        self._found: _Found | None = None
        self._waiters: list[Deferred[_Found | None]] = []

    # -- discovery ---------------------------------------------------------

    def offered(self) -> Deferred[list[str]]:
        """
        The protocols the gateway answers, of C{"pcp"}, C{"nat-pmp"} and
        C{"upnp"}; empty when there is no gateway or it answers none.
        """
        return self._discover(fresh=True).addCallback(
            lambda found: [] if found is None else found.names()
        )

    def _discover(self, fresh: bool = False) -> Deferred[_Found | None]:
        found = self._found
        if found is not None and not fresh:
            if self._reactor.seconds() - found.at < PROBE_TRUST:
                return succeed(found)
        waiter: Deferred[_Found | None] = Deferred()
        self._waiters.append(waiter)
        if len(self._waiters) == 1:
            self._probe().addCallback(self._probed)
        return waiter

    def _probed(self, found: _Found | None) -> None:
        self._found = found
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(found)

    def _probe(self) -> Deferred[_Found | None]:
        gateway = self._gateway or self._find_gateway()
        local = local_address(gateway) if gateway else None
        if gateway is None or local is None:
            return succeed(None)
        found = _Found(self._reactor.seconds(), gateway, local)
        server = (gateway, codec.SERVER_PORT)

        def pcp_ok(data: bytes) -> bool | None:
            if codec.is_pmp_answer(data):
                return False
            answer = codec.parse_pcp(data)
            return None if answer is None else answer.result == 0

        def pmp_ok(data: bytes) -> str | None:
            answer = codec.parse_pmp_address(data)
            return answer.address if answer is not None and answer.result == 0 else None

        def ssdp_ok(data: bytes) -> str | None:
            return upnp.parse_search_answer(data, gateway)

        probes = [
            ask(self._reactor, local, server, codec.pcp_announce_request(local), pcp_ok),
            ask(self._reactor, local, server, codec.pmp_address_request(), pmp_ok),
            ask(self._reactor, local, (gateway, upnp.SSDP_PORT), upnp.search_request(), ssdp_ok),
        ]

        def gathered(results: list[tuple[bool, Any]]) -> _Found:
            pcp, pmp, location = (value if ok else None for ok, value in results)
            found.pcp, found.pmp_address, found.location = bool(pcp), pmp, location
            return found

        return DeferredList(probes).addCallback(gathered)  # type: ignore[arg-type]

    # -- mapping -----------------------------------------------------------

    def map(self, local_port: int, lifetime: int) -> Deferred[Mapping | None]:
        """
        A mapping of UDP C{local_port} on our address towards the gateway,
        for C{lifetime} seconds, by the first offered protocol that grants
        it; None when none does.  Never fails.
        """
        mappers = {PCP: self._map_pcp, NAT_PMP: self._map_pmp, UPNP: self._map_upnp}

        def attempt(found: _Found | None, names: list[str]) -> Deferred[Mapping | None]:
            if found is None or not names:
                return succeed(None)
            d = quiet(mappers[names[0]](found, local_port, lifetime), "request")

            def next_one(mapping: Mapping | None) -> Mapping | Deferred[Mapping | None]:
                if mapping is not None:
                    log.info(
                        "gateway maps {external} to port {port} ({protocol})",
                        external=f"{mapping.external[0]}:{mapping.external[1]}",
                        port=local_port,
                        protocol=mapping.protocol,
                    )
                    return mapping
                return attempt(found, names[1:])

            return d.addCallback(next_one)

        d = self._discover()

        def usable(found: _Found | None) -> list[str]:
            offered = [] if found is None else found.names()
            return [name for name in self._protocols if name in offered]

        d.addCallback(lambda found: attempt(found, usable(found)))
        return quiet(d, "request")

    def _map_pcp(self, found: _Found, port: int, lifetime: int) -> Deferred[Mapping | None]:
        server = (found.gateway, codec.SERVER_PORT)
        nonce = codec.new_nonce()

        def request(lifetime: int, external: Address) -> Deferred[Renewed | None]:
            data = codec.pcp_map_request(found.local, nonce, port, lifetime, external)

            def accept(answer: bytes) -> codec.PcpAnswer | None:
                parsed = codec.parse_pcp(answer)
                ok = parsed is not None and parsed.opcode == codec.PCP_OP_MAP
                return parsed if ok and parsed is not None and parsed.nonce == nonce else None

            d = ask(self._reactor, found.local, server, data, accept)
            return d.addCallback(_pcp_granted)

        def made(granted: Renewed | None) -> Mapping | None:
            if granted is None:
                return None

            def renew(mapping: Mapping) -> Deferred[Renewed | None]:
                return request(lifetime, mapping.external)

            def delete(mapping: Mapping) -> Deferred[Renewed | None]:
                return request(0, mapping.external)

            return Mapping(PCP, granted[0], granted[1], port, renew, delete)

        return request(lifetime, ("0.0.0.0", port)).addCallback(made)

    def _map_pmp(self, found: _Found, port: int, lifetime: int) -> Deferred[Mapping | None]:
        server = (found.gateway, codec.SERVER_PORT)
        address = found.pmp_address or ""

        def request(lifetime: int, external: int) -> Deferred[Renewed | None]:
            def accept(data: bytes) -> codec.PmpMapping | None:
                parsed = codec.parse_pmp_mapping(data)
                return parsed if parsed is not None and parsed.internal_port == port else None

            def granted(answer: codec.PmpMapping | None) -> Renewed | None:
                if answer is None or answer.result != 0:
                    reason = "no answer" if answer is None else codec.PMP_RESULTS.get(answer.result)
                    log.info("NAT-PMP refused: {reason}", reason=reason)
                    return None
                return (address, answer.external_port), answer.lifetime

            data = codec.pmp_map_request(port, external, lifetime)
            return ask(self._reactor, found.local, server, data, accept).addCallback(granted)

        def made(granted: Renewed | None) -> Mapping | None:
            if granted is None:
                return None
            return Mapping(
                NAT_PMP,
                granted[0],
                granted[1],
                port,
                lambda m: request(lifetime, m.external[1]),
                lambda m: request(0, 0),
            )

        return request(lifetime, port).addCallback(made)

    def _map_upnp(self, found: _Found, port: int, lifetime: int) -> Deferred[Mapping | None]:
        def with_igd(igd: upnp.Igd | None) -> Deferred[Mapping | None]:
            found.igd = igd
            if igd is None:
                return succeed(None)
            return upnp.map_port(igd, found.local, port, lifetime)

        if found.igd is not None:
            return with_igd(found.igd)
        if found.location is None:
            return succeed(None)
        return upnp.fetch_description(self._reactor, found.location).addCallback(with_igd)


def _pcp_granted(answer: codec.PcpAnswer | None) -> Renewed | None:
    if answer is None or answer.result != 0:
        reason = "no answer" if answer is None else codec.PCP_RESULTS.get(answer.result)
        log.info("PCP refused: {reason}", reason=reason)
        return None
    return (answer.external_address, answer.external_port), answer.lifetime
