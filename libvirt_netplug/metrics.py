"""Prometheus metrics for node_exporter's textfile collector, written by reconcile and the agent.

One call after each resync: ``write_metrics(path, report, source=...)``. The file is written
with prometheus-client's ``write_to_textfile`` (temporary file + rename, so the collector never
reads half a file). Every metric carries ``source="reconcile"`` or ``source="agent"``; give
each writer its own file (the collector merges them).

Gauges describe the last run. Counters (``*_total``) accumulate across runs: a one-shot
``netplug reconcile`` has no memory, so the previous values are read back from the file it
replaces (a deleted file restarts them at zero, which Prometheus handles as a counter reset).
``netplug_last_success_timestamp_seconds`` is carried over the same way when a run fails.

Every metric is documented in docs/metrics.md (a test checks that). Names follow Prometheus'
conventions: base units in the name (``_seconds``), ``_total`` only on counters, no gauge and
counter sharing a family name (the per-run gauges are ``netplug_last_run_*``), an ``_info``
gauge of value 1 for the build.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter as _Tally
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping

from .errors import NetplugError
from .version import version

log = logging.getLogger(__name__)

PREFIX = "netplug_"
# Operation kinds, so every action has a series (0 included) and dashboards need no absent().
ACTIONS = ("fdb-replace", "fdb-delete", "port-flags", "vlan-filtering", "multicast-add",
           "multicast-delete", "unicast-add", "unicast-delete", "allmulti", "promisc",
           "address")
COUNTERS = ("runs", "failed_runs", "drift_found_operations", "repaired_operations",
            "apply_errors")


@dataclass
class Health:
    """What keeps netplug from seeing all of its inputs (gauges of their own: a broken config
    must be visible even when no run can start)."""

    config_valid: bool = True
    invalid_policies: int = 0  # networks and domains whose XML or policy could not be read
    state_record_errors: int = 0  # domain records in the state dir that cannot be used


@dataclass
class RunMetrics:
    """What one resync run measured (the metrics file's gauges)."""

    source: str
    success: bool
    timestamp: float
    duration: float | None = None
    managed_ports: dict[str, int] = field(default_factory=dict)  # by bridge
    managed_macvtaps: dict[str, int] = field(default_factory=dict)  # by lower device
    drift: dict[str, int] = field(default_factory=dict)  # planned operations by action
    repaired: dict[str, int] = field(default_factory=dict)  # applied operations by action
    apply_errors: int = 0
    error_notes: int = 0  # managed interfaces in a state netplug cannot fix
    # (domain, interface, device, list) -> entries netplug keeps on that macvtap
    rx_entries: dict[tuple[str, str, str, str], int] = field(default_factory=dict)


def run_metrics(report, *, source: str, success: bool | None = None, state=None,
                now: float | None = None, duration: float | None = None) -> RunMetrics:
    """Metrics of one sync.sync() report (``report`` None: the run failed before syncing)."""
    now = time.time() if now is None else now
    if report is None:
        return RunMetrics(source, bool(success), now, duration)
    if success is None:
        success = not report.errors
    m = RunMetrics(source, success, now, duration if duration is not None else report.elapsed)
    running = [d for d in report.domains if d.running]
    m.managed_ports = dict(_Tally(i.bridge or "" for d in running for i in d.bridge_intents
                                  if i.managed))
    m.managed_macvtaps = dict(_Tally(i.lower or "" for d in running for i in d.macvtap_intents
                                     if i.managed))
    m.drift = dict(_Tally(op.kind for op in report.planned))
    m.repaired = dict(_Tally(op.kind for op in report.applied))
    m.apply_errors = len(report.errors)
    m.error_notes = sum(1 for n in report.notes if n.level == "error")
    if state is not None:
        m.rx_entries = _rx_entries(state, [d.name for d in running
                                           if any(i.managed for i in d.macvtap_intents)])
    return m


def _rx_entries(state, names: Iterable[str]) -> dict[tuple[str, str, str, str], int]:
    """Entries netplug programmed per macvtap, from its records (read without the lock: every
    record is replaced atomically)."""
    out = {}
    for name in names:
        try:
            out.update(rx_entries_of(name, state.domain(name)))
        except NetplugError as e:
            log.warning("metrics: %s", e)
    return out


def rx_entries_of(name: str, record: Mapping[str, Any]) -> dict[tuple[str, str, str, str], int]:
    """One domain's programmed entries per macvtap and list, from its state record."""
    out = {}
    for dev, r in sorted((record.get("rx") or {}).items()):
        iface = r.get("interface") or ""
        out[(name, iface, dev, "multicast")] = len(r.get("mc") or [])
        out[(name, iface, dev, "unicast")] = len(r.get("uc") or [])
    return out


def read_previous(path: str, source: str) -> dict[str, float]:
    """Counters and the last success time from an earlier file of the same source."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return {}
    except OSError as e:
        log.warning("metrics file %s: cannot read previous values: %s", path, e.strerror)
        return {}
    wanted = {PREFIX + c + "_total" for c in COUNTERS}
    wanted |= {PREFIX + "last_success_timestamp_seconds", PREFIX + "last_run_timestamp_seconds"}
    out: dict[str, float] = {}
    try:
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name in wanted and s.labels.get("source") == source:
                    out[s.name] = s.value
    except ValueError as e:
        log.warning("metrics file %s: unparsable (%s); counters restart at 0", path, e)
        return {}
    return out


class _Collector:
    """A prometheus-client collector that yields one run's families (``m`` None: no run yet,
    e.g. the agent just started; only counters carried over and what needs no run)."""

    def __init__(self, m: RunMetrics | None, previous: dict[str, float], source: str,
                 health: Health | None = None):
        self.m = m
        self.previous = previous
        self.source = source
        self.health = health if health is not None else Health()

    def collect(self) -> Iterator:
        import platform

        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        m, src = self.m, self.source

        def gauge(name, doc, labels=(), samples=None, value=None):
            g = GaugeMetricFamily(PREFIX + name, doc, labels=["source", *labels])
            if samples is None:
                g.add_metric([src], value)
            else:
                for key, v in sorted(samples.items()):
                    g.add_metric([src, *(key if isinstance(key, tuple) else (key,))], v)
            return g

        yield gauge("build_info", "Always 1; the labels say which netplug wrote this file.",
                    ["version", "python"], {(version(), platform.python_version()): 1})
        h = self.health
        yield gauge("config_valid", "1 if the config file is valid (or absent); 0: hooks and "
                                    "agent manage nothing through it and reconcile refuses to "
                                    "run.", value=1.0 if h.config_valid else 0.0)
        yield gauge("invalid_policies", "Networks and domains whose XML or netplug policy "
                                        "could not be read (left unmanaged).",
                    value=h.invalid_policies)
        yield gauge("state_record_errors", "Domain records in the state dir that cannot be "
                                           "used (corrupt or wrong-shaped).",
                    value=h.state_record_errors)
        prev_success = self.previous.get(PREFIX + "last_success_timestamp_seconds")
        if m is not None:
            yield gauge("managed_ports", "Guest tap ports netplug manages (promiscLinks='no'), "
                                         "per bridge, in the last run.",
                        ["bridge"], m.managed_ports)
            yield gauge("managed_macvtaps", "Guest macvtaps whose RX filter netplug syncs, "
                                            "per lower device, in the last run.",
                        ["lower"], m.managed_macvtaps)
            yield gauge("last_run_drift_operations", "Operations the last run found necessary "
                                                     "(drift), by action.",
                        ["action"], {a: m.drift.get(a, 0)
                                     for a in sorted(set(ACTIONS) | set(m.drift))})
            yield gauge("last_run_repaired_operations", "Operations the last run applied, by "
                                                        "action.",
                        ["action"], {a: m.repaired.get(a, 0)
                                     for a in sorted(set(ACTIONS) | set(m.repaired))})
            yield gauge("last_run_apply_errors", "Operations that failed in the last run.",
                        value=m.apply_errors)
            yield gauge("last_run_unrepairable_interfaces",
                        "Managed interfaces in a state netplug cannot repair in the last run "
                        "(e.g. the guest's MAC is a static entry on another port).",
                        value=m.error_notes)
            yield gauge("rx_filter_entries", "Addresses netplug keeps programmed on a macvtap "
                                             "for its guest, per interface and list.",
                        ["domain", "interface", "device", "list"], m.rx_entries)
            yield gauge("last_run_timestamp_seconds", "When the last run finished (Unix time).",
                        value=m.timestamp)
            yield gauge("last_run_success", "1 if the last run completed without errors.",
                        value=1.0 if m.success else 0.0)
            if m.duration is not None:
                yield gauge("last_run_duration_seconds", "How long the last run took.",
                            value=m.duration)
        last_ok = m.timestamp if m is not None and m.success else prev_success
        if last_ok is not None:
            yield gauge("last_success_timestamp_seconds", "When a run last completed without "
                                                          "errors (Unix time).", value=last_ok)
        increments = dict.fromkeys(COUNTERS, 0)
        prev_run = self.previous.get(PREFIX + "last_run_timestamp_seconds")
        # The same run written again (e.g. the agent rewriting its file) counts once.
        if m is not None and not (prev_run is not None and abs(prev_run - m.timestamp) < 1e-6):
            increments = {"runs": 1, "failed_runs": 0 if m.success else 1,
                          "drift_found_operations": sum(m.drift.values()),
                          "repaired_operations": sum(m.repaired.values()),
                          "apply_errors": m.apply_errors}
        docs = {"runs": "Runs since the metrics file was created.",
                "failed_runs": "Runs that ended with an error.",
                "drift_found_operations": "Operations found necessary (drift), all runs.",
                "repaired_operations": "Operations applied, all runs.",
                "apply_errors": "Operations that failed, all runs."}
        for name in COUNTERS:
            c = CounterMetricFamily(PREFIX + name, docs[name], labels=["source"])
            c.add_metric([src], self.previous.get(PREFIX + name + "_total", 0.0)
                         + increments[name])
            yield c


def registry_for(m: RunMetrics | None, previous: dict[str, float] | None = None, *,
                 source: str | None = None, health: Health | None = None):
    """A registry with the families of run ``m`` (None: no run yet, for ``source``)."""
    from prometheus_client import CollectorRegistry

    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Collector(m, previous or {}, source or (m.source if m else "agent"), health))
    return reg


def write_run_metrics(path: str, m: RunMetrics, health: Health | None = None) -> None:
    from prometheus_client import write_to_textfile

    if not path.endswith(".prom"):
        log.warning("metrics file %s: node_exporter's textfile collector reads only *.prom "
                    "files", path)
    previous = read_previous(path, m.source)
    try:
        write_to_textfile(path, registry_for(m, previous, health=health))
    except OSError as e:
        raise NetplugError(f"metrics file {path}: cannot write: {e.strerror}; check that "
                           f"{os.path.dirname(path) or '.'} exists and is writable") from None


def write_metrics(path: str, report, *, source: str = "agent", success: bool | None = None,
                  state=None, now: float | None = None, duration: float | None = None,
                  health: Health | None = None) -> None:
    """Write the metrics of one resync (a sync.SyncReport, or None if the run failed early).

    ``source``: "reconcile" or "agent". ``success``: default, no operation failed. ``state``:
    a StateDir, to count the RX-filter entries netplug keeps per macvtap. ``health``: what
    kept the run from its inputs. Raises NetplugError (one line) if the file cannot be
    written.
    """
    m = run_metrics(report, source=source, success=success, state=state, now=now,
                    duration=duration)
    write_run_metrics(path, m, health)
