"""netplug reconcile, unit tier: the in-memory kernel (tests/fakes.py) behind the one seam and
libvirt's test driver (``test:///path/node.xml``, in-process, no daemon) serving the live XML.

What this proves: exit status 0/1/2 as documented; a repair does exactly the planned changes
and a second run finds nothing; --dry-run changes neither the kernel nor the state dir; every
change names domain, interface, bridge, MAC and a reason; records of domains that stopped are
undone; --domain limits the run; foreign entries are never touched; the JSON document has the
documented shape.
"""

from __future__ import annotations

import json
import os
import re

import pytest

from fakes import FakeKernel, bridge_iface, domain_xml, guest_mac, network_iface, network_xml, \
    policy_xml, tap_mac
from libvirt_netplug import cli
from libvirt_netplug.kernel import FdbEntry, Link
from libvirt_netplug.ops import (AddMulticast, Context, DeleteFdb, DelMulticast, ReplaceFdb,
                                 SetAddress, SetAllmulti, SetPortFlags, SetVlanFiltering)
from libvirt_netplug.plan import Observed
from libvirt_netplug.reconcile import explain

libvirt = pytest.importorskip("libvirt", reason="libvirt-python is not installed")

TEST_NS = "http://libvirt.org/schemas/domain/test/1.0"
A, B, C = guest_mac(1), guest_mac(2), guest_mac(3)
FOREIGN = "02:00:00:00:0f:01"
CONFIG = '[bridge.br0]\npromiscLinks = "no"\n'


# -- helpers ---------------------------------------------------------------------------------


def stopped(xml: str) -> str:
    """A domain the test driver reports as shut off."""
    return xml.replace("<domain type='qemu'>", f"<domain type='qemu' xmlns:test='{TEST_NS}'>"
                       ).replace("</name>", "</name><test:runstate>5</test:runstate>", 1)


def write_node(path, domains=(), networks=()) -> str:
    path.write_text("<node>" + "".join(domains) + "".join(networks) + "</node>")
    return f"test://{path}"


class World:
    """A host: br0 (config-managed) with uplink up0 and taps tap0/tap1 of vm1; nbr0 of the
    libvirt network 'mgd' (metadata policy) with tap2 of vm2; brF, a foreign bridge."""

    def __init__(self, tmp_path, fake: FakeKernel):
        self.tmp = tmp_path
        self.k = fake
        self.config = tmp_path / "config.toml"
        self.config.write_text(CONFIG)
        self.state = tmp_path / "state"
        self.node = tmp_path / "node.xml"
        k = fake
        k.add_bridge("br0")
        k.add_veth("up0", master="br0")
        k.add_tap("tap0", master="br0", address=tap_mac(A))
        k.add_tap("tap1", master="br0", address=tap_mac(B))
        k.add_bridge("nbr0")
        k.add_tap("tap2", master="nbr0", address=tap_mac(C))
        k.add_bridge("brF")
        k.add_veth("upF", master="brF")
        k.add_tap("tapF", master="brF")
        k.add_static("upF", "02:00:00:00:0f:02")
        k.add_static("up0", FOREIGN)
        k.set_port_flags("tapF", learning=False)
        k.journal.clear()
        self.vm1 = domain_xml("vm1", [bridge_iface("br0", "tap0", A, "ua-net0"),
                                      bridge_iface("br0", "tap1", B, "ua-net1")])
        self.vm2 = domain_xml("vm2", [network_iface("mgd", "nbr0", "tap2", C, "ua-net0")])
        self.net = network_xml("mgd", "nbr0", forward=None,
                               metadata=policy_xml(promiscLinks="no"))
        self.uri = write_node(self.node, [self.vm1, self.vm2], [self.net])

    def set_domains(self, *domains: str) -> None:
        write_node(self.node, domains, [self.net])

    def argv(self, *extra: str) -> list[str]:
        return ["reconcile", "--connect", self.uri, "--config", str(self.config),
                "--state-dir", str(self.state), *extra]

    def state_files(self) -> dict[str, bytes]:
        out = {}
        for d, _dirs, files in os.walk(self.state):
            for f in files:
                if f != "lock":
                    p = os.path.join(d, f)
                    with open(p, "rb") as fh:
                        out[os.path.relpath(p, self.state)] = fh.read()
        return out


@pytest.fixture
def world(tmp_path, fake) -> World:
    return World(tmp_path, fake)


def netplug(argv, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def managed_ok(k: FakeKernel, tap: str, mac: str) -> bool:
    d = k.devs[tap]
    return (not d.learning and not d.flood
            and k.table.get((d.master, mac, None)) == (tap, "static", False))


# -- explain(): the reason printed next to every change ----------------------------------------


def _link(name, **kw) -> Link:
    base = dict(index=5, kind="tun", address=None, master="br0", lower=None, up=True,
                promisc=False, allmulti=False, promiscuity=1, allmulti_count=1,
                bridge_port=True, learning=True, flood=True)
    base.update(kw)
    return Link(name=name, **base)


CTX = Context("vm1", "net0", A, "br0")


@pytest.mark.parametrize("op,running,entries,expected", [
    (ReplaceFdb(CTX, "tap0", A), True, [], "no FDB entry for the guest's MAC on tap0"),
    (ReplaceFdb(CTX, "tap0", A), True, [FdbEntry("tap0", A, None, "dynamic")],
     "tap0 has only a dynamic entry for " + A + " (learned); a static one is needed"),
    (ReplaceFdb(CTX, "tap0", A), True, [FdbEntry("up0", A, None, "dynamic")],
     A + " is a dynamic entry on port up0, not on the guest's tap tap0"),
    (ReplaceFdb(CTX, "tap0", A, sticky=True), True, [FdbEntry("tap0", A, None, "static")],
     "the entry is not sticky but policy says sticky='yes'"),
    (SetPortFlags(CTX, "tap0", False, False, True, False), True, [], "learning is on"),
    (SetPortFlags(CTX, "tap0", False, False, True, True), True, [],
     "learning is on and flood is on"),
    (SetPortFlags(CTX, "tap0", True, True, False, False), False, [],
     "domain vm1 no longer runs: restore the flags netplug changed"),
    (DeleteFdb(CTX, "tap0", A), False, [], "domain vm1 no longer runs: remove the entry "
                                           "netplug added"),
    (DeleteFdb(CTX, "tap0", A), True, [], "netplug added this entry for an interface that no "
                                          "longer wants it (MAC changed, interface removed or "
                                          "no longer managed)"),
    (SetVlanFiltering(Context(bridge="br0"), "br0", True), True, [],
     "policy says vlanFiltering='yes' and the bridge has vlan_filtering off"),
    (AddMulticast(CTX, "mvt0", "01:00:5e:00:00:fb"), True, [],
     "the guest listens to 01:00:5e:00:00:fb and mvt0 does not pass it"),
    (DelMulticast(CTX, "mvt0", "01:00:5e:00:00:fb"), True, [],
     "netplug added it and the guest's filter (or the policy) no longer wants it"),
    (SetAllmulti(CTX, "mvt0", True), True, [], "the guest's filter asks for allmulticast"),
    (SetAddress(CTX, "mvt0", A, B), True, [],
     f"mvt0 has address {B}, the guest's MAC is {A}"),
], ids=lambda v: v.kind if hasattr(v, "kind") else None)
def test_explain_names_the_drift(op, running, entries, expected):
    observed = Observed({"tap0": _link("tap0")}, {"br0": tuple(entries)})
    assert explain(op, running, observed) == expected


# -- repair, idempotency, dry run -----------------------------------------------------------------


def test_repair_from_scratch_then_in_sync(world, capsys):
    rc, out, err = netplug(world.argv(), capsys)
    assert rc == 2, out + err
    for tap, mac in (("tap0", A), ("tap1", B), ("tap2", C)):
        assert managed_ok(world.k, tap, mac), tap
    # Every change line names who it is for and why.
    lines = [ln for ln in out.splitlines() if ln.startswith("repaired: ")]
    assert len(lines) == 6, out
    assert ("repaired: domain vm1, interface ua-net0, mac 52:54:00:00:00:01, bridge br0: add "
            "static FDB entry 52:54:00:00:00:01 on tap0 (no FDB entry for the guest's MAC on "
            "tap0)") in lines
    assert ("repaired: domain vm2, interface ua-net0, mac 52:54:00:00:00:03, bridge nbr0, "
            "network mgd: set learning off flood off on tap2 (learning is on and flood is on)"
            ) in lines
    assert out.splitlines()[-1].startswith("drift repaired: 6 changes for 2 domains; 3 "
                                           "managed ports, 0 managed macvtaps in 2 running "
                                           "domains")
    journal = list(world.k.journal)
    snap = world.k.snapshot()
    rc, out, err = netplug(world.argv(), capsys)
    assert rc == 0, out + err
    assert out.startswith("in sync: 3 managed ports"), out
    assert world.k.journal == journal  # nothing written the second time
    assert world.k.snapshot() == snap


def test_dry_run_changes_nothing(world, capsys):
    before, files = world.k.snapshot(), world.state_files()
    rc, out, _ = netplug(world.argv("--dry-run"), capsys)
    assert rc == 2
    assert world.k.snapshot() == before and world.k.journal == []
    assert world.state_files() == files
    assert sum(ln.startswith("would repair: ") for ln in out.splitlines()) == 6
    assert "(dry run: nothing changed)" in out.splitlines()[-1]
    # After a repair, drift introduced by hand is reported by a dry run and left in place.
    assert netplug(world.argv(), capsys)[0] == 2
    world.k.set_port_flags("tap1", flood=True)
    del world.k.table[("br0", A, None)]
    before, files = world.k.snapshot(), world.state_files()
    rc, out, _ = netplug(world.argv("--dry-run"), capsys)
    assert rc == 2
    assert world.k.snapshot() == before and world.state_files() == files
    changes = [ln for ln in out.splitlines() if ln.startswith("would repair")]
    assert changes == [
        "would repair: domain vm1, interface ua-net0, mac 52:54:00:00:00:01, bridge br0: add "
        "static FDB entry 52:54:00:00:00:01 on tap0 (no FDB entry for the guest's MAC on tap0)",
        "would repair: domain vm1, interface ua-net1, mac 52:54:00:00:00:02, bridge br0: set "
        "learning off flood off on tap1 (flood is on)"]


@pytest.mark.parametrize("drift", ["learning", "flood", "entry-deleted", "entry-dynamic",
                                   "entry-sticky"])
def test_repairs_exactly_the_drift(world, capsys, drift):
    assert netplug(world.argv(), capsys)[0] == 2
    k = world.k
    if drift in ("learning", "flood"):
        k.set_port_flags("tap1", **{drift: True})
        expect = {("set_port_flags", "tap1", (False, False))}
    elif drift == "entry-deleted":
        del k.table[("br0", B, None)]
        expect = {("replace_fdb", "tap1", (B, None, False))}
    elif drift == "entry-dynamic":
        k.table[("br0", B, None)] = ("tap1", "dynamic", False)
        expect = {("replace_fdb", "tap1", (B, None, False))}
    else:
        k.table[("br0", B, None)] = ("tap1", "static", True)
        expect = {("replace_fdb", "tap1", (B, None, False))}
    k.journal.clear()
    rc, out, _ = netplug(world.argv(), capsys)
    assert rc == 2, out
    assert set(k.journal) == expect
    assert managed_ok(k, "tap1", B)
    k.journal.clear()
    assert netplug(world.argv(), capsys)[0] == 0
    assert k.journal == []


def test_hand_added_entries_are_left_alone(world, capsys):
    assert netplug(world.argv(), capsys)[0] == 2
    k = world.k
    k.add_static("tap0", "02:00:00:00:0e:01")  # an admin's extra entry on a managed tap
    k.add_static("up0", "02:00:00:00:0e:02", sticky=True)
    k.journal.clear()
    rc, out, _ = netplug(world.argv(), capsys)
    assert rc == 0, out
    assert k.journal == []
    assert k.table[("br0", "02:00:00:00:0e:01", None)] == ("tap0", "static", False)


def test_stopped_domain_is_undone_and_foreign_state_untouched(world, capsys):
    foreign = ("brF", "upF", "tapF", "up0")
    foreign_before = {n: repr(world.k.devs[n]) for n in foreign}
    table_before = {key: v for key, v in world.k.table.items() if key[0] == "brF" or
                    v[0] == "up0"}
    assert netplug(world.argv(), capsys)[0] == 2
    world.set_domains(stopped(world.vm1), world.vm2)
    world.k.journal.clear()
    rc, out, _ = netplug(world.argv(), capsys)
    assert rc == 2, out
    assert set(world.k.journal) == {("set_port_flags", "tap0", (True, True)),
                                    ("set_port_flags", "tap1", (True, True)),
                                    ("delete_fdb", "tap0", (A, None)),
                                    ("delete_fdb", "tap1", (B, None))}
    assert "repaired: domain vm1, interface ua-net0, mac 52:54:00:00:00:01, bridge br0: " \
           "delete FDB entry 52:54:00:00:00:01 on tap0 (domain vm1 no longer runs: remove " \
           "the entry netplug added)" in out.splitlines()
    assert not os.path.exists(world.state / "domains" / "vm1.json")
    assert managed_ok(world.k, "tap2", C)
    assert {n: repr(world.k.devs[n]) for n in foreign} == foreign_before
    assert {key: v for key, v in world.k.table.items() if key[0] == "brF" or v[0] == "up0"} \
        == table_before
    assert netplug(world.argv(), capsys)[0] == 0


def test_domain_option_limits_the_run(world, capsys):
    rc, out, _ = netplug(world.argv("--domain", "vm2"), capsys)
    assert rc == 2
    assert {dev for _m, dev, _a in world.k.journal} == {"tap2"}
    assert "vm1" not in out
    # A stopped domain named with --domain is undone; other domains' records stay.
    assert netplug(world.argv(), capsys)[0] == 2
    world.set_domains(stopped(world.vm1), stopped(world.vm2))
    world.k.journal.clear()
    assert netplug(world.argv("--domain", "vm2"), capsys)[0] == 2
    assert {dev for _m, dev, _a in world.k.journal} == {"tap2"}
    assert managed_ok(world.k, "tap0", A)
    assert os.path.exists(world.state / "domains" / "vm1.json")


def test_unknown_domain_is_an_error(world, capsys):
    rc, out, _ = netplug(world.argv("--domain", "nosuch"), capsys)
    assert rc == 1
    assert "error: domain nosuch: not found" in out


def test_conflicting_static_entry_is_an_error_and_left_alone(world, capsys):
    world.k.add_static("up0", B)  # somebody pinned the guest's MAC to the uplink
    rc, out, _ = netplug(world.argv(), capsys)
    assert rc == 1, out
    assert world.k.table[("br0", B, None)] == ("up0", "static", False)
    assert world.k.devs["tap1"].learning and world.k.devs["tap1"].flood
    assert any(ln.startswith("error: domain vm1, interface ua-net1") and "up0" in ln
               for ln in out.splitlines()), out
    assert out.splitlines()[-1].startswith("errors: 1 problem, 4 changes")


def test_apply_failure_is_exit_1_and_rolled_back(world, capsys):
    world.k.fail("set_port_flags", "tap1", 1)  # EPERM
    rc, out, _ = netplug(world.argv("--json"), capsys)
    assert rc == 1
    doc = json.loads(out)
    assert doc["status"] == "error" and doc["exit_status"] == 1
    by_dev = {(c["device"], c["action"]): c for c in doc["changes"]}
    assert by_dev[("tap1", "port-flags")]["result"] == "failed"
    assert "Operation not permitted" in by_dev[("tap1", "port-flags")]["error"]
    assert by_dev[("tap1", "fdb-replace")]["result"] == "not-applied"
    assert by_dev[("tap0", "port-flags")]["result"] == "applied"
    assert ("br0", B, None) not in world.k.table  # the half-applied port was rolled back
    assert doc["errors"] and doc["errors"][0].startswith("failed to set learning off flood "
                                                         "off on tap1")


def test_libvirt_unreachable_is_one_line(world, capsys, tmp_path):
    argv = world.argv()
    argv[argv.index("--connect") + 1] = "test:///nonexistent/node.xml"
    rc, out, err = netplug(argv, capsys)
    assert rc == 1 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("netplug reconcile: error: cannot "
                                                         "connect to libvirt"), err


# -- the JSON document --------------------------------------------------------------------------


def test_json_document_shape(world, capsys):
    rc, out, _ = netplug(world.argv("--json", "--dry-run"), capsys)
    assert rc == 2
    doc = json.loads(out)
    assert set(doc) == {"version", "command", "connect", "dry_run", "status", "exit_status",
                        "summary", "changes", "notes", "errors", "domains", "timing"}
    assert doc["version"] == 1 and doc["command"] == "reconcile" and doc["dry_run"] is True
    assert doc["status"] == "drift" and doc["exit_status"] == 2
    assert doc["summary"] == {"running_domains": 2, "retired_domains": 0, "managed_ports": 3,
                              "managed_macvtaps": 0, "changes": 6, "applied": 0, "failed": 0,
                              "domains_with_changes": 2}
    c = doc["changes"][0]
    assert set(c) == {"domain", "domain_running", "interface", "mac", "bridge", "network",
                      "lower", "device", "action", "description", "reason", "result", "error",
                      "operation"}
    assert c["result"] == "planned"
    assert c["operation"]["action"] == c["action"]
    assert [d["name"] for d in doc["domains"]] == ["vm1", "vm2"]
    assert set(doc["timing"]) >= {"libvirt_read", "sync", "total"}
    rc, out, _ = netplug(world.argv("--json"), capsys)
    assert json.loads(out)["status"] == "repaired"
    rc, out, _ = netplug(world.argv("--json"), capsys)
    doc = json.loads(out)
    assert rc == 0 and doc["status"] == "in-sync" and doc["changes"] == []


def test_metrics_file_written(world, capsys, tmp_path):
    prom = tmp_path / "netplug.prom"
    assert netplug(world.argv("--metrics-file", str(prom)), capsys)[0] == 2
    text = prom.read_text()
    assert 'netplug_managed_ports{bridge="br0",source="reconcile"} 2.0' in text
    assert 'netplug_last_run_repaired_operations{action="fdb-replace",source="reconcile"} 3.0' in text
    assert re.search(r'^netplug_last_run_success\{source="reconcile"\} 1\.0$', text, re.M)


def test_metrics_file_records_failure_when_libvirt_is_down(world, capsys, tmp_path):
    prom = tmp_path / "netplug.prom"
    assert netplug(world.argv("--metrics-file", str(prom)), capsys)[0] == 2
    argv = world.argv("--metrics-file", str(prom))
    argv[argv.index("--connect") + 1] = "test:///nonexistent/node.xml"
    assert netplug(argv, capsys)[0] == 1
    text = prom.read_text()
    assert re.search(r'^netplug_last_run_success\{source="reconcile"\} 0\.0$', text, re.M)
    assert re.search(r'^netplug_last_success_timestamp_seconds\{source="reconcile"\} ', text,
                     re.M)
    assert re.search(r'^netplug_failed_runs_total\{source="reconcile"\} 1\.0$', text, re.M)
