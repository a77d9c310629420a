"""
Per-source rate limits in constant memory, and counters of what was dropped.

Unauthenticated traffic must not make the server allocate: the limiter is a
fixed array of token buckets indexed by a keyed hash of the source IP, so a
flood from many addresses shares buckets instead of growing a table.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable


class SourceLimiter:
    """
    Token buckets, C{rate} per second with bursts of C{burst}, per source IP
    (hashed into C{slots} buckets).  C{rate} 0 means unlimited.

    The hash is Python's own string hash, keyed per process (SipHash with a
    random seed), so a sender cannot aim at another source's bucket.
    """

    def __init__(
        self, rate: float, burst: float, now: Callable[[], float], slots: int = 4096
    ) -> None:
        self.rate = rate
        self.burst = max(burst, 1.0)
        self._now = now
        self._slots = slots
        self._tokens = [self.burst] * slots
        self._stamps = [0.0] * slots

    def allow(self, host: str) -> bool:
        """
        Spend one token for C{host}; False when its bucket is empty.
        """
        if self.rate <= 0:
            return True
        slot = hash(host) % self._slots
        now = self._now()
        tokens = min(self.burst, self._tokens[slot] + (now - self._stamps[slot]) * self.rate)
        self._stamps[slot] = now
        if tokens < 1.0:
            self._tokens[slot] = tokens
            return False
        self._tokens[slot] = tokens - 1.0
        return True


class Counters(Counter[str]):
    """
    What the server did with each datagram, by reason.
    """
