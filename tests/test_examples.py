"""
Tests for L{punchd.examples}: etc/'s files, listed, printed and copied.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from punchd import examples

ETC = Path(__file__).resolve().parent.parent / "etc"
EXPECTED = sorted(str(p.relative_to(ETC)) for p in ETC.rglob("*") if p.is_file())


def punchctl(*argv: str) -> int:
    """
    Run the C{examples} command as punchctl's parser would.
    """
    parser = argparse.ArgumentParser(prog="punchctl")
    examples.add_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


def test_lists_every_file_of_etc(capsys: pytest.CaptureFixture[str]) -> None:
    assert "punchd/agent.toml" in EXPECTED and "sysusers.d/punchd.conf" in EXPECTED
    assert punchctl("examples") == 0
    assert capsys.readouterr().out.split() == EXPECTED


@pytest.mark.parametrize("name", ["agent.toml", "systemd/punchd-agent.service"])
def test_prints_one_by_name_or_path(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert punchctl("examples", name) == 0
    assert capsys.readouterr().out == next(ETC.rglob(Path(name).name)).read_text()


def test_unknown_name_lists_the_choices(capsys: pytest.CaptureFixture[str]) -> None:
    assert punchctl("examples", "nginx.conf") == 1
    err = capsys.readouterr().err
    assert "no example called 'nginx.conf'" in err and "punchd/peers.toml" in err


def test_copy_writes_the_tree_and_never_overwrites(tmp_path: Path) -> None:
    assert punchctl("examples", "--copy", str(tmp_path / "out")) == 0
    for relative in EXPECTED:
        assert (tmp_path / "out" / relative).read_bytes() == (ETC / relative).read_bytes()
    (tmp_path / "out" / "punchd" / "agent.toml").write_text("mine")
    (tmp_path / "out" / "punchd" / "peers.toml").unlink()
    assert punchctl("examples", "--copy", str(tmp_path / "out")) == 1
    assert (tmp_path / "out" / "punchd" / "agent.toml").read_text() == "mine"
    assert not (tmp_path / "out" / "punchd" / "peers.toml").exists()
