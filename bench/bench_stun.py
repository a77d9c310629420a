"""
Micro-benchmark of the STUN codec: operations per second, not pass/fail.

The rendezvous answers every Binding request through binding_response, so
that is the number to watch; parse and build are the agents' signalling path.

    python -m bench.bench_stun
"""

from __future__ import annotations

import timeit
from collections.abc import Callable

from punchd import stun
from punchd.stun import Attr, MessageClass, Method

TID = bytes(range(12))
KEY = b"k" * 32


def _rate(call: Callable[[], object], seconds: float = 0.5) -> float:
    """Calls per second, from the best of three runs of about C{seconds}."""
    timer = timeit.Timer(call)
    number, _ = timer.autorange()
    number = max(1, int(number * seconds / 0.2))
    return number / min(timer.repeat(repeat=3, number=number))


def cases() -> dict[str, Callable[[], object]]:
    plain = stun.build(Method.BINDING, MessageClass.REQUEST, TID)
    with_fingerprint = stun.build(Method.BINDING, MessageClass.REQUEST, TID, fingerprint=True)
    ice = stun.build(
        Method.BINDING,
        MessageClass.REQUEST,
        TID,
        [
            (Attr.USERNAME, b"0123456789abcdef0123456789abcdef:a"),
            (Attr.PRIORITY, stun.encode_u32(0x6E0001FF)),
            (Attr.USE_CANDIDATE, b""),
        ],
        integrity_sha256=KEY,
        fingerprint=True,
    )
    register_attributes = [
        (Attr.USERNAME, b"alice"),
        (Attr.SEQUENCE, stun.encode_u64(1 << 50)),
        (Attr.NONCE, b"n" * 20),
        (Attr.LIFETIME, stun.encode_u32(120)),
    ]
    register = stun.build(
        Method.REGISTER,
        MessageClass.REQUEST,
        TID,
        register_attributes,
        integrity_sha256=KEY,
        fingerprint=True,
    )
    message = stun.parse(register)
    return {
        "binding_response ipv4": lambda: stun.binding_response(plain, "192.0.2.1", 40000),
        "binding_response ipv4+fp": lambda: stun.binding_response(
            with_fingerprint, "192.0.2.1", 40000
        ),
        "binding_response ipv6+fp": lambda: stun.binding_response(
            with_fingerprint, "2001:db8::1", 40000
        ),
        "binding_response ice check": lambda: stun.binding_response(ice, "192.0.2.1", 40000),
        "binding_response garbage": lambda: stun.binding_response(b"\x00" * 48, "192.0.2.1", 1),
        "parse register": lambda: stun.parse(register),
        "verify_integrity_sha256": lambda: stun.verify_integrity_sha256(message, KEY),
        "build register (mi-sha256+fp)": lambda: stun.build(
            Method.REGISTER,
            MessageClass.REQUEST,
            TID,
            register_attributes,
            integrity_sha256=KEY,
            fingerprint=True,
        ),
    }


def main() -> None:
    for name, call in cases().items():
        print(f"{name:32} {_rate(call):>12,.0f} ops/s")


if __name__ == "__main__":
    main()
