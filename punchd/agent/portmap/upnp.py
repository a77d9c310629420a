"""
UPnP-IGD port mapping: SSDP discovery of the gateway's Internet Gateway
Device, its description, and the SOAP actions of its WANIPConnection (or
WANPPPConnection) service.

The pure half (building and parsing the messages) is tested alone; the
Twisted half (L{Igd}) speaks HTTP to the gateway with C{twisted.web}'s
client, each call bounded by a timeout, no connection kept open.
"""

from __future__ import annotations

import random
import urllib.parse
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from io import BytesIO
from typing import Any
from xml.sax.saxutils import escape

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.client import Agent, FileBodyProducer, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from punchd.agent.portmap.mapping import Mapping, Renewed

SSDP_PORT = 1900
IGD = "urn:schemas-upnp-org:device:InternetGatewayDevice:1"
SERVICES = (
    "urn:schemas-upnp-org:service:WANIPConnection:2",
    "urn:schemas-upnp-org:service:WANIPConnection:1",
    "urn:schemas-upnp-org:service:WANPPPConnection:1",
)
#: A description or SOAP answer larger than this is not a gateway's.
MAX_BODY = 65536
HTTP_TIMEOUT = 2.0
DESCRIPTION = "punchd"
UPNP = "upnp"


class UpnpError(Exception):
    """The gateway refused an action: C{code} is the UPnP error code, if any."""

    def __init__(self, code: int | None, text: str) -> None:
        super().__init__(f"UPnP error {code}: {text}" if code else text)
        self.code = code


def search_request() -> bytes:
    return (
        "M-SEARCH * HTTP/1.1\r\n"
        "HOST: 239.255.255.250:1900\r\n"
        'MAN: "ssdp:discover"\r\n'
        "MX: 1\r\n"
        f"ST: {IGD}\r\n\r\n"
    ).encode("ascii")


def parse_search_answer(data: bytes, gateway: str) -> str | None:
    """
    The description URL of an SSDP answer, if it is a success whose
    LOCATION is an http URL on the gateway itself (nothing else is fetched).
    """
    lines = data.decode("latin-1").split("\r\n")
    if not lines[0].startswith("HTTP/1.1 200"):
        return None
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "location":
            url = urllib.parse.urlsplit(value.strip())
            if url.scheme == "http" and url.hostname == gateway:
                return value.strip()
    return None


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]


def parse_description(xml: bytes, location: str) -> tuple[str, str] | None:
    """
    The (service type, absolute control URL) of the best WAN connection
    service a device description offers.
    """
    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError:
        return None
    base = location
    found: dict[str, str] = {}
    for element in root.iter():
        if _local(element.tag) == "URLBase" and element.text:
            base = element.text.strip()
        if _local(element.tag) != "service":
            continue
        fields = {_local(child.tag): (child.text or "").strip() for child in element}
        kind, control = fields.get("serviceType", ""), fields.get("controlURL", "")
        if kind in SERVICES and control:
            found.setdefault(kind, control)
    for kind in SERVICES:
        if kind in found:
            return kind, urllib.parse.urljoin(base, found[kind])
    return None


def soap_body(service: str, action: str, arguments: list[tuple[str, str]]) -> bytes:
    inner = "".join(f"<{n}>{escape(v)}</{n}>" for n, v in arguments)
    return (
        '<?xml version="1.0"?>\r\n'
        '<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"'
        ' s:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/">'
        f'<s:Body><u:{action} xmlns:u="{service}">{inner}</u:{action}></s:Body>'
        "</s:Envelope>\r\n"
    ).encode()


def parse_soap_answer(status: int, xml: bytes) -> dict[str, str]:
    """
    The output arguments of a SOAP answer, by name; raises L{UpnpError} for
    a fault (or anything but a 200 with XML).
    """
    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError:
        raise UpnpError(None, f"HTTP {status} without a SOAP answer") from None
    values = {_local(e.tag): (e.text or "").strip() for e in root.iter()}
    if status != 200 or "Fault" in values:
        code = values.get("errorCode", "")
        raise UpnpError(int(code) if code.isdigit() else None, values.get("errorDescription", ""))
    return values


@dataclass(frozen=True)
class Igd:
    """
    The WAN connection service of one gateway, found by L{discover}-ing.
    """

    reactor: Any
    service: str
    control: str

    def call(self, action: str, arguments: list[tuple[str, str]]) -> Deferred[dict[str, str]]:
        """
        One SOAP action; fails with L{UpnpError}, a timeout or a connection error.
        """
        agent = Agent(self.reactor, connectTimeout=HTTP_TIMEOUT)
        headers = Headers(
            {
                b"Content-Type": [b'text/xml; charset="utf-8"'],
                b"SOAPAction": [f'"{self.service}#{action}"'.encode()],
            }
        )
        body = FileBodyProducer(BytesIO(soap_body(self.service, action, arguments)))
        d = _read(agent.request(b"POST", self.control.encode(), headers, body))
        d.addTimeout(HTTP_TIMEOUT, self.reactor)
        return d.addCallback(lambda answer: parse_soap_answer(*answer))


def _read(requested: Deferred[IResponse]) -> Deferred[tuple[int, bytes]]:
    """
    The status and body of the response C{requested} will give.
    """
    d: Deferred[tuple[int, bytes]] = Deferred()
    requested.addCallback(_body).chainDeferred(d)
    return d


def _body(response: IResponse) -> Deferred[tuple[int, bytes]]:
    if response.length is not None and response.length != -1 and response.length > MAX_BODY:
        response.deliverBody(_Discard())
        raise UpnpError(None, "answer too large")
    d: Deferred[bytes] = readBody(response)
    return d.addCallback(lambda body: (int(response.code), body))


class _Discard:
    def makeConnection(self, transport: Any) -> None:
        transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Any) -> None:
        pass


def fetch_description(reactor: Any, location: str) -> Deferred[Igd | None]:
    """
    The gateway's WAN connection service, from its description at
    C{location}; None when it has none or does not answer in time.
    """
    agent = Agent(reactor, connectTimeout=HTTP_TIMEOUT)
    d = _read(agent.request(b"GET", location.encode()))
    d.addTimeout(HTTP_TIMEOUT, reactor)

    def parsed(answer: tuple[int, bytes]) -> Igd | None:
        status, body = answer
        found = parse_description(body, location) if status == 200 else None
        return None if found is None else Igd(reactor, *found)

    return d.addCallback(parsed).addErrback(lambda _: None)


#: UPnP errors AddPortMapping may answer that another try can get round.
CONFLICT = 718
ONLY_PERMANENT = 725


def _add(igd: Igd, local: str, external: int, port: int, lease: int) -> Deferred[dict[str, str]]:
    arguments = [
        ("NewRemoteHost", ""),
        ("NewExternalPort", str(external)),
        ("NewProtocol", "UDP"),
        ("NewInternalPort", str(port)),
        ("NewInternalClient", local),
        ("NewEnabled", "1"),
        ("NewPortMappingDescription", DESCRIPTION),
        ("NewLeaseDuration", str(lease)),
    ]
    if igd.service.endswith(":2"):
        return igd.call("AddAnyPortMapping", arguments)
    return igd.call("AddPortMapping", arguments)


def _granted(igd: Igd, local: str, port: int, lease: int) -> Deferred[tuple[int, int]]:
    """
    Add a mapping of C{port}, asking for the same external port first, then
    (on a conflict) a random one, then (when only permanent leases are
    allowed) a lease of 0; the external port and lease granted.
    """
    tries = [(port, lease), (random.randint(1024, 65535), lease), (port, 0)]

    def attempt(index: int) -> Deferred[tuple[int, int]]:
        external, asked = tries[index]

        def added(values: dict[str, str]) -> tuple[int, int]:
            reserved = values.get("NewReservedPort", "")
            return (int(reserved) if reserved.isdigit() else external), asked

        def refused(failure: Failure) -> Deferred[tuple[int, int]] | Failure:
            error = failure.value
            if isinstance(error, UpnpError) and index + 1 < len(tries):
                if (error.code, index) in ((CONFLICT, 0), (ONLY_PERMANENT, 0)):
                    return attempt(1 if error.code == CONFLICT else 2)
                if (error.code, index) == (ONLY_PERMANENT, 1):
                    return attempt(2)
            return failure

        return _add(igd, local, external, port, asked).addCallbacks(added, refused)

    return attempt(0)


def map_port(igd: Igd, local: str, port: int, lifetime: int) -> Deferred[Mapping | None]:
    """
    A UPnP mapping of UDP C{port} on C{local}; fails with L{UpnpError} (or
    a timeout) when the gateway will not.
    """
    state: dict[str, Any] = {}

    def external_address(values: dict[str, str]) -> Deferred[tuple[int, int]]:
        state["address"] = values.get("NewExternalIPAddress", "")
        return _granted(igd, local, port, lifetime)

    def made(granted: tuple[int, int]) -> Mapping:
        external, lease = granted

        def renew(mapping: Mapping) -> Deferred[Renewed | None]:
            d = _add(igd, local, mapping.external[1], port, lease)
            return d.addCallback(lambda _: (mapping.external, lease))

        def delete(mapping: Mapping) -> Deferred[dict[str, str]]:
            arguments = [
                ("NewRemoteHost", ""),
                ("NewExternalPort", str(mapping.external[1])),
                ("NewProtocol", "UDP"),
            ]
            return igd.call("DeletePortMapping", arguments)

        return Mapping(UPNP, (state["address"], external), lease, port, renew, delete)

    d = igd.call("GetExternalIPAddress", [])
    return d.addCallback(external_address).addCallback(made)
