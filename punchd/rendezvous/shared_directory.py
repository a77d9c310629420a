"""
The directory of agents kept in Redis, for services too big for a peers
file: every node holds it in memory, loads it whole when it connects, and
follows each change that C{python -m punchd.rendezvous.directory} announces
on a channel, so that an added agent may register anywhere at once.

The peers file still counts, and wins for a name listed in both.  An entry
read from Redis that does not parse, or that reuses another agent's key, is
refused with a log line: nothing else read from Redis can make an agent.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from punchd import checks
from punchd.checks import Invalid, Place
from punchd.config import PeerEntry
from punchd.keys import PrivateKey
from punchd.rendezvous.auth import Directory
from punchd.rendezvous.resp import RedisClient, RespProtocol
from punchd.rendezvous.server import RendezvousProtocol
from punchd.wire import NAME_RE

log = Logger()

#: Hash: agent name -> "NETWORK PUBLIC_KEY".
DIRECTORY = "punchd:directory"
#: Hash: public key -> agent name (keys are unique).
DIRECTORY_KEYS = "punchd:directory-keys"
#: Pub/sub: the name of an entry that changed.
DIRECTORY_CHANNEL = "punchd:directory-changed"
SCAN = 10_000


def parse_entry(name: str, value: str) -> PeerEntry:
    """
    One stored entry; ValueError with a reason if it is not one.
    """
    if not NAME_RE.match(name):
        raise ValueError("not a valid agent name")
    network, _, key = value.partition(" ")
    place = Place(None, "")
    try:
        return PeerEntry(
            name, checks.public_key(key, place), checks.name(network or "default", place)
        )
    except Invalid as e:
        raise ValueError(str(e)) from None


def format_entry(entry: PeerEntry) -> str:
    return f"{entry.network} {entry.public_key.to_base64()}"


class SharedDirectory(Directory):
    """
    The peers file plus the directory in Redis, kept current.
    """

    def __init__(
        self,
        server_key: PrivateKey,
        file_peers: Mapping[str, PeerEntry],
        client: RedisClient,
        protocol: RendezvousProtocol,
    ) -> None:
        super().__init__(server_key, file_peers)
        self._file = dict(file_peers)
        self._stored: dict[str, PeerEntry] = {}
        self._owners = {entry.public_key: name for name, entry in self._peers.items()}
        self._client = client
        self._protocol = protocol
        protocol.reload(self)

    def load(self, protocol: RespProtocol) -> Deferred[Any]:
        """
        Read the whole directory (on every (re)connection).
        """
        found: dict[str, PeerEntry] = {}

        def page(cursor: bytes) -> Deferred[Any]:
            d = protocol.command("HSCAN", DIRECTORY, cursor, "COUNT", SCAN)
            return d.addCallback(got)

        def got(reply: list[Any]) -> Deferred[Any] | None:
            cursor, items = reply
            for i in range(0, len(items), 2):
                entry = self._parsed(items[i], items[i + 1])
                if entry is not None:
                    found[entry.name] = entry
            if cursor != b"0":
                return page(cursor)
            self._replace(found)
            return None

        return page(b"0")

    def changed(self, data: bytes) -> Deferred[Any]:
        """
        The entry named C{data} changed in Redis: read it again.
        """
        name = data.decode("ascii", "replace")
        if not NAME_RE.match(name):
            return succeed(None)
        d = self._client.execute("HGET", DIRECTORY, name)

        def got(value: bytes | None) -> None:
            entry = None if value is None else self._parsed(name.encode(), value)
            self._set(name, entry)

        return d.addCallbacks(got, lambda f: log.warn("cannot read the directory: {e}", e=f))

    def replace_file(self, peers: Mapping[str, PeerEntry]) -> None:
        """
        A reloaded peers file.
        """
        names = set(self._file) | set(peers)
        self._file = dict(peers)
        for name in sorted(names):
            self._set(name, self._stored.get(name))
        log.info("peers file reloaded: {count} peers", count=len(self._peers))

    def _parsed(self, name: bytes, value: bytes) -> PeerEntry | None:
        text = name.decode("ascii", "replace")
        try:
            return parse_entry(text, value.decode("ascii", "replace"))
        except ValueError as e:
            log.warn("directory entry {peer} refused: {error}", peer=text, error=str(e))
            return None

    def _replace(self, stored: dict[str, PeerEntry]) -> None:
        names = set(self._stored) | set(stored)
        for name in names:
            self._set(name, stored.get(name))
        log.info("directory loaded from Redis: {count} agents", count=len(self._peers))

    def _set(self, name: str, stored: PeerEntry | None) -> None:
        """
        Make C{name}'s effective entry the file's, else C{stored}.
        """
        if stored is None:
            self._stored.pop(name, None)
        else:
            self._stored[name] = stored
        before = self._peers.get(name)
        after = self._file.get(name, stored)
        if after is not None and self._owners.get(after.public_key, name) != name:
            log.warn("directory entry {peer} refused: its key is another agent's", peer=name)
            after = None
        if after == before:
            return
        if before is not None:
            self._owners.pop(before.public_key, None)
            del self._peers[name]
        if after is not None:
            self._owners[after.public_key] = name
            self._peers[name] = after
        self._keys.pop(name, None)
        self._protocol.peer_changed(name, before, after, self._protocol.clock.seconds())
