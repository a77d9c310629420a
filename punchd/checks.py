"""
Checks for config values: each turns what a TOML file (or an option,
parsed) holds into the value the daemons use, or raises L{Invalid}.

A check says what was expected but not where: L{punchd.config} knows
whether the value came from a file or from the command line and puts the
file and key, or the option, in front of the message.
"""

from __future__ import annotations

import grp
import ipaddress
import math
import os
import pwd
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from punchd.keys import PrivateKey, PublicKey
from punchd.wire import NAME_RE

# Linux sun_path holds 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107

NAME_RULE = "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"


class Invalid(Exception):
    """
    A value is wrong; the message says what was expected.
    """


@dataclass(frozen=True)
class Place:
    """
    Where a value was written: the config file (None on the command line)
    and the directory its relative paths resolve against.
    """

    file: str | None
    base: str


#: A check: (TOML value or parsed option, where it was written) -> config value.
Check = Callable[[Any, Place], Any]


def show(value: object) -> str:
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


# Parsers of option text into what the TOML file would hold.  A parser keeps
# text it cannot parse, so that the check quotes what the user typed.


def int_text(text: str) -> Any:
    try:
        return int(text.strip())
    except ValueError:
        return text


def float_text(text: str) -> Any:
    try:
        return float(text.strip())
    except ValueError:
        return text


def list_text(text: str) -> list[str]:
    """
    A comma-separated option; the empty string is the empty list, so an
    option can clear what the file sets.
    """
    return [item.strip() for item in text.split(",")] if text.strip() else []


def integer(low: int, high: int) -> Check:
    def check(value: Any, place: Place) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise Invalid(f"must be an integer {low}-{high}, got {show(value)}")
        return value

    return check


def number(low: float, high: float | None) -> Check:
    expected = f"a number {low:g}-{high:g}" if high is not None else f"a number >= {low:g}"

    def check(value: Any, place: Place) -> float:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value < low
            or (high is not None and value > high)
        ):
            raise Invalid(f"must be {expected}, got {show(value)}")
        return float(value)

    return check


def choice(*options: str) -> Check:
    expected = " or ".join(repr(o) for o in options)

    def check(value: Any, place: Place) -> str:
        if not isinstance(value, str) or value not in options:
            raise Invalid(f"must be {expected}, got {show(value)}")
        return value

    return check


def name(value: Any, place: Place) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise Invalid(f"must be a name of {NAME_RULE}, got {show(value)}")
    return value


def interface(value: Any, place: Place) -> str:
    if value == "":
        return ""
    if isinstance(value, str):
        try:
            ipaddress.ip_address(value)
        except ValueError:
            pass
        else:
            return value
    raise Invalid(f'must be "" (all IPv4 interfaces) or an IP address, got {show(value)}')


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


def address(value: Any, place: Place) -> tuple[str, int]:
    """
    C{"host:port"} or C{"[IPv6]:port"}, as (host, port).
    """
    expected = f'must be "host:port" or "[IPv6]:port" with port 1-65535, got {show(value)}'
    if not isinstance(value, str):
        raise Invalid(expected)
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            sep = ""
    else:
        host, sep, port = value.rpartition(":")
        if ":" in host:
            raise Invalid(f"{expected}; write IPv6 addresses in brackets, as [2001:db8::1]:3478")
        if not _is_hostname(host):
            sep = ""
    if not sep or not re.fullmatch(r"[0-9]{1,5}", port) or not 1 <= int(port) <= 65535:
        raise Invalid(expected)
    return host, int(port)


def public_key(value: Any, place: Place) -> PublicKey:
    if not isinstance(value, str):
        raise Invalid(f"must be a base64 X25519 public key, got {show(value)}")
    try:
        return PublicKey.from_base64(value)
    except ValueError as e:
        raise Invalid(f"must be a base64 X25519 public key, got {show(value)} ({e})") from None


def path(value: Any, place: Place) -> str:
    if not isinstance(value, str) or not value or "\0" in value:
        raise Invalid(f"must be a file path, got {show(value)}")
    return os.path.normpath(os.path.join(place.base, value))


def key_path(value: Any, place: Place) -> str:
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
            raise Invalid(
                "must be the path of a key file, not the key itself"
                " (write one with: punchctl keygen FILE)"
            )
    return path(value, place)


def socket_path(value: Any, place: Place) -> str:
    resolved = path(value, place)
    if len(os.fsencode(resolved)) > _MAX_SOCKET_PATH:
        raise Invalid(
            f"must be a path of at most {_MAX_SOCKET_PATH} bytes (a Unix socket limit),"
            f" got {show(resolved)}"
        )
    return resolved


def _id_list(what: str, lookup: Callable[[str], object]) -> Check:
    """
    User or group names or numeric ids.  A name is looked up at once: the
    agent must not start with an allow list that silently allows nobody.
    """
    expected = f"must be an array of {what} names or numeric ids"

    def check(value: Any, place: Place) -> tuple[str, ...]:
        if not isinstance(value, list):
            raise Invalid(f"{expected}, got {show(value)}")
        for item in value:
            if isinstance(item, bool) or not (
                (isinstance(item, int) and item >= 0)
                or (isinstance(item, str) and item and not re.search(r"[\s,]", item))
            ):
                raise Invalid(f"{expected}, got {show(item)} in the array")
        names = [item for item in value if isinstance(item, str) and not item.isdigit()]
        for item in names:
            try:
                lookup(item)
            except (KeyError, ValueError):
                raise Invalid(f"no {what} named {item!r} on this system") from None
        return tuple(str(item) for item in value)

    return check


users = _id_list("user", pwd.getpwnam)
groups = _id_list("group", grp.getgrnam)
