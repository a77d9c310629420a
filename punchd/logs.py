"""
Log output for both daemons: text lines for people and journald, JSON lines
for machines.

Both launchers, twistd and twist, are told while they parse their options
to log punchd's lines at punchd's level (L{adopt_launcher}).
"""

from __future__ import annotations

import functools
import json
import os
import socket
import string
import sys
from typing import IO, Any

from twisted.application import service
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LegacyLogObserverWrapper,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
)
from zope.interface import implementer


def _debug() -> bool:
    return "PUNCHD_DEBUG" in os.environ


def _level() -> LogLevel:
    level: LogLevel = LogLevel.debug if _debug() else LogLevel.info
    return level


@implementer(ILogObserver)
class JSONLines:
    """
    One JSON object per line: time, level, namespace, the formatted message,
    and the event's own named fields (those its format string uses).
    """

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def __call__(self, event: dict[str, Any]) -> None:
        record: dict[str, Any] = {
            "time": event.get("log_time"),
            "level": getattr(event.get("log_level"), "name", "info"),
            "namespace": event.get("log_namespace"),
            "message": formatEvent(event),
        }
        for _, field, _, _ in string.Formatter().parse(event.get("log_format") or ""):
            name = (field or "").split(".")[0].split("[")[0].split("!")[0]
            if name and name in event and name not in record:
                value = event[name]
                record[name] = value if isinstance(value, (int, float, bool)) else str(value)
        failure = event.get("log_failure")
        if failure is not None:
            record["traceback"] = failure.getTraceback()
        self._stream.write(json.dumps(record, default=str) + "\n")
        self._stream.flush()


@implementer(ILogObserver)
class TextLines:
    """
    One line per event: C{[namespace] level: message}, with a timestamp
    unless journald (which adds its own) is reading.
    """

    def __init__(self, stream: IO[str], timestamps: bool) -> None:
        self._stream = stream
        self._timestamps = timestamps

    def __call__(self, event: dict[str, Any]) -> None:
        text = formatEventAsClassicLogText(
            event, formatTime=(lambda t: "") if not self._timestamps else _iso
        )
        if not text:
            return
        if not self._timestamps:
            text = text.lstrip()
        self._stream.write(text)
        self._stream.flush()


def _iso(when: float | None) -> str:
    """
    twisted.logger's timestamp, which has whole seconds, made once per
    second: a registration storm logs thousands of lines a second, and a
    time zone, a datetime and a strftime for each cost the rendezvous a
    tenth of its CPU (docs/scale-out.rst).
    """
    return "-" if when is None else _second(int(when))


@functools.lru_cache(maxsize=2)
def _second(when: int) -> str:
    return formatTime(when)


def lines(log_format: str, stream: IO[str] | None = None) -> ILogObserver:
    """
    punchd's lines for C{log_format} ("text" or "json"), every level.
    """
    out = stream if stream is not None else sys.stdout
    if log_format == "json":
        return JSONLines(out)
    return TextLines(out, timestamps="JOURNAL_STREAM" not in os.environ)


def _filtered(inner: ILogObserver) -> ILogObserver:
    return FilteringLogObserver(inner, [LogLevelFilterPredicate(defaultLogLevel=_level())])


def observer(log_format: str, stream: IO[str] | None = None) -> ILogObserver:
    """
    punchd's lines for C{log_format}, at info level (debug when PUNCHD_DEBUG
    is set).
    """
    return _filtered(lines(log_format, stream))


#: What L{twistd_observer} needs, recorded while twistd parses its options.
_twistd: dict[str, Any] = {}


def adopt_launcher(options: Any, log_format: str) -> None:
    """
    Make the launcher log punchd's lines at punchd's level; a daemon's
    options call this once parsed, when C{options.parent} is the launcher's.

    twistd logs every level unless told otherwise, and its one hook that
    wins over C{--logfile} and the application is C{--logger}, the dotted
    name of a factory, which we fill in unless the user did.  C{twist}
    reads its observer factory and level from its own options.
    """
    parent = getattr(options, "parent", None)
    if parent is None:
        return
    if "fileLogObserverFactory" in parent:  # twist
        parent["fileLogObserverFactory"] = lambda out: lines(log_format, out)
        parent["logFormat"] = log_format
        if _debug():
            parent["logLevel"] = LogLevel.debug
    elif "logger" in parent and parent["logger"] is None:  # twistd
        _twistd.update(options=parent, log_format=log_format)
        parent["logger"] = f"{__name__}.twistd_observer"


def twistd_observer() -> ILogObserver:
    """
    twistd's C{--logger} factory: punchd's lines in the foreground on
    stdout; twistd's own text at punchd's level for C{--logfile}, a
    daemon's C{twistd.log}, or C{--syslog}.
    """
    options = _twistd["options"]
    if (
        options.get("nodaemon")
        and not options.get("syslog")
        and (options.get("logfile") or "-") == "-"
    ):
        return observer(_twistd["log_format"])
    from twisted.scripts._twistd_unix import UnixAppLogger

    own = UnixAppLogger(options)._getLogObserver()
    if not ILogObserver.providedBy(own):  # syslog's is a legacy observer
        own = LegacyLogObserverWrapper(own)
    return _filtered(own)


def notify_ready() -> None:
    """
    Tell systemd (Type=notify) that the daemon is up: its signal handlers
    are in place and its sockets listen.  A no-op outside systemd.
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.sendto(b"READY=1", address)
    except OSError:
        pass


class LoggingService(service.MultiService):
    """
    A daemon's top service.  Logging itself is set up by L{adopt_launcher}
    while the launcher parses options, before any service exists.
    """

    def __init__(self, log_format: str) -> None:
        super().__init__()
        self.log_format = log_format
