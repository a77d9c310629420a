"""
A tunnel through the relay over TLS (C{"path": "relay-tls"}): where UDP is
blocked, the tunnel's relay candidate is a channel of the agent's TLS
stream to the rendezvous, not a UDP socket.

L{StreamChannel} stands in for the tunnel's socket while the tunnel is set
up (checks and binds travel as relayed frames).  At the hand-off the
program gets one end of a connected C{AF_UNIX}/C{SOCK_DGRAM} socket pair,
and a L{Pump} moves datagrams between the other end and the stream until
either closes: such a tunnel ends when the agent stops.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable

from twisted.internet.interfaces import IReactorFDSet, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from punchd.agent.stream import RendezvousStream

__all__ = ["Pump", "StreamChannel"]

log = Logger()

Address = tuple[str, int]
#: The largest datagram a program may send through the relay.
MAX_DATAGRAM = 65535
#: Datagrams read from the program per readiness event, so that others get their turn.
READS_PER_CALL = 64
#: Datagrams held for the program between the choice of the pair and the hand-off.
MAX_HELD = 64
#: Seconds without a datagram either way after which a pump closes: a
#: program that closed its end cannot be told from a quiet one otherwise.
IDLE_TIMEOUT = 300.0


class StreamChannel:
    """
    The tunnel's "socket" for its relay port C{port}, on the stream.

    Datagrams from the relay arrive as from C{relay}, the relay port's
    address; near the hand-off the program's first ones are held (not
    consumed) and go to the program first.
    """

    def __init__(
        self,
        reactor: IReactorFDSet,
        clock: IReactorTime,
        stream: RendezvousStream,
        relay: Address,
        received: Callable[[bytes, Address], None],
        keep: Callable[[bytes, Address], bool],
    ) -> None:
        self._reactor = reactor
        self._clock = clock
        self.stream = stream
        self.relay = relay
        self.port = relay[1]
        self._received = received
        self._keep = keep
        self.peeking = False
        self._reading = False
        self._held: list[bytes] = []
        self._closed = False
        self.local: Address = ("tls", self.port)
        stream.channels[self.port] = self._datagram

    def _datagram(self, data: bytes) -> None:
        if self._held or (self.peeking and self._keep(data, self.relay)):
            if len(self._held) < MAX_HELD:
                self._held.append(data)
        elif self._reading:
            self._received(data, self.relay)

    # -- what the tunnel does with a socket -------------------------------------

    def start_reading(self) -> None:
        self._reading = True

    def stop_reading(self) -> None:
        self._reading = False

    def send(self, data: bytes, address: Address) -> None:
        if address == self.relay:
            self.stream.send_relayed(self.port, data)

    def connect(self, remote: Address) -> None:
        "The stream carries only this relay port's datagrams already."

    def release(self, remote: Address, ours: Callable[[bytes, Address], bool]) -> socket.socket:
        """
        The program's end of a new socket pair; the agent's end is pumped
        to and from the stream from now on.
        """
        self._closed = True
        self.stream.channels.pop(self.port, None)
        program, agent = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            Pump(self._reactor, self._clock, self.stream, self.port, agent).start(self._held)
        except OSError:
            program.close()
            agent.close()
            raise
        return program

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self.stream.channels.get(self.port) == self._datagram:
                del self.stream.channels[self.port]

    def __repr__(self) -> str:
        return f"<StreamChannel relay port {self.port}>"


class Pump:
    """
    Moves datagrams between the agent's end of a program's socket pair and
    one relay port's channel on the stream.

    Bounded both ways: while the stream's send buffer is full the program
    is not read (its own sends block or fail, as on a full UDP socket), and
    a datagram for a program whose queue is full is dropped.
    """

    def __init__(
        self,
        reactor: IReactorFDSet,
        clock: IReactorTime,
        stream: RendezvousStream,
        port: int,
        sock: socket.socket,
    ) -> None:
        self._reactor = reactor
        self._clock = clock
        self.stream = stream
        self.port = port
        self.sock: socket.socket | None = sock
        self._reading = False
        self._active = False
        self._idle = clock.callLater(IDLE_TIMEOUT, self._check_idle)
        self.dropped = 0

    def start(self, held: list[bytes]) -> None:
        assert self.sock is not None
        self.sock.setblocking(False)
        for data in held:
            self._to_program(data)
        self.stream.channels[self.port] = self._to_program
        self.stream.on_resume.append(self._resume)
        self.stream.on_close.append(self.close)
        self._resume()

    # IReadDescriptor
    def fileno(self) -> int:
        return -1 if self.sock is None else self.sock.fileno()

    def logPrefix(self) -> str:
        return "Pump"

    def connectionLost(self, reason: Failure) -> None:
        self.close()

    def doRead(self) -> None:
        for _ in range(READS_PER_CALL):
            if self.sock is None:
                return
            if self.stream.paused or not self.stream.open:
                self._stop_reading()
                if not self.stream.open:
                    self.close()
                return
            try:
                data = self.sock.recv(MAX_DATAGRAM)
            except BlockingIOError:
                return
            except OSError as e:
                log.info("relay-tls tunnel on port {port} ended: {error}", port=self.port, error=e)
                self.close()
                return
            self._active = True
            self.stream.send_relayed(self.port, data)

    def _to_program(self, data: bytes) -> None:
        if self.sock is None:
            return
        self._active = True
        try:
            self.sock.send(data)
        except BlockingIOError:
            self.dropped += 1
        except OSError as e:
            if e.errno in (errno.ECONNREFUSED, errno.ENOTCONN, errno.EPIPE):
                # The program closed its end: the tunnel is over.
                self.close()
            else:
                self.dropped += 1

    def _resume(self) -> None:
        if self.sock is not None and not self._reading and not self.stream.paused:
            self._reading = True
            self._reactor.addReader(self)  # type: ignore[arg-type]

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._reactor.removeReader(self)  # type: ignore[arg-type]

    def _check_idle(self) -> None:
        if self.sock is None:
            return
        if not self._active:
            log.info("relay-tls tunnel on port {port} idle: closed", port=self.port)
            self.close()
            return
        self._active = False
        self._idle = self._clock.callLater(IDLE_TIMEOUT, self._check_idle)

    def close(self) -> None:
        self._stop_reading()
        if self.stream.channels.get(self.port) == self._to_program:
            del self.stream.channels[self.port]
        stream = self.stream
        for callbacks, f in ((stream.on_resume, self._resume), (stream.on_close, self.close)):
            if f in callbacks:
                callbacks.remove(f)
        if self._idle.active():
            self._idle.cancel()
        sock, self.sock = self.sock, None
        if sock is not None:
            sock.close()
