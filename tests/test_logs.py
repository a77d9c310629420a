"""
What the daemons log, run by twistd and by twist as users run them: debug
lines only with PUNCHD_DEBUG, and the config's log_format under both.
"""

from __future__ import annotations

import io
import re
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from twisted.logger import LogLevel, formatTime

from netlab.deployment import TWIST, Deployment
from punchd import client
from punchd.logs import TextLines

BIN = Path(sys.executable).parent
#: A punchd text line: time, [namespace#level], message.
TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\S* \[[\w.#-]+\] ")


def launcher(prefix: Sequence[str], debug: bool) -> Any:
    """
    Starts a daemon with C{prefix} instead of the deployment's twist, with
    PUNCHD_DEBUG set or not, and outside journald.
    """

    def launch(argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        env = {
            k: v
            for k, v in kwargs.pop("env").items()
            if k not in ("PUNCHD_DEBUG", "JOURNAL_STREAM")
        }
        if debug:
            env["PUNCHD_DEBUG"] = "1"
        return subprocess.Popen([*prefix, *argv[len(TWIST) :]], env=env, **kwargs)

    return launch


LAUNCHERS = {
    "twistd": [str(BIN / "twistd"), "-n", "--pidfile="],
    "twist": [str(BIN / "twist")],
}
AGENTS = [(launch, debug) for launch in LAUNCHERS for debug in (False, True)]


def agent_name(launch: str, debug: bool) -> str:
    return f"{launch}-debug" if debug else launch


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    with Deployment(tmp_path_factory.mktemp("logs")) as d:
        for launch, debug in AGENTS:
            d.add_agent(agent_name(launch, debug))
        d.add_agent("twistd-file")
        d.start_rendezvous()
        yield d


@pytest.mark.parametrize(("launch", "debug"), AGENTS)
def test_a_status_request_logs_debug_lines_only_with_punchd_debug(
    deployment: Deployment, launch: str, debug: bool
) -> None:
    name = agent_name(launch, debug)
    agent = deployment.start_agent(name, launcher(LAUNCHERS[launch], debug))
    assert client.status(socket_path=agent.socket_path)["name"] == name
    deployment.stop_agent(name)  # its log is complete once it has exited
    lines = [line for line in agent.log.read_text().splitlines() if line.strip()]
    assert any("control socket listening" in line for line in lines)
    # punchd's text lines whatever the launcher: no twist JSON events.
    assert all(TEXT_LINE.match(line) for line in lines), lines
    debug_lines = [line for line in lines if "#debug]" in line]
    if debug:
        assert any("control status id=" in line for line in debug_lines), lines
    else:
        assert debug_lines == []


def test_twistd_logfile_gets_its_own_text_without_debug_lines(deployment: Deployment) -> None:
    logfile = deployment.root / "twistd-file.log"
    prefix = [*LAUNCHERS["twistd"], f"--logfile={logfile}"]
    agent = deployment.start_agent("twistd-file", launcher(prefix, debug=False))
    client.status(socket_path=agent.socket_path)
    deployment.stop_agent("twistd-file")
    lines = logfile.read_text().splitlines()
    assert any("registered with rendezvous" in line for line in lines), lines
    assert not any("#debug]" in line or "control status" in line for line in lines), lines


def test_text_lines_are_stamped_with_the_second_of_each_event() -> None:
    out = io.StringIO()
    observer = TextLines(out, timestamps=True)
    times = [1_700_000_000.2, 1_700_000_000.9, 1_700_000_001.1, 1_700_000_000.5]
    for when in times:
        observer(
            {
                "log_format": "line",
                "log_time": when,
                "log_level": LogLevel.info,
                "log_namespace": "punchd.test",
            }
        )
    stamps = [line.split(" ")[0] for line in out.getvalue().splitlines()]
    assert stamps == [formatTime(when) for when in times]
    assert stamps[0] == stamps[1] != stamps[2]
