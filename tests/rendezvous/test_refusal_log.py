"""
The rendezvous's lines about refused requests: rate-limited per source
address and in all, and never a key.
"""

from __future__ import annotations

import re

from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent

from punchd.rendezvous.auth import REFUSAL_LINES_PER_MINUTE, RefusalLog


def said(events: list[dict[str, object]]) -> list[str]:
    return [formatEvent(e) for e in events if "refused a request" in formatEvent(e)]


def test_one_line_per_source_address_a_minute() -> None:
    clock = Clock()
    refusals = RefusalLog(clock)
    with capturedLogs() as events:
        for _ in range(20):
            refusals.refused(("192.0.2.1", 4000), "carol", False)
            refusals.refused(("192.0.2.1", 4001), "alice", True)
            refusals.refused(("192.0.2.2", 4000), None, False)
            clock.advance(1)
        assert said(events) == [  # type: ignore[arg-type]
            "refused a request from 192.0.2.1:4000 as agent 'carol', "
            "which is not in the peers file",
            "refused a request from 192.0.2.1:4001 as agent 'alice' with a bad signature "
            "(that agent's private key does not match its public key in the peers file, "
            "or its rendezvous_public_key is not ours)",
            "refused a request from 192.0.2.2:4000 without a valid agent name",
        ]
        clock.advance(60)
        refusals.refused(("192.0.2.1", 4000), "carol", False)
        assert len(said(events)) == 4  # type: ignore[arg-type]


def test_a_cap_in_all_and_a_count_of_what_it_left_out() -> None:
    clock = Clock()
    refusals = RefusalLog(clock)
    with capturedLogs() as events:
        for port in range(1000, 1100):
            refusals.refused(("198.51.100.9", port), "mallory", False)
        assert len(said(events)) == REFUSAL_LINES_PER_MINUTE  # type: ignore[arg-type]
        clock.advance(60)
        refusals.refused(("198.51.100.9", 2000), "mallory", False)
        last = said(events)[-1]  # type: ignore[arg-type]
    match = re.search(r"\((\d+) other sources' refusals not logged\)$", last)
    assert match is not None, last
    # The per-source buckets are hashed: a rare collision passes over one more.
    assert 80 <= int(match.group(1)) <= 100 - REFUSAL_LINES_PER_MINUTE
