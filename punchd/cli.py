"""
punchctl: keys, agent status, and tunnels from the shell.

connect and listen carry stdin lines to the peer as datagrams (one line, one
datagram) and print each datagram that arrives as a line; progress and errors
go to stderr.  Exit status: 0 done, 1 failed, 2 bad usage or request, 130
interrupted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import selectors
import sys
import time
from collections.abc import Sequence
from typing import Any

from punchd import client
from punchd.client import Listener, Tunnel, TunnelError

_DATAGRAM_MAX = 65535


def _say(text: str) -> None:
    print(f"punchctl: {text}", file=sys.stderr, flush=True)


def _keygen(args: argparse.Namespace) -> int:
    from punchd import keys

    key = keys.PrivateKey.generate()
    try:
        keys.write_private_key(args.file, key)
    except keys.KeyFileError as e:
        _say(str(e))
        return 1
    print(key.public_key())
    return 0


def _pubkey(args: argparse.Namespace) -> int:
    from punchd import keys

    try:
        key = keys.load_private_key(args.file)
    except keys.KeyFileError as e:
        _say(str(e))
        return 1
    print(key.public_key())
    return 0


def _status(args: argparse.Namespace) -> int:
    result = client.status(socket_path=args.socket)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            print(f"{key}: {value if isinstance(value, str) else json.dumps(value)}")
    return 0


def _peers(args: argparse.Namespace) -> int:
    result = client.peers(socket_path=args.socket)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    if not result:
        _say("no peers online")
    for peer in result:
        extra = " ".join(f"{k}={json.dumps(v)}" for k, v in peer.items() if k != "name")
        print(f"{peer.get('name', '?')} {extra}".rstrip())
    return 0


def _describe_event(event: dict[str, Any]) -> str:
    name = str(event.get("event", "?"))
    if name == "probing" and "pairs" in event:
        return f"probing {event['pairs']} pairs"
    details = [
        f"{len(value)} {key}" if isinstance(value, list) else f"{key} {value}"
        for key, value in event.items()
        if key != "event"
    ]
    return f"{name} ({', '.join(details)})" if details else name


def _describe_tunnel(info: dict[str, Any]) -> str:
    text = f"connected to {info.get('peer', '?')} via {info.get('path', '?')}"
    if info.get("remote"):
        text += f" ({info['remote']})"
    setup = info.get("setup_ms")
    if isinstance(setup, int | float):
        text += f" in {setup:.0f} ms"
    return text


def _connect(args: argparse.Namespace) -> int:
    tunnel = client.connect(
        args.peer,
        args.service,
        socket_path=args.socket,
        timeout=args.timeout,
        on_progress=lambda event: _say(_describe_event(event)),
    )
    _say(_describe_tunnel(tunnel.info))
    _chat([tunnel], None, args.linger)
    return 0


def _listen(args: argparse.Namespace) -> int:
    listener = client.listen(args.service, socket_path=args.socket)
    _say(f"listening for {args.service}")
    if args.keep:
        _chat([], listener, args.linger)
        return 0
    with listener:
        tunnel = listener.accept()
    _say(_describe_tunnel(tunnel.info))
    _chat([tunnel], None, args.linger)
    return 0


def _chat(tunnels: list[Tunnel], listener: Listener | None, linger: float) -> None:
    """
    Carry stdin lines to every tunnel and print what arrives.

    Without a listener, ends once stdin is done and nothing has arrived for
    C{linger} seconds; with one, keeps accepting tunnels until interrupted.
    """
    stdin = sys.stdin.fileno()
    out = sys.stdout.buffer
    # poll, unlike epoll, accepts regular files (always readable) on stdin.
    selector = selectors.PollSelector()
    selector.register(stdin, selectors.EVENT_READ)
    for tunnel in tunnels:
        selector.register(tunnel.socket, selectors.EVENT_READ, tunnel)
    if listener is not None:
        selector.register(listener, selectors.EVENT_READ, listener)
    partial = b""
    quiet_until: float | None = None  # set once stdin is done
    listening = listener is not None
    try:
        while True:
            timeout = None
            if quiet_until is not None and not listening:
                timeout = quiet_until - time.monotonic()
                if timeout <= 0:
                    return
            for key, _ in selector.select(timeout):
                if key.data is None:
                    chunk = os.read(stdin, 65536)
                    lines = (partial + chunk).split(b"\n")
                    partial = lines.pop()
                    if not chunk:
                        selector.unregister(stdin)
                        lines = [partial] if partial else []
                        quiet_until = time.monotonic() + linger
                    for line in lines:
                        _send(tunnels, line)
                elif isinstance(key.data, Listener):
                    listening = _accept(key.data, tunnels, selector)
                else:
                    data = _receive(key.data)
                    if data is not None:
                        out.write(data + b"\n")
                        out.flush()
                        if quiet_until is not None:
                            quiet_until = time.monotonic() + linger
    finally:
        selector.close()
        for tunnel in tunnels:
            tunnel.close()
        if listener is not None:
            listener.close()


def _accept(listener: Listener, tunnels: list[Tunnel], selector: selectors.BaseSelector) -> bool:
    """
    Take every tunnel the agent has delivered to C{listener}; false once the
    listener is gone, which ends punchctl only if no tunnel is left to chat on.
    """
    while True:
        try:
            tunnel = listener.accept(timeout=0)
        except TunnelError as e:
            if e.code == "timeout":
                return True
            if not tunnels:
                raise
            _say(f"no longer listening: {e.message}")
            selector.unregister(listener)
            return False
        _say(_describe_tunnel(tunnel.info))
        tunnels.append(tunnel)
        selector.register(tunnel.socket, selectors.EVENT_READ, tunnel)


def _send(tunnels: list[Tunnel], line: bytes) -> None:
    for tunnel in tunnels:
        try:
            tunnel.socket.send(line)
        except OSError as e:
            _say(f"could not send to {tunnel.info.get('peer', '?')}: {e.strerror or e}")


def _receive(tunnel: Tunnel) -> bytes | None:
    try:
        return tunnel.socket.recv(_DATAGRAM_MAX)
    except OSError as e:
        # A refused earlier send (ICMP port unreachable) surfaces here.
        _say(f"from {tunnel.info.get('peer', '?')}: {e.strerror or e}")
        return None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be 0 or more seconds: {text!r}")
    return value


def _positive_seconds(text: str) -> float:
    value = _seconds(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be more than 0 seconds")
    return value


def _add_linger(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--linger",
        type=_seconds,
        default=1.0,
        metavar="S",
        help="after stdin ends, exit once nothing arrived for S seconds (default 1)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="punchctl", description="Keys, agent status and tunnels for punchd."
    )
    parser.add_argument(
        "--socket",
        metavar="PATH",
        help="the agent's control socket (default: $PUNCHD_SOCKET or /run/punchd/agent.sock)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    keygen = commands.add_parser("keygen", help="write a new private key (mode 0600)")
    keygen.add_argument("file", metavar="FILE")
    keygen.set_defaults(func=_keygen)

    pubkey = commands.add_parser("pubkey", help="print the public key of a private key file")
    pubkey.add_argument("file", metavar="FILE")
    pubkey.set_defaults(func=_pubkey)

    for name, func, text in (
        ("status", _status, "show the agent's state"),
        ("peers", _peers, "list peers online in the agent's network"),
    ):
        command = commands.add_parser(name, help=text)
        command.add_argument("--json", action="store_true", help="print JSON")
        command.set_defaults(func=func)

    connect = commands.add_parser("connect", help="open a tunnel to PEER's SERVICE and chat")
    connect.add_argument("peer", metavar="PEER")
    connect.add_argument("service", metavar="SERVICE")
    connect.add_argument(
        "--timeout", type=_positive_seconds, default=10.0, metavar="S", help="seconds (default 10)"
    )
    _add_linger(connect)
    connect.set_defaults(func=_connect)

    listen = commands.add_parser("listen", help="wait for a tunnel to SERVICE and chat")
    listen.add_argument("service", metavar="SERVICE")
    listen.add_argument(
        "--keep",
        action="store_true",
        help="keep accepting tunnels, sending stdin to all of them, until interrupted",
    )
    _add_linger(listen)
    listen.set_defaults(func=_listen)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """
    Run punchctl; returns the exit status.
    """
    try:
        try:
            args = _parser().parse_args(argv)
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else 2
        return int(args.func(args))
    except TunnelError as e:
        _say(f"{e.message} ({e.code})")
        return 2 if e.code == "bad-request" else 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # stdout went away (| head): say nothing, and keep Python from
        # complaining about the unflushed buffer at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
