"""Prometheus metrics (libvirt_netplug.metrics), unit tier.

Proves: the file is valid text exposition (parsed back with prometheus-client's own parser),
names are prefixed netplug_ and labelled by source; gauges describe the last run; counters
carry over from the previous file (and a re-written run is not counted twice); a failed run
keeps the last success time; RX-filter entries per interface come from netplug's records; an
unwritable path is a one-line NetplugError.
"""

from __future__ import annotations

import pytest

from libvirt_netplug.errors import NetplugError, KernelError
from libvirt_netplug.metrics import RunMetrics, run_metrics, write_metrics, write_run_metrics
from libvirt_netplug.model import Interface
from libvirt_netplug.ops import Context, ReplaceFdb, SetPortFlags
from libvirt_netplug.plan import PortIntent
from libvirt_netplug.policy import Policy
from libvirt_netplug.rxfilter import MacvtapIntent
from libvirt_netplug.state import StateDir
from libvirt_netplug.sync import DomainSync, SyncReport

prom_parser = pytest.importorskip("prometheus_client.parser")


def _iface(i, type_="bridge", target="tap0", alias="net0"):
    return Interface(index=i, type=type_, mac=f"52:54:00:00:00:0{i + 1}", target=target,
                     alias=alias, source_bridge="br0" if type_ == "bridge" else None,
                     source_network=None, source_dev="low0" if type_ == "direct" else None,
                     source_mode="bridge" if type_ == "direct" else None, portid=None,
                     model=None, trust_guest_rx_filters=False, vlan_tag=None)


def report(applied=True, error=False) -> SyncReport:
    p = Policy(promisc_links=False)
    bi = [PortIntent("vm1", _iface(0, target="tap0"), "br0", None, p, True, "managed"),
          PortIntent("vm1", _iface(1, target="tap1", alias="net1"), "br0", None, p, True,
                     "managed"),
          PortIntent("vm1", _iface(2, target="tap2", alias="net2"), "br1", None, Policy(),
                     False, "policy does not say promiscLinks='no'")]
    mi = [MacvtapIntent("vm1", _iface(3, "direct", "mvt0", "net3"), "low0", "bridge", None,
                        Policy(rx_filters=frozenset({"multicast"})), True, "managed")]
    ctx = Context("vm1", "net0", "52:54:00:00:00:01", "br0")
    ops = [ReplaceFdb(ctx, "tap0", "52:54:00:00:00:01"), SetPortFlags(ctx, "tap0", False, False)]
    r = SyncReport(dry_run=not applied,
                   domains=[DomainSync("vm1", True, bi, mi, ops),
                            DomainSync("old", False, [], [], [])])
    if applied:
        r.applied = ops[:1] if error else list(ops)
        if error:
            r.errors = [(ops[1], KernelError("set port flags", "tap0", 1))]
    return r


def samples(path) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in prom_parser.text_string_to_metric_families(path.read_text()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(ss, name, **labels):
    return ss[(name, tuple(sorted({"source": "reconcile", **labels}.items())))]


def test_gauges_of_one_run(tmp_path):
    state = StateDir(str(tmp_path / "state"))
    state.put_domain("vm1", {"domain": "vm1", "ports": {}, "rx": {"mvt0": {
        "interface": "net3", "mc": ["01:00:5e:00:00:fb", "33:33:00:00:00:fb"], "uc": []}}})
    path = tmp_path / "netplug.prom"
    write_metrics(str(path), report(), source="reconcile", state=state, now=1000.0,
                  duration=0.25)
    ss = samples(path)
    assert all(name.startswith("netplug_") for name, _ in ss)
    assert all(dict(labels)["source"] == "reconcile" for _, labels in ss)
    assert value(ss, "netplug_managed_ports", bridge="br0") == 2
    assert ("netplug_managed_ports", (("bridge", "br1"), ("source", "reconcile"))) not in ss
    assert value(ss, "netplug_managed_macvtaps", lower="low0") == 1
    assert value(ss, "netplug_last_run_drift_operations", action="fdb-replace") == 1
    assert value(ss, "netplug_last_run_drift_operations", action="port-flags") == 1
    assert value(ss, "netplug_last_run_drift_operations", action="multicast-add") == 0
    assert value(ss, "netplug_last_run_repaired_operations", action="port-flags") == 1
    assert value(ss, "netplug_last_run_apply_errors") == 0
    assert value(ss, "netplug_rx_filter_entries", domain="vm1", interface="net3",
                 device="mvt0", list="multicast") == 2
    assert value(ss, "netplug_rx_filter_entries", domain="vm1", interface="net3",
                 device="mvt0", list="unicast") == 0
    assert value(ss, "netplug_last_run_timestamp_seconds") == 1000.0
    assert value(ss, "netplug_last_success_timestamp_seconds") == 1000.0
    assert value(ss, "netplug_last_run_success") == 1.0
    assert value(ss, "netplug_last_run_duration_seconds") == 0.25
    assert value(ss, "netplug_runs_total") == 1
    assert value(ss, "netplug_repaired_operations_total") == 2


def test_counters_carry_over_and_failures_keep_last_success(tmp_path):
    path = tmp_path / "netplug.prom"
    write_metrics(str(path), report(), source="reconcile", now=1000.0)
    write_metrics(str(path), report(error=True), source="reconcile", now=1300.0)
    ss = samples(path)
    assert value(ss, "netplug_runs_total") == 2
    assert value(ss, "netplug_failed_runs_total") == 1
    assert value(ss, "netplug_drift_found_operations_total") == 4
    assert value(ss, "netplug_repaired_operations_total") == 3
    assert value(ss, "netplug_apply_errors_total") == 1
    assert value(ss, "netplug_last_run_apply_errors") == 1
    assert value(ss, "netplug_last_run_success") == 0.0
    assert value(ss, "netplug_last_success_timestamp_seconds") == 1000.0
    assert value(ss, "netplug_last_run_timestamp_seconds") == 1300.0
    # libvirt unreachable: no report at all.
    write_metrics(str(path), None, source="reconcile", success=False, now=1600.0)
    ss = samples(path)
    assert value(ss, "netplug_runs_total") == 3 and value(ss, "netplug_failed_runs_total") == 2
    assert value(ss, "netplug_last_success_timestamp_seconds") == 1000.0
    assert value(ss, "netplug_repaired_operations_total") == 3


def test_same_run_written_twice_counts_once(tmp_path):
    path = tmp_path / "netplug.prom"
    m = run_metrics(report(), source="reconcile", now=1000.0)
    write_run_metrics(str(path), m)
    write_run_metrics(str(path), m)
    ss = samples(path)
    assert value(ss, "netplug_runs_total") == 1
    assert value(ss, "netplug_repaired_operations_total") == 2


def test_counters_are_per_source(tmp_path):
    path = tmp_path / "netplug.prom"
    write_metrics(str(path), report(), source="reconcile", now=1000.0)
    write_metrics(str(path), report(), source="agent", now=1001.0)
    ss = samples(path)
    assert ("netplug_runs_total", (("source", "agent"),)) in ss
    assert ss[("netplug_runs_total", (("source", "agent"),))] == 1  # not 2
    assert not any(dict(labels).get("source") == "reconcile" for _, labels in ss)


def test_unwritable_path_is_one_line(tmp_path):
    with pytest.raises(NetplugError) as e:
        write_run_metrics(str(tmp_path / "missing" / "netplug.prom"),
                          RunMetrics("reconcile", True, 1.0))
    assert "\n" not in str(e.value)
    assert str(e.value).startswith(f"metrics file {tmp_path}/missing/netplug.prom: cannot "
                                   f"write: No such file or directory")


def test_unparsable_previous_file_restarts_counters(tmp_path):
    path = tmp_path / "netplug.prom"
    path.write_text("this is { not prometheus\n")
    write_metrics(str(path), report(), source="reconcile", now=5.0)
    assert value(samples(path), "netplug_runs_total") == 1
