"""
twistd plugin glue for the rendezvous: C{twistd -n rendezvous --config FILE}.
"""

from __future__ import annotations

import signal
from typing import Any

from twisted.application import internet, service
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python import usage

from punchd.config import (
    ConfigError,
    RendezvousConfig,
    load_peers,
    load_rendezvous_config,
    refuse_to_start,
)
from punchd.logs import LoggingService, adopt_launcher, notify_ready
from punchd.rendezvous.limits import SourceLimiter
from punchd.rendezvous.registry import MemoryRegistry
from punchd.rendezvous.server import Directory, RendezvousProtocol

log = Logger()


class Options(usage.Options):
    """
    Command-line options; each overrides the config key of the same name.
    """

    synopsis = "[--config FILE] [options]"
    longdesc = (
        "The punchd rendezvous server: answers STUN Binding requests from anyone "
        "and introduces registered agents of the same network to each other."
    )
    optParameters = [
        ["config", "c", None, "TOML config file (keys: port, interface, private_key, peers, ...)."],
        ["port", "p", None, "UDP port to listen on (config key 'port', default 3478)."],
        [
            "interface",
            "i",
            None,
            "Address to listen on (config key 'interface'; default all IPv4).",
        ],
        ["private-key", "k", None, "The server's private key file (config key 'private_key')."],
        ["peers", None, None, "The peers file (config key 'peers')."],
        [
            "binding-rate",
            None,
            None,
            "Binding replies per second per source IP, 0 for no limit (default 50).",
        ],
        ["max-pending", None, None, "Pending introductions allowed per agent (default 256)."],
        [
            "registration-lifetime",
            None,
            None,
            "Longest registration lifetime granted, in seconds (default 600).",
        ],
        [
            "log-format",
            None,
            None,
            "text or json: JSON lines on stdout, for log collectors (default text).",
        ],
    ]

    def postOptions(self) -> None:
        overrides = {
            key.replace("-", "_"): self[key]
            for key in (
                "port",
                "interface",
                "private-key",
                "peers",
                "binding-rate",
                "max-pending",
                "registration-lifetime",
                "log-format",
            )
        }
        try:
            self["settings"] = load_rendezvous_config(self["config"], overrides)
        except ConfigError as e:
            refuse_to_start("rendezvous", str(e))
        adopt_launcher(self, self["settings"].log_format)


class RendezvousService(LoggingService):
    """
    The UDP server, its housekeeping timer, and peers-file reload on SIGHUP.
    """

    def __init__(
        self, settings: RendezvousConfig, protocol: RendezvousProtocol, reactor: Any
    ) -> None:
        super().__init__(settings.log_format)
        self.settings = settings
        self.protocol = protocol
        self._reactor = reactor
        udp = internet.UDPServer(
            settings.port, protocol, interface=settings.interface, maxPacketSize=2048
        )
        udp.setServiceParent(self)
        internet.TimerService(5.0, protocol.expire).setServiceParent(self)

    def startService(self) -> None:
        super().startService()
        log.info(
            "rendezvous listening on UDP {interface}:{port} with {count} peers",
            interface=self.settings.interface or "*",
            port=self.settings.port,
            count=len(self.settings.peers),
        )
        signal.signal(signal.SIGHUP, lambda *_: self._reactor.callFromThread(self.reload_peers))
        notify_ready()

    def stopService(self) -> Any:
        self.protocol.stop()
        return super().stopService()

    def reload_peers(self) -> None:
        """
        Read the peers file again; keep agents still listed, drop the rest.
        A broken file is reported and the old list kept.
        """
        try:
            peers = load_peers(self.settings.peers_path)
        except ConfigError as e:
            log.error("peers file not reloaded: {error}", error=str(e))
            return
        self.protocol.reload(Directory(self.settings.private_key, peers))


def makeService(config: Options, reactor: Any = None) -> service.IService:
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    settings: RendezvousConfig = config["settings"]
    # Until startService installs the reload handler, a SIGHUP must not kill us.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    clock: IReactorTime = reactor
    burst = settings.binding_rate * 2
    protocol = RendezvousProtocol(
        Directory(settings.private_key, settings.peers),
        MemoryRegistry(),
        clock,
        binding_limiter=SourceLimiter(settings.binding_rate, burst, clock.seconds),
        error_limiter=SourceLimiter(5.0, 10.0, clock.seconds),
        max_pending=settings.max_pending,
        max_lifetime=settings.registration_lifetime,
    )
    return RendezvousService(settings, protocol, reactor)
