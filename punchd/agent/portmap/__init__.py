"""
Port mapping: ask the default gateway to forward an external UDP port to a
local socket, with PCP (RFC 6887), NAT-PMP (RFC 6886) or UPnP-IGD.

L{PortMapper} is the whole API: C{offered()} for netcheck, C{map()} for a
tunnel's socket; a L{Mapping} renews and deletes itself.
"""

from punchd.agent.portmap.mapper import NAT_PMP, PCP, PROTOCOLS, UPNP, PortMapper
from punchd.agent.portmap.mapping import Mapping

__all__ = ["NAT_PMP", "PCP", "PROTOCOLS", "UPNP", "Mapping", "PortMapper"]
