"""The agent's worker: takes batches from the work queue and runs sync.sync for them.

Failures: any apply error, or an error reading libvirt, schedules a full resync with an
exponential backoff; a failed query-rx-filter re-marks its domain (the query is also what
re-arms QEMU's event). A lost connection is retried with backoff forever, followed by a full
resync; the agent never exits because libvirtd went away. A full resync also runs at start,
after every (re)connection and every ``resync_interval`` seconds.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from ..errors import NetplugError, PolicyError
from ..paths import DEFAULT_URI
from ..model import Domain
from ..plan import Note
from ..policy import Config, load_config
from ..rxfilter import RxFilter
from ..state import StateDir
from ..sync import Desired, sync
from .events import named_nics, rx_only
from .metrics import AgentMetrics
from .session import LibvirtSession, Session
from .workqueue import Work, WorkQueue

log = logging.getLogger(__name__)


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




class Backoff:
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
            from ..kernel import NetlinkKernel
            kernel_factory = NetlinkKernel
        self._kernel_factory = kernel_factory
        self.metrics = AgentMetrics(metrics_file, self.queue) if metrics_file else None
        self.session: Session | None = None
        self._kernel = None
        self._connect_backoff = Backoff(options.reconnect_min, options.reconnect_max)
        self._error_backoff = Backoff(options.retry_min, options.retry_max)
        self._retry: dict[str, Backoff] = {}
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
                if self.metrics:
                    self.metrics.health.config_valid = True
            except PolicyError as e:
                log.error("%s; keeping the previous config", e)
                if self.metrics:
                    self.metrics.health.config_valid = False
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
                rx_only(work.domains[n]) and n in self._xml for n in names)
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
        if not rx_only(reasons) or name not in self._synced:
            return True
        managed = self._rx_managed.get(name, frozenset())
        nics = named_nics(reasons)
        if nics is None:  # an event that did not name its NIC
            return bool(managed)
        return bool(nics & managed)

    def _changed_nics(self, reasons: Mapping[str, tuple[str, ...]]) -> dict[str, frozenset[str]]:
        """For RX-filter events: per domain, the managed NICs they named (the ones to ask).
        A domain with an event that named no NIC is left out: all its NICs get asked."""
        out = {}
        for name, rs in reasons.items():
            nics = named_nics(rs)
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
            # NICs whose RX filter netplug follows: managed macvtaps, and bridge ports that
            # mirror the guest's extra unicast MACs (rxFilters 'unicast').
            aliases = ds.rx_aliases if ds.running else None
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
                name, Backoff(self.options.retry_min / 2, self.options.retry_max)).next()
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
            if names is None:

                self.metrics.health.invalid_policies = len(desired.errors)
                self.metrics.health.state_record_errors = len(self.state.record_errors())
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

