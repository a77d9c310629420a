"""
punchd's tests, and what several of their packages share.
"""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> None:
    """
    Poll C{condition} until it holds; fail, naming C{what}, after C{timeout}
    seconds (generous: a busy machine is slow, not wrong).
    """
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)
