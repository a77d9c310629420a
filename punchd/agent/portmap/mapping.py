"""
A port mapping the gateway granted, whatever the protocol: its external
address, and how to renew and delete it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

log = Logger()

Address = tuple[str, int]
#: What a renewal learns: the external address and the lifetime granted.
Renewed = tuple[Address, int]


@dataclass
class Mapping:
    """
    An external address the gateway forwards to C{internal_port}, for
    C{lifetime} seconds from when it was granted.  Renew it well within
    that; delete it when no longer needed.
    """

    protocol: str
    external: Address
    lifetime: int
    internal_port: int
    _renew: Callable[[Mapping], Deferred[Renewed | None]] = field(repr=False)
    _delete: Callable[[Mapping], Deferred[Any]] = field(repr=False)
    deleted: bool = False

    def renew(self) -> Deferred[bool]:
        """
        Ask for the mapping again; True when granted (C{external} and
        C{lifetime} are updated), False otherwise.  Never fails.
        """
        if self.deleted:
            return succeed(False)

        def done(result: Renewed | None) -> bool:
            if result is None:
                return False
            self.external, self.lifetime = result
            return True

        return quiet(self._renew(self), "renew").addCallback(done)

    def delete(self) -> Deferred[None]:
        """
        Remove the mapping from the gateway (once).  Never fails.
        """
        if self.deleted:
            return succeed(None)
        self.deleted = True
        return quiet(self._delete(self), "delete").addCallback(lambda _: None)


def quiet(d: Deferred[Any], what: str) -> Deferred[Any]:
    def failed(failure: Any) -> None:
        log.info("port mapping {what} failed: {error}", what=what, error=failure.getErrorMessage())

    return d.addErrback(failed)
