"""
Which addresses a relay port may learn as a bound address, and so ever send to.

A bound address is the source of an authenticated bind as the kernel
reported it, so most of these cannot arrive from a real network; they are
refused anyway, by construction, because every forwarded datagram goes to
a bound address: coturn's CVE history (loopback, 0.0.0.0, IPv4-mapped and
link-local peers) is the warning.
"""

from __future__ import annotations

import ipaddress

__all__ = ["bindable", "is_loopback_interface"]

_BROADCAST = ipaddress.IPv4Address("255.255.255.255")
_THIS_NETWORK = ipaddress.IPv4Network("0.0.0.0/8")


def is_loopback_interface(interface: str) -> bool:
    """
    Whether the relay listens on a loopback address only (tests, or a relay
    for one machine): only then may a loopback address bind.
    """
    if interface == "":
        return False
    try:
        return ipaddress.ip_address(interface).is_loopback
    except ValueError:
        return False


def bindable(host: str, *, allow_loopback: bool) -> str | None:
    """
    C{host} in canonical text (IPv4-mapped IPv6 unwrapped), or None when a
    relay must never send to it: unspecified, multicast, broadcast,
    link-local, reserved, and loopback unless C{allow_loopback}.
    """
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return ip.compressed if allow_loopback else None
    if (
        ip.is_unspecified
        or ip.is_multicast
        or ip.is_link_local
        or ip.is_reserved  # 240.0.0.0/4, and ::/8 with the IPv4-compatible addresses
        or ip == _BROADCAST
        or ip in _THIS_NETWORK
        or (isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local)
    ):
        return None
    return ip.compressed
