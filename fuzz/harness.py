"""
What the fuzz targets share: discovery, input framing, re-signing, a fake
UDP transport, crash detection, and the simple mutator of the test slice.

The runner imports this only once atheris instruments punchd's imports.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from zope.interface import provider

from fuzz import ROOT, target_names
from punchd import stun

__all__ = ["target_names"]

CORPUS = ROOT / "corpus"

Address = tuple[str, int]


class Crash(Exception):
    """
    The code under test misbehaved without raising: a counted internal error,
    a logged failure, a broken invariant.
    """


@dataclass(frozen=True)
class Target:
    name: str
    one_input: Callable[[bytes], None]
    seeds: Callable[[], Iterable[bytes]]

    @property
    def corpus(self) -> Path:
        return CORPUS / self.name


def load(name: str) -> Target:
    module: ModuleType = importlib.import_module(f"fuzz.targets.{name}")
    return Target(name, module.one_input, module.seeds)


def corpus_files(target: Target) -> list[Path]:
    return sorted(p for p in target.corpus.iterdir() if p.is_file())


# -- framing: several datagrams, each with a byte of flags ------------------

MAX_RECORDS = 8


def record(flags: int, payload: bytes) -> bytes:
    """
    One datagram of a multi-datagram input: flags, 2-byte length, payload.
    """
    return bytes((flags & 0xFF,)) + len(payload).to_bytes(2, "big") + payload


def records(data: bytes) -> Iterator[tuple[int, bytes]]:
    """
    The C{(flags, payload)} records of an input; a short last one is cut off.
    """
    pos = 0
    for _ in range(MAX_RECORDS):
        if pos + 3 > len(data):
            return
        flags = data[pos]
        size = int.from_bytes(data[pos + 1 : pos + 3], "big")
        yield flags, data[pos + 3 : pos + 3 + size]
        pos += 3 + size


def resign(
    datagram: bytes,
    key: bytes,
    *,
    transaction_id: bytes | None = None,
    replace: dict[int, bytes] | None = None,
) -> bytes | None:
    """
    C{datagram} signed again under C{key}, so that mutations of an
    authenticated message still get past the integrity check.

    The trailers are dropped and added anew; attributes in C{replace} get the
    new value.  C{None} when the datagram does not parse as STUN.
    """
    try:
        message = stun.parse(datagram)
    except stun.StunError:
        return None
    trailers = (stun.Attr.MESSAGE_INTEGRITY, stun.Attr.MESSAGE_INTEGRITY_SHA256)
    attributes = [
        (t, (replace or {}).get(t, v))
        for t, v in message.attributes
        if t not in (*trailers, stun.Attr.FINGERPRINT)
    ]
    try:
        return stun.build(
            message.method,
            message.cls,
            transaction_id or message.transaction_id,
            attributes,
            integrity_sha256=key,
            fingerprint=True,
        )
    except ValueError:
        return None


class FakeDatagramTransport:
    """
    Records what a DatagramProtocol sends; every datagram must be STUN.
    """

    def __init__(self) -> None:
        self.written: list[tuple[bytes, Address]] = []

    def write(self, data: bytes, addr: Address) -> None:
        try:
            stun.parse(data)
        except stun.StunError as e:
            raise Crash(f"sent a datagram that is not STUN: {e}: {data!r}") from e
        self.written.append((data, addr))


@contextlib.contextmanager
def transaction_ids() -> Iterator[None]:
    """
    Deterministic transaction ids, so that a crashing input crashes again.
    """
    counter = itertools.count(1)
    original = stun.new_transaction_id
    stun.new_transaction_id = lambda: next(counter).to_bytes(12, "big")
    try:
        yield
    finally:
        stun.new_transaction_id = original


@contextlib.contextmanager
def no_logged_failures() -> Iterator[None]:
    """
    Turn a failure the code under test caught and logged into a L{Crash}.
    """
    failures: list[LogEvent] = []

    @provider(ILogObserver)
    def observe(event: LogEvent) -> None:
        if "log_failure" in event:
            failures.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        yield
    finally:
        globalLogPublisher.removeObserver(observe)
    if failures:
        event = failures[0]
        failure: Any = event["log_failure"]
        raise Crash(f"logged failure ({event.get('log_format')}): {failure.getTraceback()}")


def check_counter(counters: dict[str, int], name: str = "internal-error") -> None:
    if counters.get(name):
        raise Crash(f"the daemon counted {counters[name]} {name}")


# -- the test suite's slice: a few thousand seeded mutations ---------------

INTERESTING = (
    b"\x00",
    b"\xff",
    b"\x7f",
    b"\x80",
    b"\x00\x00",
    b"\xff\xff",
    b"\x80\x28",
    b"\x00\x1c",
    b"\x21\x12\xa4\x42",
    b"1e999",
    b"NaN",
    b"-Infinity",
    b'"',
    b"\n",
    b"{}",
    b"[]",
    b"null",
)


def mutate(data: bytes, rng: random.Random, others: Sequence[bytes] = ()) -> bytes:
    """
    One to four havoc steps, libFuzzer style: flips, overwrites, inserts,
    deletes, copies, splices with another seed.
    """
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        choice = rng.randrange(8)
        pos = rng.randrange(len(out) + 1)
        if choice == 0 and out:
            i = rng.randrange(len(out))
            out[i] ^= 1 << rng.randrange(8)
        elif choice == 1 and out:
            out[rng.randrange(len(out))] = rng.randrange(256)
        elif choice == 2:
            out[pos:pos] = rng.choice(INTERESTING)
        elif choice == 3 and out:
            del out[pos : pos + rng.randint(1, 16)]
        elif choice == 4 and out:
            start = rng.randrange(len(out))
            out[pos:pos] = out[start : start + rng.randint(1, 32)]
        elif choice == 5 and others:
            other = rng.choice(others)
            cut = rng.randrange(len(other) + 1)
            out = out[:pos] + bytearray(other[cut:])
        elif choice == 6 and len(out) >= 2:
            i = rng.randrange(len(out) - 1)
            value = (int.from_bytes(out[i : i + 2], "big") + rng.randint(-4, 4)) & 0xFFFF
            out[i : i + 2] = value.to_bytes(2, "big")
        else:
            del out[pos:]
    return bytes(out)


def run_slice(target: Target, mutations: int, seed: int = 0) -> int:
    """
    Every corpus file, then C{mutations} seeded mutations of them; returns
    the number of inputs run.  Raises what the target raises.
    """
    seeds = [p.read_bytes() for p in corpus_files(target)]
    rng = random.Random(f"{target.name}:{seed}")
    count = 0
    for data in seeds:
        target.one_input(data)
        count += 1
    for _ in range(mutations):
        data = mutate(rng.choice(seeds), rng, seeds)
        try:
            target.one_input(data)
        except Exception as e:
            raise AssertionError(f"{target.name} crashed on {data!r}") from e
        count += 1
    return count
