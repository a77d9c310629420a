"""
Gatherers: where a tunnel's local candidates come from besides its host addresses.

A gatherer asks something outside (the rendezvous today; a gateway's port
mapping or a relay later) which address it sees for the tunnel's socket and
turns the answer into a candidate of its own kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from punchd import stun
from punchd.gather import build_gather_request, parse_gather_answer
from punchd.relay.messages import build_bind, parse_bind_answer
from punchd.stun import MessageClass, Method
from punchd.wire import Candidate, CandidateKind, mapped_address

Address = tuple[str, int]


class ReflexiveGatherer(Protocol):
    """
    Learns the tunnel socket's public address from a server's answer.
    """

    @property
    def server(self) -> Address:
        "Where the request goes, and the only address an answer may come from."

    def request(self) -> tuple[bytes, bytes]:
        "A fresh request: its transaction id and bytes."

    def candidate(self, answer: stun.Message) -> Candidate | None:
        "The candidate an answer (to our request, from the server) yields."


@dataclass(frozen=True)
class PlainBinding:
    """
    A standard STUN Binding to the rendezvous: a server-reflexive candidate.
    """

    server: Address

    def request(self) -> tuple[bytes, bytes]:
        transaction_id = stun.new_transaction_id()
        data = stun.build(Method.BINDING, MessageClass.REQUEST, transaction_id, fingerprint=True)
        return transaction_id, data

    def candidate(self, answer: stun.Message) -> Candidate | None:
        if answer.method != Method.BINDING or answer.cls != MessageClass.SUCCESS:
            return None
        mapped = mapped_address(answer)
        return None if mapped is None else Candidate(CandidateKind.SRFLX, *mapped)


@dataclass(frozen=True)
class RelayBinder:
    """
    Binds a tunnel socket to its relay port: the relay learns that socket's
    NAT mapping and forwards only between the two bound sockets
    (docs/relay.rst).  Signed with the agent's rendezvous key.
    """

    name: str
    key: bytes

    def bind(self, tunnel_id: bytes) -> tuple[bytes, bytes]:
        return build_bind(self.name, self.key, tunnel_id)

    def release(self, tunnel_id: bytes) -> bytes:
        return build_bind(self.name, self.key, tunnel_id, release=True)[1]

    def bound(self, answer: stun.Message) -> Address | None:
        return parse_bind_answer(answer, self.key)


@dataclass(frozen=True)
class SignedGather:
    """
    The agent's own Binding to the rendezvous, signed with its rendezvous key:
    exempt from the anonymous per-address limit, so a neighbour flooding
    Binding requests from our public address cannot starve our gathering.
    """

    server: Address
    name: str
    key: bytes

    def request(self) -> tuple[bytes, bytes]:
        return build_gather_request(self.name, self.key)

    def candidate(self, answer: stun.Message) -> Candidate | None:
        mapped = parse_gather_answer(answer, self.key)
        return None if mapped is None else Candidate(CandidateKind.SRFLX, *mapped)
