"""
What the control socket needs from the agent: the seam between them.

The control socket (L{punchd.agent.control}) speaks newline-delimited JSON
to local programs; the agent core (signalling and tunnel machines) does the
networking.  Each side is tested alone against this interface.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.internet.defer import Deferred

#: Error codes a program may see (docs/architecture.rst, "Error codes").
ERROR_CODES = frozenset(
    {
        "bad-request",
        "unauthorized",
        "peer-unknown",
        "peer-offline",
        "no-listener",
        "rejected",
        "timeout",
        "unreachable",
        "busy",
        "not-registered",
        "cancelled",
        "internal",
        "unavailable",
    }
)


class TunnelFailed(Exception):
    """
    A tunnel could not be set up; C{code} is one of L{ERROR_CODES}.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class HandOff:
    """
    A punched tunnel ready for its program.

    C{sock} is the agent's copy of the connected UDP socket: the control
    layer sends its descriptor with the reply line describing C{info}, then
    closes it.  C{info} is the JSON-ready tunnel description of
    docs/architecture.rst ("Control socket").
    """

    sock: socket.socket
    info: dict[str, Any] = field(default_factory=dict)


#: Called with progress events (JSON-ready dicts such as
#: C{{"event": "introduced"}}, C{{"event": "probing", "pairs": 4}}).
ProgressCallback = Callable[[dict[str, Any]], None]


class AgentCore(Protocol):
    """
    The agent as the control socket sees it.
    """

    def status(self) -> dict[str, Any]:
        """
        Name, registration state, rendezvous, mapped address, tunnel counts.
        """

    def peers(self) -> Deferred[list[dict[str, Any]]]:
        """
        Peers online in this agent's network, as C{[{"name": ...}, ...]}.
        Fails with L{TunnelFailed} (C{not-registered}, C{timeout}).
        """

    def connect(
        self, peer: str, service: str, timeout: float, progress: ProgressCallback
    ) -> Deferred[HandOff]:
        """
        Punch a tunnel to C{peer} for C{service}.  Fails with L{TunnelFailed}.
        Cancelling the Deferred abandons the tunnel and frees its socket.
        """

    def listen(self, service: str, incoming: Callable[[HandOff], None]) -> Callable[[], None]:
        """
        Deliver each tunnel a peer opens for C{service} to C{incoming}, until
        the returned function is called.  Several listeners for one service
        take turns.
        """

    def netcheck(self) -> Deferred[dict[str, Any]]:
        """
        A fresh look at what the network lets tunnels do (UDP, public
        addresses, whether the NAT maps per destination, port mapping,
        round trip), as L{punchd.agent.netcheck.NetReport.to_json}.
        """
