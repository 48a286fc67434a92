"""netplug status, unit tier (in-memory kernel + libvirt's test driver).

Proves: one row per interface of every running domain (managed or not) plus rows for records
of domains that stopped; learning/flood/FDB come from the kernel; "drift" exactly where
reconcile would act; RX-filter state of managed macvtaps; last change from netplug's record;
columns aligned; JSON carries the same; status changes nothing.
"""

from __future__ import annotations

import datetime as dt
import json
import os

import pytest

from fakes import FakeKernel, bridge_iface, domain_xml, guest_mac, iface, policy_xml, tap_mac
from libvirt_netplug import cli, libvirt_io, reconcile
from libvirt_netplug.policy import load_config
from libvirt_netplug.rxfilter import RxFilter
from libvirt_netplug.state import StateDir

pytest.importorskip("libvirt", reason="libvirt-python is not installed")

TEST_NS = "http://libvirt.org/schemas/domain/test/1.0"
A, B, X, M = guest_mac(1), guest_mac(2), guest_mac(9), guest_mac(0x30)
MDNS = "01:00:5e:00:00:fb"
CONFIG = ('[bridge.br0]\npromiscLinks = "no"\n\n[direct.low0]\n'
          'rxFilters = "multicast allmulti"\n')


def stopped(xml: str) -> str:
    return xml.replace("<domain type='qemu'>", f"<domain type='qemu' xmlns:test='{TEST_NS}'>"
                       ).replace("</name>", "</name><test:runstate>5</test:runstate>", 1)


class World:
    def __init__(self, tmp_path, k: FakeKernel):
        self.k = k
        self.config = tmp_path / "config.toml"
        self.config.write_text(CONFIG)
        self.state = tmp_path / "state"
        self.node = tmp_path / "node.xml"
        k.add_bridge("br0")
        k.add_veth("up0", master="br0")
        k.add_tap("tap0", master="br0", address=tap_mac(A))
        k.add_tap("tap1", master="br0", address=tap_mac(B))
        k.add_tap("tapx", master="br0", address=tap_mac(X))
        k.add_veth("low0")
        k.add("mvt0", "macvtap", lower="low0", macvlan_mode="bridge", address=M)
        k.journal.clear()
        self.vm1 = domain_xml("vm1", [bridge_iface("br0", "tap0", A, "ua-net0"),
                                      bridge_iface("br0", "tap1", B, "ua-net1"),
                                      iface("user", mac=guest_mac(0x20), target=None)])
        self.vm2 = domain_xml("vm2", [
            bridge_iface("br0", "tapx", X, "ua-net0"),
            iface("direct", mac=M, source={"dev": "low0", "mode": "bridge"}, target="mvt0",
                  alias="ua-net1")],
            metadata=policy_xml(interfaces={X: {"promiscLinks": "yes"}}))
        self.set_domains(self.vm1, self.vm2)
        self.uri = f"test://{self.node}"

    def set_domains(self, *domains: str) -> None:
        self.node.write_text("<node>" + "".join(domains) + "</node>")

    def argv(self, cmd: str, *extra: str) -> list[str]:
        return [cmd, "--connect", self.uri, "--config", str(self.config), "--state-dir",
                str(self.state), "--no-guest-query", *extra]

    def seed(self, multicast=(MDNS,)) -> None:
        """A reconcile run that could ask QEMU (the guest listens to ``multicast``)."""
        conn = libvirt_io.connect(self.uri)
        desired = libvirt_io.read_desired(conn, load_config(str(self.config)))

        def rx_source(domain):
            return {"ua-net1": RxFilter("ua-net1", M, multicast_table=tuple(multicast))} \
                if domain.name == "vm2" else {}

        out = reconcile.reconcile(self.k, StateDir(str(self.state)), desired,
                                  rx_source=rx_source)
        assert out.exit_status == 2, out.lines()


@pytest.fixture
def world(tmp_path, fake) -> World:
    return World(tmp_path, fake)


def netplug(argv, capsys):
    capsys.readouterr()
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def rows_of(out: str) -> dict[tuple[str, str], dict]:
    return {(r["domain"], r["interface"]): r for r in json.loads(out)["interfaces"]}


def test_before_anything_is_managed(world, capsys):
    rc, out, _ = netplug(world.argv("status", "--json"), capsys)
    assert rc == 0
    rows = rows_of(out)
    assert list(rows) == [("vm1", "ua-net0"), ("vm1", "ua-net1"), ("vm1", "#2"),
                          ("vm2", "ua-net0"), ("vm2", "ua-net1")]
    r = rows[("vm1", "ua-net0")]
    assert (r["type"], r["bridge"], r["device"], r["mac"]) == ("bridge", "br0", "tap0", A)
    assert r["managed"] and r["state"] == "drift"
    assert (r["learning"], r["flood"], r["fdb"]) == (True, True, False)
    assert r["drift"] == [f"add static FDB entry {A} on tap0", "set learning off flood off on "
                                                               "tap0"]
    assert r["last_change"] is None
    assert rows[("vm1", "#2")]["type"] == "user" and rows[("vm1", "#2")]["state"] == "unmanaged"
    x = rows[("vm2", "ua-net0")]
    assert not x["managed"] and x["state"] == "unmanaged"
    assert x["reason"] == "policy says promiscLinks='yes'"
    mv = rows[("vm2", "ua-net1")]
    assert (mv["type"], mv["lower"], mv["device"], mv["mode"]) == ("direct", "low0", "mvt0",
                                                                    "bridge")
    assert mv["rx"]["state"] == "unknown" and mv["state"] == "unknown"
    assert world.k.journal == []
    assert not os.path.exists(world.state / "domains")


def test_after_reconcile_table_and_json(world, capsys):
    world.seed()
    rec_mtime = os.stat(world.state / "domains" / "vm1.json").st_mtime
    rc, out, _ = netplug(world.argv("status", "--json"), capsys)
    rows = rows_of(out)
    r = rows[("vm1", "ua-net1")]
    assert (r["learning"], r["flood"], r["fdb"], r["state"]) == (False, False, True, "ok")
    assert r["policy"] == {"promiscLinks": "no"}
    assert r["last_change"] == dt.datetime.fromtimestamp(
        rec_mtime, dt.timezone.utc).isoformat(timespec="seconds")
    mv = rows[("vm2", "ua-net1")]
    assert mv["rx"]["state"] == "in-sync" and mv["rx"]["multicast"] == 1
    assert MDNS in world.k.devs["mvt0"].mc

    rc, out, _ = netplug(world.argv("status"), capsys)
    lines = out.splitlines()
    header = lines[0]
    assert header.split() == ["DOMAIN", "INTERFACE", "TYPE", "SOURCE", "DEVICE", "MAC",
                              "POLICY", "LEARNING", "FLOOD", "FDB", "RX-FILTER", "STATE",
                              "LAST", "CHANGE"]
    table = lines[:6]
    # Aligned: every column starts at the same offset on every line, after a blank.
    starts = [header.index(h) for h in ("INTERFACE", "TYPE", "SOURCE", "DEVICE", "MAC",
                                         "POLICY", "LEARNING", "FLOOD", "FDB", "RX-FILTER",
                                         "STATE", "LAST CHANGE")]
    for line in table[1:]:
        for s in starts:
            assert line[s - 1] == " " and line[s] != " ", (line, s)
    tap1 = next(ln for ln in table if " tap1 " in ln).split()
    assert tap1[:11] == ["vm1", "ua-net1", "bridge", "br0", "tap1", B, "promiscLinks=no",
                         "off", "off", "yes", "-"]
    assert tap1[11] == "ok"
    mvt = next(ln for ln in table if " mvt0 " in ln)
    assert mvt.split()[6:12] == ["rx=multicast,allmulti", "-", "-", "-", "in-sync", "1mc"]
    assert mvt[header.index("RX-FILTER"):].startswith("in-sync 1mc ")


def test_drift_and_footnotes(world, capsys):
    world.seed()
    world.k.set_port_flags("tap1", learning=True)
    world.k.devs["mvt0"].mc.discard(MDNS)  # somebody removed the guest's group
    world.k.journal.clear()
    rc, out, _ = netplug(world.argv("status"), capsys)
    assert rc == 0
    assert "drift: vm1 ua-net1: set learning off flood off on tap1 (run 'netplug reconcile')" \
        in out.splitlines()
    assert f"drift: vm2 ua-net1: add multicast {MDNS} to mvt0 (run 'netplug reconcile')" \
        in out.splitlines()
    assert "not managed: vm2 ua-net0: policy says promiscLinks='yes'" in out.splitlines()
    assert world.k.journal == []
    rows = rows_of(netplug(world.argv("status", "--json"), capsys)[1])
    assert rows[("vm1", "ua-net1")]["state"] == "drift"
    assert rows[("vm2", "ua-net1")]["rx"]["state"] == "drift"


def test_stopped_domain_rows(world, capsys):
    world.seed()
    world.set_domains(stopped(world.vm1), world.vm2)
    rc, out, _ = netplug(world.argv("status", "--json"), capsys)
    rows = rows_of(out)
    r = rows[("vm1", "ua-net0")]
    assert not r["running"] and r["state"] == "retired"
    assert r["drift"] == ["set learning on flood on on tap0", f"delete FDB entry {A} on tap0"]
    assert ("vm1", "#2") not in rows  # only what netplug recorded


def test_no_domains(tmp_path, fake, capsys):
    node = tmp_path / "node.xml"
    node.write_text("<node/>")
    rc, out, _ = netplug(["status", "--connect", f"test://{node}", "--state-dir",
                          str(tmp_path / "s")], capsys)
    assert rc == 0
    assert out == "no running domains with interfaces, and no netplug records\n"


# -- status never hides what reconcile would change ------------------------------------------


def drift_in_text(out: str) -> list[str]:
    """Every operation the text names: 'drift: WHERE: op; op (run ...)' lines."""
    ops = []
    for line in out.splitlines():
        if line.startswith("drift: "):
            body = line[len("drift: "):].rsplit(" (run 'netplug reconcile')", 1)[0]
            ops += body.split(": ", 1)[1].split("; ")
    return sorted(ops)


def dry_run_changes(world, capsys, config) -> list[str]:
    rc, out, _ = netplug(["reconcile", "--dry-run", "--json", "--connect", world.uri,
                          "--config", str(config), "--state-dir", str(world.state),
                          "--no-guest-query"], capsys)
    return sorted(c["description"] for c in json.loads(out)["changes"])


def check_nothing_hidden(world, capsys, config) -> list[str]:
    want = dry_run_changes(world, capsys, config)
    argv = ["status", "--connect", world.uri, "--config", str(config), "--state-dir",
            str(world.state), "--no-guest-query"]
    rc, out, _ = netplug(argv, capsys)
    assert rc == 0 and drift_in_text(out) == want, out
    doc = json.loads(netplug([*argv, "--json"], capsys)[1])
    shown = [d for r in doc["interfaces"] for d in r["drift"]]
    shown += [o["description"] for o in doc["other_drift"]]
    assert sorted(shown) == want and doc["drift_operations"] == len(want)
    for r in doc["interfaces"]:
        if r["drift"]:
            assert r["state"] in ("drift", "retired", "error"), r
    return want


def test_an_interface_no_longer_managed_shows_its_revert(world, capsys, tmp_path):
    """Seen: text status said 'unmanaged' and no drift while --json listed two reverts and
    reconcile --dry-run found 2 changes (status read another config than the hooks)."""
    world.seed()
    other = tmp_path / "other.toml"
    other.write_text("")  # this config does not manage br0
    want = check_nothing_hidden(world, capsys, other)
    assert f"delete FDB entry {A} on tap0" in want and "set learning on flood on on tap0" in want
    rc, out, _ = netplug(["status", "--connect", world.uri, "--config", str(other),
                          "--state-dir", str(world.state), "--no-guest-query"], capsys)
    header = out.splitlines()[0]
    tap0 = next(ln for ln in out.splitlines() if " tap0 " in ln)
    assert tap0[header.index("STATE"):].split()[0] == "drift"


def test_a_detached_interface_shows_as_a_row(world, capsys):
    world.seed()
    vm1_without_tap1 = domain_xml("vm1", [bridge_iface("br0", "tap0", A, "ua-net0")])
    world.set_domains(vm1_without_tap1, world.vm2)
    want = check_nothing_hidden(world, capsys, world.config)
    assert f"delete FDB entry {B} on tap1" in want
    rows = rows_of(netplug(world.argv("status", "--json"), capsys)[1])
    r = rows[("vm1", "ua-net1")]
    assert r["running"] and r["state"] == "retired" and r["device"] == "tap1"


def test_a_bridge_level_change_is_shown(tmp_path, monkeypatch, capsys):
    k = FakeKernel(vlan_filtering_supported=True).install_into(monkeypatch)
    w = World(tmp_path, k)
    w.config.write_text('[bridge.br0]\npromiscLinks = "no"\nvlanFiltering = "yes"\n')
    want = check_nothing_hidden(w, capsys, w.config)
    assert "set vlan_filtering on on bridge br0" in want
    rc, out, _ = netplug(w.argv("status"), capsys)
    assert any(ln.startswith("drift: bridge br0: ") for ln in out.splitlines()), out


def test_nothing_hidden_in_the_other_scenarios(world, capsys):
    check_nothing_hidden(world, capsys, world.config)  # nothing managed yet
    world.seed()
    check_nothing_hidden(world, capsys, world.config)  # in sync: nothing
    world.k.set_port_flags("tap1", learning=True)
    world.k.devs["mvt0"].mc.discard(MDNS)
    check_nothing_hidden(world, capsys, world.config)
    world.set_domains(stopped(world.vm1), world.vm2)
    check_nothing_hidden(world, capsys, world.config)


# -- what else status shows ------------------------------------------------------------------


def test_last_hook_run_per_domain(world, capsys):
    from libvirt_netplug import hookresult

    hookresult.record(str(world.state), "qemu", "vm1", "started", "begin", now=1.7e9)
    hookresult.record(str(world.state), "qemu", "vm2", "start", "begin", errors=2,
                      error="domain vm2, interface net0: tap vnet9 does not exist",
                      now=1.7e9 + 60)
    rc, out, _ = netplug(world.argv("status"), capsys)
    lines = out.splitlines()
    head = lines.index(next(ln for ln in lines if ln.startswith("DOMAIN  LAST HOOK RUN")))
    vm1, vm2 = lines[head + 1].split(), lines[head + 2].split()
    assert vm1[0] == "vm1" and vm1[3:] == ["started", "begin", "ok"]
    assert vm2[0] == "vm2" and vm2[3:6] == ["start", "begin", "2"]
    assert lines[head + 2].endswith("errors: domain vm2, interface net0: tap vnet9 does not "
                                    "exist")
    doc = json.loads(netplug(world.argv("status", "--json"), capsys)[1])
    assert doc["last_hook_runs"]["vm2"]["ok"] is False
    assert doc["last_hook_runs"]["vm1"]["operation"] == "started"


def test_invalid_config_is_a_line_not_a_failure(world, capsys):
    world.config.write_text('[bridge.br0]\npromiscLinks = "perhaps"\n')
    rc, out, err = netplug(world.argv("status"), capsys)
    assert rc == 0 and "Traceback" not in err
    [line] = [ln for ln in out.splitlines() if ln.startswith(f"error: config {world.config}")]
    assert "perhaps" in line and "netplug check-config" in line
    assert " tap0 " in out  # every domain is still shown
    doc = json.loads(netplug(world.argv("status", "--json"), capsys)[1])
    assert "perhaps" in doc["config_error"]


def test_a_missing_explicit_config_is_an_error(world, capsys, tmp_path):
    argv = world.argv("status", "--json")
    argv[argv.index("--config") + 1] = str(tmp_path / "typo.toml")
    rc, out, err = netplug(argv, capsys)
    assert rc == 1 and err.startswith("netplug status: error: config ")
    assert json.loads(out)["error"].endswith("no such file; give an existing file, or leave "
                                             "--config out to use " +
                                             os.environ["NETPLUG_CONFIG"] +
                                             " (from $NETPLUG_CONFIG)")


def test_entries_are_shown_per_vlan_of_the_port(tmp_path, capsys, monkeypatch):
    """(MAC, VLAN) is the unit: status lists the VLANs the guest's entries cover, and a VLAN
    the port joined later, with no entry yet, shows as drift (what reconcile would add)."""
    k = FakeKernel(vlan_filtering_supported=True).install_into(monkeypatch)
    w = World(tmp_path, k)
    k.devs["br0"].vlan_filtering = True
    k.set_port_vlans("tap1", {10, 20}, pvid=10)
    w.seed()
    rc, out, _ = netplug(w.argv("status", "--json"), capsys)
    r = rows_of(out)[("vm1", "ua-net1")]
    assert [tuple(e) for e in r["fdb_entries"]] == [(B, None), (B, 10), (B, 20)]
    rc, out, _ = netplug(w.argv("status"), capsys)
    assert "yes (VLAN 10,20)" in next(ln for ln in out.splitlines() if " tap1 " in ln)
    k.set_port_vlans("tap1", {10, 20, 30}, pvid=10)
    rc, out, _ = netplug(w.argv("status", "--json"), capsys)
    r = rows_of(out)[("vm1", "ua-net1")]
    assert r["state"] == "drift" and r["drift"] == [f"add static FDB entry {B} vlan 30 on tap1"]
