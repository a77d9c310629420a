"""
TOML configuration for both daemons, validated with errors that name the file and key.

Every mistake an admin can make surfaces as one L{ConfigError} whose text is
a single line saying where (file and key, or command-line option) and what
was expected, so a daemon can print it and exit instead of failing later,
half started, with a traceback.

Each setting is declared once, as a field of L{RendezvousConfig} or
L{AgentConfig} made with L{setting}: its TOML key, check, help text, default
and command-line option.  Loading, the options' overrides and the daemons'
C{--help} are all derived from those fields (L{settings}).  The example
files in etc/punchd/ document them for admins.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import ipaddress
import os
import re
import sys
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import IO, Any, NoReturn, TypeVar, dataclass_transform

from punchd import checks
from punchd.checks import NAME_RULE, Check, Invalid, Place, show
from punchd.keys import KeyFileError, PrivateKey, PublicKey, load_private_key
from punchd.wire import NAME_RE

__all__ = [
    "EX_CONFIG",
    "NAME_RE",
    "AgentConfig",
    "ConfigError",
    "PeerEntry",
    "RendezvousConfig",
    "Setting",
    "load_agent_config",
    "load_peers",
    "load_rendezvous_config",
    "port_range",
    "refuse_to_start",
    "settings",
]

DEFAULT_NETWORK = "default"


class ConfigError(Exception):
    """
    The configuration is unusable.  C{str()} is one line naming the file and
    key (or the command-line option) at fault, e.g.
    C{"agent.toml: key 'keepalive': must be a number 1-3600, got 0"}.
    """


#: sysexits.h EX_CONFIG: the systemd units do not restart a daemon on it.
EX_CONFIG = 78


def refuse_to_start(program: str, message: str, stream: IO[str] | None = None) -> NoReturn:
    """
    Say what is wrong with the configuration in one line (on stderr unless
    C{stream} is given) and exit, before anything listens.
    """
    (stream or sys.stderr).write(f"{program}: {message}\n")
    raise SystemExit(EX_CONFIG)


# -- the settings table --------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """
    One config key, declared on its dataclass field with L{setting}.
    L{settings} fills in C{field}, C{key} and C{default}.
    """

    check: Check
    help: str
    #: The TOML key; the field's name unless given.
    key: str = ""
    #: One-letter command-line option, if any.
    short: str | None = None
    #: Turns option text into what the TOML file would hold.
    from_text: Callable[[str], Any] = str
    #: Whether a command-line option overrides it (else file only).
    option: bool = True
    field: str = ""
    #: Whether the key must be given, for want of a default.
    required: bool = True
    default: Any = None

    @property
    def option_name(self) -> str:
        return "--" + self.key.replace("_", "-")


_SETTING = "punchd.setting"


def setting(
    check: Check,
    help: str,
    *,
    default: Any = dataclasses.MISSING,
    default_factory: Callable[[], Any] | Any = dataclasses.MISSING,
    key: str = "",
    short: str | None = None,
    from_text: Callable[[str], Any] = str,
    option: bool = True,
) -> Any:
    """
    Declare a config dataclass field as a setting: the one place its key,
    check, help, default and option are written.  Without a default, the
    key is required.
    """
    spec = Setting(check, help, key, short, from_text, option)
    return field(default=default, default_factory=default_factory, metadata={_SETTING: spec})


_C = TypeVar("_C")


@dataclass_transform(kw_only_default=True, frozen_default=True, field_specifiers=(field, setting))
def _config_class(cls: type[_C]) -> type[_C]:
    """
    A frozen, keyword-only dataclass whose L{setting} fields type checkers
    understand (required unless given a default).
    """
    return dataclass(frozen=True, kw_only=True)(cls)


@functools.cache
def settings(cls: type) -> dict[str, Setting]:
    """
    The settings of config class C{cls}, by TOML key, in declaration order.
    Fields that are not settings are derived by the loader.
    """
    table = {}
    for f in dataclasses.fields(cls):
        spec = f.metadata.get(_SETTING)
        if spec is None:
            continue
        key = spec.key or f.name
        if f.default is not dataclasses.MISSING:
            spec = dataclasses.replace(spec, required=False, default=f.default)
        elif f.default_factory is not dataclasses.MISSING:
            spec = dataclasses.replace(spec, required=False, default=f.default_factory())
        table[key] = dataclasses.replace(spec, key=key, field=f.name)
    return table


# -- the peers tables ----------------------------------------------------------


@dataclass(frozen=True)
class PeerEntry:
    """
    One agent the rendezvous accepts: its name, identity, and the network
    whose members it may see and reach.
    """

    name: str
    public_key: PublicKey
    network: str = DEFAULT_NETWORK


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


def _convert(check: Check, value: Any, where: str, place: Place) -> Any:
    try:
        return check(value, place)
    except Invalid as e:
        raise ConfigError(f"{where}: {e}") from None


def _peer(name: str, entry: Any, file: str, fields: list[str]) -> PeerEntry:
    """
    Check one C{[peers.NAME]} table.
    """
    where = _at(file, f"peers.{name}")
    if not NAME_RE.match(name):
        raise ConfigError(f"{where}: a peer name must be {NAME_RULE}")
    if not isinstance(entry, dict):
        raise ConfigError(f'{where}: must be a table with public_key = "...", got {show(entry)}')
    for key in entry:
        if key not in fields:
            raise _unknown(file, f"peers.{name}.{key}", fields)
    if "public_key" not in entry:
        raise ConfigError(f"{file}: missing required key 'peers.{name}.public_key'")
    place = Place(file, "")
    public_key = _convert(
        checks.public_key, entry["public_key"], _at(file, f"peers.{name}.public_key"), place
    )
    network = DEFAULT_NETWORK
    if "network" in entry:
        where = _at(file, f"peers.{name}.network")
        network = _convert(checks.name, entry["network"], where, place)
    return PeerEntry(name, public_key, network)


def _parse_peers(table: Any, file: str, *, with_network: bool) -> dict[str, PeerEntry]:
    """
    Check C{[peers.NAME]} tables.  Two names with one public key are
    refused: the rendezvous could not tell those agents apart, and either
    could speak as the other.
    """
    if not isinstance(table, dict):
        raise ConfigError(f"{_at(file, 'peers')}: must be [peers.NAME] tables, got {show(table)}")
    fields = ["network", "public_key"] if with_network else ["public_key"]
    peers: dict[str, PeerEntry] = {}
    owners: dict[PublicKey, str] = {}
    for name, entry in table.items():
        peer = _peer(name, entry, file, fields)
        if peer.public_key in owners:
            where = _at(file, f"peers.{name}.public_key")
            raise ConfigError(f"{where}: same public key as peer '{owners[peer.public_key]}'")
        owners[peer.public_key] = name
        peers[name] = peer
    return peers


def _pinned(value: Any, place: Place) -> dict[str, PublicKey]:
    """
    The agent's pinned C{[peers.NAME]} tables (file only, so C{place.file}
    is set): peer name -> the only public key accepted for it.
    """
    entries = _parse_peers(value, place.file or "", with_network=False)
    return {name: entry.public_key for name, entry in entries.items()}


# -- the config classes --------------------------------------------------------


def _boolean(value: Any, place: Place) -> bool:
    if not isinstance(value, bool):
        raise Invalid(f"must be true or false, got {show(value)}")
    return value


def _boolean_text(text: str) -> Any:
    """
    An on/off option's text; anything else is kept for the check to quote.
    """
    words = {"true": True, "yes": True, "on": True, "1": True}
    words |= {"false": False, "no": False, "off": False, "0": False}
    return words.get(text.strip().lower(), text)


def port_range(text: str) -> tuple[int, int]:
    """
    The (low, high) ports of a checked C{relay_ports} value.
    """
    low, _, high = text.partition("-")
    return int(low), int(high)


def _port_range(value: Any, place: Place) -> str:
    """
    C{"LOW-HIGH"}, ordered, within 1024-65535, at least two ports (one
    relayed tunnel needs two).
    """
    expected = f'must be a port range "LOW-HIGH" within 1024-65535, got {show(value)}'
    if not isinstance(value, str):
        raise Invalid(expected)
    match = re.fullmatch(r"\s*([0-9]{1,5})\s*-\s*([0-9]{1,5})\s*", value)
    if match is None:
        raise Invalid(expected)
    low, high = int(match.group(1)), int(match.group(2))
    if not 1024 <= low <= 65535 or not 1024 <= high <= 65535:
        raise Invalid(expected)
    if high <= low:
        raise Invalid(f"must be a range LOW-HIGH with LOW below HIGH, got {show(value)}")
    return f"{low}-{high}"


def _registry(value: Any, place: Place) -> str:
    """
    C{"memory"}, or C{"redis://HOST:PORT/DB"} (credentials never in it).
    """
    from punchd.rendezvous.resp import parse_url

    if value == "memory":
        return "memory"
    if not isinstance(value, str):
        raise Invalid(f'must be "memory" or "redis://HOST:PORT/DB", got {show(value)}')
    try:
        parse_url(value)
    except ValueError as e:
        raise Invalid(str(e)) from None
    return value


def _optional_path(value: Any, place: Place) -> str:
    if value == "":
        return ""
    path: str = checks.path(value, place)
    return path


class Servers(tuple[str, int]):
    """
    The agent's C{rendezvous}: the first address, as the C{(host, port)}
    everyone uses, carrying the service's other nodes in C{fallbacks}.
    """

    fallbacks: tuple[tuple[str, int], ...]

    def __new__(
        cls, first: tuple[str, int], fallbacks: tuple[tuple[str, int], ...] = ()
    ) -> Servers:
        self = super().__new__(cls, first)
        self.fallbacks = fallbacks
        return self

    @property
    def all(self) -> tuple[tuple[str, int], ...]:
        return ((self[0], self[1]), *self.fallbacks)


def _addresses(value: Any, place: Place) -> Servers:
    """
    One rendezvous address, or a non-empty list of them (one service's
    nodes, tried in turn).
    """
    if isinstance(value, str):
        return Servers(checks.address(value, place))
    if not isinstance(value, list) or not value:
        raise Invalid(f'must be "host:port" or a list of them, got {show(value)}')
    found = []
    for i, item in enumerate(value):
        try:
            found.append(checks.address(item, place))
        except Invalid as e:
            raise Invalid(f"item {i + 1}: {e}") from None
    return Servers(found[0], tuple(found[1:]))


def _tls_address(value: Any, place: Place) -> str:
    """
    C{"auto"}, C{"off"}, or an address C{"host:port"} / C{"[IPv6]:port"}.
    """
    if value in ("auto", "off"):
        return str(value)
    try:
        checks.address(value, place)
    except Invalid as e:
        raise Invalid(f'must be "auto", "off" or "host:port": {e}') from None
    return str(value)


_LOG_FORMAT_HELP = "Log lines as text for people, or json (one object per line) for collectors."
_METRICS_HELP = (
    'Serve Prometheus metrics at http://IP:PORT/metrics, for example "127.0.0.1:9478"; "" for none.'
)


def _ip_address(value: Any, place: Place) -> str:
    """
    C{""} or an IP address (not a name: agents are told it as is).
    """
    if value == "":
        return ""
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise Invalid(f'must be "" or an IP address, got {show(value)}') from None


def _metrics_address(value: Any, place: Place) -> str:
    """
    C{""} (off) or C{"IP:port"} / C{"[IPv6]:port"}: an address, not a
    name, so that what is exposed is plain from the config.
    """
    if value == "":
        return ""
    expected = f'must be "" (off) or "IP:port" such as "127.0.0.1:9478", got {show(value)}'
    host, _ = checks.address(value, place)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise Invalid(expected) from None
    return str(value)


def _flag(value: Any, place: Place) -> bool:
    if not isinstance(value, bool):
        raise Invalid(f"must be true or false, got {show(value)}")
    return value


def _flag_text(text: str) -> Any:
    """
    C{true}/C{yes}/C{on}/C{1} or C{false}/C{no}/C{off}/C{0}; other text is
    kept for the check to quote.
    """
    word = text.strip().lower()
    if word in ("true", "yes", "on", "1"):
        return True
    if word in ("false", "no", "off", "0"):
        return False
    return text


@_config_class
class RendezvousConfig:
    port: int = setting(
        checks.integer(1, 65535),
        "UDP port for STUN Binding and punchd's signalling.",
        default=3478,
        short="p",
        from_text=checks.int_text,
    )
    interface: str = setting(
        checks.interface,
        'Address to listen on: "" for all IPv4 interfaces, or an IP address.',
        default="",
        short="i",
    )
    private_key_path: str = setting(
        checks.key_path,
        "The rendezvous's private key file (punchctl keygen FILE writes one).",
        key="private_key",
        short="k",
    )
    peers_path: str = setting(
        checks.path,
        "The peers file: which agents may register, with which key, in which network.",
        key="peers",
    )
    binding_rate: float = setting(
        checks.number(0, None),
        "Binding replies per second per source IP (burst twice that); 0 for no limit.",
        default=50.0,
        from_text=checks.float_text,
    )
    max_pending: int = setting(
        checks.integer(1, 65536),
        "Pending introductions allowed per agent.",
        default=256,
        from_text=checks.int_text,
    )
    registration_lifetime: int = setting(
        checks.integer(10, 86400),
        "Longest registration lifetime granted, in seconds.",
        default=600,
        from_text=checks.int_text,
    )
    relay: bool = setting(
        _boolean,
        "Relay tunnels between agents that cannot reach each other directly.",
        default=True,
        from_text=_boolean_text,
    )
    relay_ports: str = setting(
        _port_range,
        'UDP ports the relay opens, two per relayed tunnel: a range "LOW-HIGH" within 1024-65535.',
        default="49152-65535",
    )
    relay_idle_timeout: float = setting(
        checks.number(1, 86400),
        "Seconds without a datagram either way before a relayed tunnel is freed.",
        default=120.0,
        from_text=checks.float_text,
    )
    relay_max_per_agent: int = setting(
        checks.integer(1, 65536),
        "Relayed tunnels one agent may have at once, on either side.",
        default=16,
        from_text=checks.int_text,
    )
    relay_rate: float = setting(
        checks.number(0, None),
        "Bytes per second one relayed tunnel may carry, both ways together; 0 for no limit.",
        default=0.0,
        from_text=checks.float_text,
    )
    relay_address: str = setting(
        _ip_address,
        "The IP address agents reach this node's relay at, for tunnels between agents"
        ' registered on different nodes of a service; "" for the interface, when that'
        " is one address.",
        default="",
    )
    log_format: str = setting(checks.choice("text", "json"), _LOG_FORMAT_HELP, default="text")
    # Derived by load_rendezvous_config.
    private_key: PrivateKey
    peers: dict[str, PeerEntry]
    # -- hard NATs --
    alternate_port: int = setting(
        checks.integer(0, 65535),
        "A second UDP port answering STUN Binding, so that agents can tell whether"
        " their NAT's mapping varies by destination; 0 for none.",
        default=0,
        from_text=checks.int_text,
    )
    # -- metrics --
    metrics: str = setting(_metrics_address, _METRICS_HELP, default="")

    # -- TLS, where UDP is blocked --
    tls_port: int = setting(
        checks.integer(0, 65535),
        "TCP port where agents that have no UDP reach the rendezvous and the relay"
        " over TLS; 0 for none.",
        default=0,
        from_text=checks.int_text,
    )
    tls_certificate: str = setting(
        _optional_path,
        "PEM file with the TLS port's certificate, then any intermediate certificates.",
        default="",
    )
    tls_private_key: str = setting(
        _optional_path,
        "PEM file with the TLS certificate's private key (unencrypted, mode 0600).",
        default="",
    )
    tls_auth_timeout: float = setting(
        checks.number(1, 300),
        "Seconds a TLS connection has to finish its handshake and send an accepted"
        " agent request or relay bind.",
        default=10.0,
        from_text=checks.float_text,
    )
    tls_idle_timeout: float = setting(
        checks.number(5, 86400),
        "Seconds without a whole frame before a TLS connection is closed.",
        default=120.0,
        from_text=checks.float_text,
    )
    tls_max_per_source: int = setting(
        checks.integer(1, 65536),
        "TLS connections one IPv4 address (or IPv6 /64) may have open at once.",
        default=16,
        from_text=checks.int_text,
    )
    tls_max_connections: int = setting(
        checks.integer(1, 1_000_000),
        "TLS connections open at once, from everyone.",
        default=1024,
        from_text=checks.int_text,
    )

    # -- scale-out --
    registry: str = setting(
        _registry,
        'Where registrations live: "memory" (one process), or "redis://HOST:PORT/DB",'
        " shared by every node of the service.",
        default="memory",
    )
    redis_password_file: str = setting(
        _optional_path,
        'File holding Redis\'s password, or USERNAME:PASSWORD for an ACL user; "" for none.',
        default="",
    )
    workers: int = setting(
        checks.integer(1, 256),
        "Processes serving the one UDP port (SO_REUSEPORT); more than 1 needs a redis registry.",
        default=1,
        from_text=checks.int_text,
    )
    directory: str = setting(
        checks.choice("file", "redis"),
        'Where agents\' keys live: "file" (the peers file), or "redis" (the peers file'
        " plus what punchd.rendezvous.directory put in the registry's Redis).",
        default="file",
    )


@_config_class
class AgentConfig:
    name: str = setting(
        checks.name, "This agent's name, as the rendezvous's peers file lists it.", short="n"
    )
    private_key_path: str = setting(
        checks.key_path,
        "This agent's private key file (punchctl keygen FILE writes one).",
        key="private_key",
        short="k",
    )
    rendezvous: tuple[str, int] = setting(
        _addresses,
        "The rendezvous server, host:port or [IPv6]:port; or a list of a service's nodes"
        " (comma-separated on the command line), tried in turn when one falls silent.",
        short="r",
        from_text=lambda text: checks.list_text(text) if "," in text else text,
    )
    rendezvous_public_key: PublicKey = setting(
        checks.public_key, "The rendezvous server's public key, base64."
    )
    rendezvous_tls: str = setting(
        _tls_address,
        'Where to register over TLS when UDP to the rendezvous is blocked: "host:port";'
        ' "auto" for the rendezvous\'s host on port 443; "off" never to.',
        default="auto",
    )
    rendezvous_ca: str = setting(
        _optional_path,
        "PEM file of the CA that signed the rendezvous's TLS certificate;"
        ' "" for the system\'s CA store.',
        default="",
    )
    control_socket: str = setting(
        checks.socket_path,
        "Unix socket where local programs ask for tunnels.",
        default="/run/punchd/agent.sock",
        short="s",
    )
    keepalive: float = setting(
        checks.number(1, 3600),
        "Seconds between registrations with the rendezvous.",
        default=20.0,
        from_text=checks.float_text,
    )
    allow_users: tuple[str, ...] = setting(
        checks.users,
        "Users (names or uids, comma-separated) allowed on the control socket"
        " besides the agent's own user and root.",
        default=(),
        from_text=checks.list_text,
    )
    allow_groups: tuple[str, ...] = setting(
        checks.groups,
        "Groups (names or gids, comma-separated) whose members may use the control socket.",
        default=(),
        from_text=checks.list_text,
    )
    connect_timeout: float = setting(
        checks.number(0.1, 600),
        "Seconds a connect may take when the program gives none.",
        default=10.0,
        from_text=checks.float_text,
    )
    pinned_peers: dict[str, PublicKey] = setting(
        _pinned,
        "[peers.NAME] tables: the only public key accepted for each peer named.",
        default_factory=dict,
        key="peers",
        option=False,
    )
    log_format: str = setting(checks.choice("text", "json"), _LOG_FORMAT_HELP, default="text")
    # Derived by load_agent_config.
    private_key: PrivateKey
    # -- hard NATs --
    port_mapping: bool = setting(
        _flag,
        "Ask the gateway for port mappings (PCP, NAT-PMP, UPnP-IGD).",
        default=True,
        from_text=_flag_text,
    )
    hard_nat_sockets: int = setting(
        checks.integer(0, 512),
        "Sockets a tunnel opens when this agent's NAT maps per destination and the"
        " peer's does not (birthday probing); 0 turns birthday probing off.",
        default=256,
        from_text=checks.int_text,
    )
    hard_nat_probe_rate: float = setting(
        checks.number(1, 2000),
        "Probes per second the easy side sends to the hard side's ports.",
        default=250.0,
        from_text=checks.float_text,
    )
    hard_nat_budget: int = setting(
        checks.integer(0, 10000),
        "Probes at most per tunnel (and the hard side's sockets live that long).",
        default=1200,
        from_text=checks.int_text,
    )
    # -- metrics --
    metrics: str = setting(_metrics_address, _METRICS_HELP, default="")


# -- loading -------------------------------------------------------------------


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


@dataclass
class _Merged:
    """
    Settings merged from a file and the command line, by field name.
    C{where} tells, per field, what to blame in an error about a value
    found only later (a key file that will not load, say).
    """

    values: dict[str, Any]
    where: dict[str, str]


def _from_file(
    merged: _Merged, file: str, table: Mapping[str, Setting], skip: Mapping[str, object]
) -> None:
    """
    Check every key of C{file}, except those in C{skip} (overridden).
    """
    place = Place(file, os.path.dirname(os.path.abspath(file)))
    for key, value in _read_toml(file).items():
        if key not in table:
            raise _unknown(file, key, sorted(table))
        if key in skip:
            continue
        s = table[key]
        merged.where[s.field] = _at(file, key)
        merged.values[s.field] = _convert(s.check, value, merged.where[s.field], place)


def _from_options(
    merged: _Merged, given: Mapping[str, object], table: Mapping[str, Setting]
) -> None:
    """
    Check the command-line values; relative paths are from the cwd.
    """
    place = Place(None, os.getcwd())
    for key, value in given.items():
        s = table[key]
        if isinstance(value, str):
            value = s.from_text(value)
        merged.where[s.field] = s.option_name
        merged.values[s.field] = _convert(s.check, value, s.option_name, place)


def _require(merged: _Merged, file: str | None, table: Mapping[str, Setting]) -> None:
    for s in table.values():
        if not s.required or s.field in merged.values:
            continue
        give = f" (or give {s.option_name})" if s.option else ""
        if file is not None:
            raise ConfigError(f"{file}: missing required key '{s.key}'{give}")
        raise ConfigError(
            f"missing required setting '{s.key}': give {s.option_name} or a config file"
        )


def _merge(
    path: str | os.PathLike[str] | None, overrides: Mapping[str, object] | None, cls: type
) -> _Merged:
    """
    Validate the file and the overrides (keyed by config key, None when not
    given) against C{cls}'s settings.  An override replaces the file's
    value unchecked, so that a bad value can be fixed from the command line.
    Settings given nowhere are left to the dataclass's defaults.
    """
    table = settings(cls)
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    for key in given:
        if key not in table or not table[key].option:
            raise ValueError(f"override for unknown config key {key!r}")
    file = None if path is None else os.fspath(path)
    merged = _Merged({}, {})
    if file is not None:
        _from_file(merged, file, table, given)
    _from_options(merged, given, table)
    _require(merged, file, table)
    return merged


def _private_key(merged: _Merged) -> PrivateKey:
    try:
        return load_private_key(merged.values["private_key_path"])
    except KeyFileError as e:
        raise ConfigError(f"{merged.where['private_key_path']}: {e}") from None


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
    merged = _merge(path, overrides, RendezvousConfig)
    if merged.values.get("workers", 1) > 1 and merged.values.get("registry", "memory") == "memory":
        raise ConfigError(f'{merged.where["workers"]}: workers > 1 needs registry = "redis://..."')
    if (
        merged.values.get("directory") == "redis"
        and merged.values.get("registry", "memory") == "memory"
    ):
        raise ConfigError(
            f'{merged.where["directory"]}: directory = "redis" needs a redis registry'
        )
    if merged.values.get("tls_port", 0):
        for key in ("tls_certificate", "tls_private_key"):
            if not merged.values.get(key):
                raise ConfigError(f"{merged.where['tls_port']}: a TLS port needs {key}")
    peers_path = merged.values["peers_path"]
    return RendezvousConfig(
        **merged.values,
        private_key=_private_key(merged),
        peers=_load_peers(peers_path, merged.where["peers_path"]),
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
    merged = _merge(path, overrides, AgentConfig)
    return AgentConfig(**merged.values, private_key=_private_key(merged))
