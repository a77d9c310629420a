"""The root check skips locally but never lets CI pass without the lab."""

import pytest

from netlab import lab as netlab
from tests.netlab.conftest import requires_root


def test_lab_needs_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netlab.os, "geteuid", lambda: 1000)
    assert "root" in (netlab.unavailable_reason() or "")


def test_lab_needs_its_tools(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netlab.os, "geteuid", lambda: 0)
    monkeypatch.setattr(netlab.shutil, "which", lambda tool: None if tool == "nft" else tool)
    assert "'nft'" in (netlab.unavailable_reason() or "")


@pytest.mark.parametrize("ci", [None, "false", "1"])
def test_skips_without_root_outside_ci(monkeypatch: pytest.MonkeyPatch, ci: str | None) -> None:
    monkeypatch.setattr(netlab, "unavailable_reason", lambda: "no root here")
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.skip.Exception, match="no root here"):
        requires_root()


def test_fails_without_root_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netlab, "unavailable_reason", lambda: "no root here")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"CI=true.*no root here"):
        requires_root()


def test_passes_when_the_lab_can_be_built(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netlab, "unavailable_reason", lambda: None)
    monkeypatch.setenv("CI", "true")
    requires_root()
