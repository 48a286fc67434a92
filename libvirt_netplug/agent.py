"""``netplug agent``: the long-running daemon for what libvirt hooks cannot see.

Hooks never fire for NIC hotplug, vCPU resume, migration finish, restore or a guest changing
its RX filter, and a hook must never call libvirt. The agent listens to libvirt's events and
keeps the host in step, through the same engine as ``netplug reconcile`` (sync.sync: the same
planners, the same applier, the same state-dir lock as the hooks)::

    libvirt event loop thread (process-wide)       worker thread (whoever calls Agent.run)
    ----------------------------------------       ---------------------------------------
    domain LIFECYCLE / DEVICE_ADDED /         --.
      DEVICE_REMOVED / METADATA_CHANGE / REBOOT  |   WorkQueue.take()
    QEMU NIC_RX_FILTER_CHANGED                --+-->  {domain: reasons}  -> sync(only=domains)
    network LIFECYCLE                         --+-->  full resync        -> sync()
    connection closed (EOF, keepalive)        --'-->  lost               -> reconnect, full

Callbacks only mark work in the queue (a dict and a condition variable); they never call
libvirt or the kernel, so libvirt's event loop is never blocked.

Coalescing: a domain is one key in the queue however many events arrive for it, and one
sync serves them all. A marked domain becomes due ``debounce`` after its first mark (0 by
default: in the lab QEMU sent one event per guest action, and a wait only adds latency) and
is rate-limited by a per-domain
token bucket: ``burst`` syncs back to back (a guest change that arrives in two steps costs no
waiting), then one per ``min_interval`` (a guest rewriting its filter hundreds of times a
second costs at most 1/min_interval syncs a second). QEMU re-arms NIC_RX_FILTER_CHANGED only
when the filter is queried, and each sync queries it, so a burst always ends with a sync that
reads the final filter.

Latency: an RX-filter event for a domain whose XML the agent already holds skips libvirt's
XML (nothing in it changed: every XML change has its own event), asks QEMU about the NICs
the events named only (query-rx-filter by name: other NICs keep their recorded state and
their own events armed) through a cached domain handle before taking the state lock, then
plans and applies for that domain only; it reads only the macvtaps netplug syncs. Events for NICs netplug does not sync (libvirt's trustGuestRxFilters ones) are dropped.

Failures: any apply error, or an error reading libvirt, schedules a full resync with an
exponential backoff; a failed query-rx-filter re-marks its domain (the query is also what
re-arms QEMU's event). A lost connection is retried with backoff forever, followed by a full
resync; the agent never exits because libvirtd went away. A full resync also runs at start,
after every (re)connection and every ``resync_interval`` seconds.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Protocol

from .errors import NetplugError, PolicyError
from .model import Domain
from .plan import Note
from .policy import Config, load_config
from .rxfilter import PartialFilters, RxFilter
from .state import StateDir
from .sync import Desired, SyncReport, sync

log = logging.getLogger(__name__)

DEFAULT_URI = "qemu:///system"
# Reasons the queue records (also the "event" label of netplug_agent_events_total).
RX_EVENT = "rx-filter"


# --------------------------------------------------------------------------- the queue


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


# --------------------------------------------------------------------------- libvirt


class Session(Protocol):
    """One connection to libvirtd, as the worker uses it (a fake in unit tests)."""

    def desired(self, config: Config, names: Iterable[str] | None = None) -> Desired: ...
    def rx_filters(self, domain: Domain, nics: Iterable[str] | None = None
                   ) -> Mapping[str, RxFilter] | None: ...
    def alive(self) -> bool: ...
    def close(self) -> None: ...


_loop_lock = threading.Lock()
_loop_thread: threading.Thread | None = None


def start_event_loop() -> None:
    """Register and run libvirt's default event loop in a daemon thread.

    libvirt's event implementation is process-global and can be registered only once, so this
    is the one piece of module-level state here; every connection of the process shares it.
    """
    global _loop_thread
    from .libvirt_io import load_libvirt

    libvirt = load_libvirt()
    with _loop_lock:
        if _loop_thread is not None:
            return
        if libvirt.virEventRegisterDefaultImpl() < 0:
            raise NetplugError("cannot register libvirt's default event loop")

        def run() -> None:
            while True:
                if libvirt.virEventRunDefaultImpl() < 0:
                    log.error("libvirt event loop iteration failed")
                    time.sleep(0.1)

        _loop_thread = threading.Thread(target=run, name="libvirt-events", daemon=True)
        _loop_thread.start()


def rx_reason(details: str | None) -> str:
    """The queue reason for a NIC_RX_FILTER_CHANGED event: "rx-filter <NIC alias>"."""
    import json

    try:
        name = json.loads(details or "{}").get("name")
    except (ValueError, AttributeError):
        name = None
    return f"{RX_EVENT} {name}" if isinstance(name, str) and name else RX_EVENT


_LIFECYCLE = {0: "DEFINED", 1: "UNDEFINED", 2: "STARTED", 3: "SUSPENDED", 4: "RESUMED",
              5: "STOPPED", 6: "SHUTDOWN", 7: "PMSUSPENDED", 8: "CRASHED"}
# The details that say why (for the log): migration, save/restore, post-copy.
_DETAIL = {(2, 1): "migrated", (2, 2): "restored", (3, 1): "migrating", (3, 4): "restoring",
           (3, 7): "post-copy", (4, 1): "migrated", (4, 3): "post-copy", (5, 3): "migrated",
           (5, 4): "saved"}


def lifecycle_reason(event: int, detail: int) -> str:
    why = _DETAIL.get((event, detail))
    return f"lifecycle {_LIFECYCLE.get(event, event)}" + (f" ({why})" if why else "")
_CLOSE_REASONS = {0: "error", 1: "end of file", 2: "keepalive timeout", 3: "client"}


class LibvirtSession:
    """A libvirtd connection whose event callbacks feed a WorkQueue.

    Keepalive (5 s x 3) detects a hung libvirtd; the close callback reports EOF/keepalive
    loss to the queue. Events registered: domain LIFECYCLE, DEVICE_ADDED, DEVICE_REMOVED,
    METADATA_CHANGE (a netplug policy edited in place), REBOOT; network LIFECYCLE; and QEMU's
    NIC_RX_FILTER_CHANGED through libvirt's QEMU monitor events.
    """

    KEEPALIVE = (5, 3)

    def __init__(self, uri: str, queue: WorkQueue):
        from . import libvirt_io

        libvirt = libvirt_io.load_libvirt()
        import libvirt_qemu

        start_event_loop()
        self.uri = uri
        self._libvirt = libvirt
        self._io = libvirt_io
        self._queue = queue
        self._closing = False
        self._dom_ids: list[int] = []
        self._net_ids: list[int] = []
        self._qemu_ids: list[int] = []
        self._handles: dict[str, Any] = {}  # uuid -> virDomain (a handle is just a name)
        self.conn = libvirt_io.connect(uri)
        self.rx_events = True
        q = queue
        try:
            try:
                self.conn.setKeepAlive(*self.KEEPALIVE)
            except libvirt.libvirtError as e:
                if e.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT:
                    raise
                # A driver running in this process (test:///, for instance): nothing to lose.
            self.conn.registerCloseCallback(self._on_close, None)
            dom_events = (
                (libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                 lambda c, d, ev, det, o: q.mark(d.name(), lifecycle_reason(ev, det))),
                (libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_ADDED,
                 lambda c, d, alias, o: q.mark(d.name(), f"device-added {alias}")),
                (libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED,
                 lambda c, d, alias, o: q.mark(d.name(), f"device-removed {alias}")),
                (libvirt.VIR_DOMAIN_EVENT_ID_METADATA_CHANGE,
                 lambda c, d, mtype, ns, o: q.mark(d.name(), "metadata-changed")),
                (libvirt.VIR_DOMAIN_EVENT_ID_REBOOT,
                 lambda c, d, o: q.mark(d.name(), "reboot")),
            )
            for event_id, cb in dom_events:
                self._dom_ids.append(self.conn.domainEventRegisterAny(None, event_id, cb, None))
            self._net_ids.append(self.conn.networkEventRegisterAny(
                None, libvirt.VIR_NETWORK_EVENT_ID_LIFECYCLE,
                lambda c, n, ev, det, o: q.mark_full(f"network {n.name()}"), None))
            try:
                self._qemu_ids.append(libvirt_qemu.qemuMonitorEventRegister(
                    self.conn, None, "NIC_RX_FILTER_CHANGED",
                    lambda c, d, ev, s, us, details, o: q.mark(d.name(), rx_reason(details)),
                    None, 0))
            except libvirt.libvirtError as e:
                if e.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT:
                    raise
                self.rx_events = False
                log.warning("%s has no QEMU monitor events: guest RX-filter changes are only "
                            "picked up by lifecycle events and full resyncs", uri)
        except libvirt.libvirtError as e:
            self.close()
            raise NetplugError(f"libvirt at {uri}: cannot register for events: "
                               f"{e.get_error_message()}") from None

    def _on_close(self, _conn, reason: int, _opaque) -> None:
        if not self._closing:
            self._queue.lost(f"connection to {self.uri} closed "
                             f"({_CLOSE_REASONS.get(reason, reason)})")

    def desired(self, config: Config, names: Iterable[str] | None = None) -> Desired:
        if names is None:
            self._handles.clear()
        return self._io.read_desired(self.conn, config, names, missing_ok=True)

    def rx_filters(self, domain: Domain, nics: Iterable[str] | None = None
                   ) -> Mapping[str, RxFilter] | None:
        """The guest's filters: every NIC's, or (``nics``) only those NICs' (a PartialFilters).

        Asking one NIC by name is what its event needs: a smaller reply, and the domain's
        other NICs (e.g. the ones libvirt syncs with trustGuestRxFilters='yes') are left for
        whoever listens to their events."""
        key = domain.uuid or domain.name
        dom = self._handles.get(key)
        if dom is None:
            dom = self._handles[key] = self._io.lookup_domain(self.conn, domain)
        try:
            if nics is None:
                # One call for every NIC of the domain; it also re-arms QEMU's event for each.
                return self._io.query_rx_filters(dom)
            asked = sorted(set(nics))
            got: dict[str, RxFilter] = {}
            for nic in asked:
                got.update(self._io.query_rx_filters(dom, nic))
            return PartialFilters(got, asked)
        except NetplugError:
            self._handles.pop(key, None)
            raise

    def alive(self) -> bool:
        try:
            return bool(self.conn.isAlive())
        except self._libvirt.libvirtError:
            return False

    def close(self) -> None:
        """Deregister and close; errors (a dead connection) are expected and ignored."""
        import libvirt_qemu

        self._closing = True
        err = self._libvirt.libvirtError
        for cb_id in self._dom_ids:
            try:
                self.conn.domainEventDeregisterAny(cb_id)
            except err:
                pass
        for cb_id in self._net_ids:
            try:
                self.conn.networkEventDeregisterAny(cb_id)
            except err:
                pass
        for cb_id in self._qemu_ids:
            try:
                libvirt_qemu.qemuMonitorEventDeregister(self.conn, cb_id)
            except err:
                pass
        self._dom_ids, self._net_ids, self._qemu_ids = [], [], []
        try:
            self.conn.unregisterCloseCallback()
        except err:
            pass
        try:
            self.conn.close()
        except err:
            pass


# --------------------------------------------------------------------------- metrics


class AgentMetrics:
    """The agent's Prometheus textfile: metrics.py's netplug_* families with source="agent".

    The agent syncs one domain at a time, so the gauges that describe "what netplug manages"
    (managed ports and macvtaps, RX-filter entries) are aggregated over the last sync of every
    running domain; per-run series (drift, repaired, apply errors) describe the last sync.
    Agent-only series: netplug_agent_connected, netplug_agent_connects_total,
    netplug_agent_events_total{event}. Writes are throttled to one per ``min_gap`` seconds
    (the worker flushes the rest when idle).
    """

    def __init__(self, path: str, queue: WorkQueue, min_gap: float = 1.0):
        self.path = path
        self.queue = queue
        self.min_gap = min_gap
        self.connected = False
        self.connects = 0
        self.dirty = False
        self._domains: dict[str, Any] = {}  # name -> its last DomainSync (running domains)
        self._rx: dict[str, dict[tuple[str, str, str, str], int]] = {}  # name -> entries
        self._last_run = None
        self._last_write = float("-inf")
        self._warned = False

    def update(self, report: SyncReport, full: bool) -> None:
        from . import metrics

        if full:
            self._domains, self._rx = {}, {}
        for ds in report.domains:
            if ds.running:
                self._domains[ds.name] = ds
            else:
                self._domains.pop(ds.name, None)
            self._rx.pop(ds.name, None)
            if ds.running and any(i.managed for i in ds.macvtap_intents):
                # The record as the run just wrote it (no second read of the file).
                self._rx[ds.name] = metrics.rx_entries_of(ds.name,
                                                          report.records.get(ds.name, {}))
        run = metrics.run_metrics(report, source="agent")
        everything = SyncReport(dry_run=False, domains=list(self._domains.values()))
        total = metrics.run_metrics(everything, source="agent")
        run.managed_ports = total.managed_ports
        run.managed_macvtaps = total.managed_macvtaps
        run.rx_entries = {k: v for entries in self._rx.values() for k, v in entries.items()}
        self._last_run = run
        self.dirty = True

    def write(self, force: bool = False) -> None:
        from . import metrics
        from prometheus_client import write_to_textfile
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        now = time.monotonic()
        if not force and now - self._last_write < self.min_gap:
            self.dirty = True
            return
        run = self._last_run or metrics.RunMetrics("agent", False, time.time())
        registry = metrics.registry_for(run, metrics.read_previous(self.path, "agent"))
        agent = self

        class _AgentSeries:
            def collect(self_inner):
                g = GaugeMetricFamily("netplug_agent_connected",
                                      "1 while the agent is connected to libvirtd.",
                                      labels=["source"])
                g.add_metric(["agent"], 1.0 if agent.connected else 0.0)
                yield g
                c = CounterMetricFamily("netplug_agent_connects",
                                        "Connections to libvirtd since the agent started.",
                                        labels=["source"])
                c.add_metric(["agent"], agent.connects)
                yield c
                c = CounterMetricFamily("netplug_agent_events",
                                        "libvirt events (and internal triggers) received, by "
                                        "kind, since the agent started.",
                                        labels=["source", "event"])
                for kind, n in sorted(dict(agent.queue.counts).items()):
                    c.add_metric(["agent", kind], n)
                yield c

        registry.register(_AgentSeries())
        try:
            write_to_textfile(self.path, registry)
        except OSError as e:
            if not self._warned:
                log.warning("cannot write metrics to %s: %s", self.path, e.strerror or e)
                self._warned = True
            return
        self._warned = False
        self._last_write = now
        self.dirty = False


# --------------------------------------------------------------------------- the agent


@dataclass
class AgentOptions:
    uri: str = DEFAULT_URI
    resync_interval: float = 300.0  # seconds between periodic full resyncs; 0: never
    debounce: float = 0.0  # seconds from a domain's first event to its sync
    min_interval: float = 0.05  # seconds per sync of one domain, after a burst of ...
    burst: int = 3  # ... this many back-to-back syncs
    reconnect_min: float = 0.5  # first delay between connection attempts (then doubling)
    reconnect_max: float = 30.0
    retry_min: float = 1.0  # first delay of a full resync after an error (then doubling)
    retry_max: float = 60.0


def _rx_only(reasons: Iterable[str]) -> bool:
    return all(r.split(" ", 1)[0] == RX_EVENT for r in reasons)


def _named_nics(reasons: Iterable[str]) -> frozenset[str] | None:
    """The NICs that RX-filter reasons ("rx-filter net1", see rx_reason) name; None when one
    of them names none."""
    nics = set()
    for r in reasons:
        nic = r.partition(" ")[2]
        if not nic:
            return None
        nics.add(nic)
    return frozenset(nics)


class _Backoff:
    def __init__(self, first: float, cap: float):
        self.first, self.cap, self.n = first, cap, 0

    def next(self) -> float:
        delay = min(self.cap, self.first * (2 ** self.n))
        self.n += 1
        return delay

    def reset(self) -> None:
        self.n = 0


class Agent:
    """The worker: takes batches from the queue and runs sync.sync for them.

    ``connect(queue) -> Session`` opens a libvirt session whose callbacks mark the queue
    (LibvirtSession by default). ``kernel_factory()`` gives the kernel seam; it is created in
    the thread that calls run(), which is also where every kernel call happens.
    """

    def __init__(self, options: AgentOptions, *, state: StateDir, config: Config,
                 config_path: str | None = None,
                 connect: Callable[[WorkQueue], Session] | None = None,
                 kernel_factory: Callable[[], Any] | None = None,
                 metrics_file: str | None = None):
        self.options = options
        self.state = state
        self.config = config
        self.config_path = config_path
        self.queue = WorkQueue(options.debounce, options.min_interval, options.burst)
        self._connect = connect or (lambda q: LibvirtSession(options.uri, q))
        if kernel_factory is None:
            from .kernel import NetlinkKernel
            kernel_factory = NetlinkKernel
        self._kernel_factory = kernel_factory
        self.metrics = AgentMetrics(metrics_file, self.queue) if metrics_file else None
        self.session: Session | None = None
        self._kernel = None
        self._connect_backoff = _Backoff(options.reconnect_min, options.reconnect_max)
        self._error_backoff = _Backoff(options.retry_min, options.retry_max)
        self._retry: dict[str, _Backoff] = {}
        # As last synced: NIC aliases of each domain's managed macvtaps; the domains synced
        # since the last connection; their parsed live XML and the active networks. An
        # RX-filter event changes neither the XML nor the networks (every change of those has
        # its own event, or a periodic resync), so RX-only syncs reuse them and go straight to
        # QEMU's query-rx-filter.
        self._rx_managed: dict[str, frozenset[str]] = {}
        self._synced: set[str] = set()
        self._xml: dict[str, Domain] = {}
        self._networks: Mapping[str, Any] | None = None
        self._reload = False
        self._connect_failures = 0
        # Observable counters (tests, status): syncs by scope, connections.
        self.stats: dict[str, int] = {"full": 0, "domain": 0, "connects": 0, "errors": 0,
                                      "skipped": 0}
        self.ready = threading.Event()  # set after the first full resync

    # -- control (any thread) ----------------------------------------------------------

    def stop(self) -> None:
        self.queue.stop()

    def reload(self) -> None:
        """Re-read the config file, then resync everything (SIGHUP)."""
        self._reload = True
        self.queue.mark_full("reload")

    def resync(self, reason: str = "requested") -> None:
        self.queue.mark_full(reason)

    # -- the worker --------------------------------------------------------------------

    def run(self) -> None:
        """The worker loop; returns after stop()."""
        self._kernel = self._kernel_factory()
        try:
            while not self.queue.stopping:
                if self.session is None and not self._open_session():
                    continue
                work = self.queue.take(
                    timeout=self.metrics.min_gap if self.metrics and self.metrics.dirty
                    else None)
                if work is None:
                    break
                if self.metrics and self.metrics.dirty and not (work.full or work.domains):
                    self.metrics.write()
                if work.lost:
                    log.warning("%s; reconnecting", work.lost)
                    self._close_session()
                    continue
                self._handle(work)
        finally:
            self._close_session()
            if self._kernel is not None and hasattr(self._kernel, "close"):
                self._kernel.close()
            if self.metrics:
                self.metrics.write(force=True)
            log.info("stopped")

    def _open_session(self) -> bool:
        try:
            self.session = self._connect(self.queue)
        except NetplugError as e:
            self._connect_failures += 1
            delay = self._connect_backoff.next()
            if self._connect_failures == 1 or self._connect_failures % 10 == 0:
                log.warning("%s; retrying in %.1f s (attempt %d)", e, delay,
                            self._connect_failures)
            else:
                log.debug("%s; retrying in %.1f s", e, delay)
            self.queue.sleep(delay)
            return False
        log.info("connected to %s%s", self.options.uri,
                 f" after {self._connect_failures} failed attempts"
                 if self._connect_failures else "")
        self._connect_failures = 0
        self._connect_backoff.reset()
        self._synced.clear()
        self._xml.clear()
        self._networks = None
        self.stats["connects"] += 1
        if self.metrics:
            self.metrics.connected = True
            self.metrics.connects += 1
            self.metrics.write(force=True)
        # Events registered before this full resync reads anything: nothing falls between.
        self.queue.mark_full("connected")
        return True

    def _close_session(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None
            if self.metrics:
                self.metrics.connected = False
                self.metrics.write(force=True)

    def _handle(self, work: Work) -> None:
        if self._reload:
            self._reload = False
            try:
                self.config = load_config(self.config_path)
                log.info("reloaded config %s", self.config.path or "(none: empty config)")
            except PolicyError as e:
                log.error("%s; keeping the previous config", e)
        if work.full:
            names = None
            log.info("full resync (%s)", work.full)
        else:
            names = [n for n, reasons in work.domains.items() if self._relevant(n, reasons)]
            self.stats["skipped"] += len(work.domains) - len(names)
            if not names:
                return
            log.debug("sync %s", "; ".join(f"{n} ({', '.join(work.domains[n])})"
                                            for n in names))
        try:
            cached = names is not None and all(
                _rx_only(work.domains[n]) and n in self._xml for n in names)
            self._sync(names, cached=cached, marked=work.marked,
                       nics=self._changed_nics(work.domains) if cached else None)
        except NetplugError as e:
            if self.session is not None and not self.session.alive():
                self.queue.lost(f"connection to {self.options.uri} lost ({e})")
            else:
                self._after_error(f"{e}")
        except Exception:  # noqa: BLE001 - the daemon must outlive a programmer error
            log.exception("internal error during %s", "full resync" if names is None
                          else "sync of " + ", ".join(names))
            self._fresh_kernel()
            self._after_error("internal error")
        finally:
            if names:
                self.queue.done(names)

    def _relevant(self, name: str, reasons: tuple[str, ...]) -> bool:
        """An RX-filter event matters only for a NIC netplug syncs (a domain's other NICs,
        e.g. the ones libvirt syncs with trustGuestRxFilters='yes', send events too)."""
        if not _rx_only(reasons) or name not in self._synced:
            return True
        managed = self._rx_managed.get(name, frozenset())
        nics = _named_nics(reasons)
        if nics is None:  # an event that did not name its NIC
            return bool(managed)
        return bool(nics & managed)

    def _changed_nics(self, reasons: Mapping[str, tuple[str, ...]]) -> dict[str, frozenset[str]]:
        """For RX-filter events: per domain, the managed NICs they named (the ones to ask).
        A domain with an event that named no NIC is left out: all its NICs get asked."""
        out = {}
        for name, rs in reasons.items():
            nics = _named_nics(rs)
            if nics is not None:
                out[name] = nics & self._rx_managed.get(name, frozenset())
        return out

    def _sync(self, names: list[str] | None, cached: bool = False,
              marked: float | None = None,
              nics: Mapping[str, frozenset[str]] | None = None) -> None:
        assert self.session is not None
        session = self.session
        t0 = time.monotonic()
        waited = t0 - marked if marked is not None else 0.0
        if cached and names is not None and self._networks is not None:
            desired = Desired(tuple(self._xml[n] for n in sorted(names)), self._networks,
                              self.config)
        else:
            desired = session.desired(self.config, names)
            if names is None:
                self._xml = {}
            for n in names or ():
                self._xml.pop(n, None)
            self._xml.update({d.name: d for d in desired.domains})
            self._networks = desired.networks
        t_read = time.monotonic() - t0
        for err in desired.errors:
            self._note(Note("warning", err, once_key=f"desired:{err[:120]}"))

        def rx_source(domain: Domain) -> Mapping[str, RxFilter] | None:
            asked = (nics or {}).get(domain.name)
            return session.rx_filters(domain, asked) if asked else session.rx_filters(domain)

        # sync() asks QEMU before it takes the state lock (hooks wait on it).
        report = sync(self._kernel, self.state, desired, rx_source=rx_source, only=names)
        t_query = report.rx_query_seconds
        failed = {ds.name for ds in report.domains if ds.rx_error is not None}
        ok = {ds.name for ds in report.domains if ds.rx_queried and ds.rx_error is None}
        total = time.monotonic() - t0
        log.debug("%s took %.1f ms (queued %.1f ms, libvirt XML %.1f ms, QEMU query %.1f ms, "
                  "kernel and state %.1f ms, %d operations)", "full resync" if names is None
                  else "sync of " + ", ".join(names), total * 1e3, waited * 1e3, t_read * 1e3,
                  t_query * 1e3, (total - t_read - t_query) * 1e3, len(report.applied))
        scope = "full" if names is None else "domain"
        self.stats[scope] += 1
        for note in report.notes:
            self._note(note)
        if names is None:
            self._rx_managed = {}
            self._synced = {d.name for d in desired.domains}
        else:
            self._synced |= set(names)
        for ds in report.domains:
            aliases = frozenset(i.interface.alias for i in ds.macvtap_intents
                                if i.managed and i.interface.alias) if ds.running else None
            if aliases:
                self._rx_managed[ds.name] = aliases
            else:
                self._rx_managed.pop(ds.name, None)
        for name in ok:
            self._retry.pop(name, None)
        for name in failed:
            if not session.alive():
                break
            delay = self._retry.setdefault(
                name, _Backoff(self.options.retry_min / 2, self.options.retry_max)).next()
            log.info("domain %s: retrying its RX filter in %.1f s", name, delay)
            self.queue.mark(name, "retry", delay)
        if report.errors:
            self.stats["errors"] += len(report.errors)
            self._after_error(f"{len(report.errors)} operation(s) failed")
        elif names is None:
            self._error_backoff.reset()
            if self.options.resync_interval > 0:
                self.queue.mark_full("periodic", self.options.resync_interval)
        if names is None and not self.ready.is_set():
            self.ready.set()
        if self.metrics:
            self.metrics.update(report, full=names is None)
            self.metrics.write()

    def _after_error(self, why: str) -> None:
        delay = self._error_backoff.next()
        log.warning("%s; full resync in %.1f s", why, delay)
        self.queue.mark_full(f"after-error ({why})", delay)

    def _fresh_kernel(self) -> None:
        try:
            if self._kernel is not None and hasattr(self._kernel, "close"):
                self._kernel.close()
        finally:
            self._kernel = self._kernel_factory()

    def _note(self, note: Note) -> None:
        if note.once_key and not self.state.first_time(note.once_key):
            return
        level = {"info": logging.INFO, "warning": logging.WARNING,
                 "error": logging.ERROR}[note.level]
        log.log(level, "%s", note.message)


# --------------------------------------------------------------------------- CLI


def cmd_agent(args: argparse.Namespace) -> int:
    from . import logsetup
    from .policy import config_path

    # Under systemd stderr already goes to the journal: no second copy through syslog.
    logsetup.setup("agent", sys.stderr, logging.DEBUG if args.verbose else logging.INFO,
                   syslog=False)
    config = load_config(args.config)
    options = AgentOptions(uri=args.connect, resync_interval=args.resync_interval,
                           debounce=args.debounce / 1000.0,
                           min_interval=args.min_interval / 1000.0)
    agent = Agent(options, state=StateDir(args.state_dir), config=config,
                  config_path=config_path(args.config), metrics_file=args.metrics_file)
    signals = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
    # Block the signals before any thread exists (threads inherit the mask), and take them
    # synchronously here: no handler ever runs inside libvirt's loop or the worker.
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        worker = threading.Thread(target=agent.run, name="netplug-worker")
        log.info("starting (libvirt %s, state dir %s, config %s)", args.connect,
                 agent.state.path, config.path or "none")
        worker.start()
        stopping = False
        while worker.is_alive():
            info = signal.sigtimedwait(signals, 1.0)
            if info is None:
                continue
            if info.si_signo == signal.SIGHUP:
                log.info("SIGHUP: reloading the config and resyncing")
                agent.reload()
            elif not stopping:
                log.info("%s: stopping", signal.Signals(info.si_signo).name)
                stopping = True
                agent.stop()
        worker.join()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    return 0 if stopping else 1


def register(subparsers) -> None:
    sp = subparsers.add_parser(
        "agent", help="run the event agent: macvtap RX-filter sync, hotplug, resume, "
                      "migration (a daemon; see systemd/netplug-agent.service)",
        description="Listen to libvirt's events and keep bridge ports and macvtap RX filters "
                    "in step with the running guests. Full resync at start, after every "
                    "reconnection, after errors and every --resync-interval seconds. "
                    "SIGHUP re-reads the config; SIGTERM/SIGINT stop.")
    sp.add_argument("--connect", "-c", default=DEFAULT_URI, metavar="URI",
                    help=f"libvirt URI (default {DEFAULT_URI})")
    sp.add_argument("--config", metavar="FILE", help="netplug config (TOML; default "
                    "$NETPLUG_CONFIG or /etc/libvirt-netplug/config.toml)")
    sp.add_argument("--state-dir", metavar="DIR", help="state dir shared with the hooks "
                    "(default $NETPLUG_STATE_DIR or /run/libvirt-netplug)")
    sp.add_argument("--metrics-file", metavar="FILE",
                    help="write Prometheus metrics to FILE (node_exporter textfile format) "
                         "after every sync")
    sp.add_argument("--resync-interval", type=_nonneg_float, default=300.0, metavar="SEC",
                    help="full resync every SEC seconds (default 300; 0: only at start, "
                         "reconnect and after errors)")
    sp.add_argument("--debounce", type=_nonneg_float, default=0.0, metavar="MS",
                    help="wait MS milliseconds after a domain's first event before syncing "
                         "it (default 0: QEMU sends one event per guest change, see "
                         "bench/rx_sync_latency.py)")
    sp.add_argument("--min-interval", type=_nonneg_float, default=50.0, metavar="MS",
                    help="rate limit per domain: after 3 back-to-back syncs, at most one "
                         "every MS milliseconds; bounds the cost of a guest flooding RX-filter "
                         "changes (default 50)")
    sp.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    sp.set_defaults(func=cmd_agent)


def _nonneg_float(value: str) -> float:
    try:
        f = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if f < 0 or f != f or f == float("inf"):
        raise argparse.ArgumentTypeError(f"{value!r}: use a number >= 0")
    return f


if __name__ == "__main__":  # pragma: no cover - python -m libvirt_netplug.agent
    from .cli import main

    sys.exit(main(["agent", *sys.argv[1:]]))
