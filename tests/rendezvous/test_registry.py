"""
Tests for L{punchd.rendezvous.registry}: the anti-replay window against a
plain model of it, and the in-memory registry's lifetimes.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from punchd.rendezvous.registry import REPLAY_WINDOW, MemoryRegistry, ReplayWindow

# Small steps around the window's edge, and the jumps of a restarted agent.
steps = st.one_of(
    st.integers(-2 * REPLAY_WINDOW, 2 * REPLAY_WINDOW),
    st.integers(10**9, 10**13),
)


@given(st.integers(0, 2**40), st.lists(steps, max_size=60))
def test_window_accepts_exactly_what_the_model_accepts(start: int, moves: list[int]) -> None:
    window = ReplayWindow()
    seen: set[int] = set()
    highest = -1
    sequence = start
    for move in [0, *moves]:
        sequence = max(0, sequence + move)
        expected = sequence > highest or (
            highest - sequence < REPLAY_WINDOW and sequence not in seen
        )
        assert window.accept(sequence) is expected, (sequence, highest)
        if expected:
            seen.add(sequence)
            highest = max(highest, sequence)
    assert window.highest == highest
    assert window.bitmap < 1 << REPLAY_WINDOW


def test_registry_lifetimes_and_moves() -> None:
    registry = MemoryRegistry()
    first, moved = registry.register("alice", "default", ("192.0.2.1", 1), 100.0, 10)
    assert moved is None and registry.count == 1
    again, moved = registry.register("alice", "default", ("192.0.2.1", 2), 105.0, 10)
    assert again is first and moved == ("192.0.2.1", 1)
    registry.register("bob", "default", ("192.0.2.2", 1), 105.0, 60)
    registry.register("eve", "elsewhere", ("192.0.2.3", 1), 105.0, 60)
    assert registry.online("default", 110.0) == ["alice", "bob"]
    assert registry.lookup("alice", 115.0) is first
    assert registry.lookup("alice", 115.5) is None
    assert registry.online("default", 115.5) == ["bob"]
    assert registry.expire(115.5) == ["alice"]
    assert registry.count == 2
    # Registering after expiry starts afresh.
    fresh, moved = registry.register("alice", "default", ("192.0.2.1", 3), 200.0, 10)
    assert fresh is not first and moved is None and fresh.registered_at == 200.0
