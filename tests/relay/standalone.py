"""
A real relay in its own process, for the live tests and bench/bench_relay.py:
the rendezvous's RelayService on the real reactor, without the rendezvous.

    python -m tests.relay.standalone < settings.json

stdin holds one JSON object: C{interface}, C{ports} ("LOW-HIGH"),
C{keys} (agent name -> message key, hex), C{tunnels} (a list of
C{[tunnel id hex, initiator, responder]}), and optionally C{rate} and
C{idle_timeout}.  stdout gets one JSON line with the allocated ports, then,
on SIGTERM, one with the relay's counters.
"""

from __future__ import annotations

import json
import signal
import sys
from typing import Any

from twisted.internet import reactor

from punchd.relay import RelayService


def main() -> None:
    settings = json.loads(sys.stdin.readline())
    keys = {name: bytes.fromhex(key) for name, key in settings["keys"].items()}
    low, high = (int(p) for p in settings["ports"].split("-"))
    relay = RelayService(
        keys.get,
        clock=reactor,
        interface=settings["interface"],
        ports=(low, high),
        rate=float(settings.get("rate", 0)),
        idle_timeout=float(settings.get("idle_timeout", 120)),
    )
    relay.startService()
    allocated = [relay.allocate(bytes.fromhex(t), a, b) for t, a, b in settings["tunnels"]]
    print(json.dumps({"allocations": allocated}), flush=True)

    def stop(*_: Any) -> None:
        reactor.callFromThread(reactor.stop)  # type: ignore[attr-defined]

    signal.signal(signal.SIGTERM, stop)
    reactor.run()  # type: ignore[attr-defined]
    relay.stopService()
    print(json.dumps({"counters": dict(relay.counters)}), flush=True)


if __name__ == "__main__":
    main()
