"""
The port mapper's codecs (PCP, NAT-PMP, SSDP, SOAP, the route table) and
its exchanges on a fake clock and transport: answers, silence, refusals.
"""

from __future__ import annotations

import ipaddress
import struct
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from punchd.agent.portmap import PortMapper, codec, upnp
from punchd.agent.portmap.exchange import ask
from punchd.agent.portmap.gateway import default_gateway

GATEWAY = "192.0.2.1"
LOCAL = "192.0.2.2"
NONCE = bytes(range(12))


# -- NAT-PMP (RFC 6886) ---------------------------------------------------


def test_pmp_requests_follow_the_rfc_layout() -> None:
    assert codec.pmp_address_request() == b"\x00\x00"
    # Version 0, opcode 1 (UDP), reserved, internal, suggested external, lifetime.
    assert codec.pmp_map_request(40000, 40001, 7200) == bytes.fromhex(
        "0001 0000 9c40 9c41 00001c20"
    )
    assert codec.pmp_map_request(40000, 0, 0)[-6:] == bytes(6)


def test_pmp_answers_parse() -> None:
    address = bytes.fromhex("0080 0000 00000e10 cb007105")
    assert codec.parse_pmp_address(address) == codec.PmpAddress(0, 3600, "203.0.113.5")
    mapping = bytes.fromhex("0081 0000 00000e10 9c40 9c41 00001c20")
    assert codec.parse_pmp_mapping(mapping) == codec.PmpMapping(0, 3600, 40000, 40001, 7200)
    assert codec.parse_pmp_mapping(address) is None
    assert codec.parse_pmp_address(mapping) is None
    assert codec.parse_pmp_address(address[:11]) is None
    assert codec.is_pmp_answer(bytes.fromhex("0081 0001 00000000"))
    assert not codec.is_pmp_answer(b"\x02\x81\x00\x00")


# -- PCP (RFC 6887) ---------------------------------------------------------


def mapped(address: str) -> bytes:
    return ipaddress.IPv6Address("::ffff:" + address).packed


def test_pcp_announce_is_a_bare_header() -> None:
    request = codec.pcp_announce_request(LOCAL)
    assert len(request) == 24
    assert request[:8] == bytes([2, 0, 0, 0, 0, 0, 0, 0])
    assert request[8:] == mapped(LOCAL)


def test_pcp_map_request_layout() -> None:
    request = codec.pcp_map_request(LOCAL, NONCE, 40000, 7200, ("203.0.113.5", 40001))
    assert len(request) == 60
    version, opcode, _, lifetime = struct.unpack_from("!BBHI", request)
    assert (version, opcode, lifetime) == (2, 1, 7200)
    assert request[8:24] == mapped(LOCAL)
    assert request[24:36] == NONCE
    assert request[36] == 17 and request[37:40] == bytes(3)
    assert struct.unpack_from("!HH", request, 40) == (40000, 40001)
    assert request[44:60] == mapped("203.0.113.5")
    assert codec.pcp_map_request(LOCAL, NONCE, 1, 0)[44:60] == mapped("0.0.0.0")
    with pytest.raises(ValueError):
        codec.pcp_map_request(LOCAL, b"short", 1, 0)


def pcp_map_answer(result: int = 0, nonce: bytes = NONCE, lifetime: int = 7200) -> bytes:
    header = struct.pack("!BBBBII", 2, 0x81, 0, result, lifetime, 99) + bytes(12)
    body = nonce + struct.pack("!B3xHH", 17, 40000, 40001) + mapped("203.0.113.5")
    return header + body


def test_pcp_answers_parse() -> None:
    answer = codec.parse_pcp(pcp_map_answer())
    assert answer == codec.PcpAnswer(1, 0, 7200, 99, NONCE, 40000, 40001, "203.0.113.5")
    refused = codec.parse_pcp(pcp_map_answer(result=2)[:24])
    assert refused is not None and refused.result == 2 and refused.nonce == b""
    announce = struct.pack("!BBBBII", 2, 0x80, 0, 0, 0, 5) + bytes(12)
    assert codec.parse_pcp(announce) == codec.PcpAnswer(0, 0, 0, 5)
    assert codec.parse_pcp(codec.pcp_announce_request(LOCAL)) is None  # a request
    assert codec.parse_pcp(b"\x00\x80" + bytes(22)) is None  # NAT-PMP


# -- UPnP-IGD ---------------------------------------------------------------

DESCRIPTION = b"""<?xml version="1.0"?>
<root xmlns="urn:schemas-upnp-org:device-1-0"><device><deviceList><device>
<deviceList><device><serviceList>
<service><serviceType>urn:schemas-upnp-org:service:WANIPConnection:1</serviceType>
<controlURL>/ctl/IPConn1</controlURL></service>
<service><serviceType>urn:schemas-upnp-org:service:WANIPConnection:2</serviceType>
<controlURL>/ctl/IPConn</controlURL></service>
</serviceList></device></deviceList></device></deviceList></device></root>"""


def test_ssdp_answer_gives_a_location_on_the_gateway_only() -> None:
    search = upnp.search_request().decode()
    assert search.startswith("M-SEARCH * HTTP/1.1\r\n") and search.endswith("\r\n\r\n")
    assert f"ST: {upnp.IGD}" in search
    answer = b"HTTP/1.1 200 OK\r\nST: x\r\nLocation: http://192.0.2.1:5000/rootDesc.xml\r\n\r\n"
    assert upnp.parse_search_answer(answer, GATEWAY) == "http://192.0.2.1:5000/rootDesc.xml"
    assert upnp.parse_search_answer(answer, "192.0.2.9") is None
    assert upnp.parse_search_answer(answer.replace(b"200 OK", b"404 No"), GATEWAY) is None


def test_description_gives_the_best_wan_service() -> None:
    location = "http://192.0.2.1:5000/rootDesc.xml"
    service, control = upnp.parse_description(DESCRIPTION, location) or ("", "")
    assert service.endswith("WANIPConnection:2")
    assert control == "http://192.0.2.1:5000/ctl/IPConn"
    assert upnp.parse_description(b"<root/>", location) is None
    assert upnp.parse_description(b"not xml", location) is None


def test_soap_answers_and_faults() -> None:
    body = upnp.soap_body("urn:x", "AddPortMapping", [("NewPortMappingDescription", "a<b")])
    assert b'<u:AddPortMapping xmlns:u="urn:x">' in body and b"a&lt;b" in body
    ok = (
        b"<s:Envelope xmlns:s='x'><s:Body><u:R xmlns:u='y'>"
        b"<NewReservedPort>4000</NewReservedPort></u:R></s:Body></s:Envelope>"
    )
    assert upnp.parse_soap_answer(200, ok)["NewReservedPort"] == "4000"
    fault = (
        b"<s:Envelope xmlns:s='x'><s:Body><s:Fault><detail><UPnPError>"
        b"<errorCode>718</errorCode><errorDescription>Conflict</errorDescription>"
        b"</UPnPError></detail></s:Fault></s:Body></s:Envelope>"
    )
    with pytest.raises(upnp.UpnpError) as error:
        upnp.parse_soap_answer(500, fault)
    assert error.value.code == 718
    with pytest.raises(upnp.UpnpError):
        upnp.parse_soap_answer(500, b"<html")


# -- the default gateway ----------------------------------------------------


def test_default_gateway_from_the_route_table(tmp_path: Path) -> None:
    table = tmp_path / "route"
    table.write_text(
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\n"
        "eth0\t000200C0\t00000000\t0001\t0\t0\t0\tF0FFFFFF\n"
        "eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\n"
    )
    assert default_gateway(str(table)) == GATEWAY
    table.write_text("Iface\tDestination\tGateway\n")
    assert default_gateway(str(table)) is None
    assert default_gateway(str(tmp_path / "missing")) is None


# -- exchanges on a fake clock ----------------------------------------------


class FakePort:
    def __init__(self, protocol: Any) -> None:
        self.protocol = protocol
        self.sent: list[tuple[bytes, tuple[str, int]]] = []
        self.open = True

    def write(self, data: bytes, address: tuple[str, int]) -> None:
        self.sent.append((data, address))

    def stopListening(self) -> None:
        self.open = False
        self.protocol.transport = None


class FakeReactor(Clock):
    def __init__(self) -> None:
        super().__init__()
        self.ports: list[FakePort] = []

    def listenUDP(self, port: int, protocol: Any, interface: str = "") -> FakePort:
        fake = FakePort(protocol)
        self.ports.append(fake)
        protocol.makeConnection(fake)
        return fake


def result_of(d: Deferred[Any]) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "not fired"
    return results[0]


def test_exchange_resends_then_gives_up_and_closes() -> None:
    reactor = FakeReactor()
    d = ask(reactor, LOCAL, (GATEWAY, 5351), b"req", lambda data: data)
    reactor.advance(0)
    reactor.advance(0.25)
    reactor.advance(0.25)
    [port] = reactor.ports
    assert [data for data, _ in port.sent] == [b"req"] * 3
    reactor.advance(0.5)
    assert result_of(d) is None and not port.open
    assert reactor.getDelayedCalls() == []


def test_exchange_takes_the_first_acceptable_answer_from_the_gateway() -> None:
    reactor = FakeReactor()
    d = ask(reactor, LOCAL, (GATEWAY, 5351), b"req", lambda data: data if data == b"ok" else None)
    reactor.advance(0)
    [port] = reactor.ports
    port.protocol.datagramReceived(b"ok", ("192.0.2.66", 5351))  # not the gateway
    port.protocol.datagramReceived(b"junk", (GATEWAY, 5351))
    assert not d.called
    port.protocol.datagramReceived(b"ok", (GATEWAY, 5351))
    assert result_of(d) == b"ok" and not port.open
    assert reactor.getDelayedCalls() == []


def test_cancelled_exchange_closes_its_socket() -> None:
    reactor = FakeReactor()
    d = ask(reactor, LOCAL, (GATEWAY, 5351), b"req", lambda data: data)
    d.cancel()
    assert result_of(d) is None and not reactor.ports[0].open
    assert reactor.getDelayedCalls() == []


def answer_probes(reactor: FakeReactor, pcp: bytes | None, pmp: bytes | None) -> None:
    reactor.advance(0)
    for port in reactor.ports:
        if not port.open or not port.sent:
            continue
        request, server = port.sent[0]
        if server[1] == 5351 and request[0] == 2 and pcp is not None:
            port.protocol.datagramReceived(pcp, server)
        elif server[1] == 5351 and request[0] == 0 and pmp is not None:
            port.protocol.datagramReceived(pmp, server)


def mapper(reactor: FakeReactor, monkeypatch: pytest.MonkeyPatch) -> PortMapper:
    monkeypatch.setattr("punchd.agent.portmap.mapper.local_address", lambda gateway: LOCAL)
    return PortMapper(reactor, GATEWAY)


def test_offered_within_a_second(monkeypatch: pytest.MonkeyPatch) -> None:
    reactor = FakeReactor()
    m = mapper(reactor, monkeypatch)
    d = m.offered()
    announce = struct.pack("!BBBBII", 2, 0x80, 0, 0, 0, 5) + bytes(12)
    answer_probes(reactor, announce, bytes.fromhex("0080 0000 00000e10 cb007105"))
    assert not d.called  # UPnP still has its chance
    reactor.advance(1.0)
    assert result_of(d) == ["pcp", "nat-pmp"]
    assert all(not port.open for port in reactor.ports)


def test_nat_pmp_only_gateway_is_not_taken_for_pcp(monkeypatch: pytest.MonkeyPatch) -> None:
    reactor = FakeReactor()
    d = mapper(reactor, monkeypatch).offered()
    unsupported = bytes.fromhex("0080 0001 00000000 00000000")
    answer_probes(reactor, unsupported, bytes.fromhex("0080 0000 00000e10 cb007105"))
    reactor.advance(1.0)
    assert result_of(d) == ["nat-pmp"]


def test_silent_gateway_offers_nothing_and_maps_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    reactor = FakeReactor()
    m = mapper(reactor, monkeypatch)
    d = m.map(40000, 120)
    reactor.advance(1.0)
    assert result_of(d) is None
    assert reactor.getDelayedCalls() == []


def test_pcp_mapping_renews_and_deletes_with_its_nonce(monkeypatch: pytest.MonkeyPatch) -> None:
    reactor = FakeReactor()
    m = mapper(reactor, monkeypatch)
    d = m.map(40000, 7200)
    announce = struct.pack("!BBBBII", 2, 0x80, 0, 0, 0, 5) + bytes(12)
    answer_probes(reactor, announce, None)
    reactor.advance(1.0)
    reactor.advance(0)
    port = reactor.ports[-1]
    request, server = port.sent[0]
    nonce = request[24:36]
    port.protocol.datagramReceived(pcp_map_answer(result=0, nonce=bytes(12)), server)  # not ours
    port.protocol.datagramReceived(pcp_map_answer(nonce=nonce), server)
    mapping = result_of(d)
    assert (mapping.protocol, mapping.external, mapping.lifetime) == (
        "pcp",
        ("203.0.113.5", 40001),
        7200,
    )
    deleted = mapping.delete()
    reactor.advance(0)
    port = reactor.ports[-1]
    request, server = port.sent[0]
    assert request[24:36] == nonce and struct.unpack_from("!I", request, 4)[0] == 0
    port.protocol.datagramReceived(pcp_map_answer(nonce=nonce, lifetime=0), server)
    assert result_of(deleted) is None and mapping.deleted
    assert result_of(mapping.renew()) is False
