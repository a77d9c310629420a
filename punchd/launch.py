"""
What the two daemons' twistd plugins share: command-line options derived
from the settings table, a pid file named after the daemon, and refusing to
start in one line with EX_CONFIG when a port or socket cannot be had.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any, NoReturn, Protocol, TypeVar

from twisted.internet.error import CannotListenError
from twisted.python import usage

from punchd.config import ConfigError, refuse_to_start, settings
from punchd.logs import LoggingService, adopt_launcher, notify_ready

#: twistd's own default, which two daemons started in one directory share.
_TWISTD_PIDFILE = "twistd.pid"


def _shown(default: object) -> str:
    """
    A default as an option would take it.
    """
    if isinstance(default, float):
        return f"{default:g}"
    if isinstance(default, tuple):
        return ",".join(map(str, default)) or '"" (none)'
    if default == "":
        return '""'
    return str(default)


def option_parameters(cls: type) -> list[list[Any]]:
    """
    C{optParameters} for config class C{cls}: C{--config}, then one option
    per setting that has one, named after its key, its help ending with
    its default.  Values stay None unless given, so that only options
    actually given override the file.
    """
    table: list[list[Any]] = [
        ["config", "c", None, "TOML config file; the options below override its keys."]
    ]
    for s in settings(cls).values():
        if s.option:
            more = (
                "Required, here or in the file." if s.required else f"Default: {_shown(s.default)}."
            )
            text = f"{s.help} {more}"
            table.append([s.option_name[2:], s.short, None, text])
    return table


class _Settings(Protocol):
    @property
    def log_format(self) -> str: ...


_S = TypeVar("_S", bound=_Settings)


def configure(
    options: usage.Options,
    program: str,
    cls: type[_S],
    load: Callable[[str | None, Mapping[str, object]], _S],
) -> _S:
    """
    Load the daemon's settings from C{--config} and the options (the
    twistd plugin's C{postOptions}), or refuse to start.
    """
    overrides = {s.key: options[s.option_name[2:]] for s in settings(cls).values() if s.option}
    try:
        loaded = load(options["config"], overrides)
    except ConfigError as e:
        refuse_to_start(program, str(e))
    launcher = getattr(options, "parent", None)
    if launcher is not None and launcher.get("pidfile") == _TWISTD_PIDFILE:
        # Runs before twistd's own postOptions makes the path absolute.
        launcher["pidfile"] = f"{program}.pid"
    adopt_launcher(options, loaded.log_format)
    return loaded


def cannot_listen(error: CannotListenError) -> str:
    """
    One line for a port the daemon could not have.
    """
    host = error.interface or "*"
    where = f"[{host}]:{error.port}" if ":" in host else f"{host}:{error.port}"
    reason = error.socketError
    if isinstance(reason, OSError):
        text = reason.strerror or str(reason)
        if reason.errno == errno.EADDRINUSE:
            text += " (another process has it)"
    else:
        text = str(reason)
    return f"cannot listen on {where}: {text}"


class StartRefused(Exception):
    """
    A daemon could not start: its message is the one line to show.
    """


class DaemonService(LoggingService):
    """
    A daemon's top service.  When a child cannot have its port or socket
    (one of C{refusals}, or L{CannotListenError}), the daemon stops with
    one line and EX_CONFIG, as for a config error, and takes its pid file
    along; once everything started, it tells systemd it is ready.
    """

    def __init__(
        self,
        log_format: str,
        program: str,
        launcher: Mapping[str, Any] | None,
        refusals: tuple[type[Exception], ...] = (),
    ) -> None:
        super().__init__(log_format)
        self._program = program
        self._launcher = launcher or {}
        self._refusals: tuple[type[Exception], ...] = (CannotListenError, *refusals)

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()  # type: ignore[no-untyped-call]
        except self._refusals as e:
            self._refuse(e)

    def startService(self) -> None:
        try:
            super().startService()
        except self._refusals as e:
            self._refuse(e)
        notify_ready()

    def _refuse(self, error: Exception) -> NoReturn:
        message = cannot_listen(error) if isinstance(error, CannotListenError) else str(error)
        if self._launcher.get("statusPipe") is not None:
            # Daemonized, with stderr gone: twistd passes this line to the
            # parent, which prints it, and removes the pid file.
            raise StartRefused(message) from None
        pidfile = self._launcher.get("pidfile")
        if pidfile:
            _remove_own_pidfile(pidfile)
        # twistd sends sys.stderr to its log by now; the line goes to the terminal.
        refuse_to_start(self._program, message, sys.__stderr__)


def _remove_own_pidfile(path: str) -> None:
    """
    Remove the pid file twistd wrote for this process, which twistd leaves
    behind when a daemon exits before its reactor runs.
    """
    try:
        with open(path) as f:
            ours = int(f.read().strip() or 0) == os.getpid()
        if ours:
            os.unlink(path)
    except (OSError, ValueError):
        pass
