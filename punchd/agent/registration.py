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


def build_registration() -> Callable[[RegistrationCore], Registration]:
    builder = TypeMachineBuilder(Registration, RegistrationCore)
    stopped = builder.state("stopped")
    registering = builder.state("registering")
    registered = builder.state("registered")
    refreshing = builder.state("refreshing")
    waiting = builder.state("waiting to retry")
    # Refused, and waiting to retry; refused, and retrying.
    refused = builder.state("refused")
    rechecking = builder.state("rechecking")

    @stopped.upon(Registration.start).to(registering)
    @waiting.upon(Registration.retryIsDue).to(registering)
    @waiting.upon(Registration.reregisterNow).to(registering)
    @refused.upon(Registration.retryIsDue).to(rechecking)
    @refused.upon(Registration.reregisterNow).to(rechecking)
    def register(machine: Registration, core: RegistrationCore) -> None:
        core.cancel_timer()
        _send(machine, core)

    @registered.upon(Registration.keepaliveIsDue).to(refreshing)
    @registered.upon(Registration.reregisterNow).to(refreshing)
    def refresh(machine: Registration, core: RegistrationCore) -> None:
        core.cancel_timer()
        _send(machine, core)

    @registering.upon(Registration.succeed).to(registered)
    @refreshing.upon(Registration.succeed).to(registered)
    @rechecking.upon(Registration.succeed).to(registered)
    def remember(
        machine: Registration, core: RegistrationCore, mapped: tuple[str, int], lifetime: int
    ) -> None:
        core.outcomes[
            "refreshed" if core.registered_at and not core.failures else "registered"
        ] += 1
        if core.registered_at is None or core.failures:
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

    @registering.upon(Registration.fail).to(waiting)
    @refreshing.upon(Registration.fail).to(waiting)
    @rechecking.upon(Registration.fail).to(waiting)
    def schedule_retry(machine: Registration, core: RegistrationCore, reason: str) -> None:
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

    @registering.upon(Registration.refuse).to(refused)
    @refreshing.upon(Registration.refuse).to(refused)
    def first_refusal(machine: Registration, core: RegistrationCore, reason: str) -> None:
        core.outcomes["refused"] += 1
        delay = _retry_later(machine, core, reason)
        log.warn("{reason}; retrying in {delay:.1f} s", reason=reason, delay=delay)

    @rechecking.upon(Registration.refuse).to(refused)
    def refused_again(machine: Registration, core: RegistrationCore, reason: str) -> None:
        core.outcomes["refused"] += 1
        delay = _retry_later(machine, core, reason)
        log.info(
            "registration attempt {attempt} refused; next in {delay:.1f} s",
            attempt=core.failures,
            delay=delay,
        )

    @registering.upon(Registration.stop).to(stopped)
    @registered.upon(Registration.stop).to(stopped)
    @refreshing.upon(Registration.stop).to(stopped)
    @waiting.upon(Registration.stop).to(stopped)
    @refused.upon(Registration.stop).to(stopped)
    @rechecking.upon(Registration.stop).to(stopped)
    def halt(machine: Registration, core: RegistrationCore) -> None:
        core.cancel_timer()
        core.cancel_inflight()

    for state in (registering, registered, refreshing, waiting, refused, rechecking):
        state.upon(Registration.start).loop().returns(None)
    for state in (registering, refreshing, rechecking):
        state.upon(Registration.reregisterNow).loop().returns(None)
    stopped.upon(Registration.stop).loop().returns(None)
    stopped.upon(Registration.reregisterNow).loop().returns(None)

    for state, name in (
        (stopped, "stopped"),
        (registering, "registering"),
        (registered, "registered"),
        (refreshing, "registered"),
        (waiting, "retrying"),
        (refused, "refused"),
        (rechecking, "refused"),
    ):
        state.upon(Registration.describe).loop().returns(name)

    return builder.build()


build_registration_machine = build_registration()
