"""
TOML configuration for both daemons, validated with errors that name the file and key.

Every mistake an admin can make surfaces as one L{ConfigError} whose text is
a single line saying where (file and key, or command-line option) and what
was expected, so a daemon can print it and exit instead of failing later,
half started, with a traceback.  Defaults live on the config dataclasses
only; the example files in etc/punchd/ document them.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import os
import re
import sys
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn

from punchd.keys import KeyFileError, PrivateKey, PublicKey, load_private_key

#: Names of peers, agents, networks and services.  C{\\Z}, not C{$}: C{$}
#: would accept a trailing newline.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")

DEFAULT_NETWORK = "default"

# Linux sun_path holds 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107

_NAME_RULE = "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"


class ConfigError(Exception):
    """
    The configuration is unusable.  C{str()} is one line naming the file and
    key (or the command-line option) at fault, e.g.
    C{"agent.toml: key 'keepalive': must be a number 1-3600, got 0"}.
    """


#: sysexits.h EX_CONFIG: the systemd units do not restart a daemon on it.
EX_CONFIG = 78


def refuse_to_start(program: str, message: str) -> NoReturn:
    """
    Say what is wrong with the configuration in one line and exit, before
    anything listens.
    """
    sys.stderr.write(f"{program}: {message}\n")
    raise SystemExit(EX_CONFIG)


@dataclass(frozen=True)
class PeerEntry:
    """
    One agent the rendezvous accepts: its name, identity, and the network
    whose members it may see and reach.
    """

    name: str
    public_key: PublicKey
    network: str = DEFAULT_NETWORK


@dataclass(frozen=True, kw_only=True)
class RendezvousConfig:
    port: int = 3478
    #: "" = all IPv4 interfaces; otherwise an IP literal to bind to.
    interface: str = ""
    private_key: PrivateKey
    private_key_path: str
    peers: dict[str, PeerEntry]
    peers_path: str
    #: Binding replies per second per source IP (token bucket, burst 2x); 0 = unlimited.
    binding_rate: float = 50.0
    #: Pending introductions per agent.
    max_pending: int = 256
    #: Longest registration LIFETIME granted, seconds.
    registration_lifetime: int = 600
    log_format: str = "text"


@dataclass(frozen=True, kw_only=True)
class AgentConfig:
    name: str
    private_key: PrivateKey
    private_key_path: str
    #: (host, port); host is a name or an IP literal, without brackets.
    rendezvous: tuple[str, int]
    rendezvous_public_key: PublicKey
    control_socket: str = "/run/punchd/agent.sock"
    #: Seconds between registrations with the rendezvous.
    keepalive: float = 20.0
    #: User names or numeric uids allowed on the control socket, besides the agent's own user.
    allow_users: tuple[str, ...] = ()
    #: Group names or numeric gids allowed on the control socket.
    allow_groups: tuple[str, ...] = ()
    #: Default seconds a connect may take when the program gives none.
    connect_timeout: float = 10.0
    #: Peer name -> the only public key accepted for it, whatever the rendezvous says.
    pinned_peers: dict[str, PublicKey] = field(default_factory=dict)
    log_format: str = "text"


class _Invalid(Exception):
    """
    A value is wrong.  The message says what was expected but not where:
    the caller knows whether it came from a file or the command line.
    """


# A converter turns a TOML value (or pre-parsed command-line text) into the
# config value.  Its second argument is the directory relative paths resolve
# against.
_Converter = Callable[[Any, str], Any]


@dataclass(frozen=True)
class _Setting:
    convert: _Converter
    #: Turns command-line text into what the TOML file would hold.
    from_text: Callable[[str], Any] = str


def _show(value: object) -> str:
    """
    Render a bad value for an error message, short and on one line.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _int_text(text: str) -> Any:
    """
    Parse an option as an integer, keeping the text when it is not one so
    that the converter quotes what the user typed.
    """
    try:
        return int(text.strip())
    except ValueError:
        return text


def _float_text(text: str) -> Any:
    try:
        return float(text.strip())
    except ValueError:
        return text


def _list_text(text: str) -> list[str]:
    """
    A comma-separated option; the empty string is the empty list, so an
    option can clear what the file sets.
    """
    return [item.strip() for item in text.split(",")] if text.strip() else []


def _integer(low: int, high: int) -> _Converter:
    def convert(value: Any, base: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise _Invalid(f"must be an integer {low}-{high}, got {_show(value)}")
        return value

    return convert


def _number(low: float, high: float | None) -> _Converter:
    expected = f"a number {low:g}-{high:g}" if high is not None else f"a number >= {low:g}"

    def convert(value: Any, base: str) -> float:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value < low
            or (high is not None and value > high)
        ):
            raise _Invalid(f"must be {expected}, got {_show(value)}")
        return float(value)

    return convert


def _choice(*options: str) -> _Converter:
    expected = " or ".join(repr(o) for o in options)

    def convert(value: Any, base: str) -> str:
        if not isinstance(value, str) or value not in options:
            raise _Invalid(f"must be {expected}, got {_show(value)}")
        return value

    return convert


def _name(value: Any, base: str) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise _Invalid(f"must be a name of {_NAME_RULE}, got {_show(value)}")
    return value


def _interface(value: Any, base: str) -> str:
    if value == "":
        return ""
    if isinstance(value, str):
        try:
            ipaddress.ip_address(value)
        except ValueError:
            pass
        else:
            return value
    raise _Invalid(f'must be "" (all IPv4 interfaces) or an IP address, got {_show(value)}')


def _is_hostname(host: str) -> bool:
    """
    A DNS name by RFC 1123, or an IPv4 literal.  All-numeric names are
    taken for IPv4 so that a typo like 10.0.0.256 is caught here.
    """
    if re.fullmatch(r"[0-9.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return False
        return True
    labels = host.removesuffix(".").split(".")
    return len(host) <= 253 and all(
        re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?", label) for label in labels
    )


def _address(value: Any, base: str) -> tuple[str, int]:
    expected = f'must be "host:port" or "[IPv6]:port" with port 1-65535, got {_show(value)}'
    if not isinstance(value, str):
        raise _Invalid(expected)
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            sep = ""
    else:
        host, sep, port = value.rpartition(":")
        if ":" in host:
            raise _Invalid(f"{expected}; write IPv6 addresses in brackets, as [2001:db8::1]:3478")
        if not _is_hostname(host):
            sep = ""
    if not sep or not re.fullmatch(r"[0-9]{1,5}", port) or not 1 <= int(port) <= 65535:
        raise _Invalid(expected)
    return host, int(port)


def _public_key(value: Any, base: str) -> PublicKey:
    if not isinstance(value, str):
        raise _Invalid(f"must be a base64 X25519 public key, got {_show(value)}")
    try:
        return PublicKey.from_base64(value)
    except ValueError as e:
        raise _Invalid(f"must be a base64 X25519 public key, got {_show(value)} ({e})") from None


def _path(value: Any, base: str) -> str:
    if not isinstance(value, str) or not value or "\0" in value:
        raise _Invalid(f"must be a file path, got {_show(value)}")
    return os.path.normpath(os.path.join(base, value))


def _key_path(value: Any, base: str) -> str:
    """
    A private key file path.  A key pasted in place of the path is refused
    without echoing it, so the secret does not end up in a log.
    """
    if isinstance(value, str):
        try:
            PrivateKey.from_base64(value)
        except ValueError:
            pass
        else:
            raise _Invalid(
                "must be the path of a key file, not the key itself"
                " (write one with: punchctl keygen FILE)"
            )
    return _path(value, base)


def _socket_path(value: Any, base: str) -> str:
    path = _path(value, base)
    if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
        raise _Invalid(
            f"must be a path of at most {_MAX_SOCKET_PATH} bytes (a Unix socket limit),"
            f" got {_show(path)}"
        )
    return path


def _id_list(what: str) -> _Converter:
    expected = f"must be an array of {what} names or numeric ids"

    def convert(value: Any, base: str) -> tuple[str, ...]:
        if not isinstance(value, list):
            raise _Invalid(f"{expected}, got {_show(value)}")
        for item in value:
            if isinstance(item, bool) or not (
                (isinstance(item, int) and item >= 0)
                or (isinstance(item, str) and item and not re.search(r"[\s,]", item))
            ):
                raise _Invalid(f"{expected}, got {_show(item)} in the array")
        return tuple(str(item) for item in value)

    return convert


_LOG_FORMAT = _Setting(_choice("text", "json"))

_RENDEZVOUS_SETTINGS: dict[str, _Setting] = {
    "port": _Setting(_integer(1, 65535), _int_text),
    "interface": _Setting(_interface),
    "private_key": _Setting(_key_path),
    "peers": _Setting(_path),
    "binding_rate": _Setting(_number(0, None), _float_text),
    "max_pending": _Setting(_integer(1, 65536), _int_text),
    "registration_lifetime": _Setting(_integer(10, 86400), _int_text),
    "log_format": _LOG_FORMAT,
}

_AGENT_SETTINGS: dict[str, _Setting] = {
    "name": _Setting(_name),
    "private_key": _Setting(_key_path),
    "rendezvous": _Setting(_address),
    "rendezvous_public_key": _Setting(_public_key),
    "control_socket": _Setting(_socket_path),
    "keepalive": _Setting(_number(1, 3600), _float_text),
    "allow_users": _Setting(_id_list("user"), _list_text),
    "allow_groups": _Setting(_id_list("group"), _list_text),
    "connect_timeout": _Setting(_number(0.1, 600), _float_text),
    "log_format": _LOG_FORMAT,
}


def _option(key: str) -> str:
    return "--" + key.replace("_", "-")


def _at(file: str, key: str) -> str:
    return f"{file}: key '{key}'"


def _unknown(file: str, key: str, known: list[str], hint: str = "") -> ConfigError:
    """
    An unknown key, with the closest known one suggested: most unknown keys
    are typos.
    """
    leaf = key.rpartition(".")[2]
    close = difflib.get_close_matches(leaf, known, n=1)
    if close:
        hint = f" (did you mean '{close[0]}'?)"
    return ConfigError(f"{file}: unknown key '{key}'{hint}")


def _read_toml(path: str, where: str | None = None) -> dict[str, Any]:
    """
    Parse a TOML file.  When another setting named it, C{where} says which,
    so that a missing file is traced back to the key that points at it.
    """
    prefix = f"{where}: " if where else ""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{prefix}{path}: cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid TOML: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None


def _convert(convert: _Converter, value: Any, where: str, base: str) -> Any:
    try:
        return convert(value, base)
    except _Invalid as e:
        raise ConfigError(f"{where}: {e}") from None


@dataclass
class _Merged:
    """
    Settings merged from a file and the command line.  C{where} tells, per
    key, what to blame in an error about a value found only later (a key
    file that will not load, say).
    """

    file: str | None
    values: dict[str, Any]
    where: dict[str, str]
    tables: dict[str, Any]


def _merge(
    path: str | os.PathLike[str] | None,
    overrides: Mapping[str, object] | None,
    settings: Mapping[str, _Setting],
    defaults: Mapping[str, Any],
    tables: frozenset[str] = frozenset(),
) -> _Merged:
    """
    Validate the file and the overrides against C{settings}; an override
    replaces the file's value unchecked, so that a bad value can be fixed
    from the command line.  Keys named in C{tables} are returned raw for
    the caller to check.
    """
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    for key in given:
        if key not in settings:
            raise ValueError(f"override for unknown config key {key!r}")
    file = None if path is None else os.fspath(path)
    merged = _Merged(file, {}, {}, {})
    if file is not None:
        base = os.path.dirname(os.path.abspath(file))
        known = sorted([*settings, *tables])
        for key, value in _read_toml(file).items():
            if key in tables:
                merged.tables[key] = value
            elif key not in settings:
                raise _unknown(file, key, known)
            elif key not in given:
                merged.where[key] = _at(file, key)
                merged.values[key] = _convert(settings[key].convert, value, merged.where[key], base)
    for key, value in given.items():
        setting = settings[key]
        if isinstance(value, str):
            value = setting.from_text(value)
        merged.where[key] = _option(key)
        merged.values[key] = _convert(setting.convert, value, merged.where[key], os.getcwd())
    for key in settings:
        if key in merged.values:
            continue
        if key not in defaults:
            if file is not None:
                raise ConfigError(f"{file}: missing required key '{key}' (or give {_option(key)})")
            raise ConfigError(
                f"missing required setting '{key}': give {_option(key)} or a config file"
            )
        merged.values[key] = defaults[key]
    return merged


def _defaults(cls: type) -> dict[str, Any]:
    return {
        f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING
    }


def _private_key(merged: _Merged) -> PrivateKey:
    try:
        return load_private_key(merged.values["private_key"])
    except KeyFileError as e:
        raise ConfigError(f"{merged.where['private_key']}: {e}") from None


def _parse_peers(table: Any, file: str, *, with_network: bool) -> dict[str, PeerEntry]:
    """
    Check C{[peers.NAME]} tables.  Two names with one public key are
    refused: the rendezvous could not tell those agents apart, and either
    could speak as the other.
    """
    if not isinstance(table, dict):
        raise ConfigError(f"{_at(file, 'peers')}: must be [peers.NAME] tables, got {_show(table)}")
    fields = ["network", "public_key"] if with_network else ["public_key"]
    peers: dict[str, PeerEntry] = {}
    owners: dict[PublicKey, str] = {}
    for name, entry in table.items():
        where = _at(file, f"peers.{name}")
        if not NAME_RE.match(name):
            raise ConfigError(f"{where}: a peer name must be {_NAME_RULE}")
        if not isinstance(entry, dict):
            raise ConfigError(
                f'{where}: must be a table with public_key = "...", got {_show(entry)}'
            )
        for key in entry:
            if key not in fields:
                raise _unknown(file, f"peers.{name}.{key}", fields)
        if "public_key" not in entry:
            raise ConfigError(f"{file}: missing required key 'peers.{name}.public_key'")
        key_where = _at(file, f"peers.{name}.public_key")
        public_key = _convert(_public_key, entry["public_key"], key_where, "")
        if public_key in owners:
            raise ConfigError(f"{key_where}: same public key as peer '{owners[public_key]}'")
        owners[public_key] = name
        network = DEFAULT_NETWORK
        if "network" in entry:
            network = _convert(_name, entry["network"], _at(file, f"peers.{name}.network"), "")
        peers[name] = PeerEntry(name, public_key, network)
    return peers


def _load_peers(path: str, where: str | None) -> dict[str, PeerEntry]:
    data = _read_toml(path, where)
    for key in data:
        if key != "peers":
            raise _unknown(path, key, ["peers"], " (a peers file holds only [peers.NAME] tables)")
    return _parse_peers(data.get("peers", {}), path, with_network=True)


def load_peers(path: str | os.PathLike[str]) -> dict[str, PeerEntry]:
    """
    The rendezvous's peers file: C{[peers.NAME]} tables with C{public_key}
    and optional C{network}.  An empty file is an empty dict.
    """
    return _load_peers(os.fspath(path), None)


def load_rendezvous_config(
    path: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> RendezvousConfig:
    """
    Load C{path} (or nothing), apply command-line C{overrides} keyed by
    config key (a string, or None when not given), and validate everything,
    key and peers files included.
    """
    merged = _merge(path, overrides, _RENDEZVOUS_SETTINGS, _defaults(RendezvousConfig))
    values = merged.values
    return RendezvousConfig(
        port=values["port"],
        interface=values["interface"],
        private_key=_private_key(merged),
        private_key_path=values["private_key"],
        peers=_load_peers(values["peers"], merged.where["peers"]),
        peers_path=values["peers"],
        binding_rate=values["binding_rate"],
        max_pending=values["max_pending"],
        registration_lifetime=values["registration_lifetime"],
        log_format=values["log_format"],
    )


def load_agent_config(
    path: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> AgentConfig:
    """
    Load C{path} (or nothing), apply command-line C{overrides} keyed by
    config key, and validate everything, including the optional pinned
    C{[peers.NAME]} tables and the private key file.
    """
    merged = _merge(path, overrides, _AGENT_SETTINGS, _defaults(AgentConfig), frozenset({"peers"}))
    values = merged.values
    pinned = {}
    if merged.file is not None and "peers" in merged.tables:
        entries = _parse_peers(merged.tables["peers"], merged.file, with_network=False)
        pinned = {name: entry.public_key for name, entry in entries.items()}
    return AgentConfig(
        name=values["name"],
        private_key=_private_key(merged),
        private_key_path=values["private_key"],
        rendezvous=values["rendezvous"],
        rendezvous_public_key=values["rendezvous_public_key"],
        control_socket=values["control_socket"],
        keepalive=values["keepalive"],
        allow_users=values["allow_users"],
        allow_groups=values["allow_groups"],
        connect_timeout=values["connect_timeout"],
        pinned_peers=pinned,
        log_format=values["log_format"],
    )
