"""
Host candidates: the addresses of this machine's interfaces.

Loopback is left out (a peer on another host would reach its own loopback),
and so is IPv4 link-local; the server-reflexive candidate covers peers on
this very host.
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


def host_addresses() -> list[str]:
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
