"""
A simulated population of agents for bench_redis: keys, directory entries
and signed keepalives, made on every CPU.

A million agents cost the load generator what they cost a million real
agents once each: an X25519 key pair and an X25519 exchange plus HKDF for
the message key (about 140 us per agent here, over two minutes on one
core), then an HMAC-SHA256 per keepalive (about 15 us).  Done in a pool of
one process per CPU, before the nodes are under load, so that the numbers
measured afterwards are the nodes', not the generator's.  The C generator
(loadgen.c) then only sends the prepared datagrams.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from punchd import stun, wire
from punchd.config import PeerEntry
from punchd.keys import PrivateKey, PublicKey, derive_rendezvous_key
from punchd.stun import Attr, MessageClass, Method

CHUNK = 20_000
LIFETIME = 600


@dataclass
class Population:
    """
    Agents C{names[i]} with public key C{publics[i]} and message key
    C{keys[i]}; each agent's next SEQUENCE is C{sequence} + the number of
    requests signed for it so far (every agent signs as many).
    """

    names: list[str]
    publics: list[bytes]
    keys: list[bytes]
    sequence: int

    def entries(self) -> list[PeerEntry]:
        return [PeerEntry(n, PublicKey(p)) for n, p in zip(self.names, self.publics, strict=True)]

    def key_map(self) -> dict[str, bytes]:
        return dict(zip(self.names, self.keys, strict=True))


def _all_cpus() -> None:
    """
    Pool processes may use every CPU, whatever the parent was pinned to.
    """
    os.sched_setaffinity(0, range(os.cpu_count() or 1))


def _pool() -> ProcessPoolExecutor:
    return ProcessPoolExecutor(max_workers=os.cpu_count() or 1, initializer=_all_cpus)


def _make(first: int, count: int, server: bytes) -> tuple[list[bytes], list[bytes]]:
    server_key = PublicKey(server)
    publics, keys = [], []
    for i in range(first, first + count):
        private = PrivateKey.generate()
        publics.append(private.public_key().raw)
        keys.append(derive_rendezvous_key(private, server_key, f"a{i:07d}"))
    return publics, keys


def make(count: int, server: PublicKey) -> Population:
    """
    C{count} agents named a0000000, a0000001, ... with keys for C{server}.
    """
    publics: list[bytes] = []
    keys: list[bytes] = []
    with _pool() as pool:
        starts = range(0, count, CHUNK)
        sizes = [min(CHUNK, count - s) for s in starts]
        for p, k in pool.map(_make, starts, sizes, [server.raw] * len(sizes)):
            publics += p
            keys += k
    names = [f"a{i:07d}" for i in range(count)]
    return Population(names, publics, keys, time.time_ns() // 1000)


def _sign(
    names: Sequence[str], keys: Sequence[bytes], sequence: int, nonce: bytes, run_id: bytes
) -> bytes:
    out = bytearray()
    lifetime = stun.encode_u32(LIFETIME)
    number = stun.encode_u64(sequence)
    for name, key in zip(names, keys, strict=True):
        attributes = [
            (Attr.USERNAME, name.encode("ascii")),
            (Attr.SEQUENCE, number),
            (Attr.LIFETIME, lifetime),
            (Attr.NONCE, nonce),
        ]
        tid = run_id + os.urandom(8)
        data = wire.signed(Method.REGISTER, MessageClass.REQUEST, tid, attributes, key)
        out += len(data).to_bytes(2, "big") + data
    return bytes(out)


def keepalives(
    population: Population,
    members: Sequence[int],
    round_number: int,
    nonce: bytes,
    run_id: bytes,
    path: Path,
) -> Path:
    """
    One signed REGISTER per agent C{population.names[i]} for i in
    C{members} (round C{round_number}, so numbered after the previous
    rounds'), under C{nonce}, as loadgen's record file at C{path}.
    """
    sequence = population.sequence + round_number
    with _pool() as pool, open(path, "wb") as out:
        chunks = [members[s : s + CHUNK] for s in range(0, len(members), CHUNK)]
        jobs = [
            pool.submit(
                _sign,
                [population.names[i] for i in chunk],
                [population.keys[i] for i in chunk],
                sequence,
                nonce,
                run_id,
            )
            for chunk in chunks
        ]
        for job in jobs:
            out.write(job.result())
    return path
