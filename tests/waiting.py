"""Bounded waits for tests that watch a cluster change."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest


def wait_for(
    what: str,
    check: Callable[[], bool],
    timeout: float,
    every: float = 0.1,
    detail: Callable[[], object] | None = None,
) -> float:
    """Seconds until check() holds; fails the test with `what` (and detail()) after timeout."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if check():
            return time.monotonic() - start
        time.sleep(every)
    pytest.fail(f"{what} did not happen within {timeout} s" + (f": {detail()}" if detail else ""))
