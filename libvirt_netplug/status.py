"""``netplug status``: what netplug manages, per domain and interface, and whether it holds.

A read-only view built on the reconcile engine in dry-run mode (sync.sync): the same intents,
the same bulk kernel read, the same planner. An interface "drifts" exactly when ``netplug
reconcile`` would change something for it, and every operation reconcile would perform is
shown: on its interface's row, on a row for a record whose interface is gone, or as a line of
its own (a bridge-level change). Below the table: each domain's last hook run, and what
stops netplug from seeing everything (an invalid config, a corrupt state record, paths that
differ from the hooks'). Output: an aligned table (like ``virsh domiflist``) or JSON
(docs/reconcile.md).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, TextIO

from . import hookresult
from .model import Interface
from .ops import Operation
from .plan import Observed, PortIntent
from .reconcile import (Inputs, JSON_VERSION, add_common_arguments, command_paths, observe_dry,
                        read_inputs, setup_logging)
from .rxfilter import MacvtapIntent
from .state import StateDir
from .sync import DomainSync, SyncReport

# Reasons that just mean "no netplug policy here": not worth a footnote.
_QUIET_REASONS = ("policy does not say promiscLinks='no'", "policy has no rxFilters")


@dataclass
class Row:
    domain: str
    running: bool
    interface: str  # alias or #index
    type: str
    mac: str | None
    network: str | None
    bridge: str | None
    lower: str | None
    mode: str | None  # macvtap mode
    device: str | None  # tap or macvtap
    managed: bool
    reason: str
    policy: dict[str, Any]
    learning: bool | None = None
    flood: bool | None = None
    fdb: bool | None = None  # a static entry for the guest's MAC on its tap
    # Static entries on the tap for the guest's MAC and its extra MACs, as (MAC, VLAN): the
    # kernel's key (VLAN None: "no VLAN", VID 0).
    fdb_entries: tuple[tuple[str, int | None], ...] = ()
    rx: dict[str, Any] | None = None
    state: str = "-"  # ok | drift | error | unmanaged | retired
    drift: tuple[str, ...] = ()  # what reconcile would do for this interface
    problems: tuple[str, ...] = ()  # error notes for this interface
    last_change: float | None = None  # mtime of netplug's record for this domain

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["drift"] = list(self.drift)
        d["problems"] = list(self.problems)
        d["last_change"] = _iso(self.last_change)
        return d


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).isoformat(timespec="seconds")


def _problems_for(ds: DomainSync, label: str, mac: str | None) -> tuple[str, ...]:
    # Notes name the interface through Context.describe(): "domain D, interface I, mac M…".
    key = f"interface {label}, "
    return tuple(n.message for n in ds.notes if n.level == "error" and key in n.message
                 and (mac is None or mac in n.message))


def _bridge_row(ds: DomainSync, it: PortIntent, observed: Observed | None,
                records: dict[str, Any], mtime: float | None) -> Row:
    label = it.interface.display_name
    row = Row(ds.name, True, label, it.interface.type, it.mac, it.network, it.bridge, None,
              None, it.tap, it.managed, it.reason, it.policy.to_json())
    link = observed.links.get(it.tap) if observed and it.tap else None
    if link is not None and link.master == it.bridge:
        row.learning, row.flood = link.learning, link.flood
        if it.mac and it.bridge:
            row.fdb_entries = tuple(sorted(
                ((e.mac, e.vlan) for mac in (it.mac, *it.extra_macs)
                 for e in observed.entries_for_mac(it.bridge, mac)
                 if e.port == it.tap and e.state == "static"),
                key=lambda k: (k[0] != it.mac, k[0], k[1] or 0)))
            row.fdb = any(mac == it.mac for mac, _vlan in row.fdb_entries)
    ops = [op for op in ds.ops if op.device == it.tap] if it.tap else []
    row.drift = tuple(op.what() for op in ops)
    row.problems = _problems_for(ds, label, it.mac)
    row.last_change = mtime if it.tap in records.get("ports", {}) else None
    if it.managed:
        row.state = "error" if row.problems else "drift" if ops else "ok"
    else:
        row.state = "unmanaged"
    return row


def _macvtap_row(ds: DomainSync, it: MacvtapIntent, records: dict[str, Any],
                 mtime: float | None) -> Row:
    label = it.interface.display_name
    row = Row(ds.name, True, label, it.interface.type, it.interface.mac, it.network, None,
              it.lower, it.mode, it.dev, it.managed, it.reason, it.policy.to_json())
    ops = [op for op in ds.ops if op.device == it.dev] if it.dev else []
    row.drift = tuple(op.what() for op in ops)
    row.problems = _problems_for(ds, label, it.interface.mac)
    rec = records.get("rx", {}).get(it.dev or "")
    if it.managed:
        if rec is None:
            sync_state = "drift" if ops else "unknown"
        else:
            sync_state = "drift" if ops else "in-sync"
        row.rx = {"state": sync_state,
                  "multicast": len(rec.get("mc", [])) if rec else 0,
                  "unicast": len(rec.get("uc", [])) if rec else 0,
                  "allmulti": bool(rec.get("allmulti")) if rec else False,
                  "promisc": bool(rec.get("promisc")) if rec else False,
                  "guest": rec.get("guest") if rec else None}
        row.state = "error" if row.problems else "drift" if ops else \
            "ok" if rec is not None else "unknown"
        row.last_change = mtime if rec is not None else None
    else:
        row.state = "unmanaged"
    return row


def _other_row(ds: DomainSync, iface: Interface) -> Row:
    return Row(ds.name, True, iface.display_name, iface.type, iface.mac, iface.source_network,
               iface.source_bridge, iface.source_dev, None, iface.target, False,
               "netplug does not manage this interface type", {}, state="unmanaged")


def _retired_rows(ds: DomainSync, record: dict[str, Any], mtime: float | None,
                  skip: set[str] = frozenset(), reason: str = "domain no longer runs"
                  ) -> list[Row]:
    """Records reconcile will undo: of a domain that no longer runs, or (``skip`` naming the
    devices its current interfaces cover) of interfaces a running domain no longer has."""
    rows = []
    for tap, r in sorted(record.get("ports", {}).items()):
        if tap in skip:
            continue
        rows.append(Row(ds.name, ds.running, r.get("interface") or "?", "bridge" if not
                        r.get("network") else "network", r.get("mac"), r.get("network"),
                        r.get("bridge"), None, None, tap, True, reason,
                        r.get("policy") or {}, state="retired",
                        drift=tuple(op.what() for op in ds.ops if op.device == tap),
                        last_change=mtime))
    for dev, r in sorted(record.get("rx", {}).items()):
        if dev in skip:
            continue
        rows.append(Row(ds.name, ds.running, r.get("interface") or "?", "direct", r.get("mac"),
                        r.get("network"), None, r.get("lower"), None, dev, True,
                        reason, {}, state="retired",
                        drift=tuple(op.what() for op in ds.ops if op.device == dev),
                        last_change=mtime))
    return rows


def build_rows(report: SyncReport, inputs: Inputs, state: StateDir) -> list[Row]:
    domains = {d.name: d for d in inputs.desired.domains}
    records = report.records
    rows: list[Row] = []
    for ds in report.domains:
        rec = records.get(ds.name, {})
        mtime = state.domain_mtime(ds.name) if rec else None
        if not ds.running:
            rows += _retired_rows(ds, rec, mtime)
            continue
        by_index: dict[int, Row] = {}
        for it in ds.bridge_intents:
            by_index[it.interface.index] = _bridge_row(ds, it, report.observed, rec, mtime)
        for it in ds.macvtap_intents:
            by_index[it.interface.index] = _macvtap_row(ds, it, rec, mtime)
        for iface in domains[ds.name].interfaces:
            rows.append(by_index.get(iface.index) or _other_row(ds, iface))
        # Recorded ports and macvtaps the domain's interfaces no longer cover (a NIC detached,
        # its tap renamed): reconcile undoes them, so they get rows of their own.
        covered = {r.device for r in rows if r.domain == ds.name and r.device}
        rows += _retired_rows(ds, rec, mtime, covered,
                              "no interface of the running domain has this device any more")
    for r in rows:
        # Whatever reconcile would change shows as drift, managed or not (an interface that is
        # no longer managed gets its port reverted).
        if r.drift and r.state not in ("retired", "error"):
            r.state = "drift"
    return rows


def unplaced_ops(report: SyncReport, rows: Iterable[Row]) -> list[Operation]:
    """Planned operations no row shows (bridge-level ones, e.g. vlan_filtering on)."""
    shown = {(r.domain, r.device) for r in rows if r.drift}
    return [op for d in report.domains for op in d.ops if (d.name, op.device) not in shown]


# -- output -----------------------------------------------------------------------------------


def _yn(v: bool | None, yes: str = "on", no: str = "off") -> str:
    return "-" if v is None else yes if v else no


def _policy_cell(r: Row) -> str:
    if not r.managed:
        return "-"
    if r.rx is not None or (r.type == "direct" and r.policy.get("rxFilters")):
        return "rx=" + (r.policy.get("rxFilters") or "").replace(" ", ",")
    parts = ["promiscLinks=no"]
    if r.policy.get("sticky") == "yes":
        parts.append("sticky")
    if r.policy.get("vlanFiltering") == "yes":
        parts.append("vlan")
    return ",".join(parts)


def _rx_cell(r: Row) -> str:
    if r.rx is None:
        return "-"
    s = r.rx["state"]
    if r.rx["multicast"] or r.rx["unicast"]:
        s += f" {r.rx['multicast']}mc"
        if r.rx["unicast"]:
            s += f"/{r.rx['unicast']}uc"
    return s


def _time_cell(ts: float | None) -> str:
    if ts is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


COLUMNS = ("DOMAIN", "INTERFACE", "TYPE", "SOURCE", "DEVICE", "MAC", "POLICY", "LEARNING",
           "FLOOD", "FDB", "RX-FILTER", "STATE", "LAST CHANGE")


def table(rows: Iterable[Row]) -> list[str]:
    cells = [COLUMNS]
    for r in rows:
        cells.append((r.domain, r.interface, r.type, r.bridge or r.lower or r.network or "-",
                      r.device or "-", r.mac or "-", _policy_cell(r), _yn(r.learning),
                      _yn(r.flood), _fdb_cell(r), _rx_cell(r), r.state,
                      _time_cell(r.last_change)))
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]


def _fdb_cell(r: Row) -> str:
    """"yes", "yes (VLAN 10, 20)" where the port is in VLANs, "+2 MACs" for extra MACs."""
    cell = _yn(r.fdb, "yes", "no")
    vlans = sorted({v for m, v in r.fdb_entries if m == r.mac and v is not None})
    if r.fdb and vlans:
        cell += f" (VLAN {','.join(map(str, vlans))})"
    extra = {m for m, _v in r.fdb_entries if m != r.mac}
    if extra:
        cell += f" +{len(extra)} MAC{'s' * (len(extra) != 1)}"
    return cell


def footnotes(rows: Iterable[Row], report: SyncReport) -> list[str]:
    out = []
    rows = list(rows)
    for r in rows:
        where = f"{r.domain} {r.interface}"
        for p in r.problems:
            out.append(f"error: {p}")
        if r.drift:
            out.append(f"drift: {where}: {'; '.join(r.drift)} (run 'netplug reconcile')")
        if not r.managed and r.reason not in _QUIET_REASONS and r.type in (
                "bridge", "network", "direct"):
            out.append(f"not managed: {where}: {r.reason}")
    for op in unplaced_ops(report, rows):
        out.append(f"drift: {op.ctx.describe()}: {op.what()} (run 'netplug reconcile')")
    seen = set(out)
    for n in report.notes:
        line = f"{n.level}: {n.message}"
        if line not in seen:
            out.append(line)
            seen.add(line)
    return out


def problems(inputs: Inputs, state: StateDir, paths=None) -> list[str]:
    """What keeps status (and reconcile) from seeing all of netplug's work, one line each."""
    out = []
    if inputs.config_error:
        out.append(f"error: {inputs.config_error}; until it is fixed the hooks manage nothing "
                   f"through it and reconcile refuses to run (netplug check-config)")
    for name, why in sorted(state.record_errors().items()):
        out.append(f"error: domain {name}: {why}")
    for m in paths.mismatches() if paths is not None else ():
        out.append(f"warning: {m}; what is shown is for this command's paths, not the hooks'")
    if paths is not None and paths.hooks is not None and paths.hooks.problem:
        out.append(f"warning: {paths.hooks.problem}")
    for e in inputs.desired.errors:
        out.append(f"error: {e}")
    return out


def hook_results(rows: Iterable[Row], state: StateDir) -> dict[str, hookresult.HookResult]:
    """The last qemu hook run of every domain in the table that has one."""
    names = sorted({r.domain for r in rows})
    return {n: res for n in names if (res := hookresult.read(state.path, "qemu", n))}


def hook_lines(results: dict[str, hookresult.HookResult]) -> list[str]:
    if not results:
        return []
    cells = [("DOMAIN", "LAST HOOK RUN", "OPERATION", "RESULT")]
    for name, r in sorted(results.items()):
        cells.append((name, _time_cell(r.at), f"{r.operation} {r.subop}", r.outcome()))
    widths = [max(len(c[i]) for c in cells) for i in range(3)]
    return ["  ".join([*(c.ljust(w) for c, w in zip(row[:3], widths)), row[3]]).rstrip()
            for row in cells]


def document(rows: list[Row], report: SyncReport, inputs: Inputs, state: StateDir | None = None,
             paths=None, results: dict | None = None) -> dict[str, Any]:
    return {"version": JSON_VERSION, "command": "status", "connect": inputs.uri,
            "interfaces": [r.to_json() for r in rows],
            # Planned operations no interface row shows (bridge-level ones).
            "other_drift": [{"description": op.what(), "context": op.ctx.describe(),
                             "operation": op.to_json()} for op in unplaced_ops(report, rows)],
            "drift_operations": len(report.planned),
            "last_hook_runs": {n: r.to_json() for n, r in (results or {}).items()},
            "notes": [n.to_json() for n in report.notes],
            "config_error": inputs.config_error,
            "record_errors": state.record_errors() if state is not None else {},
            "paths": paths.to_json() if paths is not None else None,
            "path_mismatches": paths.mismatches() if paths is not None else [],
            "errors": list(inputs.desired.errors)}


# -- the command ------------------------------------------------------------------------------


def register(subparsers) -> None:
    sp = subparsers.add_parser(
        "status", help="show what netplug manages, per domain and interface",
        description="A table per domain and interface: type, bridge or lower device, tap or "
                    "macvtap, policy, learning, flood, FDB entry present, RX-filter sync "
                    "state, last change. Read-only.")
    add_common_arguments(sp)
    sp.add_argument("--verbose", "-v", action="store_true", help=argparse.SUPPRESS)
    sp.set_defaults(func=cmd_status)


def run(args: argparse.Namespace, out: TextIO, *,
        kernel_factory: Callable[[], Any] | None = None) -> int:
    paths = command_paths(args)
    state = StateDir(paths.state_dir.value)
    inputs = read_inputs(args.connect, paths.config.value, guest_query=args.guest_query,
                         lenient_config=True)
    if kernel_factory is None:
        report = observe_dry(inputs, state)
    else:
        with kernel_factory() as k:
            report = observe_dry(inputs, state, k)
    rows = build_rows(report, inputs, state)
    results = hook_results(rows, state)
    if args.json:
        json.dump(document(rows, report, inputs, state, paths, results), out, indent=2)
        out.write("\n")
        return 0
    lines = table(rows) if rows else [
        "no running domains with interfaces, and no netplug records"]
    lines += footnotes(rows, report)
    hooks = hook_lines(results)
    if hooks:
        lines += [""] + hooks
    lines += problems(inputs, state, paths)
    out.write("".join(line + "\n" for line in lines))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    setup_logging("status", getattr(args, "verbose", False))
    return run(args, sys.stdout)
