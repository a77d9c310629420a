"""
The agent's registration with the rendezvous, as an explicit state machine.

Registered agents refresh every C{keepalive} seconds, which also keeps their
NAT mapping open.  A refresh that goes unanswered means the rendezvous went
silent (or the path to it did); the agent says so and registers again with
capped, jittered backoff for as long as it runs.  An attempt that the
rendezvous refused (L{Refused}: a wrong name or key, most likely) leaves the
agent "refused" until one succeeds, retried the same way, so that a
corrected peers file lets it in without a restart.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from automat import TypeMachineBuilder
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from punchd.agent.rendezvous_client import Refused
from punchd.wire import format_address

log = Logger()

#: What one registration attempt yields: our mapped address and the lifetime granted.
Registered = tuple[tuple[str, int], int]


class Registration(Protocol):
    """
    Inputs of the registration machine.
    """

    def start(self) -> None:
        "Begin registering."

    def stop(self) -> None:
        "Stop refreshing and retrying."

    def succeed(self, mapped: tuple[str, int], lifetime: int) -> None:
        "The rendezvous accepted a registration."

    def fail(self, reason: str) -> None:
        "A registration attempt got an error or no answer."

    def refuse(self, reason: str) -> None:
        "The rendezvous refused our credentials (unsigned 401s only)."

    def keepaliveIsDue(self) -> None:
        "Time to refresh."

    def retryIsDue(self) -> None:
        "Time to try again after a failure."

    def reregisterNow(self) -> None:
        "The rendezvous forgot us (it said so): refresh at once."

    def describe(self) -> str:
        "The state's name for status reports."


def backoff_delay(attempt: int, jitter: Callable[[], float] = random.random) -> float:
    """
    1, 2, 4, ... seconds, capped at 30, each shortened by up to a fifth at
    random so that agents restarted together do not retry in lockstep.
    """
    return min(30.0, 2.0 ** max(0, attempt - 1)) * (1.0 - 0.2 * jitter())


@dataclass
class RegistrationCore:
    """
    What the machine works with: the clock, the way to send one attempt,
    and what it has learned.
    """

    clock: IReactorTime
    attempt: Callable[[], Deferred[Registered]]
    keepalive: float
    server: Callable[[], str]
    jitter: Callable[[], float] = random.random
    mapped: tuple[str, int] | None = None
    lifetime: int = 0
    registered_at: float | None = None
    failures: int = 0
    #: Attempts by outcome: registered, refreshed, failed, refused.
    outcomes: Counter[str] = field(default_factory=Counter)
    last_error: str | None = None
    timer: IDelayedCall | None = None
    inflight: Deferred[Registered] | None = None

    def cancel_timer(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None

    def cancel_inflight(self) -> None:
        inflight, self.inflight = self.inflight, None
        if inflight is not None:
            inflight.cancel()


def _send(machine: Registration, core: RegistrationCore) -> None:
    d = core.attempt()
    core.inflight = d

    def done(result: Registered) -> None:
        if core.inflight is d:
            core.inflight = None
            machine.succeed(*result)

    def failed(failure: Failure) -> None:
        if core.inflight is d:
            core.inflight = None
            if failure.check(Refused):
                machine.refuse(str(failure.value))
            else:
                machine.fail(failure.getErrorMessage() or repr(failure.value))

    d.addCallbacks(done, failed)


def _retry_later(machine: Registration, core: RegistrationCore, reason: str) -> float:
    core.failures += 1
    core.last_error = reason
    delay = backoff_delay(core.failures, core.jitter)
    core.timer = core.clock.callLater(delay, machine.retryIsDue)
    return delay


# -- what the transitions do ---------------------------------------------------


def _attempt(machine: Registration, core: RegistrationCore) -> None:
    core.cancel_timer()
    _send(machine, core)


def _remember(
    machine: Registration, core: RegistrationCore, mapped: tuple[str, int], lifetime: int
) -> None:
    fresh = core.registered_at is None or core.failures > 0
    core.outcomes["registered" if fresh else "refreshed"] += 1
    if fresh:
        log.info(
            "registered with rendezvous {server} as {mapped}",
            server=core.server(),
            mapped=format_address(mapped),
        )
    if core.mapped is not None and core.mapped != mapped:
        log.info(
            "our mapped address changed from {old} to {new}",
            old=format_address(core.mapped),
            new=format_address(mapped),
        )
    core.mapped = mapped
    core.lifetime = lifetime
    core.registered_at = core.clock.seconds()
    core.failures = 0
    core.last_error = None
    # Refresh well within what the server granted, whatever was asked.
    refresh = min(core.keepalive, lifetime / 3) if lifetime > 0 else core.keepalive
    core.timer = core.clock.callLater(refresh, machine.keepaliveIsDue)


def _schedule_retry(machine: Registration, core: RegistrationCore, reason: str) -> None:
    core.outcomes["failed"] += 1
    delay = _retry_later(machine, core, reason)
    if core.failures == 1:
        log.warn(
            "rendezvous {server} did not accept us ({reason}); retrying",
            server=core.server(),
            reason=reason,
        )
    else:
        log.info(
            "registration attempt {attempt} failed ({reason}); next in {delay:.1f} s",
            attempt=core.failures,
            reason=reason,
            delay=delay,
        )


def _first_refusal(machine: Registration, core: RegistrationCore, reason: str) -> None:
    core.outcomes["refused"] += 1
    delay = _retry_later(machine, core, reason)
    log.warn("{reason}; retrying in {delay:.1f} s", reason=reason, delay=delay)


def _refused_again(machine: Registration, core: RegistrationCore, reason: str) -> None:
    core.outcomes["refused"] += 1
    delay = _retry_later(machine, core, reason)
    log.info(
        "registration attempt {attempt} refused; next in {delay:.1f} s",
        attempt=core.failures,
        delay=delay,
    )


def _halt(machine: Registration, core: RegistrationCore) -> None:
    core.cancel_timer()
    core.cancel_inflight()


#: Each state's name in status reports.
DESCRIPTIONS = {
    "stopped": "stopped",
    "registering": "registering",
    "registered": "registered",
    "refreshing": "registered",
    "waiting to retry": "retrying",
    # Refused, and waiting to retry; refused, and retrying.
    "refused": "refused",
    "rechecking": "refused",
}


def build_registration() -> Callable[[RegistrationCore], Registration]:
    builder = TypeMachineBuilder(Registration, RegistrationCore)
    states = {name: builder.state(name) for name in DESCRIPTIONS}
    stopped, registering, registered = (
        states["stopped"],
        states["registering"],
        states["registered"],
    )
    refreshing, waiting = states["refreshing"], states["waiting to retry"]
    refused, rechecking = states["refused"], states["rechecking"]
    R = Registration

    stopped.upon(R.start).to(registering)(_attempt)
    for idle, attempting in [(waiting, registering), (refused, rechecking)]:
        idle.upon(R.retryIsDue).to(attempting)(_attempt)
        idle.upon(R.reregisterNow).to(attempting)(_attempt)
    registered.upon(R.keepaliveIsDue).to(refreshing)(_attempt)
    registered.upon(R.reregisterNow).to(refreshing)(_attempt)
    for attempting in (registering, refreshing, rechecking):
        attempting.upon(R.succeed).to(registered)(_remember)
        attempting.upon(R.fail).to(waiting)(_schedule_retry)
        attempting.upon(R.reregisterNow).loop().returns(None)
    registering.upon(R.refuse).to(refused)(_first_refusal)
    refreshing.upon(R.refuse).to(refused)(_first_refusal)
    rechecking.upon(R.refuse).to(refused)(_refused_again)

    for name, state in states.items():
        state.upon(R.describe).loop().returns(DESCRIPTIONS[name])
        if state is stopped:
            state.upon(R.stop).loop().returns(None)
            state.upon(R.reregisterNow).loop().returns(None)
        else:
            state.upon(R.stop).to(stopped)(_halt)
            state.upon(R.start).loop().returns(None)
    return builder.build()


build_registration_machine = build_registration()
