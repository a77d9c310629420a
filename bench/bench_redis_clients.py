"""
Redis clients under Twisted, side by side: what made the rendezvous use its
own (punchd.rendezvous.resp).  Each client, on a real redis-server:

* round trips: one command, wait for its reply, next (what a cross-node
  lookup costs);
* a burst: many commands written at once, then every reply (what a batch
  of claims costs);
* while Redis is down: how long a command takes to fail.

txredisapi is measured when installed (it is not a dependency).

    .venv/bin/python -m bench.bench_redis_clients [--count 20000]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from twisted.internet import defer, task

from punchd.rendezvous.resp import RedisClient
from tests.rendezvous.redis_helpers import RedisServer


async def sequential(execute: Callable[..., Any], count: int) -> float:
    started = time.perf_counter()
    for i in range(count):
        await execute("SET", f"k{i % 100}", "v")
    return count / (time.perf_counter() - started)


async def burst(execute: Callable[..., Any], count: int) -> float:
    started = time.perf_counter()
    await defer.gatherResults([execute("SET", f"k{i % 100}", "v") for i in range(count)])
    return count / (time.perf_counter() - started)


async def failing(execute: Callable[..., Any], reactor: Any) -> str:
    started = time.perf_counter()
    d = defer.ensureDeferred(_try(execute))
    timeout = task.deferLater(reactor, 5.0, lambda: "still waiting after 5 s")
    first = await defer.DeferredList([d, timeout], fireOnOneCallback=True, consumeErrors=True)
    result = first[0]
    if result == "still waiting after 5 s":
        d.cancel()
        return str(result)
    return f"failed after {1000 * (time.perf_counter() - started):.1f} ms: {result}"


async def _try(execute: Callable[..., Any]) -> str:
    try:
        await execute("GET", "k")
    except Exception as e:
        return type(e).__name__
    return "answered"


async def measure(reactor: Any, redis: RedisServer, count: int) -> None:
    ours = RedisClient(redis.address, reactor)
    ours.start()
    while not ours.ready:
        await task.deferLater(reactor, 0.05, lambda: None)
    clients: dict[str, Callable[..., Any]] = {"punchd.rendezvous.resp": ours.execute}
    tx = None
    if importlib.util.find_spec("txredisapi") is not None:
        import txredisapi

        tx = await txredisapi.Connection(
            "127.0.0.1", redis.port, password=redis.password, reconnect=True
        )
        clients["txredisapi"] = lambda *a: tx.execute_command(*a)
    else:
        print("txredisapi: not installed, skipped")
    for name, execute in clients.items():
        one = await sequential(execute, count // 4)
        many = await burst(execute, count)
        print(f"  {name:<24} {one:>9,.0f} round trips/s   {many:>9,.0f} commands/s in a burst")
    redis.stop()
    await task.deferLater(reactor, 0.5, lambda: None)
    for name, execute in clients.items():
        print(f"  {name:<24} Redis down: {await failing(execute, reactor)}")
    redis.start()
    await ours.stop()
    if tx is not None:
        tx.disconnect()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--count", type=int, default=20_000)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-redis-clients-") as tmp:
        redis = RedisServer(Path(tmp) / "redis")
        redis.start()
        try:
            print("Redis clients under Twisted's reactor, on loopback:")
            task.react(lambda reactor: defer.ensureDeferred(measure(reactor, redis, args.count)))
        except SystemExit as e:
            if e.code:
                raise
        finally:
            redis.stop()


if __name__ == "__main__":
    main(sys.argv[1:])
