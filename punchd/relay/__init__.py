"""
The relay: raw UDP forwarding between two agents that have no direct path,
run by the rendezvous as its own service (docs/relay.rst).

The rendezvous allocates two relay ports per relayed tunnel
(L{RelayService.allocate}); each agent binds its port with a signed
RELAY_BIND from its tunnel socket (L{build_bind}); from then on what one
bound address sends to its port leaves from the other port to the other
bound address, unchanged, and nothing else gets through.
"""

from punchd.relay.messages import build_bind, parse_bind_answer
from punchd.relay.service import BIND_TIMEOUT, RelayRefused, RelayService

__all__ = ["BIND_TIMEOUT", "RelayRefused", "RelayService", "build_bind", "parse_bind_answer"]
