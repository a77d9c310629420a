"""
Manage the directory of agents kept in Redis (C{directory = "redis"}):

    python -m punchd.rendezvous.directory --config rendezvous.toml add NAME PUBLIC_KEY [--network N]
    python -m punchd.rendezvous.directory --config rendezvous.toml remove NAME
    python -m punchd.rendezvous.directory --config rendezvous.toml list [--network N]
    python -m punchd.rendezvous.directory --config rendezvous.toml import PEERS_FILE

Every node of the service follows each change at once, without a reload.
The Redis address and password file come from the rendezvous's config
(C{registry}, C{redis_password_file}).  Exit status 0 on success, 1 on a
refused change, 78 on a configuration error.
"""

from __future__ import annotations

import argparse
import os
import sys
import tomllib
from collections.abc import Sequence
from typing import Any

from punchd import checks
from punchd.checks import Invalid, Place
from punchd.config import EX_CONFIG, ConfigError, PeerEntry, load_peers
from punchd.rendezvous.resp import (
    Arg,
    BlockingRedis,
    RedisAddress,
    RedisError,
    parse_url,
    read_credentials,
)
from punchd.rendezvous.shared_directory import (
    DIRECTORY,
    DIRECTORY_CHANNEL,
    DIRECTORY_KEYS,
    format_entry,
    parse_entry,
)
from punchd.wire import NAME_RE

#: ARGV: name, stored value, public key.  Refuses a key another agent has.
ADD = f"""
local owner = redis.call('HGET', '{DIRECTORY_KEYS}', ARGV[3])
if owner and owner ~= ARGV[1] then
  return redis.error_reply('public key already used by agent ' .. owner)
end
local old = redis.call('HGET', '{DIRECTORY}', ARGV[1])
if old == ARGV[2] then return 0 end
if old then redis.call('HDEL', '{DIRECTORY_KEYS}', string.match(old, ' (.*)$')) end
redis.call('HSET', '{DIRECTORY}', ARGV[1], ARGV[2])
redis.call('HSET', '{DIRECTORY_KEYS}', ARGV[3], ARGV[1])
redis.call('PUBLISH', '{DIRECTORY_CHANNEL}', ARGV[1])
return 1
"""

#: ARGV: name.
REMOVE = f"""
local old = redis.call('HGET', '{DIRECTORY}', ARGV[1])
if not old then return 0 end
redis.call('HDEL', '{DIRECTORY_KEYS}', string.match(old, ' (.*)$'))
redis.call('HDEL', '{DIRECTORY}', ARGV[1])
redis.call('PUBLISH', '{DIRECTORY_CHANNEL}', ARGV[1])
return 1
"""

BATCH = 1000


class Refused(Exception):
    """
    The change was refused; the message says why.
    """


def redis_of(config_path: str) -> RedisAddress:
    """
    The Redis of a rendezvous config file, with its credentials.
    """
    try:
        with open(config_path, "rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{config_path}: cannot read: {e}") from None
    registry = data.get("registry", "memory")
    if registry == "memory" or not isinstance(registry, str):
        raise ConfigError(f"{config_path}: key 'registry': the directory needs redis://...")
    try:
        address = parse_url(registry)
    except ValueError as e:
        raise ConfigError(f"{config_path}: key 'registry': {e}") from None
    password_file = data.get("redis_password_file", "")
    if not password_file:
        return address
    path = os.path.join(os.path.dirname(os.path.abspath(config_path)), str(password_file))
    try:
        username, password = read_credentials(path)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return RedisAddress(address.host, address.port, address.db, username, password)


def entry_of(name: str, public_key: str, network: str) -> PeerEntry:
    if not NAME_RE.match(name):
        raise Refused(f"{name!r} is not a valid agent name")
    place = Place(None, "")
    try:
        return PeerEntry(name, checks.public_key(public_key, place), checks.name(network, place))
    except Invalid as e:
        raise Refused(str(e)) from None


def add(redis: BlockingRedis, entries: Sequence[PeerEntry]) -> int:
    """
    Add or change C{entries}; how many changed.  Each is its own atomic step.
    """
    changed = 0
    for i in range(0, len(entries), BATCH):
        batch = entries[i : i + BATCH]
        commands: list[list[Arg]] = [
            ["EVAL", ADD, 0, e.name, format_entry(e), e.public_key.to_base64()] for e in batch
        ]
        try:
            changed += sum(redis.pipeline(commands))
        except RedisError as e:
            raise Refused(str(e)) from None
    return changed


def remove(redis: BlockingRedis, name: str) -> bool:
    return bool(redis.execute("EVAL", REMOVE, 0, name))


def entries(redis: BlockingRedis) -> list[PeerEntry]:
    found = []
    cursor: Any = b"0"
    while True:
        cursor, items = redis.execute("HSCAN", DIRECTORY, cursor, "COUNT", 10_000)
        for i in range(0, len(items), 2):
            try:
                found.append(parse_entry(items[i].decode(), items[i + 1].decode()))
            except (ValueError, UnicodeDecodeError):
                continue
        if cursor == b"0":
            return sorted(found, key=lambda e: e.name)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m punchd.rendezvous.directory",
        description="Manage the agents' directory in the rendezvous service's Redis.",
    )
    p.add_argument("--config", "-c", required=True, help="the rendezvous's config file")
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("add", help="add an agent, or change its key or network")
    a.add_argument("name")
    a.add_argument("public_key")
    a.add_argument("--network", default="default")
    r = sub.add_parser("remove", help="remove an agent")
    r.add_argument("name")
    ls = sub.add_parser("list", help="list the agents: name, network, public key")
    ls.add_argument("--network")
    i = sub.add_parser("import", help="add every agent of a peers file")
    i.add_argument("peers_file")
    return p


def run(args: argparse.Namespace, redis: BlockingRedis) -> str:
    if args.command == "add":
        changed = add(redis, [entry_of(args.name, args.public_key, args.network)])
        return f"{args.name}: {'added' if changed else 'unchanged'}"
    if args.command == "remove":
        if not remove(redis, args.name):
            raise Refused(f"{args.name} is not in the directory")
        return f"{args.name}: removed"
    if args.command == "import":
        peers = load_peers(args.peers_file)
        changed = add(redis, list(peers.values()))
        return f"imported {len(peers)} agents ({changed} new or changed)"
    lines = [
        f"{e.name} {e.network} {e.public_key.to_base64()}"
        for e in entries(redis)
        if args.network is None or e.network == args.network
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        redis = BlockingRedis(redis_of(args.config))
    except ConfigError as e:
        print(f"directory: {e}", file=sys.stderr)
        return EX_CONFIG
    except (OSError, RedisError) as e:
        print(f"directory: cannot reach Redis: {e}", file=sys.stderr)
        return 1
    try:
        out = run(args, redis)
    except ConfigError as e:
        print(f"directory: {e}", file=sys.stderr)
        return EX_CONFIG
    except (Refused, RedisError, OSError) as e:
        print(f"directory: {e}", file=sys.stderr)
        return 1
    finally:
        redis.close()
    if out:
        print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
