"""
What a user's wheel holds: punchd and its Twisted plugin, never the NAT lab.
"""

from __future__ import annotations

import configparser
from pathlib import Path

from setuptools import find_namespace_packages

ROOT = Path(__file__).resolve().parent.parent


def shipped_packages() -> list[str]:
    """
    The packages setup.cfg's C{find_namespace:} rules select, as a build would.
    """
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    rules = config["options.packages.find"]
    return find_namespace_packages(
        where=str(ROOT),
        include=rules.get("include", "").split(),
        exclude=rules.get("exclude", "").split(),
    )


def test_the_wheel_ships_punchd_and_its_plugin_but_not_the_lab() -> None:
    packages = shipped_packages()
    assert {"punchd", "punchd.agent", "punchd.rendezvous", "twisted.plugins"} <= set(packages)
    assert not [p for p in packages if "netlab" in p or p.startswith(("tests", "bench"))]
    assert (ROOT / "netlab" / "lab.py").exists()
