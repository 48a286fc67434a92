"""The agent's work queue: a coalescing dirty set between libvirt's callbacks and the worker.

Callbacks (libvirt's event-loop thread) only mark work here: a dict update under a condition
variable, never a call into libvirt or the kernel. The worker thread takes batches.

Coalescing: a domain is one key however many events arrive for it, and one sync serves them
all. A marked domain becomes due ``debounce`` after its first mark and is rate-limited by a
per-domain token bucket: ``burst`` syncs back to back (a guest change that arrives in two
steps costs no waiting), then one per ``min_interval`` (a guest rewriting its filter hundreds
of times a second costs at most 1/min_interval syncs a second). A full resync covers every
pending domain. Stdlib only; no libvirt, no kernel: testable with a fake clock.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable


@dataclass
class Work:
    """One batch for the worker: a full resync, some domains, or "the connection is gone"."""

    domains: dict[str, tuple[str, ...]] = field(default_factory=dict)  # name -> reasons
    full: str | None = None  # why a full resync is due
    lost: str | None = None  # why the connection is gone
    marked: float | None = None  # clock time of the oldest mark in this batch


@dataclass
class _Pending:
    at: float  # earliest time it may run (now, or later for a retry)
    reasons: set[str]
    marked: float  # when it was first marked


class WorkQueue:
    """The coalescing dirty set between libvirt's callbacks and the worker.

    ``mark``/``mark_full``/``lost``/``stop`` may be called from any thread and never block
    for longer than a dict update; ``take`` is for the one worker.
    """

    def __init__(self, debounce: float = 0.0, min_interval: float = 0.0, burst: int = 3,
                 clock: Callable[[], float] = time.monotonic):
        self.debounce = debounce
        self.min_interval = min_interval
        self.burst = max(1, burst)
        self._clock = clock
        self._cond = threading.Condition()
        self._pending: dict[str, _Pending] = {}
        self._full_at: float | None = None
        self._full_reason = ""
        self._lost: str | None = None
        self._stopping = False
        # Per-domain token bucket: ``burst`` syncs back to back, then one per min_interval.
        self._tokens: dict[str, tuple[float, float]] = {}  # name -> (tokens, as of when)
        self.counts: dict[str, int] = {}  # marks by event kind (for metrics)

    @property
    def stopping(self) -> bool:
        return self._stopping

    def mark(self, name: str, reason: str, delay: float = 0.0) -> None:
        now = self._clock()
        with self._cond:
            kind = reason.split(" ", 1)[0]
            self.counts[kind] = self.counts.get(kind, 0) + 1
            p = self._pending.get(name)
            if p is None:
                self._pending[name] = _Pending(now + delay, {reason}, now)
            else:
                p.at = min(p.at, now + delay)
                p.reasons.add(reason)
            self._cond.notify()

    def mark_full(self, reason: str, delay: float = 0.0) -> None:
        at = self._clock() + delay
        with self._cond:
            kind = reason.split(" ", 1)[0]
            self.counts[kind] = self.counts.get(kind, 0) + 1
            if self._full_at is None or at < self._full_at:
                self._full_at, self._full_reason = at, reason
            self._cond.notify()

    def lost(self, reason: str) -> None:
        with self._cond:
            self._lost = reason
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    def done(self, names: Iterable[str]) -> None:
        """The worker finished syncing these domains: each spends one token."""
        if self.min_interval <= 0:
            return
        now = self._clock()
        with self._cond:
            for n in names:
                self._tokens[n] = (self._tokens_now(n, now) - 1.0, now)

    def _tokens_now(self, name: str, now: float) -> float:
        tokens, when = self._tokens.get(name, (float(self.burst), now))
        return min(float(self.burst), tokens + (now - when) / self.min_interval)

    def sleep(self, seconds: float) -> bool:
        """Wait (backoff between reconnects); True if the agent is stopping."""
        deadline = self._clock() + seconds
        with self._cond:
            while not self._stopping:
                left = deadline - self._clock()
                if left <= 0:
                    break
                self._cond.wait(left)
            return self._stopping

    def pending(self) -> dict[str, tuple[str, ...]]:
        with self._cond:
            return {n: tuple(sorted(p.reasons)) for n, p in self._pending.items()}

    def _due(self, name: str, p: _Pending, now: float) -> float:
        due = p.at + self.debounce
        if self.min_interval > 0 and name in self._tokens:
            missing = 1.0 - self._tokens_now(name, now)
            if missing > 0:
                due = max(due, now + missing * self.min_interval)
        return due

    def take(self, timeout: float | None = None) -> Work | None:
        """Block until work is due; None when stopping (or, with a timeout, an empty Work)."""
        deadline = None if timeout is None else self._clock() + timeout
        with self._cond:
            while True:
                if self._stopping:
                    return None
                now = self._clock()
                if self._lost is not None:
                    reason, self._lost = self._lost, None
                    return Work(lost=reason)
                if self._full_at is not None and self._full_at <= now:
                    # A full resync reads everything: pending domains are covered by it.
                    reason = self._full_reason
                    self._full_at, self._full_reason = None, ""
                    self._pending.clear()
                    return Work(full=reason)
                ready = {n: p for n, p in self._pending.items() if self._due(n, p, now) <= now}
                if ready:
                    for n in ready:
                        del self._pending[n]
                    # Forget full buckets: bounded memory whatever the number of domains.
                    for n in [n for n in self._tokens
                              if self._tokens_now(n, now) >= self.burst]:
                        del self._tokens[n]
                    return Work({n: tuple(sorted(p.reasons)) for n, p in sorted(ready.items())},
                                marked=min(p.marked for p in ready.values()))
                wake = [self._due(n, p, now) for n, p in self._pending.items()]
                if self._full_at is not None:
                    wake.append(self._full_at)
                if deadline is not None:
                    wake.append(deadline)
                    if now >= deadline:
                        return Work()
                self._cond.wait(min(wake) - now if wake else None)

