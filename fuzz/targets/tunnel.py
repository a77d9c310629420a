"""
The agent's tunnel glue, C{Tunnel}'s datagram handler, for one responder on
a fake clock whose sockets record what they would send.

The responder knows the initiator's key, so signed checks, nominations,
Confirm and Abandon reach deep into the machine.  An input is up to eight
datagrams (L{fuzz.harness.records}); each one's flags byte picks

  - bit 0, its source: the initiator's candidate or a stranger;
  - bit 1, its authentication: as it is, or signed again under the tunnel
    key with the initiator's USERNAME;
  - bit 2, which socket it arrives on (IPv4 or a birthday socket, if any);
  - bits 5-7, the seconds to let pass first: 0, or 0.05 * 2**(n-1).

Afterwards the clock runs to the deadline: the tunnel must end (handed off
or failed), with every socket closed, and nothing it sent may be anything
but STUN.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable

from twisted.internet.task import Clock
from twisted.python.failure import Failure

from fuzz.harness import Crash, record, records, resign, transaction_ids
from fuzz.harness import no_logged_failures as no_logged_failures
from punchd import stun
from punchd.agent.api import HandOff, TunnelFailed
from punchd.agent.roles import Responder
from punchd.agent.tunnel import Tunnel
from punchd.agent.tunnel_messages import TunnelSigner
from punchd.agent.tunnel_socket import TunnelSocket
from punchd.keys import PrivateKey
from punchd.stun import Attr, MessageClass, Method
from punchd.wire import Candidate, CandidateKind

Address = tuple[str, int]

INITIATOR_KEY = PrivateKey(bytes(range(1, 33)))
RESPONDER_KEY = PrivateKey(bytes(range(33, 65)))
TUNNEL_ID = bytes(range(16))
NONCE = bytes(range(16, 32))
PEER: Address = ("198.51.100.20", 42000)
STRANGER: Address = ("203.0.113.66", 6666)
TIMEOUT = 5.0


class FakeReactor(Clock):
    def addReader(self, reader: object) -> None:
        pass

    def removeReader(self, reader: object) -> None:
        pass


class RecordingSocket(TunnelSocket):
    """
    A real loopback socket, never read or written: sends are recorded.
    """

    sent: list[tuple[bytes, Address]]

    def send(self, data: bytes, address: Address) -> None:
        try:
            stun.parse(data)
        except stun.StunError as e:
            raise Crash(f"the tunnel sent a datagram that is not STUN: {data!r}") from e
        self.sent.append((data, address))

    def connect(self, remote: Address) -> None:
        pass

    def release(self, remote: Address, ours: Callable[[bytes, Address], bool]) -> socket.socket:
        self.close()
        return socket.socket(socket.AF_INET, socket.SOCK_DGRAM)


def _signer() -> TunnelSigner:
    return TunnelSigner.derive(
        INITIATOR_KEY, RESPONDER_KEY.public_key(), TUNNEL_ID, NONCE, initiator=True
    )


def _responder(clock: FakeReactor) -> tuple[Tunnel, list[RecordingSocket]]:
    opened: list[RecordingSocket] = []

    def sockets(
        family: socket.AddressFamily,
        received: Callable[[bytes, Address], None],
        keep: Callable[[bytes, Address], bool],
    ) -> TunnelSocket:
        sock = RecordingSocket(clock, received, keep, bind=("127.0.0.1", 0))  # type: ignore[arg-type]
        sock.sent = []
        opened.append(sock)
        return sock

    role = Responder(
        INITIATOR_KEY.public_key(), [Candidate(CandidateKind.SRFLX, *PEER)], nonce=NONCE
    )
    role.answer.addErrback(lambda f: None)
    tunnel = Tunnel(
        clock=clock,
        sockets=sockets,
        role=role,
        peer="alice",
        service="chat",
        tunnel_id=TUNNEL_ID,
        own_key=RESPONDER_KEY,
        timeout=TIMEOUT,
        host_addresses=["192.0.2.10"],
    )
    return tunnel, opened


def one_input(data: bytes) -> None:
    with transaction_ids(), no_logged_failures():
        clock = FakeReactor()
        tunnel, opened = _responder(clock)
        outcome: list[HandOff | Failure] = []
        tunnel.result.addBoth(outcome.append)
        signer = _signer()
        for flags, payload in records(data):
            steps = flags >> 5
            if steps:
                clock.advance(0.05 * 2 ** (steps - 1))
            datagram = payload
            if flags & 2:
                datagram = (
                    resign(payload, signer.key, replace={Attr.USERNAME: signer.own_username})
                    or payload
                )
            source = STRANGER if flags & 1 else PEER
            tunnel._datagram(0, datagram, source)
        clock.advance(TIMEOUT + 5.0)
        _check_ending(outcome, opened)


def _check_ending(outcome: list[HandOff | Failure], opened: list[RecordingSocket]) -> None:
    if len(outcome) != 1:
        raise Crash(f"the tunnel ended {len(outcome)} times")
    (result,) = outcome
    if isinstance(result, Failure):
        if not isinstance(result.value, TunnelFailed):
            raise Crash(f"the tunnel failed with {result.getTraceback()}")
    else:
        result.sock.close()
    if any(sock.sock is not None for sock in opened):
        raise Crash("a tunnel socket was left open")


# -- seeds --------------------------------------------------------------------


def seeds() -> Iterable[bytes]:
    with transaction_ids():  # Confirm and Abandon draw theirs: the same every time
        return list(_seeds())


def _seeds() -> Iterable[bytes]:
    signer = _signer()
    tid = bytes.fromhex("c1c2c3c4c5c6c7c8c9cacbcc")
    check = signer.check(tid, nominate=False)
    nominate = signer.check(bytes(reversed(tid)), nominate=True)
    confirm = signer.confirm()
    abandon = signer.abandon()
    answer = stun.build(Method.BINDING, MessageClass.SUCCESS, tid, [], fingerprint=True)
    signed = 2
    later = 2 << 5
    yield record(0, check)
    yield record(0, check) + record(0, nominate) + record(later, confirm)
    yield record(0, nominate) + record(0, confirm) + record(0, confirm) + record(0, confirm)
    yield record(signed, check) + record(1, check) + record(0, abandon)
    yield record(0, answer) + record(signed | 1, nominate) + record(later, b"program data")
    yield record(0, b"junk") + record(signed, answer)
