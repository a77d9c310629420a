"""
How the agent reaches its rendezvous: over UDP, or over TLS where UDP is
blocked (docs/protocol.rst, "TLS").

The agent speaks UDP for as long as the rendezvous answers there.  When a
registration over UDP gets no answer at all, the machine connects over
TLS; once the handshake has checked the certificate, the agent's requests
travel on that stream and the registration goes on there.  While on TLS
it asks the rendezvous over UDP again every C{recheck} seconds (a signed
gather from a fresh socket) and moves back as soon as UDP answers: a
network that blocked UDP for a while gets direct tunnels again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from automat import TypeMachineBuilder
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from punchd.agent.stream import RendezvousStream

__all__ = ["PathCore", "RendezvousPath", "build_path_machine"]

log = Logger()


class RendezvousPath(Protocol):
    """
    Inputs of the machine that chooses between UDP and TLS.
    """

    def udpWentSilent(self) -> None:
        "A registration over UDP got no answer at all."

    def tlsIsUp(self, stream: RendezvousStream) -> None:
        "The TLS connection is up, its certificate checked."

    def tlsFailed(self, reason: str) -> None:
        "Connecting over TLS failed, or the connection was lost or went silent."

    def udpRecheckIsDue(self) -> None:
        "Time to ask the rendezvous over UDP again."

    def udpAnswered(self) -> None:
        "The rendezvous answered over UDP."

    def udpStillSilent(self) -> None:
        "The rendezvous did not answer over UDP."

    def stop(self) -> None:
        "The agent stops: close the stream, stop the timers."

    def describe(self) -> str:
        "C{udp}, C{connecting}, C{tls}, or C{stopped}."


@dataclass
class PathCore:
    """
    What the machine works with: how to connect, how to probe UDP, and
    whom to tell.
    """

    clock: IReactorTime
    #: Connect to the rendezvous' TLS port (fails with a reason in words).
    connect: Callable[[], Deferred[RendezvousStream]]
    #: Whether the rendezvous answers over UDP now.
    probe_udp: Callable[[], Deferred[bool]]
    #: Route the agent's requests on this stream (None: back to UDP).
    use: Callable[[RendezvousStream | None], None]
    #: The way changed: register again on the new one.
    changed: Callable[[], None]
    #: Seconds between UDP rechecks while on TLS.
    recheck: float
    #: The TLS address in use, for log lines.
    where: Callable[[], str]
    stream: RendezvousStream | None = None
    #: Why TLS failed last, in words (None since it last worked).
    last_error: str | None = None
    #: TLS failures since the agent last moved to another rendezvous.
    tls_failures: int = 0
    _waiting: list[Deferred[None]] = field(default_factory=list)

    def settled(self) -> Deferred[None]:
        """
        Fires once the TLS connection being set up is up or has failed.
        """
        d: Deferred[None] = Deferred()
        self._waiting.append(d)
        return d

    def soon(self, f: Callable[[], object]) -> None:
        """
        Call C{f} once the current input is over: what it sets off (a
        registration attempt) asks this machine again.
        """
        self.clock.callLater(0, f)

    def release_waiters(self) -> None:
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)

    def drop_stream(self) -> None:
        stream, self.stream = self.stream, None
        self.use(None)
        if stream is not None:
            stream.close()


@dataclass
class Connecting:
    pending: Deferred[RendezvousStream]

    def stop(self) -> None:
        self.pending.cancel()


@dataclass
class OnTls:
    timer: IDelayedCall

    def stop(self) -> None:
        if self.timer.active():
            self.timer.cancel()


def connecting(m: RendezvousPath, core: PathCore) -> Connecting:
    log.warn(
        "the rendezvous does not answer over UDP; trying TLS to {where}",
        where=core.where(),
    )
    pending = core.connect()

    # The outcome may be known at once (a CA file that cannot be read): it
    # is an input of its own, after this one.
    def up(stream: RendezvousStream) -> None:
        core.soon(lambda: m.tlsIsUp(stream))

    def failed(failure: Failure) -> None:
        if not failure.check(CancelledError):  # cancelled: the agent stopped
            reason = failure.getErrorMessage()
            core.soon(lambda: m.tlsFailed(reason))

    pending.addCallbacks(up, failed)
    return Connecting(pending)


def on_tls(m: RendezvousPath, core: PathCore, stream: RendezvousStream | None = None) -> OnTls:
    if stream is not None:
        core.stream = stream
        core.last_error = None
        core.use(stream)
        log.info("UDP blocked, using TLS to the rendezvous at {where}", where=core.where())
        core.soon(core.release_waiters)
        core.soon(core.changed)
    return OnTls(core.clock.callLater(core.recheck, m.udpRecheckIsDue))


def build_path() -> Callable[[PathCore], RendezvousPath]:
    builder = TypeMachineBuilder(RendezvousPath, PathCore)
    udp = builder.state("udp")
    connecting_ = builder.state("connecting", connecting)
    tls = builder.state("tls", on_tls)
    rechecking = builder.state("rechecking")
    stopped = builder.state("stopped")
    P = RendezvousPath

    udp.upon(P.udpWentSilent).to(connecting_).returns(None)
    connecting_.upon(P.tlsIsUp).to(tls).returns(None)

    @connecting_.upon(P.tlsFailed).to(udp)
    def refused(m: RendezvousPath, core: PathCore, data: Connecting, reason: str) -> None:
        core.tls_failures += 1
        core.last_error = reason
        log.warn("{reason}", reason=reason)
        core.soon(core.release_waiters)

    @tls.upon(P.udpRecheckIsDue).to(rechecking)
    def recheck(m: RendezvousPath, core: PathCore, data: OnTls) -> None:
        def answered(works: bool) -> None:
            (m.udpAnswered if works else m.udpStillSilent)()

        core.probe_udp().addCallbacks(answered, lambda f: m.udpStillSilent())

    rechecking.upon(P.udpStillSilent).to(tls).returns(None)

    @rechecking.upon(P.udpAnswered).to(udp)
    def back_to_udp(m: RendezvousPath, core: PathCore) -> None:
        log.info("the rendezvous answers over UDP again; leaving TLS")
        core.drop_stream()
        core.soon(core.changed)

    def lost(m: RendezvousPath, core: PathCore, reason: str, data: OnTls | None = None) -> None:
        if data is not None:
            data.stop()
        core.tls_failures += 1
        core.last_error = reason
        log.warn("{reason}; back to UDP", reason=reason)
        core.drop_stream()
        core.soon(core.changed)

    @tls.upon(P.tlsFailed).to(udp)
    def lost_on_tls(m: RendezvousPath, core: PathCore, data: OnTls, reason: str) -> None:
        lost(m, core, reason, data)

    rechecking.upon(P.tlsFailed).to(udp)(lost)

    def halt(m: RendezvousPath, core: PathCore) -> None:
        core.drop_stream()
        core.soon(core.release_waiters)

    @connecting_.upon(P.stop).to(stopped)
    def cancel(m: RendezvousPath, core: PathCore, data: Connecting) -> None:
        data.stop()
        halt(m, core)

    @tls.upon(P.stop).to(stopped)
    def close(m: RendezvousPath, core: PathCore, data: OnTls) -> None:
        data.stop()
        halt(m, core)

    udp.upon(P.stop).to(stopped)(halt)
    rechecking.upon(P.stop).to(stopped)(halt)

    names: dict[Any, str] = {
        udp: "udp",
        connecting_: "connecting",
        tls: "tls",
        rechecking: "tls",
        stopped: "stopped",
    }
    for state, name in names.items():
        state.upon(P.describe).loop().returns(name)
    # What an input means nowhere else: nothing to do.
    udp.upon(P.tlsFailed).loop().returns(None)
    busy: list[Any] = [connecting_, tls, rechecking, stopped]
    for state in busy:
        state.upon(P.udpWentSilent).loop().returns(None)
    # A probe's answer may come after the stream it was for is gone.
    not_rechecking: list[Any] = [udp, connecting_, tls, stopped]
    for state in not_rechecking:
        for late in (P.udpAnswered, P.udpStillSilent):
            state.upon(late).loop().returns(None)
    for state in (udp, stopped):
        state.upon(P.udpRecheckIsDue).loop().returns(None)
    stopped.upon(P.tlsFailed).loop().returns(None)
    stopped.upon(P.stop).loop().returns(None)

    def unwanted(m: RendezvousPath, core: PathCore, stream: RendezvousStream) -> None:
        stream.close()  # a connection nobody waits for any more

    @tls.upon(P.tlsIsUp).loop()
    def unwanted_on_tls(
        m: RendezvousPath, core: PathCore, data: OnTls, stream: RendezvousStream
    ) -> None:
        stream.close()

    for state in (udp, rechecking, stopped):
        state.upon(P.tlsIsUp).loop()(unwanted)
    return builder.build()


build_path_machine = build_path()
