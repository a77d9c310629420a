"""
punchctl: keys, agent status, and tunnels from the shell.

connect and listen carry stdin lines to the peer as datagrams (one line, one
datagram) and print each datagram that arrives as a line; progress and errors
go to stderr.  An empty datagram is a keepalive: sent whenever punchctl has
sent nothing for a while, so that the NATs keep the path open, and never
printed.  Exit status: 0 done, 1 failed, 2 bad usage or request, 130
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

from punchd import __version__, client, examples
from punchd.client import DEFAULT_SOCKET_PATH, Listener, Tunnel, TunnelError

_DATAGRAM_MAX = 65535
#: Seconds without sending before a chat sends a keepalive: well inside the
#: 30 s after which Linux and many home routers forget an idle UDP mapping.
KEEPALIVE = 15.0


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
        print(describe_status(result, time.time()))
    return 0


#: A netcheck gathers twice (up to ~2.5 s each) and probes the gateway.
NETCHECK_TIMEOUT = 15.0


def _netcheck(args: argparse.Namespace) -> int:
    # punchd.client has no netcheck() of its own yet: ask for the op directly.
    report = client._ask("netcheck", "netcheck", args.socket, NETCHECK_TIMEOUT)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(describe_netcheck(report))
    return 0


def describe_netcheck(report: dict[str, Any]) -> str:
    """
    A netcheck report as a few aligned lines for people.
    """
    rtt = report.get("rendezvous_rtt_ms")
    udp = "blocked (no answer from the rendezvous)"
    if report.get("over_tls"):
        udp = "blocked, using TLS to the rendezvous"
    if report.get("udp"):
        udp = "works" + (f" (rendezvous round trip {rtt:g} ms)" if rtt is not None else "")
    varies = report.get("mapping_varies_by_destination")
    if report.get("nat") is False:
        nat = "none (this host has the public address)"
    elif varies is None:
        nat = "unknown (the rendezvous has no alternate port)" if report.get("udp") else "unknown"
    elif varies:
        nat = "maps each destination apart (symmetric, hard to punch)"
    else:
        nat = "keeps one mapping per socket (cone, easy to punch)"
    mapping = ", ".join(report.get("port_mapping") or []) or "none offered by the gateway"
    rows = [
        ("UDP", udp),
        ("public IPv4", report.get("ipv4") or "none"),
        ("public IPv6", report.get("ipv6") or "none"),
        ("NAT", nat),
        ("port mapping", mapping),
        ("in short", str(report.get("summary", ""))),
    ]
    return "\n".join(f"{label + ':':<14}{value}" for label, value in rows)


#: How status's fields read, in this order; any others follow as they come.
_STATUS_LABELS = {
    "name": "agent",
    "registration": "state",
    "rendezvous": "rendezvous",
    "transport": "transport",
    "mapped": "public address",
    "tunnels": "tunnels",
    "listening": "listening for",
    "netcheck": "network",
    "last_error": "last error",
    "tls_error": "TLS error",
}
#: Fields read as part of others.
_STATUS_FOLDED = {"uptime", "registered_at", "keepalive", "rendezvous_address"}


def describe_status(status: dict[str, Any], now: float) -> str:
    """
    The agent's status as aligned lines for people: states in words, times
    as durations, counts as phrases.  C{now} is the wall clock (status
    times are the agent's, on the same host).
    """
    rows: list[tuple[str, str]] = []
    for key, label in _STATUS_LABELS.items():
        if key in status and status[key] not in (None, [], ""):
            rows.append((label, _status_field(key, status, now)))
    rows += [
        (key.replace("_", " "), _words(value))
        for key, value in status.items()
        if key not in _STATUS_LABELS and key not in _STATUS_FOLDED
    ]
    width = max((len(label) for label, _ in rows), default=0)
    return "\n".join(f"{label:<{width}}  {text}" for label, text in rows)


def _status_field(key: str, status: dict[str, Any], now: float) -> str:
    value = status[key]
    if key == "name" and isinstance(status.get("uptime"), int | float):
        return f"{value}, up {duration(status['uptime'])}"
    if key == "registration":
        return _registration(status, now)
    if key == "rendezvous":
        resolved = status.get("rendezvous_address")
        return f"{value} ({resolved})" if resolved and resolved != value else str(value)
    return _words(value)


def _registration(status: dict[str, Any], now: float) -> str:
    state = str(status["registration"])
    since = status.get("registered_at")
    ago = f"{duration(now - since)} ago" if isinstance(since, int | float) else None
    every = status.get("keepalive")
    if state == "registered":
        text = f"registered {ago}" if ago else "registered"
        return f"{text}, refreshed every {duration(every)}" if every else text
    text = {
        "registering": "registering with the rendezvous",
        "retrying": "not registered, retrying (see last error)",
        "stopped": "stopped",
    }.get(state, state)
    return f"{text}; last registered {ago}" if ago else text


def _words(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict):
        if set(value) <= {"code", "message"} and "message" in value:
            return str(value["message"])
        return ", ".join(f"{_words(v)} {str(k).replace('_', ' ')}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(_words(v) for v in value) or "none"
    return "none" if value is None else str(value)


def duration(seconds: float) -> str:
    """
    C{seconds} the way people say it: 45s, 3m, 2h 5m, 3d 4h.
    """
    whole = max(0, round(seconds))
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h" if hours else f"{days}d"
    if hours:
        return f"{hours}h {minutes}m" if minutes else f"{hours}h"
    if minutes:
        return f"{minutes}m"
    return f"{secs}s"


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
    _chat([tunnel], None, args)
    return 0


def _listen(args: argparse.Namespace) -> int:
    listener = client.listen(args.service, socket_path=args.socket)
    _say(f"listening for {args.service}")
    if args.keep:
        _chat([], listener, args)
        return 0
    with listener:
        tunnel = listener.accept()
    _say(_describe_tunnel(tunnel.info))
    _chat([tunnel], None, args)
    return 0


def _chat(tunnels: list[Tunnel], listener: Listener | None, args: argparse.Namespace) -> None:
    """
    Carry stdin lines to every tunnel and print what arrives.

    Without a listener, ends once stdin is done and nothing has arrived for
    C{--linger} seconds; with one, keeps accepting tunnels until interrupted.
    """
    # poll, unlike epoll, accepts regular files (always readable) on stdin.
    selector = selectors.PollSelector()
    try:
        _Chat(tunnels, listener, selector, args.linger, args.keepalive).run()
    finally:
        selector.close()
        for tunnel in tunnels:
            tunnel.close()
        if listener is not None:
            listener.close()


class _Chat:
    """
    One chat's state: stdin's unfinished line, when to stop once stdin is
    done, and when punchctl last sent anything (to time keepalives).
    """

    def __init__(
        self,
        tunnels: list[Tunnel],
        listener: Listener | None,
        selector: selectors.BaseSelector,
        linger: float,
        keepalive: float,
    ) -> None:
        self.tunnels = tunnels
        self.selector = selector
        self.linger = linger
        self.keepalive = keepalive
        self.partial = b""
        self.quiet_until: float | None = None  # set once stdin is done
        self.listening = listener is not None
        self.listener = listener
        self.last_sent = time.monotonic()
        selector.register(sys.stdin.fileno(), selectors.EVENT_READ)
        for tunnel in tunnels:
            selector.register(tunnel.socket, selectors.EVENT_READ, tunnel)
        if listener is not None:
            selector.register(listener, selectors.EVENT_READ, listener)

    def run(self) -> None:
        if self.listener is not None:
            # Tunnels may have come with the listen reply, already read off
            # the socket: select() would not see them.
            self.listening = _accept(self.listener, self.tunnels, self.selector)
        while True:
            now = time.monotonic()
            deadlines = []
            if self.quiet_until is not None and not self.listening:
                if now >= self.quiet_until:
                    return
                deadlines.append(self.quiet_until)
            if self.keepalive:
                if now >= self.last_sent + self.keepalive:
                    self.send(b"")
                deadlines.append(self.last_sent + self.keepalive)
            timeout = min(deadlines) - now if deadlines else None
            for key, _ in self.selector.select(timeout):
                if key.data is None:
                    self.read_stdin()
                elif isinstance(key.data, Listener):
                    self.listening = _accept(key.data, self.tunnels, self.selector)
                else:
                    self.deliver(key.data)

    def read_stdin(self) -> None:
        chunk = os.read(sys.stdin.fileno(), 65536)
        lines = (self.partial + chunk).split(b"\n")
        self.partial = lines.pop()
        if not chunk:
            self.selector.unregister(sys.stdin.fileno())
            lines = [self.partial] if self.partial else []
            self.quiet_until = time.monotonic() + self.linger
        for line in lines:
            self.send(line)

    def send(self, datagram: bytes) -> None:
        self.last_sent = time.monotonic()
        _send(self.tunnels, datagram)

    def deliver(self, tunnel: Tunnel) -> None:
        data = _receive(tunnel)
        if data:  # None: an error, said already; empty: a keepalive
            sys.stdout.buffer.write(data + b"\n")
            sys.stdout.buffer.flush()
            if self.quiet_until is not None:
                self.quiet_until = time.monotonic() + self.linger


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


def _add_chat_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--linger",
        type=_seconds,
        default=1.0,
        metavar="S",
        help="after stdin ends, exit once nothing arrived for S seconds (default 1)",
    )
    parser.add_argument(
        "--keepalive",
        type=_seconds,
        default=KEEPALIVE,
        metavar="S",
        help=(
            "after S seconds without sending, send an empty datagram so that NATs keep "
            f"the path open; the peer's punchctl prints none (default {KEEPALIVE:g}, 0: never)"
        ),
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="punchctl", description="Keys, agent status and tunnels for punchd."
    )
    parser.add_argument(
        "--socket",
        metavar="PATH",
        help=f"the agent's control socket (default: $PUNCHD_SOCKET or {DEFAULT_SOCKET_PATH})",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    keygen = commands.add_parser("keygen", help="write a new private key (mode 0600)")
    keygen.add_argument(
        "file", metavar="FILE", help="where to write the key; refused if it exists already"
    )
    keygen.set_defaults(func=_keygen)

    pubkey = commands.add_parser("pubkey", help="print the public key of a private key file")
    pubkey.add_argument("file", metavar="FILE", help="a private key file, as keygen wrote it")
    pubkey.set_defaults(func=_pubkey)

    for name, func, text in (
        ("status", _status, "show the agent's state"),
        ("peers", _peers, "list peers online in the agent's network"),
        ("netcheck", _netcheck, "check what this network lets tunnels do"),
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
    _add_chat_options(connect)
    connect.set_defaults(func=_connect)

    listen = commands.add_parser("listen", help="wait for a tunnel to SERVICE and chat")
    listen.add_argument("service", metavar="SERVICE")
    listen.add_argument(
        "--keep",
        action="store_true",
        help="keep accepting tunnels, sending stdin to all of them, until interrupted",
    )
    _add_chat_options(listen)
    listen.set_defaults(func=_listen)
    examples.add_command(commands)
    return parser


#: What punchd.client's agent-unreachable message ends with, for programs;
#: punchctl says instead where the path it used came from.
_CLIENT_HINT = " (PUNCHD_SOCKET chooses another socket)"


def _choose_socket(args: argparse.Namespace) -> str:
    """
    Settle which control socket to use, in C{args.socket}; returns where
    that choice came from, for error messages.
    """
    if args.socket:
        return "--socket named it"
    if os.environ.get("PUNCHD_SOCKET"):
        args.socket = os.environ["PUNCHD_SOCKET"]
        return "$PUNCHD_SOCKET named it; --socket PATH chooses another"
    args.socket = DEFAULT_SOCKET_PATH
    return "the default; --socket PATH or $PUNCHD_SOCKET chooses another"


def main(argv: Sequence[str] | None = None) -> int:
    """
    Run punchctl; returns the exit status.
    """
    try:
        try:
            args = _parser().parse_args(argv)
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else 2
        chosen_by = _choose_socket(args)
        return int(args.func(args))
    except TunnelError as e:
        message = e.message
        if e.code == "agent-unreachable":
            message = message.removesuffix(_CLIENT_HINT) + f" ({chosen_by})"
        _say(f"{message} ({e.code})")
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
