"""
L{IRegistry} shared through Redis, for a rendezvous service of several
processes (docs/scale-out.rst).

Each node answers its own agents from memory, exactly as the in-memory
registry does, and tells Redis only what others need: which node holds an
agent (a claim, written when an agent is new or has moved), that it let an
agent go (a release), and now and then that a record still stands (one
script call refreshes the expiry of a whole batch).  A keepalive that
changes nothing costs no Redis round trip.  Nodes prove they are alive with
a heartbeat every second; records of a node whose heartbeat stopped are
ignored at once and swept away in the background.  Times inside Redis come
from Redis's own clock, so the nodes' clocks need not agree.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from punchd.rendezvous.registry import IRegistry, MemoryRegistry, Registration
from punchd.rendezvous.resp import RedisClient, RedisUnavailable, RespProtocol

log = Logger()

PREFIX = "punchd:"
AGENT = PREFIX + "agent:"
NODES = PREFIX + "nodes"
MEMBERS = PREFIX + "members:"
#: Pub/sub: claims made by a node (so that others drop stale local copies).
CLAIMS = PREFIX + "claims"
#: Pub/sub: one channel per node, for introductions it must deliver.
NODE_CHANNEL = PREFIX + "node:"

HEARTBEAT = 1.0
#: A node not heard from for this long is dead: its agents are offline.
NODE_GRACE_MS = 10_000
#: Lifetime of a record in Redis: only a safety net, since a node releases
#: its agents explicitly and a dead node's records are ignored and swept.
RECORD_TTL_MS = 300_000
REFRESH_EVERY = RECORD_TTL_MS / 3000
CHUNK = 1000
CLAIM_DELAY = 0.01

_NOW_MS = "local t = redis.call('TIME') local now = t[1] * 1000 + math.floor(t[2] / 1000) "

SCRIPTS = {
    # ARGV: node, ttl, then (name, host, port, network, age) per agent, age
    # being how long ago (ms) the node last heard from it.  A record another
    # node heard more recently stands: those names are returned.
    "claim": _NOW_MS
    + """
local node, ttl, lost = ARGV[1], ARGV[2], {}
for i = 3, #ARGV, 5 do
  local name, net = ARGV[i], ARGV[i + 3]
  local seen = now - tonumber(ARGV[i + 4])
  local key = 'punchd:agent:' .. name
  local old = redis.call('HMGET', key, 'node', 'network', 'seen')
  if old[1] and old[1] ~= node and tonumber(old[3] or 0) > seen then
    lost[#lost + 1] = name
  else
    if old[2] and old[2] ~= net then redis.call('ZREM', 'punchd:net:' .. old[2], name) end
    if old[1] and old[1] ~= node then redis.call('SREM', 'punchd:members:' .. old[1], name) end
    redis.call('HSET', key, 'node', node, 'host', ARGV[i + 1], 'port', ARGV[i + 2],
      'network', net, 'seen', seen)
    redis.call('PEXPIRE', key, ttl)
    redis.call('ZADD', 'punchd:net:' .. net, 0, name)
    redis.call('SADD', 'punchd:members:' .. node, name)
  end
end
return lost
""",
    # ARGV: node, ttl, names; returns the names whose record is not ours.
    "refresh": """
local missing = {}
for i = 3, #ARGV do
  local key = 'punchd:agent:' .. ARGV[i]
  if redis.call('HGET', key, 'node') == ARGV[1] then
    redis.call('PEXPIRE', key, ARGV[2])
  else
    missing[#missing + 1] = ARGV[i]
  end
end
return missing
""",
    # ARGV: node, names.
    "release": """
for i = 2, #ARGV do
  local key = 'punchd:agent:' .. ARGV[i]
  local r = redis.call('HMGET', key, 'node', 'network')
  if r[1] == ARGV[1] then
    redis.call('DEL', key)
    redis.call('ZREM', 'punchd:net:' .. r[2], ARGV[i])
  end
  redis.call('SREM', 'punchd:members:' .. ARGV[1], ARGV[i])
end
return 1
""",
    # ARGV: node, grace.  Heartbeat, then sweep some of one dead node's
    # agents.  -1 when this node had been taken for dead (its records may
    # be gone): it must publish them again.
    "beat": _NOW_MS
    + """
local mine = redis.call('ZSCORE', 'punchd:nodes', ARGV[1])
redis.call('ZADD', 'punchd:nodes', now + tonumber(ARGV[2]), ARGV[1])
if not mine or tonumber(mine) < now then return -1 end
local dead = redis.call('ZRANGEBYSCORE', 'punchd:nodes', '-inf', now, 'LIMIT', 0, 1)[1]
if not dead then return 0 end
local names = redis.call('SPOP', 'punchd:members:' .. dead, 1000)
for _, name in ipairs(names) do
  local key = 'punchd:agent:' .. name
  local r = redis.call('HMGET', key, 'node', 'network')
  if r[1] == dead then
    redis.call('DEL', key)
    redis.call('ZREM', 'punchd:net:' .. r[2], name)
  end
end
if #names == 0 then redis.call('ZREM', 'punchd:nodes', dead) end
return #names
""",
    # ARGV: name.  The live node that holds it, or nil.
    "locate": _NOW_MS
    + """
local node = redis.call('HGET', 'punchd:agent:' .. ARGV[1], 'node')
if not node then return false end
local deadline = redis.call('ZSCORE', 'punchd:nodes', node)
if not deadline or tonumber(deadline) < now then return false end
return node
""",
    # ARGV: network, after, count.  Names of live agents, sorted.
    "page": _NOW_MS
    + """
local net = 'punchd:net:' .. ARGV[1]
local start = ARGV[2] == '' and '-' or ('(' .. ARGV[2])
local want = tonumber(ARGV[3])
local out, alive, scanned = {}, {}, 0
while #out < want and scanned < 20 * want do
  local names = redis.call('ZRANGEBYLEX', net, start, '+', 'LIMIT', 0, want)
  if #names == 0 then break end
  for _, name in ipairs(names) do
    scanned = scanned + 1
    start = '(' .. name
    local node = redis.call('HGET', 'punchd:agent:' .. name, 'node')
    if not node then
      redis.call('ZREM', net, name)
    else
      local ok = alive[node]
      if ok == nil then
        local d = redis.call('ZSCORE', 'punchd:nodes', node)
        ok = (d ~= false and tonumber(d) >= now)
        alive[node] = ok
      end
      if ok then
        out[#out + 1] = name
        if #out >= want then break end
      end
    end
  end
end
return out
""",
}


def new_node_id() -> str:
    """
    A name for this process in the service, unique across restarts.
    """
    return f"{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@implementer(IRegistry)
class RedisRegistry:
    """
    This node's agents in memory (L{MemoryRegistry}), published to Redis.

    C{moved_away} is called with the names of local agents that registered
    on another node since (they are dropped here).
    """

    def __init__(self, client: RedisClient, node: str, clock: IReactorTime) -> None:
        self.node = node
        self.local = MemoryRegistry()
        self._client = client
        self._clock = clock
        self._shas: dict[str, str] = {}
        self._synced: dict[str, float] = {}
        self._claims: set[str] = set()
        self._releases: set[str] = set()
        self._refreshes: set[str] = set()
        self._flush_call: Any = None
        self._heartbeat = LoopingCall(self._beat)
        self._heartbeat.clock = clock
        self.ticks: list[Callable[[], None]] = []
        self.moved_away: Callable[[list[str]], None] = lambda names: None

    # -- IRegistry ---------------------------------------------------------

    @property
    def count(self) -> int:
        return self.local.count

    def lookup(self, name: str, now: float) -> Registration | None:
        return self.local.lookup(name, now)

    def register(
        self, name: str, network: str, address: tuple[str, int], now: float, lifetime: float
    ) -> tuple[Registration, tuple[str, int] | None]:
        prior = self.local.lookup(name, now)
        changed = prior is None or prior.address != address or prior.network != network
        registration, moved = self.local.register(name, network, address, now, lifetime)
        if changed:
            self._claims.add(name)
            self._synced[name] = now
            self._schedule()
        elif now - self._synced.get(name, 0.0) >= REFRESH_EVERY:
            self._refreshes.add(name)
            self._synced[name] = now
        return registration, moved

    def online(self, network: str, now: float) -> list[str]:
        """
        This node's own agents in C{network} (L{page} sees the service's).
        """
        return self.local.online(network, now)

    def page(self, network: str, after: str, count: int, now: float) -> Deferred[list[str]]:
        """
        The service's agents; only this node's own while Redis is unreachable.
        """
        d = self._script("page", network, after, count)
        d.addCallback(lambda names: [_text(n) for n in names])

        def alone(failure: Failure) -> Deferred[list[str]]:
            failure.trap(RedisUnavailable)
            return self.local.page(network, after, count, now)

        return d.addErrback(alone)

    def remove(self, name: str) -> None:
        if self.local.lookup(name, self._clock.seconds()) is not None:
            self._release([name])
        self.local.remove(name)

    def expire(self, now: float) -> list[str]:
        gone = self.local.expire(now)
        self._release(gone)
        return gone

    # -- the service ---------------------------------------------------------

    def locate(self, name: str) -> Deferred[str | None]:
        """
        The live node where C{name} is registered, or None; fails with
        L{RedisUnavailable} while Redis is.
        """
        return self._script("locate", name).addCallback(lambda n: None if n is None else _text(n))

    def forget_moved(self, names: Iterable[str]) -> list[str]:
        """
        Another node claimed C{names}: local copies are stale, drop them
        without releasing (the record is the other node's now).
        """
        now = self._clock.seconds()
        dropped = [n for n in names if self.local.lookup(n, now) is not None]
        for name in dropped:
            self.local.remove(name)
            self._synced.pop(name, None)
            self._claims.discard(name)
            self._refreshes.discard(name)
        return dropped

    def start(self) -> None:
        self._heartbeat.start(HEARTBEAT, now=False)

    def stop(self) -> Deferred[Any]:
        """
        Release every local agent, so that others see them offline at once.
        """
        if self._heartbeat.running:
            self._heartbeat.stop()
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._release(self._all_local())
        done = self._flush()
        done.addCallback(lambda _: self._client.execute("ZREM", NODES, self.node))
        return done.addErrback(lambda f: None)

    def ready(self, protocol: RespProtocol) -> Deferred[Any]:
        """
        On each (re)connection: load the scripts, prove we are alive, and
        publish again everything this node holds (Redis may have restarted
        empty, or have missed what happened while it was away).
        """
        loads = [
            protocol.command("SCRIPT", "LOAD", text).addCallback(self._loaded, name)
            for name, text in SCRIPTS.items()
        ]
        d = DeferredList(loads, fireOnOneErrback=True, consumeErrors=True)
        d.addCallback(lambda _: self._republish(protocol))
        return d

    # -- talking to Redis --------------------------------------------------------

    def _loaded(self, sha: bytes, name: str) -> None:
        self._shas[name] = _text(sha)

    def _script(self, name: str, *args: str | int | float) -> Deferred[Any]:
        sha = self._shas.get(name)
        if sha is None:
            return self._client.execute("EVAL", SCRIPTS[name], 0, *args)
        return self._client.execute("EVALSHA", sha, 0, *args)

    def _all_local(self) -> list[str]:
        return self.local.names()

    def _republish(self, protocol: RespProtocol) -> Deferred[Any]:
        now = self._clock.seconds()
        names = self._all_local()
        self._claims.update(names)
        for name in names:
            self._synced[name] = now
        # A first beat's -1 ("taken for dead") is moot: everything goes again.
        beat = protocol.command(
            "EVALSHA", self._shas["beat"], 0, self.node, NODE_GRACE_MS
        ).addCallback(lambda _: protocol.command("SMEMBERS", MEMBERS + self.node))
        beat.addCallback(self._reconcile, set(names))
        log.info("publishing {count} registrations to Redis", count=len(names))
        return beat

    def _reconcile(self, members: list[bytes], names: set[str]) -> None:
        """
        Records Redis holds for us of agents we no longer have: release them.
        """
        stale = [_text(m) for m in members if _text(m) not in names]
        self._release(stale)
        self._schedule()

    def _release(self, names: list[str]) -> None:
        for name in names:
            self._synced.pop(name, None)
            self._claims.discard(name)
            self._refreshes.discard(name)
        if names:
            self._releases.update(names)
            self._schedule()

    def _schedule(self) -> None:
        if self._flush_call is None or not self._flush_call.active():
            self._flush_call = self._clock.callLater(CLAIM_DELAY, self._flush)

    def _flush(self) -> Deferred[Any]:
        """
        Send what changed, in a few script calls of up to C{CHUNK} agents.
        """
        if not self._client.ready:
            return succeed(None)  # all of it goes again on reconnection
        claims, self._claims = self._claims, set()
        releases, self._releases = self._releases, set()
        refreshes, self._refreshes = self._refreshes, set()
        sent: list[Deferred[Any]] = []
        now = self._clock.seconds()
        claimed = [n for n in claims if self.local.lookup(n, now) is not None]
        for chunk in _chunks(claimed):
            sent.append(self._claim(chunk, now))
        for chunk in _chunks(sorted(releases)):
            d = self._script("release", self.node, *chunk)
            sent.append(d.addErrback(self._failed, "release", chunk))
        for chunk in _chunks(sorted(refreshes)):
            d = self._script("refresh", self.node, RECORD_TTL_MS, *chunk)
            sent.append(d.addCallbacks(self._refreshed, self._failed, errbackArgs=("refresh",)))
        return DeferredList(sent, consumeErrors=True) if sent else succeed(None)

    def _claim(self, names: list[str], now: float) -> Deferred[Any]:
        args: list[str | int] = [self.node, RECORD_TTL_MS]
        for name in names:
            registration = self.local.lookup(name, now)
            assert registration is not None
            host, port = registration.address
            age = max(0, int((now - registration.refreshed) * 1000))
            args += [name, host, port, registration.network, age]
        d = self._script("claim", *args)
        d.addCallback(self._claimed, names)
        return d.addErrback(self._failed, "claim", names)

    def _claimed(self, lost: list[bytes], names: list[str]) -> Deferred[Any]:
        """
        Tell the other nodes; forget the agents another node heard from since.
        """
        gone = {_text(n) for n in lost}
        for name in self.forget_moved(gone):
            log.info("agent {peer} registered elsewhere since", peer=name)
        won = [n for n in names if n not in gone]
        return self._client.execute("PUBLISH", CLAIMS, "\n".join([self.node, *won]))

    def _beaten(self, result: int) -> None:
        if result != -1:
            return
        # Our heartbeat stopped long enough for others to sweep our records
        # (a reactor blocked, or a Redis restarted empty between two beats).
        names = self._all_local()
        log.warn(
            "this node was taken for dead; publishing its {count} registrations again",
            count=len(names),
        )
        self._claims.update(names)
        self._schedule()

    def _refreshed(self, missing: list[bytes]) -> None:
        if missing:
            # Lost (an empty Redis that came back between two reconnections).
            self._claims.update(_text(m) for m in missing)
            self._schedule()

    def _failed(self, failure: Failure, what: str, names: list[str] | None = None) -> None:
        if what == "release" and names:
            self._releases.update(names)
        elif what == "claim" and names:
            self._claims.update(names)
        log.warn("could not {what} in Redis: {error}", what=what, error=failure.getErrorMessage())

    def _beat(self) -> None:
        if self._client.ready:
            d = self._script("beat", self.node, NODE_GRACE_MS)
            d.addCallbacks(self._beaten, self._failed, errbackArgs=("heartbeat",))
            self._flush()
        for tick in self.ticks:
            tick()


def _chunks(names: list[str]) -> Iterable[list[str]]:
    for i in range(0, len(names), CHUNK):
        yield names[i : i + CHUNK]
