"""
Port mappings kept after the hand-off: renewed while the port is in use,
deleted once it is closed, never kept twice for one port.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.defer import succeed
from twisted.internet.task import Clock

from punchd.agent.mappings import CHECK_EVERY, KeptMappings, port_in_use


class FakeMapping:
    def __init__(self, port: int, lifetime: int = 20) -> None:
        self.internal_port = port
        self.lifetime = lifetime
        self.renewed = 0
        self.deleted = False

    def renew(self) -> Any:
        self.renewed += 1
        return succeed(True)

    def delete(self) -> Any:
        self.deleted = True
        return succeed(None)


def test_a_mapping_lives_while_its_port_does() -> None:
    clock = Clock()
    kept = KeptMappings(clock)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        assert port_in_use(port)
        mapping = FakeMapping(port)
        kept.keep(mapping)  # type: ignore[arg-type]
        for _ in range(4):
            clock.advance(CHECK_EVERY)
        assert mapping.renewed >= 1 and not mapping.deleted
    clock.advance(CHECK_EVERY)
    assert mapping.deleted and len(kept) == 0


def test_keeping_a_port_again_drops_the_earlier_mapping() -> None:
    clock = Clock()
    kept = KeptMappings(clock)
    first, second = FakeMapping(40000), FakeMapping(40000)
    kept.keep(first)  # type: ignore[arg-type]
    kept.keep(second)  # type: ignore[arg-type]
    assert first.deleted and not second.deleted
    assert len(kept) == 1 and len(clock.getDelayedCalls()) == 1
