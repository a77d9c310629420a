"""
twistd plugin glue for the agent: C{twistd -n punch-agent --config FILE}.
"""

from __future__ import annotations

import os
from typing import Any

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
from punchd.config import AgentConfig, load_agent_config, refuse_to_start
from punchd.launch import DaemonService, configure, option_parameters
from punchd.metrics import FunctionCollector, agent_metrics, metrics_service

PROGRAM = "punch-agent"


class Options(usage.Options):
    """
    C{--config FILE}, and an option per config key (L{option_parameters}).
    """

    synopsis = "[--config FILE] [options]"
    longdesc = (
        "The punchd agent: registers with a rendezvous server, punches direct UDP "
        "paths to peers, and hands the connected sockets to local programs over "
        "its control socket.  Each option overrides the config key of the same "
        "name, with '-' for '_'."
    )
    optParameters = option_parameters(AgentConfig)

    def postOptions(self) -> None:
        self["settings"] = configure(self, PROGRAM, AgentConfig, load_agent_config)


class AgentService(service.Service):
    """
    Runs the agent core while the application runs.
    """

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self.agent.start()

    def stopService(self) -> Deferred[None] | None:
        super().stopService()  # type: ignore[no-untyped-call]
        return self.agent.stop()


def _check_control_socket(path: str) -> None:
    """
    Refuse, before anything starts, a control socket that cannot be ours: a
    missing directory, a file that is not a socket, or a live agent's.
    """
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        raise ControlSocketError(
            f"the directory of control_socket {path} does not exist "
            "(systemd's RuntimeDirectory=punchd creates /run/punchd)"
        )
    clear_stale_socket(path)


def makeService(config: Options, reactor: Any = None) -> service.IService:
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    settings: AgentConfig = config["settings"]
    path = settings.control_socket
    try:
        authorizer = Authorizer(settings.allow_users, settings.allow_groups)
        _check_control_socket(path)
    except (ControlSocketError, ValueError, KeyError) as e:
        refuse_to_start(PROGRAM, str(e))
    agent = Agent(settings, reactor)
    parent = DaemonService(
        settings.log_format, PROGRAM, getattr(config, "parent", None), (ControlSocketError,)
    )
    AgentService(agent).setServiceParent(parent)
    factory = ControlFactory(
        agent, authorizer, connect_timeout=settings.connect_timeout, clock=reactor
    )
    ControlService(reactor, path, factory).setServiceParent(parent)
    collector = FunctionCollector(lambda: agent_metrics(agent, factory.counters))
    metrics = metrics_service(settings.metrics, PROGRAM, collector, reactor)
    if metrics is not None:
        metrics.setServiceParent(parent)
    return parent
