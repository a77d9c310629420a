"""
The program a lab host runs: it asks its agent for a tunnel (or accepts
one) through L{punchd.client}, exactly as a user's program would, exchanges
datagrams across it, and prints one JSON line saying what happened.

    python -m netlab.program connect PEER SERVICE [--count N] [--timeout S]
    python -m netlab.program accept SERVICE [--count N] [--timeout S]

The connecting side sends N numbered pings, each repeated until echoed (the
lab may drop datagrams); the accepting side echoes whatever arrives until
it has seen N distinct pings and then a short quiet period.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from typing import Any

from punchd import client

PING_RETRY = 0.2
QUIET = 1.0


def ping(sock: socket.socket, count: int, deadline: float) -> tuple[int, list[bytes]]:
    """
    Send pings 0..count-1, each until its echo comes back; return how many
    did, and anything that arrived that was not an echo (there must be none).
    """
    done = 0
    strays: list[bytes] = []
    for i in range(count):
        payload = b"ping %d" % i
        while time.monotonic() < deadline:
            sock.send(payload)
            sock.settimeout(PING_RETRY)
            try:
                while True:
                    data = sock.recv(2048)
                    if data == payload:
                        done += 1
                        break
                    if not data.startswith(b"ping "):
                        strays.append(data)
            except TimeoutError:
                continue
            break
    return done, strays


def echo(sock: socket.socket, count: int, deadline: float) -> tuple[int, list[bytes]]:
    """
    Echo datagrams until C{count} distinct pings and a quiet period; return
    the count seen and anything that was not a ping (there must be none).
    """
    seen: set[bytes] = set()
    strays: list[bytes] = []
    sock.settimeout(QUIET)
    while time.monotonic() < deadline:
        try:
            data = sock.recv(2048)
        except TimeoutError:
            if len(seen) >= count:
                break
            continue
        if data.startswith(b"ping "):
            seen.add(data)
            sock.send(data)
        else:
            strays.append(data)
    return len(seen), strays


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="netlab.program")
    parser.add_argument("--socket", default=None)
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=10.0)
    sub = parser.add_subparsers(dest="command", required=True)
    connect = sub.add_parser("connect")
    connect.add_argument("peer")
    connect.add_argument("service")
    accept = sub.add_parser("accept")
    accept.add_argument("service")
    args = parser.parse_args(argv)

    result: dict[str, Any] = {"command": args.command}
    started = time.monotonic()
    try:
        if args.command == "connect":
            tunnel = client.connect(
                args.peer, args.service, socket_path=args.socket, timeout=args.timeout
            )
        else:
            with client.listen(args.service, socket_path=args.socket) as listener:
                print(json.dumps({"listening": True}), flush=True)
                tunnel = listener.accept(timeout=args.timeout + 30)
    except client.TunnelError as e:
        result.update(ok=False, code=e.code, message=str(e))
        print(json.dumps(result), flush=True)
        return 1
    result.update(ok=True, info=tunnel.info, wall_ms=round((time.monotonic() - started) * 1000))
    with tunnel:
        deadline = time.monotonic() + 30
        if args.command == "connect":
            result["exchanged"], strays = ping(tunnel.socket, args.count, deadline)
        else:
            result["exchanged"], strays = echo(tunnel.socket, args.count, deadline)
        result["strays"] = [s[:40].hex() for s in strays]
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
