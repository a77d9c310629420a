"""
`make demo` shows the main job: through the NAT lab as root, over loopback otherwise.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from netlab import child_env, demo
from netlab import lab as netlab

SHOWN = [
    "connected to bob via direct",
    "chat across the tunnel:",
    "bob < hello bob, it's alice",
    "alice < hi alice! no relay between us",
    "alice < yes, no daemon needed",
]


@pytest.mark.netlab
def test_demo_through_the_nat_lab() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "netlab.demo"],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for text in [*SHOWN, "behind a carrier-grade NAT", "(srflx -> srflx)", "lab torn down"]:
        assert text in done.stdout, text


def test_demo_over_loopback_without_root(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(netlab, "unavailable_reason", lambda: "not running as root")
    assert demo.main() == 0
    shown = capsys.readouterr().out
    assert "no NAT lab: not running as root" in shown
    for text in SHOWN:
        assert text in shown, text
