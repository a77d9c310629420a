"""
Log output for both daemons: text lines for people and journald, JSON lines
for machines.

twistd picks its log observer from the application's ILogObserver component
when there is one, so a daemon's service installs ours as it joins the
application (L{LoggingService}); without a reason to, twistd's own stays.
"""

from __future__ import annotations

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
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    formatEventAsClassicLogText,
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
    from twisted.logger import formatTime

    return formatTime(when)


def observer(log_format: str, stream: IO[str] | None = None) -> ILogObserver:
    """
    The observer for C{log_format} ("text" or "json"), at info level
    (debug when PUNCHD_DEBUG is set).
    """
    out = stream if stream is not None else sys.stdout
    if log_format == "json":
        inner: ILogObserver = JSONLines(out)
    else:
        inner = TextLines(out, timestamps="JOURNAL_STREAM" not in os.environ)
    return FilteringLogObserver(inner, [LogLevelFilterPredicate(defaultLogLevel=_level())])


def wanted(log_format: str) -> bool:
    """
    Whether punchd's observer should replace the launcher's own: JSON was
    asked for, journald is reading, or debug lines are.
    """
    return log_format == "json" or "JOURNAL_STREAM" in os.environ or _debug()


def adopt_launcher(options: Any, log_format: str) -> None:
    """
    Under C{twist}, whose runner reads its log observer factory from the
    parent options rather than from the application, put punchd's there.
    """
    parent = getattr(options, "parent", None)
    if parent is not None and "fileLogObserverFactory" in parent and wanted(log_format):
        parent["fileLogObserverFactory"] = lambda out: observer(log_format, out)


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
    A daemon's top service: installs punchd's log observer into the
    application when JSON was asked for, when running under systemd, or
    when PUNCHD_DEBUG is set.
    """

    def __init__(self, log_format: str) -> None:
        super().__init__()
        self.log_format = log_format

    def setServiceParent(self, parent: Any) -> None:
        if wanted(self.log_format) and hasattr(parent, "setComponent"):
            parent.setComponent(ILogObserver, observer(self.log_format))
        super().setServiceParent(parent)
