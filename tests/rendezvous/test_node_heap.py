"""
A node sets what it has loaded aside from garbage collection.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from punchd.rendezvous.node import settle_heap


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()


@pytest.mark.usefixtures("unfrozen")
def test_settle_heap_freezes_what_is_alive() -> None:
    kept = [{"entry": i} for i in range(1000)]
    settle_heap()
    assert gc.get_freeze_count() >= len(kept)
