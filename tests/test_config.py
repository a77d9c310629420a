"""
Tests for L{punchd.config}: loading, overrides, and one-line errors naming
the file and key (or option) at fault.
"""

from __future__ import annotations

import dataclasses
import grp
import os
import pwd
import re
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest

from punchd.config import (
    NAME_RE,
    AgentConfig,
    ConfigError,
    PeerEntry,
    RendezvousConfig,
    load_agent_config,
    load_peers,
    load_rendezvous_config,
    settings,
)
from punchd.keys import PrivateKey, PublicKey, write_private_key

EXAMPLES = Path(__file__).resolve().parent.parent / "etc" / "punchd"

ALICE = PrivateKey.generate().public_key()
BOB = PrivateKey.generate().public_key()
SERVER = PrivateKey.generate()


@pytest.fixture
def conf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """
    A config directory holding both key files and a peers file, and a cwd
    elsewhere, so that resolving relative paths against the cwd shows.
    """
    d = tmp_path / "conf"
    d.mkdir()
    write_private_key(d / "server.key", SERVER)
    write_private_key(d / "agent.key", PrivateKey.generate())
    (d / "peers.toml").write_text(f'[peers.alice]\npublic_key = "{ALICE}"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    return d


RENDEZVOUS_MINIMAL = 'private_key = "server.key"\npeers = "peers.toml"\n'
AGENT_MINIMAL = (
    'name = "alice"\nprivate_key = "agent.key"\nrendezvous = "rdv.example.net:3478"\n'
    f'rendezvous_public_key = "{SERVER.public_key()}"\n'
)


#: A user and a group every system has (allow lists must name existing ones).
USER = pwd.getpwuid(0).pw_name
GROUP = grp.getgrgid(0).gr_name
#: Names no system has.
NO_USER = "punchd-no-such-user"
NO_GROUP = "punchd-no-such-group"

USERS = "key 'allow_users': must be an array of user names or numeric ids, got "


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def error(load: Callable[[], object]) -> str:
    """
    The ConfigError message C{load} raises, checked to be one line.
    """
    with pytest.raises(ConfigError) as info:
        load()
    message = str(info.value)
    assert "\n" not in message
    return message


def rendezvous_error(conf: Path, text: str, overrides: dict[str, object] | None = None) -> str:
    path = write(conf / "r.toml", text)
    return error(lambda: load_rendezvous_config(path, overrides))


def agent_error(conf: Path, text: str, overrides: dict[str, object] | None = None) -> str:
    path = write(conf / "a.toml", text)
    return error(lambda: load_agent_config(path, overrides))


# Rendezvous


def test_rendezvous_minimal(conf: Path) -> None:
    config = load_rendezvous_config(write(conf / "r.toml", RENDEZVOUS_MINIMAL), {})
    assert config == RendezvousConfig(
        private_key=SERVER,
        private_key_path=str(conf / "server.key"),
        peers={"alice": PeerEntry("alice", ALICE, "default")},
        peers_path=str(conf / "peers.toml"),
    )
    assert (config.port, config.interface, config.binding_rate) == (3478, "", 50.0)
    assert (config.max_pending, config.registration_lifetime, config.log_format) == (
        256,
        600,
        "text",
    )


def test_rendezvous_every_key(conf: Path) -> None:
    path = write(
        conf / "r.toml",
        RENDEZVOUS_MINIMAL + 'port = 5000\ninterface = "::1"\nbinding_rate = 0\nmax_pending = 3\n'
        'registration_lifetime = 60\nlog_format = "json"\n',
    )
    config = load_rendezvous_config(path, {})
    assert (config.port, config.interface, config.binding_rate) == (5000, "::1", 0.0)
    assert isinstance(config.binding_rate, float)
    assert (config.max_pending, config.registration_lifetime, config.log_format) == (
        3,
        60,
        "json",
    )


def test_overrides_win(conf: Path) -> None:
    path = write(conf / "r.toml", RENDEZVOUS_MINIMAL + "port = 4000\nbinding_rate = 10\n")
    config = load_rendezvous_config(
        path, {"port": "5000", "binding_rate": "2.5", "interface": None, "log_format": "json"}
    )
    assert (config.port, config.binding_rate, config.log_format) == (5000, 2.5, "json")
    assert config.interface == ""


def test_override_replaces_bad_file_value(conf: Path) -> None:
    """
    A value the command line overrides is not checked, so an admin can fix a
    bad file from the command line.
    """
    path = write(conf / "r.toml", RENDEZVOUS_MINIMAL + 'port = "http"\n')
    assert load_rendezvous_config(path, {"port": "5000"}).port == 5000


def test_override_values_already_converted(conf: Path) -> None:
    """
    An option parser that already converted a value (say with int) is fine.
    """
    path = write(conf / "r.toml", RENDEZVOUS_MINIMAL)
    assert load_rendezvous_config(path, {"port": 5000}).port == 5000


def test_overrides_only(conf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(conf)
    config = load_rendezvous_config(None, {"private_key": "server.key", "peers": "peers.toml"})
    assert config.private_key == SERVER
    assert config.private_key_path == str(conf / "server.key")
    assert config.peers_path == str(conf / "peers.toml")
    assert load_rendezvous_config(overrides={"private_key": "server.key", "peers": "peers.toml"})


def test_overrides_only_missing_required(conf: Path) -> None:
    message = error(lambda: load_rendezvous_config(None, {"peers": "peers.toml"}))
    assert message == "missing required setting 'private_key': give --private-key or a config file"


def test_unknown_override_is_a_bug(conf: Path) -> None:
    with pytest.raises(ValueError, match="config"):
        load_rendezvous_config(write(conf / "r.toml", RENDEZVOUS_MINIMAL), {"config": "x"})


def test_relative_paths_resolve_against_file_directory(conf: Path, tmp_path: Path) -> None:
    sub = conf / "sub"
    sub.mkdir()
    path = write(sub / "r.toml", 'private_key = "../server.key"\npeers = "../peers.toml"\n')
    config = load_rendezvous_config(path, {})
    assert config.private_key_path == str(conf / "server.key")
    assert config.peers_path == str(conf / "peers.toml")
    assert os.getcwd() == str(tmp_path / "elsewhere")


def test_absolute_paths_kept(conf: Path) -> None:
    path = write(
        conf / "r.toml", f'private_key = "{conf / "server.key"}"\npeers = "{conf / "peers.toml"}"\n'
    )
    assert load_rendezvous_config(path, {}).private_key_path == str(conf / "server.key")


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("prot = 1", "unknown key 'prot' (did you mean 'port'?)"),
        ("colour = 1", "unknown key 'colour'"),
        ("[server]\nport = 1", "unknown key 'server'"),
        ('port = "3478"', "key 'port': must be an integer 1-65535, got '3478'"),
        ("port = true", "key 'port': must be an integer 1-65535, got true"),
        ("port = 3478.0", "key 'port': must be an integer 1-65535, got 3478.0"),
        ("port = 0", "key 'port': must be an integer 1-65535, got 0"),
        ("port = 65536", "key 'port': must be an integer 1-65535, got 65536"),
        ('interface = "eth0"', "key 'interface': must be \"\" (all IPv4 interfaces) or an IP"),
        ("interface = 0", "key 'interface': must be \"\""),
        ('interface = "[::1]"', "key 'interface': must be \"\""),
        ("binding_rate = -1", "key 'binding_rate': must be a number >= 0, got -1"),
        ("binding_rate = nan", "key 'binding_rate': must be a number >= 0, got nan"),
        ("binding_rate = inf", "key 'binding_rate': must be a number >= 0, got inf"),
        ('binding_rate = "50"', "key 'binding_rate': must be a number >= 0, got '50'"),
        ("max_pending = 0", "key 'max_pending': must be an integer 1-65536, got 0"),
        ("registration_lifetime = 5", "key 'registration_lifetime': must be an integer 10-86400"),
        ('log_format = "xml"', "key 'log_format': must be 'text' or 'json', got 'xml'"),
        ("log_format = []", "key 'log_format': must be 'text' or 'json', got an array"),
        ('peers = ""', "key 'peers': must be a file path, got ''"),
        ("peers = 3", "key 'peers': must be a file path, got 3"),
    ],
)
def test_rendezvous_errors(conf: Path, line: str, expected: str) -> None:
    key = line.partition(" ")[0]
    text = "".join(x + "\n" for x in RENDEZVOUS_MINIMAL.splitlines() if not x.startswith(key + " "))
    message = rendezvous_error(conf, text + line + "\n")
    assert message.startswith(f"{conf / 'r.toml'}: {expected}")


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"port": "abc"}, "--port: must be an integer 1-65535, got 'abc'"),
        ({"port": "99999"}, "--port: must be an integer 1-65535, got 99999"),
        ({"binding_rate": "fast"}, "--binding-rate: must be a number >= 0, got 'fast'"),
        ({"registration_lifetime": "1"}, "--registration-lifetime: must be an integer 10-86400"),
        ({"log_format": "XML"}, "--log-format: must be 'text' or 'json', got 'XML'"),
    ],
)
def test_override_errors_name_option(
    conf: Path, overrides: dict[str, object], expected: str
) -> None:
    assert rendezvous_error(conf, RENDEZVOUS_MINIMAL, overrides).startswith(expected)


def test_missing_required_key(conf: Path) -> None:
    message = rendezvous_error(conf, 'peers = "peers.toml"\n')
    assert (
        message == f"{conf / 'r.toml'}: missing required key 'private_key' (or give --private-key)"
    )


def test_config_file_missing(conf: Path) -> None:
    path = conf / "nope.toml"
    message = error(lambda: load_rendezvous_config(path, {}))
    assert message == f"{path}: cannot read: No such file or directory"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"port = \n", "not valid TOML: Invalid value (at line 1, column 8)"),
        (b"port = 1\nport = 2\n", "not valid TOML: Cannot overwrite a value (at line 2"),
        (b"# \xff\xfe\n", "not valid TOML: not UTF-8 text"),
    ],
)
def test_config_file_malformed(conf: Path, content: bytes, expected: str) -> None:
    path = conf / "r.toml"
    path.write_bytes(content)
    assert error(lambda: load_rendezvous_config(path, {})).startswith(f"{path}: {expected}")


def test_key_file_readable_by_others(conf: Path) -> None:
    key = conf / "server.key"
    key.chmod(0o644)
    message = rendezvous_error(conf, RENDEZVOUS_MINIMAL)
    assert message.startswith(f"{conf / 'r.toml'}: key 'private_key': {key}: ")
    assert message.endswith(f"run chmod 600 {key}")
    assert SERVER.to_base64() not in message


def test_key_file_missing_via_option(conf: Path) -> None:
    key = conf / "missing.key"
    message = rendezvous_error(conf, RENDEZVOUS_MINIMAL, {"private_key": str(key)})
    assert message == f"--private-key: {key}: cannot read key file: No such file or directory"


def test_key_file_malformed(conf: Path) -> None:
    key = conf / "server.key"
    key.write_text("hello\n")
    message = rendezvous_error(conf, RENDEZVOUS_MINIMAL)
    assert message == (
        f"{conf / 'r.toml'}: key 'private_key': {key}: private key is not valid base64"
    )


def test_key_pasted_instead_of_path(conf: Path) -> None:
    """
    The key text is refused and not echoed into what may become a log line.
    """
    text = PrivateKey.generate().to_base64()
    message = rendezvous_error(conf, f'private_key = "{text}"\npeers = "peers.toml"\n')
    assert message.startswith(f"{conf / 'r.toml'}: key 'private_key': must be the path of a key")
    assert text not in message
    message = rendezvous_error(conf, RENDEZVOUS_MINIMAL, {"private_key": text})
    assert message.startswith("--private-key: must be the path of a key file")
    assert text not in message


def test_peers_file_missing(conf: Path) -> None:
    (conf / "peers.toml").unlink()
    message = rendezvous_error(conf, RENDEZVOUS_MINIMAL)
    assert message == (
        f"{conf / 'r.toml'}: key 'peers': {conf / 'peers.toml'}: cannot read:"
        " No such file or directory"
    )


def test_peers_file_error_names_peers_file(conf: Path) -> None:
    write(conf / "peers.toml", '[peers.alice]\npublic_key = "nope"\n')
    message = rendezvous_error(conf, RENDEZVOUS_MINIMAL)
    assert message.startswith(
        f"{conf / 'peers.toml'}: key 'peers.alice.public_key': must be a base64 X25519 public key"
    )


# Peers files


def test_peers(tmp_path: Path) -> None:
    path = write(
        tmp_path / "peers.toml",
        f'[peers.alice]\npublic_key = "{ALICE}"\n\n'
        f'[peers."bob.lab-2_x"]\npublic_key = "{BOB}"\nnetwork = "lab"\n',
    )
    assert load_peers(path) == {
        "alice": PeerEntry("alice", ALICE, "default"),
        "bob.lab-2_x": PeerEntry("bob.lab-2_x", BOB, "lab"),
    }


@pytest.mark.parametrize("content", ["", "# nobody yet\n", "[peers]\n"])
def test_peers_empty(tmp_path: Path, content: str) -> None:
    assert load_peers(write(tmp_path / "peers.toml", content)) == {}


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("[peers.alice]\n", "missing required key 'peers.alice.public_key'"),
        (
            f'[peers.alice]\npublic_key = "{ALICE}"\nnetwrok = "x"\n',
            "unknown key 'peers.alice.netwrok' (did you mean 'network'?)",
        ),
        (
            f'[peers.alice]\npubkey = "{ALICE}"\n',
            "unknown key 'peers.alice.pubkey' (did you mean 'public_key'?)",
        ),
        (
            f'[alice]\npublic_key = "{ALICE}"\n',
            "unknown key 'alice' (a peers file holds only [peers.NAME] tables)",
        ),
        ("[peer.alice]\n", "unknown key 'peer' (did you mean 'peers'?)"),
        ("peers = 1\n", "key 'peers': must be [peers.NAME] tables, got 1"),
        ('[peers]\nalice = "x"\n', "key 'peers.alice': must be a table with public_key"),
        (
            f'[peers."a b"]\npublic_key = "{ALICE}"\n',
            "key 'peers.a b': a peer name must be 1-64 letters, digits",
        ),
        (
            f'[peers."{"a" * 65}"]\npublic_key = "{ALICE}"\n',
            f"key 'peers.{'a' * 65}': a peer name must be",
        ),
        (
            f'[peers.alice]\npublic_key = "{ALICE}"\nnetwork = "my net"\n',
            "key 'peers.alice.network': must be a name of 1-64 letters",
        ),
        (
            f'[peers.alice]\npublic_key = "{ALICE}"\nnetwork = "lab\\n"\n',
            "key 'peers.alice.network': must be a name",
        ),
        (
            '[peers.alice]\npublic_key = "AAAA"\n',
            "key 'peers.alice.public_key': must be a base64 X25519 public key, got 'AAAA'"
            " (public key must be 32 bytes",
        ),
        (
            f'[peers.alice]\npublic_key = "{ALICE}"\n[peers.bob]\npublic_key = "{ALICE}"\n',
            "key 'peers.bob.public_key': same public key as peer 'alice'",
        ),
    ],
)
def test_peers_errors(tmp_path: Path, content: str, expected: str) -> None:
    path = write(tmp_path / "peers.toml", content)
    assert error(lambda: load_peers(path)).startswith(f"{path}: {expected}")


def test_name_re_rejects_trailing_newline() -> None:
    assert NAME_RE.match("alice")
    assert not NAME_RE.match("alice\n")
    assert NAME_RE.match("a" * 64)
    assert not NAME_RE.match("a" * 65)


# Agent


def test_agent_minimal(conf: Path) -> None:
    config = load_agent_config(write(conf / "a.toml", AGENT_MINIMAL), {})
    assert config.name == "alice"
    assert config.private_key_path == str(conf / "agent.key")
    assert config.rendezvous == ("rdv.example.net", 3478)
    assert config.rendezvous_public_key == SERVER.public_key()
    assert config.control_socket == "/run/punchd/agent.sock"
    assert (config.keepalive, config.connect_timeout) == (20.0, 10.0)
    assert (config.allow_users, config.allow_groups) == ((), ())
    assert config.pinned_peers == {}
    assert config.log_format == "text"


def test_agent_every_key(conf: Path) -> None:
    path = write(
        conf / "a.toml",
        AGENT_MINIMAL + 'control_socket = "run/agent.sock"\nkeepalive = 5\nconnect_timeout = 0.5\n'
        f'allow_users = ["{USER}", 1001]\nallow_groups = [0, "{GROUP}"]\nlog_format = "json"\n',
    )
    config = load_agent_config(path, {})
    assert config.control_socket == str(conf / "run" / "agent.sock")
    assert (config.keepalive, config.connect_timeout) == (5.0, 0.5)
    assert config.allow_users == (USER, "1001")
    assert config.allow_groups == ("0", GROUP)
    assert config.log_format == "json"


def test_agent_overrides(conf: Path) -> None:
    path = write(conf / "a.toml", AGENT_MINIMAL + 'allow_users = ["bob"]\n')
    config = load_agent_config(
        path,
        {
            "name": "carol",
            "rendezvous": "[2001:db8::1]:4000",
            "keepalive": "30",
            "allow_users": f"{USER}, 1002",
            "allow_groups": "",
            "control_socket": "agent.sock",
        },
    )
    assert config.name == "carol"
    assert config.rendezvous == ("2001:db8::1", 4000)
    assert config.keepalive == 30.0
    assert config.allow_users == (USER, "1002")
    assert config.allow_groups == ()
    assert config.control_socket == os.path.join(os.getcwd(), "agent.sock")


def test_agent_override_clears_list(conf: Path) -> None:
    path = write(conf / "a.toml", AGENT_MINIMAL + 'allow_users = ["bob"]\n')
    assert load_agent_config(path, {"allow_users": ""}).allow_users == ()


def test_agent_overrides_only(conf: Path) -> None:
    config = load_agent_config(
        None,
        {
            "name": "alice",
            "private_key": str(conf / "agent.key"),
            "rendezvous": "192.0.2.1:3478",
            "rendezvous_public_key": str(SERVER.public_key()),
        },
    )
    assert config.rendezvous == ("192.0.2.1", 3478)


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("rdv.example.net:3478", ("rdv.example.net", 3478)),
        ("rdv.example.net.:1", ("rdv.example.net.", 1)),
        ("localhost:65535", ("localhost", 65535)),
        ("203.0.113.7:3478", ("203.0.113.7", 3478)),
        ("[2001:db8::1]:3478", ("2001:db8::1", 3478)),
        ("[::ffff:192.0.2.1]:3478", ("::ffff:192.0.2.1", 3478)),
    ],
)
def test_agent_rendezvous_addresses(conf: Path, address: str, expected: tuple[str, int]) -> None:
    path = write(conf / "a.toml", AGENT_MINIMAL)
    assert load_agent_config(path, {"rendezvous": address}).rendezvous == expected


@pytest.mark.parametrize(
    "address",
    [
        "rdv.example.net",
        "rdv.example.net:",
        "rdv.example.net:0",
        "rdv.example.net:65536",
        "rdv.example.net:+80",
        "rdv.example.net: 80",
        "rdv.example.net:http",
        ":3478",
        "bad_host:3478",
        "-bad.example:3478",
        "10.0.0.256:3478",
        "[2001:db8::1]",
        "[2001:db8::1]:",
        "[192.0.2.1]:3478",
        "[rdv.example.net]:3478",
        "a" * 64 + ".example:3478",
    ],
)
def test_agent_bad_rendezvous_address(conf: Path, address: str) -> None:
    message = agent_error(conf, AGENT_MINIMAL.replace("rdv.example.net:3478", address))
    assert message.startswith(
        f'{conf / "a.toml"}: key \'rendezvous\': must be "host:port" or "[IPv6]:port"'
        f" with port 1-65535, got {address[:20]!r}"[:-1]
    )


def test_agent_bare_ipv6_hint(conf: Path) -> None:
    message = agent_error(conf, AGENT_MINIMAL, {"rendezvous": "2001:db8::1:3478"})
    assert message.startswith("--rendezvous: must be")
    assert message.endswith("write IPv6 addresses in brackets, as [2001:db8::1]:3478")


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("keepalvie = 3", "unknown key 'keepalvie' (did you mean 'keepalive'?)"),
        ("allow_user = []", "unknown key 'allow_user' (did you mean 'allow_users'?)"),
        ('name = "bad name"', "key 'name': must be a name of 1-64 letters, digits"),
        ('name = "-alice"', "key 'name': must be a name of"),
        ('name = "alice\\n"', "key 'name': must be a name of"),
        (f'name = "{"a" * 65}"', "key 'name': must be a name of"),
        ("name = 7", "key 'name': must be a name of 1-64 letters, digits, '.', '_' or '-',"),
        ('rendezvous_public_key = "abc"', "key 'rendezvous_public_key': must be a base64 X25519"),
        ("keepalive = 0", "key 'keepalive': must be a number 1-3600, got 0"),
        ("keepalive = 3600.5", "key 'keepalive': must be a number 1-3600, got 3600.5"),
        ('keepalive = "20"', "key 'keepalive': must be a number 1-3600, got '20'"),
        ("keepalive = false", "key 'keepalive': must be a number 1-3600, got false"),
        ("connect_timeout = 0.05", "key 'connect_timeout': must be a number 0.1-600, got 0.05"),
        ("connect_timeout = 601", "key 'connect_timeout': must be a number 0.1-600, got 601"),
        ('allow_users = "alice"', "key 'allow_users': must be an array of user names or numeric"),
        ("allow_users = [true]", "key 'allow_users': must be an array of user names"),
        (
            "allow_users = [-1]",
            USERS + "-1 in the array",
        ),
        (
            'allow_users = [""]',
            USERS + "'' in the array",
        ),
        (
            'allow_users = ["a b"]',
            USERS + "'a b' in the array",
        ),
        (
            "allow_users = [1.5]",
            USERS + "1.5 in the array",
        ),
        ("allow_groups = [[0]]", "key 'allow_groups': must be an array of group names"),
        (
            f'allow_users = ["{USER}", "{NO_USER}"]',
            f"key 'allow_users': no user named '{NO_USER}' on this system",
        ),
        (
            f'allow_groups = ["{NO_GROUP}"]',
            f"key 'allow_groups': no group named '{NO_GROUP}' on this system",
        ),
        ("control_socket = 1", "key 'control_socket': must be a file path, got 1"),
        (
            f'control_socket = "/{"s" * 107}"',
            "key 'control_socket': must be a path of at most 107 bytes (a Unix socket limit)",
        ),
        ('log_format = "JSON"', "key 'log_format': must be 'text' or 'json', got 'JSON'"),
        ("[peers.bob]\n", "missing required key 'peers.bob.public_key'"),
        (
            f'[peers.bob]\npublic_key = "{BOB}"\nnetwork = "lab"\n',
            "unknown key 'peers.bob.network'",
        ),
        (
            f'[peers.bob]\npublic_kye = "{BOB}"\n',
            "unknown key 'peers.bob.public_kye' (did you mean 'public_key'?)",
        ),
        ('[peers.bob]\npublic_key = "x"\n', "key 'peers.bob.public_key': must be a base64"),
    ],
)
def test_agent_errors(conf: Path, line: str, expected: str) -> None:
    key = line.partition(" ")[0]
    text = "".join(x + "\n" for x in AGENT_MINIMAL.splitlines() if not x.startswith(key + " "))
    message = agent_error(conf, text + line + "\n")
    assert message.startswith(f"{conf / 'a.toml'}: {expected}")


def test_agent_missing_required_keys(conf: Path) -> None:
    for line in AGENT_MINIMAL.splitlines():
        key = line.partition(" ")[0]
        message = agent_error(conf, AGENT_MINIMAL.replace(line + "\n", ""))
        option = "--" + key.replace("_", "-")
        assert message == f"{conf / 'a.toml'}: missing required key '{key}' (or give {option})"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"name": "a b"}, "--name: must be a name of"),
        ({"keepalive": "often"}, "--keepalive: must be a number 1-3600, got 'often'"),
        ({"connect_timeout": "nan"}, "--connect-timeout: must be a number 0.1-600, got nan"),
        ({"allow_users": "alice,,bob"}, "--allow-users: must be an array of user names"),
        ({"allow_groups": "a b"}, "--allow-groups: must be an array of group names"),
        ({"allow_groups": f"0,{NO_GROUP}"}, f"--allow-groups: no group named '{NO_GROUP}'"),
        ({"rendezvous": "nowhere"}, '--rendezvous: must be "host:port"'),
        ({"rendezvous_public_key": "zz"}, "--rendezvous-public-key: must be a base64 X25519"),
    ],
)
def test_agent_override_errors(conf: Path, overrides: dict[str, object], expected: str) -> None:
    assert agent_error(conf, AGENT_MINIMAL, overrides).startswith(expected)


def test_agent_pinned_peers(conf: Path) -> None:
    path = write(
        conf / "a.toml",
        AGENT_MINIMAL
        + f'\n[peers.bob]\npublic_key = "{BOB}"\n\n[peers.carol]\npublic_key = "{ALICE}"\n',
    )
    assert load_agent_config(path, {}).pinned_peers == {"bob": BOB, "carol": ALICE}


def test_agent_pinned_peers_not_an_override(conf: Path) -> None:
    with pytest.raises(ValueError):
        load_agent_config(write(conf / "a.toml", AGENT_MINIMAL), {"peers": "x"})


def test_config_repr_hides_private_key(conf: Path) -> None:
    config = load_agent_config(write(conf / "a.toml", AGENT_MINIMAL), {})
    assert config.private_key.to_base64() not in repr(config)


# Example files


def test_example_rendezvous_config(tmp_path: Path) -> None:
    key = PrivateKey.generate()
    write_private_key(tmp_path / "server.key", key)
    config = load_rendezvous_config(
        EXAMPLES / "rendezvous.toml", {"private_key": str(tmp_path / "server.key")}
    )
    assert config.private_key == key
    assert config.peers_path == str(EXAMPLES / "peers.toml")
    assert {name: peer.network for name, peer in config.peers.items()} == {
        "alice": "default",
        "bob": "default",
        "carol": "lab",
    }


def test_example_agent_config(tmp_path: Path) -> None:
    key = PrivateKey.generate()
    write_private_key(tmp_path / "agent.key", key)
    config = load_agent_config(
        EXAMPLES / "agent.toml", {"private_key": str(tmp_path / "agent.key")}
    )
    assert config.private_key == key
    assert config.name == "alice"
    assert config.rendezvous == ("rendezvous.example.net", 3478)
    assert isinstance(config.rendezvous_public_key, PublicKey)


def test_example_key_paths_are_relative() -> None:
    """
    Installed next to their key files in /etc/punchd, the examples find them.
    """
    for name in ("rendezvous.toml", "agent.toml"):
        data = tomllib.loads((EXAMPLES / name).read_text())
        assert not os.path.isabs(data["private_key"])


@pytest.mark.parametrize(
    ("name", "cls"), [("rendezvous.toml", RendezvousConfig), ("agent.toml", AgentConfig)]
)
def test_examples_document_every_key(name: str, cls: type) -> None:
    """
    Every key is in the example; an optional one appears commented out with
    its default value, so that the example doubles as the reference.
    """
    text = (EXAMPLES / name).read_text()
    for s in settings(cls).values():
        if s.required:
            assert re.search(rf"^{s.key} = ", text, re.MULTILINE), s.key
            continue
        if isinstance(s.default, dict):  # tables
            assert re.search(rf"^# \[{s.key}\.", text, re.MULTILINE), s.key
            continue
        match = re.search(rf"^# {s.key} = (.*)$", text, re.MULTILINE)
        assert match, s.key
        value = tomllib.loads(f"v = {match.group(1)}")["v"]
        default = list(s.default) if isinstance(s.default, tuple) else s.default
        assert value == default, s.key
        assert f"Default: {match.group(1)}." in text, s.key


@pytest.mark.parametrize("cls", [RendezvousConfig, AgentConfig])
def test_every_field_is_a_setting_or_derived(cls: type) -> None:
    """
    The settings table is the fields declared with setting(); the others are
    what the loader derives (the key itself, the rendezvous's peers).
    """
    derived = {f.name for f in dataclasses.fields(cls)} - {s.field for s in settings(cls).values()}
    assert derived <= {"private_key", "peers"}
    assert all(s.help.endswith(".") for s in settings(cls).values())
