"""The agent's Prometheus textfile: metrics.py's netplug_* families plus the agent's own."""

from __future__ import annotations

import logging
import time
from typing import Any

from ..sync import SyncReport
from .workqueue import WorkQueue

log = logging.getLogger(__name__)


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
        self._last_run = None  # None until the first sync: a fresh start counts no run
        self._last_write = float("-inf")
        self._warned = False
        from ..metrics import Health

        self.health = Health()  # the worker keeps it current (config reloads, full syncs)

    def update(self, report: SyncReport, full: bool) -> None:
        from .. import metrics

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
        from .. import metrics
        from prometheus_client import write_to_textfile
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        now = time.monotonic()
        if not force and now - self._last_write < self.min_gap:
            self.dirty = True
            return
        registry = metrics.registry_for(self._last_run,
                                        metrics.read_previous(self.path, "agent"),
                                        source="agent", health=self.health)
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

