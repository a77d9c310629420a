"""
Where the default gateway is, and which of our addresses talks to it.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

ROUTE_FILE = "/proc/net/route"
RTF_GATEWAY = 0x2


def default_gateway(route_file: str = ROUTE_FILE) -> str | None:
    """
    The IPv4 default route's gateway, from the kernel's routing table; None
    when there is none (or the table cannot be read).
    """
    try:
        with open(route_file) as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) < 4 or fields[1] != "00000000":
            continue
        try:
            flags, gateway = int(fields[3], 16), int(fields[2], 16)
        except ValueError:
            continue
        if flags & RTF_GATEWAY and gateway:
            return str(ipaddress.IPv4Address(struct.pack("<I", gateway)))
    return None


def local_address(gateway: str, port: int = 5351) -> str | None:
    """
    Our address on the way to C{gateway} (connecting a UDP socket sends nothing).
    """
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((gateway, port))
            address: str = s.getsockname()[0]
            return address
    except OSError:
        return None
