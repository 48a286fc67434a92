"""Waiting for an outcome that another thread or process produces (the agent's worker, a
daemon, libvirtd): poll a predicate until it holds or time runs out."""

from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


def wait_for(pred: Callable[[], T], timeout: float = 10.0, what: str = "condition",
             detail: Callable[[], str] | None = None, interval: float = 0.01) -> T:
    """Return pred()'s first truthy value; AssertionError naming ``what`` after ``timeout``,
    with the tail of ``detail()`` (e.g. a daemon's log) when given."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            tail = f"\n--- log ---\n{detail()[-3000:]}" if detail else ""
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}{tail}")
        time.sleep(interval)
