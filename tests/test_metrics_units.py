"""
The metrics' building blocks, without a daemon: counters read at scrape
time, the plain histogram, and what the agent counts of its tunnels.
"""

from __future__ import annotations

from collections import Counter

from prometheus_client.core import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.python.failure import Failure

from punchd import wire
from punchd.agent.api import TunnelFailed
from punchd.metrics import (
    Durations,
    FromCounter,
    FunctionCollector,
    TunnelStats,
    read_counter,
)
from punchd.stun import MessageClass

FAMILIES = (
    FromCounter("things", "Things.", keys={"thing": ""}),
    FromCounter("dropped", "Drops.", "reason", prefix="dropped-"),
)


def exposed(collect: FunctionCollector) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collect)  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_counters_are_read_when_scraped_and_nothing_is_hidden() -> None:
    counter: Counter[str] = Counter()
    samples = exposed(FunctionCollector(lambda: read_counter(counter, FAMILIES, "other")))
    assert samples == {("punchd_things_total", ()): 0.0}  # a fixed key shows while 0
    counter.update({"thing": 3, "dropped-too-big": 2, "surprise": 1})
    samples = exposed(FunctionCollector(lambda: read_counter(counter, FAMILIES, "other")))
    assert samples == {
        ("punchd_things_total", ()): 3.0,
        ("punchd_dropped_total", (("reason", "too_big"),)): 2.0,
        ("punchd_other_total", (("event", "surprise"),)): 1.0,
    }


def test_durations_are_cumulative_buckets() -> None:
    durations = Durations(buckets=(0.1, 1.0))
    assert durations.cumulative() == [("0.1", 0.0), ("1", 0.0), ("+Inf", 0.0)]
    for seconds in (0.05, 0.1, 0.5, 7.0):
        durations.observe(seconds)
    assert durations.cumulative() == [("0.1", 2.0), ("1", 3.0), ("+Inf", 4.0)]
    assert durations.total == 7.65


def test_tunnel_outcomes_pass_results_on() -> None:
    stats = TunnelStats()
    failure = Failure(TunnelFailed("peer-offline", "bob is not online"))

    class HandOffLike:
        info = {"path": "direct", "setup_ms": 12.5}

    handoff = HandOffLike()
    assert stats.ended(failure, "initiator") is failure
    assert stats.ended(handoff, "initiator") is handoff
    assert stats.outcomes == {
        ("initiator", "none", "peer-offline"): 1,
        ("initiator", "direct", "ok"): 1,
    }
    assert stats.setup["initiator"].total == 0.0125


def test_answers_to_introductions_count_by_name() -> None:
    stats = TunnelStats()
    accepted = (MessageClass.SUCCESS, [])
    assert stats.answered(accepted) is accepted
    stats.answered((MessageClass.ERROR, wire.error_attributes(460)))
    stats.answered((MessageClass.ERROR, wire.error_attributes(486)))
    assert stats.introductions == {"accepted": 1, "no_listener": 1, "busy": 1}
