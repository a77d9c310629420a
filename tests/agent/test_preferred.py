"""
Moving back to the first rendezvous once it answers again, on a Clock.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from punchd.agent.preferred import PreferredCheck


class World:
    def __init__(self) -> None:
        self.clock = Clock()
        self.away = True
        self.probes: list[Deferred[bool]] = []
        self.returns = 0
        self.check = PreferredCheck(
            self.clock, 60.0, lambda: self.away, self._probe, self._back, jitter=lambda: 0.5
        )

    def _probe(self) -> Deferred[bool]:
        d: Deferred[bool] = Deferred()
        self.probes.append(d)
        return d

    def _back(self) -> None:
        self.returns += 1
        self.away = False


def test_nothing_is_asked_once_back_on_the_first() -> None:
    world = World()
    world.check.start()
    world.away = False  # the first came back by itself
    world.clock.advance(3600)
    assert world.probes == [] and world.clock.getDelayedCalls() == []
    world.check.start()  # away again
    world.away = True
    world.clock.advance(54)
    assert len(world.probes) == 1


def test_the_first_is_asked_every_interval_and_taken_back_when_it_answers() -> None:
    world = World()
    world.check.start()
    world.clock.advance(53.9)  # 60 s less a tenth (half the jitter)
    assert world.probes == []
    world.clock.advance(0.1)
    assert len(world.probes) == 1
    world.probes[0].callback(False)
    assert world.returns == 0
    world.clock.advance(54)
    world.probes[1].errback(OSError("no socket"))
    assert world.returns == 0
    world.clock.advance(54)
    world.probes[2].callback(True)
    assert world.returns == 1
    world.clock.advance(3600)
    assert len(world.probes) == 3, "back on the first: no more probes"
    assert world.clock.getDelayedCalls() == []


def test_an_answer_after_moving_elsewhere_changes_nothing() -> None:
    world = World()
    world.check.start()
    world.clock.advance(54)
    world.away = False  # registered with the first meanwhile (it came back by itself)
    world.probes[0].callback(True)
    assert world.returns == 0


def test_stop_cancels_the_timer_and_the_probe() -> None:
    world = World()
    world.check.start()
    world.clock.advance(54)
    world.check.stop()
    assert world.probes[0].called  # cancelled
    assert world.clock.getDelayedCalls() == [] and world.returns == 0
