"""
Host candidates: the addresses of this machine's interfaces.

Loopback is left out (a peer on another host would reach its own loopback),
and so are link-local addresses (they need a scope and rarely route); the
server-reflexive candidate covers peers on this very host.
"""

from __future__ import annotations

import array
import fcntl
import ipaddress
import socket
import struct

SIOCGIFCONF = 0x8912
IFREQ_SIZE = 40
MAX_INTERFACES = 256
IF_INET6 = "/proc/net/if_inet6"
#: IFA_F_DADFAILED | IFA_F_DEPRECATED | IFA_F_TENTATIVE: not usable (yet).
UNUSABLE_IPV6 = 0x08 | 0x20 | 0x40


def host_addresses() -> list[str]:
    """
    The IPv4 addresses of configured interfaces, then their global or
    unique-local IPv6 addresses, each in kernel order.
    """
    return ipv4_addresses() + ipv6_addresses()


def ipv6_addresses(table: str = IF_INET6) -> list[str]:
    """
    IPv6 addresses from the kernel's table, without loopback, link-local
    and addresses still in (or failed) duplicate address detection.
    """
    try:
        with open(table) as lines:
            rows = [line.split() for line in lines]
    except OSError:
        return []
    result: list[str] = []
    for row in rows:
        if len(row) < 6:
            continue
        try:
            ip = ipaddress.IPv6Address(bytes.fromhex(row[0]))
            flags = int(row[4], 16)
        except ValueError:
            continue
        if ip.is_loopback or ip.is_link_local or ip.is_multicast or flags & UNUSABLE_IPV6:
            continue
        if ip.compressed not in result:
            result.append(ip.compressed)
    return result


def ipv4_addresses() -> list[str]:
    """
    IPv4 addresses of the interfaces that are configured, in kernel order.
    """
    buffer = array.array("B", b"\0" * (IFREQ_SIZE * MAX_INTERFACES))
    address, _ = buffer.buffer_info()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        request = struct.pack("iL", len(buffer) * buffer.itemsize, address)
        length = struct.unpack("iL", fcntl.ioctl(probe.fileno(), SIOCGIFCONF, request))[0]
    raw = buffer.tobytes()[:length]
    result: list[str] = []
    for offset in range(0, length, IFREQ_SIZE):
        ip = ipaddress.IPv4Address(raw[offset + 20 : offset + 24])
        if ip.is_loopback or ip.is_link_local or ip.is_unspecified:
            continue
        if ip.compressed not in result:
            result.append(ip.compressed)
    return result
