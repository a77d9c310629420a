"""
One node of a rendezvous service shared through Redis: its two Redis
connections (commands, and pub/sub), its registry, the cross-node
introductions, and the directory kept in Redis when configured.
"""

from __future__ import annotations

import gc
from typing import Any

from twisted.application import service
from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger

from punchd.config import RendezvousConfig, refuse_to_start
from punchd.rendezvous.cluster import Cluster
from punchd.rendezvous.redis_registry import RedisRegistry, new_node_id
from punchd.rendezvous.resp import (
    RedisAddress,
    RedisClient,
    RespProtocol,
    parse_url,
    read_credentials,
)
from punchd.rendezvous.server import RendezvousProtocol
from punchd.rendezvous.shared_directory import DIRECTORY_CHANNEL, SharedDirectory

log = Logger()

PROGRAM = "rendezvous"


def redis_address(settings: RendezvousConfig) -> RedisAddress:
    """
    The registry's Redis, with its credentials read from their file; or
    refuse to start with one line.
    """
    address = parse_url(settings.registry)
    if not settings.redis_password_file:
        return address
    try:
        username, password = read_credentials(settings.redis_password_file)
    except ValueError as e:
        refuse_to_start(PROGRAM, f"redis_password_file: {e}")
    return RedisAddress(address.host, address.port, address.db, username, password)


_settled = False


def settle_heap() -> None:
    """
    Take what is alive now (the directory above all: a million entries are
    millions of objects) out of the garbage collector's sight.  Each full
    collection would otherwise walk all of it again, blocking the reactor
    for a second or more while datagrams pile up; they are freed by their
    reference counts as ever when they go.
    """
    global _settled
    if _settled:
        return  # once: later objects (a reconnect's) stay collectable
    _settled = True
    gc.collect()
    gc.freeze()
    log.info("{count} objects set aside from garbage collection", count=gc.get_freeze_count())


class ServiceNode(service.Service):
    """
    Runs the node's Redis side while the rendezvous runs.
    """

    def __init__(self, settings: RendezvousConfig, reactor: Any, worker: int = 0) -> None:
        address = redis_address(settings)
        self.node = new_node_id() + (f"-w{worker}" if settings.workers > 1 else "")
        self.commands = RedisClient(address, reactor, on_ready=self._ready, purpose="registry")
        self.subscriber = RedisClient(
            address,
            reactor,
            on_ready=self._subscribe,
            on_push=self._received,
            purpose="introductions between nodes",
        )
        self.registry = RedisRegistry(self.commands, self.node, reactor)
        self.cluster = Cluster(self.registry, self.commands, reactor, settings.max_pending)
        self.directory: SharedDirectory | None = None
        self._settings = settings
        self._protocol: RendezvousProtocol | None = None

    def attach(self, protocol: RendezvousProtocol) -> None:
        self._protocol = protocol
        self.cluster.attach(
            lambda: protocol.directory, protocol.send, protocol.incoming_answer, protocol.counters
        )
        if self._settings.directory == "redis":
            self.directory = SharedDirectory(
                self._settings.private_key, self._settings.peers, self.commands, protocol
            )

    def _ready(self, protocol: RespProtocol) -> Deferred[Any]:
        d = self.registry.ready(protocol)
        if self.directory is not None:
            d.addCallback(lambda _: self.directory.load(protocol) if self.directory else None)
        return d.addCallback(lambda _: settle_heap())

    def _subscribe(self, protocol: RespProtocol) -> Deferred[Any]:
        d = self.cluster.subscribe(protocol)
        if self.directory is not None:
            d.addCallback(lambda _: protocol.command("SUBSCRIBE", DIRECTORY_CHANNEL))
        return d.addCallback(lambda _: self.cluster.connected())

    def _received(self, push: list[Any]) -> None:
        if self.directory is not None and push[-2] == DIRECTORY_CHANNEL.encode():
            self.directory.changed(push[-1])
        else:
            self.cluster.received(push)

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        log.info(
            "node {node} of a rendezvous service on {address}",
            node=self.node,
            address=str(self.commands.address),
        )
        self.commands.start()
        self.subscriber.start()
        self.registry.start()

    def stopService(self) -> Deferred[Any]:
        super().stopService()  # type: ignore[no-untyped-call]
        d = self.registry.stop()
        d.addBoth(lambda _: DeferredList([self.commands.stop(), self.subscriber.stop()]))
        return d
