"""
twistd plugin glue for the rendezvous: C{twistd -n rendezvous --config FILE}.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
from collections.abc import Callable
from typing import Any

from twisted.application import internet, service
from twisted.internet.interfaces import IListeningPort, IReactorTime
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from twisted.python import usage

from punchd.config import (
    ConfigError,
    PeerEntry,
    RendezvousConfig,
    load_peers,
    load_rendezvous_config,
    port_range,
    refuse_to_start,
)
from punchd.config import settings as settings_table
from punchd.launch import DaemonService, configure, option_parameters
from punchd.metrics import FunctionCollector, metrics_service, rendezvous_metrics
from punchd.relay import RelayService
from punchd.rendezvous.limits import SourceLimiter
from punchd.rendezvous.registry import IRegistry, MemoryRegistry
from punchd.rendezvous.server import AlternatePort, Directory, RendezvousProtocol
from punchd.rendezvous.stream import StreamFactory, StreamLimits
from punchd.rendezvous.tls import TLSPortService, TLSSetupError, bind_tcp, server_options

log = Logger()

PROGRAM = "rendezvous"


class Options(usage.Options):
    """
    C{--config FILE}, and an option per config key (L{option_parameters}).
    """

    synopsis = "[--config FILE] [options]"
    longdesc = (
        "The punchd rendezvous server: answers STUN Binding requests from anyone "
        "and introduces registered agents of the same network to each other.  "
        "Each option overrides the config key of the same name, with '-' for '_'."
    )
    optParameters = option_parameters(RendezvousConfig)

    def postOptions(self) -> None:
        self["settings"] = configure(self, PROGRAM, RendezvousConfig, load_rendezvous_config)


def bind_udp(interface: str, port: int, shared: bool = False) -> socket.socket:
    """
    The rendezvous's UDP socket, bound at once: C{""} is all IPv4
    interfaces, as for Twisted's C{listenUDP}.  C{shared} lets the other
    workers of this rendezvous bind the same port (SO_REUSEPORT).
    """
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if shared:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((interface, port))
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


class UDPService(service.Service):
    """
    Serves C{protocol} on an already bound socket while running.  Binding
    when the service is made, not when it starts, lets a port in use stop
    the daemon with one line before twistd writes a pid file or logs.
    """

    def __init__(self, sock: socket.socket, protocol: DatagramProtocol, reactor: Any) -> None:
        self._socket = sock
        self._protocol = protocol
        self._reactor = reactor
        self._port: IListeningPort | None = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._port = self._reactor.adoptDatagramPort(
            self._socket.fileno(), self._socket.family, self._protocol, maxPacketSize=2048
        )
        self._socket.close()  # the port holds its own duplicate

    def stopService(self) -> Any:
        super().stopService()  # type: ignore[no-untyped-call]
        port, self._port = self._port, None
        return None if port is None else port.stopListening()


class RendezvousService(DaemonService):
    """
    The UDP server, its housekeeping timer, the relay (a child service,
    also C{protocol.relay}, when on) and peers-file reload on SIGHUP.
    """

    def __init__(
        self,
        settings: RendezvousConfig,
        protocol: RendezvousProtocol,
        reactor: Any,
        sock: socket.socket,
        launcher: Any = None,
        alternate: socket.socket | None = None,
        extra: list[service.IService] | None = None,
    ) -> None:
        super().__init__(settings.log_format, PROGRAM, launcher)
        self.settings = settings
        self.protocol = protocol
        self.relay = protocol.relay
        self._reactor = reactor
        #: Called with a reloaded peers file instead of the plain reload.
        self.peers_reloaded: Callable[[dict[str, PeerEntry]], None] | None = None
        self.hangup_hooks: list[Callable[[], None]] = []
        for child in extra or []:
            child.setServiceParent(self)
        UDPService(sock, protocol, reactor).setServiceParent(self)
        if self.relay is not None:
            self.relay.setServiceParent(self)
        if alternate is not None:
            UDPService(alternate, AlternatePort(protocol), reactor).setServiceParent(self)
        internet.TimerService(5.0, protocol.expire).setServiceParent(self)

    def startService(self) -> None:
        signal.signal(signal.SIGHUP, lambda *_: self._reactor.callFromThread(self.reload_peers))
        super().startService()
        log.info(
            "rendezvous listening on UDP {interface}:{port} with {count} peers",
            interface=self.settings.interface or "*",
            port=self.settings.port,
            count=len(self.settings.peers),
        )
        if self.settings.alternate_port:
            log.info("alternate Binding port {port}", port=self.settings.alternate_port)
        if self.settings.tls_port:
            log.info("TLS port {port} (TCP)", port=self.settings.tls_port)

    def stopService(self) -> Any:
        self.protocol.stop()
        return super().stopService()

    def reload_peers(self) -> None:
        """
        Read the peers file again; keep agents still listed, drop the rest.
        A broken file is reported and the old list kept.
        """
        for hook in self.hangup_hooks:
            hook()
        try:
            peers = load_peers(self.settings.peers_path)
        except ConfigError as e:
            log.error("peers file not reloaded: {error}", error=str(e))
            return
        if self.peers_reloaded is not None:
            self.peers_reloaded(peers)
            return
        self.protocol.reload(Directory(self.settings.private_key, peers))


def make_relay(
    settings: RendezvousConfig, reactor: Any, keys: Callable[[str], bytes | None]
) -> RelayService | None:
    """
    The relay the settings ask for, on the rendezvous's interface, or None.
    """
    if not settings.relay:
        return None
    return RelayService(
        keys,
        clock=reactor,
        interface=settings.interface,
        ports=port_range(settings.relay_ports),
        idle_timeout=settings.relay_idle_timeout,
        max_per_agent=settings.relay_max_per_agent,
        rate=settings.relay_rate,
    )


def relay_address(settings: RendezvousConfig) -> str | None:
    """
    Where agents of other nodes reach this node's relay: C{relay_address},
    or the interface when it is one address; None when neither tells.
    """
    if settings.relay_address:
        return settings.relay_address
    interface = settings.interface
    if interface and not ipaddress.ip_address(interface).is_unspecified:
        return interface
    return None


def makeService(config: Options, reactor: Any = None, worker: int = 0) -> service.IService:
    """
    The rendezvous; with C{workers} > 1, worker 0 of them, which starts the
    others (C{worker} is the index of a worker process started so).
    """
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    settings: RendezvousConfig = config["settings"]
    shared = settings.workers > 1
    sock = _bind_or_refuse(settings.interface, settings.port, shared)
    alternate = None
    if settings.alternate_port:
        alternate = _bind_or_refuse(settings.interface, settings.alternate_port, shared)
    # Until startService installs the reload handler, a SIGHUP must not kill us.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    clock: IReactorTime = reactor
    burst = settings.binding_rate * 2
    relay = make_relay(settings, reactor, lambda name: protocol.directory.key_for(name))
    registry: IRegistry = MemoryRegistry()
    extra: list[service.IService] = []
    node = None
    if settings.registry != "memory":
        from punchd.rendezvous.node import ServiceNode

        node = ServiceNode(settings, reactor, worker)
        registry = node.registry
        extra.append(node)
    protocol = RendezvousProtocol(
        Directory(settings.private_key, settings.peers),
        registry,
        clock,
        binding_limiter=SourceLimiter(settings.binding_rate, burst, clock.seconds),
        error_limiter=SourceLimiter(5.0, 10.0, clock.seconds),
        max_pending=settings.max_pending,
        max_lifetime=settings.registration_lifetime,
        relay=relay,
        alternate_port=settings.alternate_port,
        remote=None if node is None else node.cluster,
        relay_address=relay_address(settings) if relay is not None else None,
    )
    workers = None
    if node is not None:
        node.attach(protocol)
        if worker == 0 and settings.workers > 1:
            from punchd.rendezvous.workers import Workers

            workers = Workers(settings.workers, worker_argv(config), reactor)
            extra.append(workers)
    if settings.tls_port:
        extra.append(tls_service(settings, protocol, reactor, shared))
    launcher = getattr(config, "parent", None)
    parent = RendezvousService(settings, protocol, reactor, sock, launcher, alternate, extra)
    if workers is not None:
        parent.hangup_hooks.append(workers.hangup)
    if node is not None and node.directory is not None:
        parent.peers_reloaded = node.directory.replace_file
    collector = FunctionCollector(lambda: rendezvous_metrics(protocol))
    metrics = metrics_service(settings.metrics, PROGRAM, collector, reactor)
    if metrics is not None:
        metrics.setServiceParent(parent)
    return parent


def tls_service(
    settings: RendezvousConfig, protocol: RendezvousProtocol, reactor: Any, shared: bool
) -> TLSPortService:
    """
    The TLS port, its certificate loaded and its socket listening, or a
    one-line refusal to start.
    """
    try:
        options = server_options(settings.tls_certificate, settings.tls_private_key, reactor)
    except TLSSetupError as e:
        refuse_to_start(PROGRAM, str(e))
    where = f"[{settings.interface}]" if ":" in settings.interface else settings.interface
    try:
        sock = bind_tcp(settings.interface, settings.tls_port, shared=shared)
    except OSError as e:
        refuse_to_start(
            PROGRAM, f"cannot listen on TCP {where or '*'}:{settings.tls_port}: {e.strerror}"
        )
    limits = StreamLimits(
        auth_timeout=settings.tls_auth_timeout,
        idle_timeout=settings.tls_idle_timeout,
        max_per_source=settings.tls_max_per_source,
        max_connections=settings.tls_max_connections,
    )
    streams = StreamFactory(protocol, reactor, limits, protocol.relay)
    return TLSPortService(sock, options, streams, reactor)


def _bind_or_refuse(interface: str, port: int, shared: bool = False) -> socket.socket:
    try:
        return bind_udp(interface, port, shared=shared)
    except OSError as e:
        where = f"[{interface}]" if ":" in interface else interface
        refuse_to_start(PROGRAM, f"cannot listen on UDP {where or '*'}:{port}: {e.strerror}")


def worker_argv(config: Options) -> list[str]:
    """
    The options a worker process needs to load the same settings.
    """
    argv = []
    if config["config"] is not None:
        argv += ["--config", os.path.abspath(config["config"])]
    for s in settings_table(RendezvousConfig).values():
        value = config[s.option_name[2:]] if s.option else None
        if value is not None:
            argv += [s.option_name, str(value)]
    return argv
