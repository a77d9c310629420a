"""
Who is registered where: the rendezvous server's only lasting state.

It sits behind L{IRegistry} so that a shared backend can replace the
in-memory one for rendezvous servers that outgrow one machine.  Only
authenticated agents ever get a record.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.internet.defer import Deferred, succeed
from zope.interface import Attribute, Interface, implementer

REPLAY_WINDOW = 64


@dataclass
class ReplayWindow:
    """
    WireGuard-style anti-replay: the highest sequence number seen and a bitmap
    of the C{REPLAY_WINDOW} below it.
    """

    highest: int = -1
    bitmap: int = 0

    def too_old(self, sequence: int) -> bool:
        """
        Whether C{sequence} is below what the window can tell apart.
        """
        return self.highest - sequence >= REPLAY_WINDOW

    def accept(self, sequence: int) -> bool:
        """
        True (and remember it) if C{sequence} is new; False for a replay or
        something too old to tell.
        """
        if sequence > self.highest:
            shift = sequence - self.highest
            # A restarted agent jumps by its uptime in microseconds: shifting
            # by that much would allocate gigabytes only to mask them away.
            if shift >= REPLAY_WINDOW:
                self.bitmap = 1
            else:
                self.bitmap = ((self.bitmap << shift) | 1) & ((1 << REPLAY_WINDOW) - 1)
            self.highest = sequence
            return True
        offset = self.highest - sequence
        if offset >= REPLAY_WINDOW or self.bitmap & (1 << offset):
            return False
        self.bitmap |= 1 << offset
        return True


@dataclass
class Registration:
    """
    One registered agent: where it was last heard and until when it counts.
    """

    name: str
    network: str
    address: tuple[str, int]
    expires: float
    registered_at: float
    #: When the agent last registered or refreshed.
    refreshed: float = 0.0


class IRegistry(Interface):
    """
    Registered agents by name.
    """

    count = Attribute("How many agents are registered.")

    def lookup(name: str, now: float) -> Registration | None:
        """
        The live registration of C{name}, or None.
        """

    def register(
        name: str, network: str, address: tuple[str, int], now: float, lifetime: float
    ) -> tuple[Registration, tuple[str, int] | None]:
        """
        Record or refresh C{name} at C{address}; return the registration and
        the previous address when it moved (None when new or unchanged).
        """

    def online(network: str, now: float) -> list[str]:
        """
        Names registered in C{network}, sorted.
        """

    def page(network: str, after: str, count: int, now: float) -> Deferred[list[str]]:
        """
        Up to C{count} names registered in C{network} (on any node of the
        service), sorted, all after C{after}: one page of a peers list.
        """

    def remove(name: str) -> None:
        """
        Forget C{name}.
        """

    def expire(now: float) -> list[str]:
        """
        Forget every registration past its lifetime; return their names.
        """


@implementer(IRegistry)
class MemoryRegistry:
    """
    L{IRegistry} in a dict: enough for one server.
    """

    def __init__(self) -> None:
        self._byName: dict[str, Registration] = {}

    @property
    def count(self) -> int:
        return len(self._byName)

    def lookup(self, name: str, now: float) -> Registration | None:
        registration = self._byName.get(name)
        if registration is None or registration.expires < now:
            return None
        return registration

    def register(
        self, name: str, network: str, address: tuple[str, int], now: float, lifetime: float
    ) -> tuple[Registration, tuple[str, int] | None]:
        registration = self._byName.get(name)
        if registration is None or registration.expires < now:
            registration = Registration(name, network, address, now + lifetime, now, now)
            self._byName[name] = registration
            return registration, None
        moved = registration.address if registration.address != address else None
        registration.address = address
        registration.network = network
        registration.expires = now + lifetime
        registration.refreshed = now
        return registration, moved

    def online(self, network: str, now: float) -> list[str]:
        return sorted(
            r.name for r in self._byName.values() if r.network == network and r.expires >= now
        )

    def page(self, network: str, after: str, count: int, now: float) -> Deferred[list[str]]:
        return succeed([n for n in self.online(network, now) if n > after][:count])

    def names(self) -> list[str]:
        """
        Every name held, live or not yet expired.
        """
        return list(self._byName)

    def remove(self, name: str) -> None:
        self._byName.pop(name, None)

    def expire(self, now: float) -> list[str]:
        gone = [name for name, r in self._byName.items() if r.expires < now]
        for name in gone:
            del self._byName[name]
        return gone
