"""
What a user's wheel holds, and what the developer's editable install offers.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from hatchling.build import build_wheel

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """
    The wheel C{pip install .} would install, built once by the project's backend.
    """
    out = tmp_path_factory.mktemp("wheel")
    here = os.getcwd()
    os.chdir(ROOT)
    try:
        return out / build_wheel(str(out))
    finally:
        os.chdir(here)


def test_the_wheel_holds_punchd_its_plugin_examples_and_licence(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert "punchd/stun.py" in names
    assert "twisted/plugins/punchd_plugins.py" in names
    assert not [n for n in names if n.startswith("twisted/") and n.endswith("__init__.py")]
    etc = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "etc").rglob("*") if p.is_file())
    assert etc and all(f"punchd/{name}" in names for name in etc)
    assert [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]


def test_the_wheel_leaves_out_the_lab_tests_and_benchmarks(wheel: Path) -> None:
    tops = {n.split("/")[0] for n in zipfile.ZipFile(wheel).namelist()}
    assert tops == {"punchd", "twisted", wheel.name.split("-py3")[0] + ".dist-info"}
    assert not [n for n in zipfile.ZipFile(wheel).namelist() if "netlab" in n]


def test_building_leaves_no_build_directory(wheel: Path) -> None:
    assert wheel.exists()
    assert not (ROOT / "build").exists()


def test_installed_examples_are_package_data(wheel: Path, tmp_path: Path) -> None:
    zipfile.ZipFile(wheel).extractall(tmp_path)
    where = subprocess.run(
        [sys.executable, "-c", "from punchd import examples; print(examples.directory())"],
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=str(tmp_path)),
        capture_output=True,
        text=True,
        check=True,
    )
    assert where.stdout.strip() == str(tmp_path / "punchd" / "etc")


def test_twistd_lists_the_plugins_from_anywhere(tmp_path: Path) -> None:
    twistd = Path(sys.executable).with_name("twistd")
    shown = subprocess.run(
        [str(twistd), "--help"], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    commands = {line.split()[0] for line in shown.stdout.splitlines() if line.startswith("    ")}
    assert {"rendezvous", "punch-agent"} <= commands
