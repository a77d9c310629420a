"""Netlab tests build real NATs: they need root, and under CI they must run."""

import os
from collections.abc import Iterator

import pytest

from netlab import lab as netlab


def requires_root() -> None:
    """Skip the calling test when no lab can be built here; under ``CI=true`` fail instead."""
    reason = netlab.unavailable_reason()
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true, so the NAT lab must run, but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Decide before any lab fixture runs, so that no fixture fails for lack of root."""
    if item.get_closest_marker("netlab") is not None:
        requires_root()


@pytest.fixture
def lab() -> Iterator[netlab.Lab]:
    """A fresh lab for one test, torn down after it."""
    with netlab.Lab() as lab:
        yield lab
