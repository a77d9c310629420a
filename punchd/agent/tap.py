"""
twistd plugin glue for the agent: C{twistd -n punch-agent --config FILE}.
"""

from __future__ import annotations

import os
from typing import Any, NoReturn

from twisted.application import service
from twisted.internet.defer import Deferred
from twisted.python import usage

from punchd.agent.control import (
    Authorizer,
    ControlFactory,
    ControlService,
    ControlSocketError,
    clear_stale_socket,
)
from punchd.agent.core import Agent
from punchd.config import AgentConfig, ConfigError, load_agent_config, refuse_to_start
from punchd.logs import LoggingService, adopt_launcher, notify_ready

OVERRIDABLE = (
    "name",
    "private-key",
    "rendezvous",
    "rendezvous-public-key",
    "control-socket",
    "keepalive",
    "connect-timeout",
    "log-format",
)


class Options(usage.Options):
    """
    Command-line options; each overrides the config key of the same name.
    """

    synopsis = "[--config FILE] [options]"
    longdesc = (
        "The punchd agent: registers with a rendezvous server, punches direct UDP "
        "paths to peers, and hands the connected sockets to local programs over "
        "its control socket."
    )
    optParameters = [
        ["config", "c", None, "TOML config file (keys: name, private_key, rendezvous, ...)."],
        ["name", "n", None, "This agent's name, as the rendezvous's peers file lists it."],
        ["private-key", "k", None, "This agent's private key file (config key 'private_key')."],
        ["rendezvous", "r", None, "The rendezvous server, host:port (config key 'rendezvous')."],
        [
            "rendezvous-public-key",
            None,
            None,
            "The rendezvous server's public key, base64 (config key 'rendezvous_public_key').",
        ],
        [
            "control-socket",
            "s",
            None,
            "Unix socket for local programs (default /run/punchd/agent.sock).",
        ],
        ["keepalive", None, None, "Seconds between registration refreshes (default 20)."],
        ["connect-timeout", None, None, "Default seconds a tunnel may take (default 10)."],
        [
            "log-format",
            None,
            None,
            "text or json: JSON lines on stdout, for log collectors (default text).",
        ],
    ]

    def postOptions(self) -> None:
        overrides = {key.replace("-", "_"): self[key] for key in OVERRIDABLE}
        try:
            self["settings"] = load_agent_config(self["config"], overrides)
        except ConfigError as e:
            _die(str(e))
        adopt_launcher(self, self["settings"].log_format)


def _die(message: str) -> NoReturn:
    refuse_to_start("punch-agent", message)


class AgentService(service.Service):
    """
    Runs the agent core while the application runs.
    """

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self.agent.start()
        notify_ready()

    def stopService(self) -> Deferred[None] | None:
        super().stopService()  # type: ignore[no-untyped-call]
        return self.agent.stop()


def makeService(config: Options, reactor: Any = None) -> service.IService:
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    settings: AgentConfig = config["settings"]
    path = settings.control_socket
    try:
        authorizer = Authorizer(settings.allow_users, settings.allow_groups)
        directory = os.path.dirname(path) or "."
        if not os.path.isdir(directory):
            raise ControlSocketError(
                f"the directory of control_socket {path} does not exist "
                "(systemd's RuntimeDirectory=punchd creates /run/punchd)"
            )
        clear_stale_socket(path)
    except (ControlSocketError, ValueError, KeyError) as e:
        _die(str(e))
    agent = Agent(settings, reactor)
    parent = LoggingService(settings.log_format)
    AgentService(agent).setServiceParent(parent)
    factory = ControlFactory(agent, authorizer, connect_timeout=settings.connect_timeout)
    ControlService(reactor, path, factory).setServiceParent(parent)
    return parent
