"""miniupnpd in a lab NAT: the real PCP, NAT-PMP and UPnP-IGD daemon.

miniupnpd refuses to map ports when its WAN address is reserved, and every
lab address is (documentation prefixes).  Its way out, ``ext_perform_stun``,
asks a STUN server from four sockets whether the WAN side is really open:
the lab runs a plain STUN responder for it on the internet's router
(:data:`STUN_ADDRESS`), and nothing ever leaves the lab's namespaces.  The
responder ignores RFC 3489's CHANGE-REQUEST, which miniupnpd sends and a
RFC 5389 server (such as punchd's rendezvous) rejects; answering from the
same address is what a NAT-less WAN sees anyway.

``python -m netlab.upnp stun PORT`` runs the responder; ``python -m
netlab.upnp map`` maps a fresh socket with punchd's port mapper, for tests.
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

STUN_PORT = 3478
MAGIC = 0x2112A442
_LIFETIME = 3600.0


def stun_answer(request: bytes, source: tuple[str, int]) -> bytes | None:
    """A Binding success with XOR-MAPPED-ADDRESS for any Binding request."""
    if len(request) < 20 or request[:2] != b"\x00\x01":
        return None
    if struct.unpack_from("!I", request, 4)[0] != MAGIC:
        return None
    ip = socket.inet_aton(source[0])
    port = source[1] ^ (MAGIC >> 16)
    address = bytes(a ^ b for a, b in zip(ip, struct.pack("!I", MAGIC), strict=True))
    attribute = struct.pack("!HHBBH", 0x0020, 8, 0, 1, port) + address
    return struct.pack("!HH", 0x0101, len(attribute)) + request[4:20] + attribute


def _stun(port: int, lifetime: float) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("0.0.0.0", port))
        s.settimeout(1.0)
        deadline = time.monotonic() + lifetime
        while time.monotonic() < deadline:
            try:
                data, source = s.recvfrom(2048)
            except TimeoutError:
                continue
            answer = stun_answer(data, source)
            if answer is not None:
                s.sendto(answer, source)


#: The chains miniupnpd fills (its nft_init.sh would make them).  Its SNAT
#: chain runs just before the site's masquerade, so that traffic from a
#: mapped port keeps the mapped port; its filter chain only ever accepts.
MINIUPNPD_TABLES = """\
table inet miniupnpd {
\tchain forward {
\t\ttype filter hook forward priority filter; policy accept;
\t\tjump miniupnpd
\t}
\tchain miniupnpd {
\t}
\tchain prerouting {
\t\ttype nat hook prerouting priority dstnat; policy accept;
\t\tjump prerouting_miniupnpd
\t}
\tchain postrouting {
\t\ttype nat hook postrouting priority srcnat - 1; policy accept;
\t\tjump postrouting_miniupnpd
\t}
\tchain prerouting_miniupnpd {
\t}
\tchain postrouting_miniupnpd {
\t}
}
"""


def miniupnpd_config(directory: Path, stun_host: str, lan: str, uuid: str) -> str:
    """A miniupnpd.conf for a lab NAT with interfaces ``wan`` and ``lan``."""
    return "\n".join(
        [
            "ext_ifname=wan",
            "listening_ip=lan",
            "http_port=0",
            "enable_upnp=yes",
            "enable_natpmp=yes",
            "secure_mode=yes",
            "ext_perform_stun=yes",
            f"ext_stun_host={stun_host}",
            f"ext_stun_port={STUN_PORT}",
            f"uuid={uuid}",
            f"lease_file={directory / 'leases'}",
            "upnp_table_name=miniupnpd",
            "upnp_nat_table_name=miniupnpd",
            f"allow 1024-65535 {lan} 1024-65535",
            "deny 0-65535 0.0.0.0/0 0-65535",
            "",
        ]
    )


def _map(lifetime: int, protocols: tuple[str, ...]) -> None:
    """
    Map a fresh UDP socket with punchd's PortMapper; print (JSON lines) what
    the gateway offers and the mapping, then every datagram the socket gets,
    until stdin closes; then delete the mapping and say so.
    """
    from twisted.internet import defer, reactor, stdio
    from twisted.internet.protocol import DatagramProtocol, Protocol

    from punchd.agent.portmap import PortMapper

    def say(**fields: object) -> None:
        print(json.dumps(fields), flush=True)

    class Receiver(DatagramProtocol):
        def datagramReceived(self, datagram: bytes, addr: Any) -> None:
            say(received=datagram.decode(errors="replace"), source=list(addr))

    closed: defer.Deferred[None] = defer.Deferred()

    class Stdin(Protocol):
        def connectionLost(self, reason: object = None) -> None:
            closed.callback(None)

    @defer.inlineCallbacks
    def run() -> Any:
        port = reactor.listenUDP(0, Receiver())  # type: ignore[attr-defined]
        mapper = PortMapper(reactor, protocols=protocols)
        offered = yield mapper.offered()
        mapping = yield mapper.map(port.getHost().port, lifetime)
        described = None if mapping is None else [mapping.protocol, *mapping.external]
        say(offered=offered, port=port.getHost().port, mapping=described)
        stdio.StandardIO(Stdin())
        yield closed
        if mapping is not None:
            yield mapping.delete()
        say(deleted=True)
        reactor.stop()  # type: ignore[attr-defined]

    reactor.callWhenRunning(run)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m netlab.upnp")
    commands = parser.add_subparsers(dest="command", required=True)
    stun = commands.add_parser("stun", help="a STUN Binding responder")
    stun.add_argument("port", type=int)
    stun.add_argument("--lifetime", type=float, default=_LIFETIME)
    mapping = commands.add_parser("map", help="map a UDP socket with punchd's PortMapper")
    mapping.add_argument("--lifetime", type=int, default=120)
    mapping.add_argument("--protocol", action="append", help="only these, in this order")
    args = parser.parse_args(argv)
    if args.command == "stun":
        _stun(args.port, args.lifetime)
    else:
        from punchd.agent.portmap import PROTOCOLS

        _map(args.lifetime, tuple(args.protocol or PROTOCOLS))


if __name__ == "__main__":
    main()
