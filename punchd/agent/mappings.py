"""
Port mappings that outlive their tunnel's set-up: kept while the program
holds the socket, deleted as soon as it is gone.

After the hand-off the agent no longer owns the socket, but the kernel still
lists its port in /proc/net/udp while the program keeps it open: that is
when a mapping the tunnel's path goes through must be renewed.
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from punchd.agent.portmap import Mapping

log = Logger()

UDP_TABLES = ("/proc/net/udp", "/proc/net/udp6")
#: How often a kept mapping's port is looked at.
CHECK_EVERY = 5.0


def port_in_use(port: int, tables: tuple[str, ...] = UDP_TABLES) -> bool:
    """
    Whether any UDP socket on this host is bound to C{port}.
    """
    wanted = f":{port:04X}"
    for table in tables:
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        if any(line.split()[1].endswith(wanted) for line in lines if len(line.split()) > 1):
            return True
    return False


class KeptMappings:
    """
    The mappings that handed-off tunnels go through.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self._kept: dict[int, tuple[Mapping, LoopingCall]] = {}

    def __len__(self) -> int:
        return len(self._kept)

    def keep(self, mapping: Mapping) -> None:
        """
        Renew C{mapping} at half its lifetime while its port is in use.
        """
        self.drop(mapping.internal_port)  # the port's earlier tunnel is over
        renewed = [self.clock.seconds()]

        def check() -> None:
            if not port_in_use(mapping.internal_port):
                log.debug("port {port} closed: its mapping goes", port=mapping.internal_port)
                self.drop(mapping.internal_port)
            elif self.clock.seconds() - renewed[0] >= mapping.lifetime / 2:
                renewed[0] = self.clock.seconds()
                mapping.renew()

        renewal = LoopingCall(check)
        renewal.clock = self.clock
        self._kept[mapping.internal_port] = (mapping, renewal)
        renewal.start(CHECK_EVERY, now=False)

    def drop(self, port: int) -> None:
        kept = self._kept.pop(port, None)
        if kept is not None:
            mapping, renewal = kept
            if renewal.running:
                renewal.stop()
            mapping.delete()

    def drop_all(self) -> None:
        for port in list(self._kept):
            self.drop(port)
