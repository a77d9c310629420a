"""
C{workers = N}: the twistd process is worker 0 and starts N-1 more, each a
node of the service on the same UDP port (SO_REUSEPORT: the kernel spreads
agents over the sockets by their address, so an agent always reaches the
same worker while the set of workers stays the same).

A worker that exits is started again after a second; all stop with the
main process.  A worker's stdin is a pipe from the main process: when the
main process dies, even by SIGKILL, the pipe closes and the worker stops
(L{main}), so one systemd unit owns them all.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from twisted.application import service
from twisted.internet import protocol
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

RESTART_DELAY = 1.0


class _Worker(protocol.ProcessProtocol):
    def __init__(self, index: int, owner: Workers) -> None:
        self.index = index
        self.owner = owner
        self.ended: Deferred[None] = Deferred()

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(None)
        self.owner.ended(self, reason)


class Workers(service.Service):
    """
    Starts and watches workers 1 to N-1.
    """

    def __init__(self, count: int, argv: list[str], reactor: Any) -> None:
        self._count = count
        self._argv = argv
        self._reactor = reactor
        self._running: dict[int, tuple[_Worker, Any]] = {}

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        for index in range(1, self._count):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        if not self.running:
            return
        worker = _Worker(index, self)
        argv = [sys.executable, "-m", "punchd.rendezvous.workers", str(index), *self._argv]
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
        transport = self._reactor.spawnProcess(
            worker, sys.executable, argv, env=env, childFDs={0: "w", 1: 1, 2: 2}
        )
        self._running[index] = (worker, transport)
        log.info("worker {index} started (pid {pid})", index=index, pid=transport.pid)

    def ended(self, worker: _Worker, reason: Failure) -> None:
        self._running.pop(worker.index, None)
        if self.running:
            log.warn(
                "worker {index} exited ({reason}); starting it again",
                index=worker.index,
                reason=reason.getErrorMessage(),
            )
            self._reactor.callLater(RESTART_DELAY, self._spawn, worker.index)

    def hangup(self) -> None:
        """
        Pass a SIGHUP (reload the peers file) on to every worker.
        """
        for _, transport in self._running.values():
            try:
                transport.signalProcess("HUP")
            except Exception:
                pass

    def stopService(self) -> Deferred[Any]:
        super().stopService()  # type: ignore[no-untyped-call]
        waits: list[Deferred[None]] = []
        for worker, transport in list(self._running.values()):
            waits.append(worker.ended)
            try:
                transport.signalProcess("TERM")
            except Exception:
                pass
        return DeferredList(waits) if waits else succeed(None)


class _ParentWatch(protocol.Protocol):
    """
    The worker's stdin: closed when the main process is gone.
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        if self._reactor.running:
            log.info("the main rendezvous process is gone; stopping")
            self._reactor.stop()


def main(argv: list[str]) -> None:
    """
    C{python -m punchd.rendezvous.workers INDEX [options]}: one worker.
    """
    from twisted.internet import reactor as _reactor
    from twisted.internet import stdio
    from twisted.logger import globalLogBeginner

    from punchd.logs import observer
    from punchd.rendezvous.tap import Options, makeService

    reactor: Any = _reactor
    index = int(argv[0])
    options = Options()
    options.parseOptions(argv[1:])
    globalLogBeginner.beginLoggingTo(
        [observer(options["settings"].log_format, sys.stdout)], redirectStandardIO=False
    )
    top = makeService(options, reactor, worker=index)
    watch: Any = stdio.StandardIO
    watch(_ParentWatch(reactor), stdin=0, stdout=os.open(os.devnull, os.O_WRONLY))
    signal.signal(signal.SIGTERM, lambda *_: reactor.callFromThread(reactor.stop))
    reactor.callWhenRunning(top.startService)
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1:])
