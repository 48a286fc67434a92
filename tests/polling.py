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


# A bound on a run that only catches a hang: 10x what the slowest of these runs (a `netplug`
# process: interpreter start, imports, one parse; an in-process hook) takes on a loaded 2-core
# VM. Speed is measured in bench/, never asserted here.
HANG_SECONDS = 10.0


def assert_no_hang(elapsed: float, what: str = "the run") -> None:
    assert elapsed < HANG_SECONDS, f"{what} took {elapsed:.1f} s: hung?"
