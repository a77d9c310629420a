"""
The rendezvous's second Binding port (C{alternate_port}): same answers,
same budgets as the main port, announced in Register replies.
"""

from __future__ import annotations

from punchd import stun
from punchd.gather import build_gather_request, parse_gather_answer
from punchd.rendezvous.server import AlternatePort
from punchd.stun import Attr, MessageClass, Method
from tests.rendezvous.test_server import (
    Agent,
    FakeDatagramTransport,
    Harness,
    binding_request,
)

ALTERNATE = 3479


def alternate(h: Harness) -> tuple[AlternatePort, FakeDatagramTransport]:
    port = AlternatePort(h.protocol)
    transport = FakeDatagramTransport()
    port.makeConnection(transport)  # type: ignore[arg-type]
    return port, transport


def test_register_reply_names_the_alternate_port() -> None:
    alice = Agent("alice", ("203.0.113.5", 41000))
    h = Harness([alice])
    assert h.register(alice).get(Attr.ALTERNATE_PORT) is None
    h.protocol.alternate_port = ALTERNATE
    value = h.register(alice).get(Attr.ALTERNATE_PORT)
    assert value is not None and stun.decode_u32(value) == ALTERNATE


def test_alternate_port_answers_binding_from_itself() -> None:
    h = Harness()
    port, transport = alternate(h)
    source = ("198.51.100.7", 40000)
    request = binding_request(fingerprint=True)
    port.datagramReceived(request, source)
    [(data, address)] = transport.take()
    assert address == source and h.transport.take() == []
    answer = stun.parse(data)
    assert (answer.method, answer.cls) == (Method.BINDING, MessageClass.SUCCESS)
    xor = answer.get(Attr.XOR_MAPPED_ADDRESS)
    assert xor is not None and stun.decode_xor_address(xor, answer.transaction_id) == source


def test_alternate_port_shares_the_anonymous_budget() -> None:
    h = Harness(binding_rate=1.0, binding_burst=2.0)
    port, transport = alternate(h)
    source = ("192.0.2.1", 1000)
    assert len(h.receive(binding_request(), source)) == 1
    port.datagramReceived(binding_request(), source)
    port.datagramReceived(binding_request(), source)
    assert len(transport.take()) == 1
    assert h.protocol.counters["binding-rate-limited"] == 1


def test_alternate_port_answers_signed_gathers() -> None:
    alice = Agent("alice", ("203.0.113.5", 41000))
    h = Harness([alice], binding_rate=1.0, binding_burst=1.0)
    port, transport = alternate(h)
    source = ("203.0.113.5", 41002)
    for _ in range(3):
        tid, request = build_gather_request(alice.name, alice.key)
        port.datagramReceived(request, source)
        [(data, address)] = transport.take()
        assert address == source and parse_gather_answer(data, alice.key, tid) == source
    assert h.protocol.counters["gather"] == 3


def test_alternate_port_ignores_everything_but_binding() -> None:
    alice = Agent("alice", ("203.0.113.5", 41000))
    h = Harness([alice])
    port, transport = alternate(h)
    _, register = alice.request(Method.REGISTER, [(Attr.LIFETIME, stun.encode_u32(60))])
    port.datagramReceived(register, alice.address)
    port.datagramReceived(b"\xff" * 30, alice.address)
    assert transport.take() == [] and h.transport.take() == []
    assert h.protocol.counters["dropped-alternate-not-binding"] == 2
    h.no_state()
