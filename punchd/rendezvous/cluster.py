"""
Introductions between nodes of one rendezvous service, over Redis pub/sub.

An agent's NAT has a mapping only towards the node it registers with, so an
Incoming for it must leave from that node's socket.  The initiator's node
builds and signs the Incoming as usual (every node holds the service's key
pair and the directory) and keeps the introduction, its retransmissions and
its limits in its own L{Introductions}; each (re)transmission goes to the
target's node as a C{deliver} message on that node's channel.  The target's
node checks the Incoming against its directory, sends it to the agent,
remembers where it came from, and sends the agent's answer back on the
initiator's node channel, where it is taken like a local answer.

Nothing read from Redis reaches an agent unless it is an Incoming signed
with the key of an agent in this node's directory and registered here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from punchd import stun, wire
from punchd.rendezvous.auth import Directory
from punchd.rendezvous.limits import Counters
from punchd.rendezvous.redis_registry import CLAIMS, NODE_CHANNEL, RedisRegistry
from punchd.rendezvous.resp import RedisClient, RespProtocol
from punchd.stun import MessageClass, Method

log = Logger()

Address = tuple[str, int]
DELIVER = b"D"
ANSWER = b"A"
#: How long a delivered Incoming's origin is remembered for its answer.
FOREIGN_LIFETIME = 15.0


@dataclass
class Foreign:
    """
    An Incoming another node asked us to deliver.
    """

    origin: str
    target: str
    datagram: bytes
    expires: float


class Cluster:
    """
    This node's side of cross-node introductions (the introducer's C{remote}).
    """

    def __init__(
        self,
        registry: RedisRegistry,
        commands: RedisClient,
        clock: IReactorTime,
        max_pending: int,
    ) -> None:
        self.node = registry.node
        self._registry = registry
        self._commands = commands
        self._clock = clock
        self._counters = Counters()
        self._max_pending = max_pending
        self._foreign: dict[bytes, Foreign] = {}
        self._by_target: dict[str, set[bytes]] = {}
        self._directory: Callable[[], Directory | None] = lambda: None
        self._send: Callable[[bytes, Address], None] = lambda data, address: None
        self._local_answer: Callable[[stun.Message], None] = lambda message: None
        self._said_unreachable = False
        registry.ticks.append(self.expire)

    def attach(
        self,
        directory: Callable[[], Directory | None],
        send: Callable[[bytes, Address], None],
        local_answer: Callable[[stun.Message], None],
        counters: Counters,
    ) -> None:
        """
        Connect to the protocol that owns the socket and the introductions.
        """
        self._counters = counters
        self._directory = directory
        self._send = send
        self._local_answer = local_answer

    def subscribe(self, protocol: RespProtocol) -> Deferred[Any]:
        """
        The subscriber connection's C{on_ready}.
        """
        d = protocol.command("SUBSCRIBE", NODE_CHANNEL + self.node)
        return d.addCallback(lambda _: protocol.command("SUBSCRIBE", CLAIMS))

    # -- the initiator's node -------------------------------------------------

    def locate(self, name: str) -> Deferred[str | None]:
        """
        The other node that holds C{name}; None when none does (or only we
        do, but lost it since).
        """
        d = self._registry.locate(name)
        return d.addCallback(lambda node: None if node == self.node else node)

    def forward(self, target: str, datagram: bytes) -> None:
        """
        (Re)transmit an Incoming to C{target} through the node holding it.
        """

        def located(node: str | None) -> Deferred[Any] | None:
            if node is None:
                self._counters["introduction-remote-offline"] += 1
                return None
            self._counters["introduction-remote-sent"] += 1
            message = b"\n".join([DELIVER + self.node.encode(), target.encode(), datagram])
            return self._commands.execute("PUBLISH", NODE_CHANNEL + node, message)

        self.locate(target).addCallback(located).addErrback(self._unreachable)

    def _unreachable(self, failure: Failure) -> None:
        self._counters["introduction-remote-error"] += 1
        if not self._said_unreachable:
            self._said_unreachable = True
            log.warn(
                "cannot reach other nodes through Redis: {error}", error=failure.getErrorMessage()
            )

    # -- pub/sub in ------------------------------------------------------------

    def received(self, push: list[Any]) -> None:
        """
        A pub/sub message: C{[b"message", channel, data]}.
        """
        try:
            channel, data = push[-2], push[-1]
            if channel == CLAIMS.encode():
                self._claimed(data)
            elif data[:1] == DELIVER:
                self._deliver(data)
            elif data[:1] == ANSWER:
                self._answered(data[1:])
            else:
                self._counters["cluster-dropped-unexpected"] += 1
        except Exception:
            self._counters["internal-error"] += 1
            log.failure("unexpected error handling a message from another node")

    def _claimed(self, data: bytes) -> None:
        node, *names = data.decode("ascii", "replace").split("\n")
        if node == self.node:
            return
        for name in self._registry.forget_moved(names):
            log.info("agent {peer} moved to node {node}", peer=name, node=node)

    def _verified(self, target: str, datagram: bytes) -> stun.Message | None:
        """
        The Incoming (request or answer) in C{datagram}, if it is signed for
        C{target} of our directory.
        """
        directory = self._directory()
        key = None if directory is None else directory.key_for(target)
        if key is None:
            return None
        try:
            message = stun.parse(datagram)
        except stun.StunError:
            return None
        if message.method != Method.INCOMING or not stun.verify_integrity_sha256(message, key):
            return None
        return message

    def _deliver(self, data: bytes) -> None:
        origin_bytes, target_bytes, datagram = data[1:].split(b"\n", 2)
        origin, target = origin_bytes.decode("ascii"), target_bytes.decode("ascii")
        message = self._verified(target, datagram)
        if message is None or message.cls != MessageClass.REQUEST:
            self._counters["cluster-dropped-unauthenticated"] += 1
            return
        registration = self._registry.lookup(target, self._clock.seconds())
        if registration is None:
            self._counters["cluster-deliver-offline"] += 1
            return  # the origin looks it up again at its next retransmission
        incoming_id = message.transaction_id
        if incoming_id not in self._foreign:
            if len(self._by_target.get(target, ())) >= self._max_pending:
                self._busy(origin, target, incoming_id)
                return
            expires = self._clock.seconds() + FOREIGN_LIFETIME
            self._foreign[incoming_id] = Foreign(origin, target, datagram, expires)
            self._by_target.setdefault(target, set()).add(incoming_id)
        self._counters["cluster-delivered"] += 1
        self._send(datagram, registration.address)

    def _busy(self, origin: str, target: str, incoming_id: bytes) -> None:
        directory = self._directory()
        key = None if directory is None else directory.key_for(target)
        if key is None:
            return
        self._counters["busy"] += 1
        refusal = wire.signed(
            Method.INCOMING, MessageClass.ERROR, incoming_id, wire.error_attributes(486), key
        )
        self._publish_answer(origin, refusal)

    def _answered(self, datagram: bytes) -> None:
        try:
            message = stun.parse(datagram)
        except stun.StunError:
            self._counters["cluster-dropped-malformed"] += 1
            return
        # The introducer checks it against the target's key.
        self._local_answer(message)

    # -- the target's node -----------------------------------------------------

    def answer(self, message: stun.Message) -> bool:
        """
        An agent answered an Incoming: if another node asked for it, send the
        answer there.
        """
        foreign = self._foreign.get(message.transaction_id)
        if foreign is None:
            return False
        if self._verified(foreign.target, message.raw) is None:
            self._counters["dropped-unauthenticated"] += 1
            return True
        self._unhold(foreign.target, message.transaction_id)
        self._publish_answer(foreign.origin, message.raw)
        return True

    def heard_from(self, target: str) -> None:
        """
        C{target} refreshed: its NAT may have a new mapping, so Incomings it
        has not answered go again now (as for local introductions).
        """
        ids = self._by_target.get(target)
        if not ids:
            return
        registration = self._registry.lookup(target, self._clock.seconds())
        if registration is None:
            return
        for incoming_id in list(ids):
            self._counters["introduction-resent"] += 1
            self._send(self._foreign[incoming_id].datagram, registration.address)

    def _publish_answer(self, origin: str, datagram: bytes) -> None:
        d = self._commands.execute("PUBLISH", NODE_CHANNEL + origin, ANSWER + datagram)
        d.addErrback(self._unreachable)

    def _unhold(self, target: str, incoming_id: bytes) -> None:
        """
        Stop counting (and resending) an Incoming for C{target}.
        """
        ids = self._by_target.get(target)
        if ids is not None:
            ids.discard(incoming_id)
            if not ids:
                del self._by_target[target]

    def expire(self) -> None:
        """
        Forget delivered Incomings whose introduction is over by now.
        """
        now = self._clock.seconds()
        for incoming_id, foreign in list(self._foreign.items()):
            if foreign.expires < now:
                del self._foreign[incoming_id]
                self._unhold(foreign.target, incoming_id)

    def connected(self) -> None:
        self._said_unreachable = False
