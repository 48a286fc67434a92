"""Waiting for an outcome that another thread or process produces (the agent's worker, a
daemon, libvirtd): poll a predicate until it holds or time runs out."""

from __future__ import annotations

import contextlib
import signal
import time
from typing import Callable, Iterator, TypeVar

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


# A bound on a wait that only catches a hang: 10x what the slowest of these waits (a `netplug`
# process: interpreter start, imports, one parse; an in-process hook) takes on a loaded 2-core
# VM. Speed is measured in bench/, never asserted here: tests bound hangs with the timeouts of
# their subprocesses and children, or with hang_guard.
HANG_SECONDS = 10.0


@contextlib.contextmanager
def hang_guard(what: str, seconds: float = 6 * HANG_SECONDS) -> Iterator[None]:
    """Fail, instead of hanging the whole run, if the block is still running after ``seconds``
    (SIGALRM; main thread). For code that would block forever if it were wrong, e.g. a write
    to a socket nobody reads; never a measure of speed."""
    def hung(_signum, _frame):
        raise AssertionError(f"{what}: still running after {seconds:g} s: hung")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
