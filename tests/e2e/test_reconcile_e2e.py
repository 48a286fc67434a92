"""`netplug reconcile`, `status` and `doctor` against the real libvirt lab: a private libvirtd,
one Linux guest booted once for the whole module, no hooks and no agent (so everything netplug
does here, reconcile did). The commands run as an operator runs them, in the lab's network
namespace, talking to the lab's libvirtd over its socket.

The guest vm1 has:
    M0  bridge br0 (host bridge, config promiscLinks="no", uplink up0)      managed
    M1  network 'mgd' (isolated libvirt network on nbr0, metadata policy)   managed
    M2  macvtap on low0 (bridge mode), domain policy rxFilters="multicast"  synced
    M3  bridge br0 with a per-interface promiscLinks='yes'                  left alone

Every outcome is read from the lab's kernel by the oracle.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import oracle  # noqa: E402
from fakes import NS  # noqa: E402
from netns import netplug_cli  # noqa: E402
from tests.lab import Lab  # noqa: E402
from tests.lab.lab import Nic  # noqa: E402

pytestmark = pytest.mark.e2e

M0, M1, M2, M3 = (f"52:54:00:5e:00:0{i}" for i in range(4))
GROUP = "01:00:5e:05:06:07"


NETWORK = (f"<network><name>mgd</name><bridge name='nbr0'/><metadata>"
           f"<netplug:policy xmlns:netplug='{NS}' promiscLinks='no'/></metadata></network>")
METADATA = (f"<netplug:policy xmlns:netplug='{NS}'>"
            f"<netplug:interface mac='{M2}' rxFilters='multicast'/>"
            f"<netplug:interface mac='{M3}' promiscLinks='yes'/></netplug:policy>")


class Rig:
    def __init__(self, lab: Lab, tmp: Path):
        self.lab, self.tmp = lab, tmp
        self.config = tmp / "config.toml"
        self.config.write_text('[bridge.br0]\npromiscLinks = "no"\n')
        self.state = tmp / "state"

    def netplug(self, cmd: str, *extra: str) -> subprocess.CompletedProcess:
        argv = ["ip", "netns", "exec", self.lab.name, *netplug_cli(), cmd, "--connect",
                self.lab.host_uri, "--config", str(self.config), "--state-dir",
                str(self.state), *extra]
        if cmd == "doctor":
            argv += ["--hooks-dir", str(self.lab.hooks_dir)]
        return subprocess.run(argv, capture_output=True, text=True, timeout=120)

    def json(self, cmd: str, *extra: str) -> tuple[int, dict]:
        p = self.netplug(cmd, "--json", *extra)
        assert "Traceback" not in p.stderr, p.stderr
        return p.returncode, json.loads(p.stdout)


@pytest.fixture(scope="module")
def rig(tmp_path_factory, lab_release):
    lab = Lab(release=lab_release)  # a fresh random name: two runs never share a lab
    lab.start()
    try:
        lab.add_host_bridge("br0")
        lab.add_uplink("br0", "up0")
        lab.add_lower_veth("low0")
        lab.define_network(NETWORK)
        r = Rig(lab, tmp_path_factory.mktemp("reconcile-e2e"))
        r.guest = lab.start_guest("vm1", [Nic("bridge", "br0", mac=M0),
                                          Nic("network", "mgd", mac=M1),
                                          Nic("direct", "low0", mac=M2),
                                          Nic("bridge", "br0", mac=M3)],
                                  metadata=METADATA, timeout=180)
        r.eth = {mac: name for name, mac in r.guest.macs.items()}
        r.dev = r.guest.targets()
        yield r
    finally:
        lab.stop()


def test_repairs_from_scratch_then_in_sync(rig):
    lab, dev = rig.lab, rig.dev
    untouched = oracle.view(oracle.snapshot(lab.name), [dev[M3], "up0"])
    rc, doc = rig.json("reconcile", "--dry-run")
    assert rc == 2 and doc["status"] == "drift", doc
    assert oracle.port_flags(lab.name, dev[M0]) == (True, True)  # dry run: nothing changed
    rc, doc = rig.json("reconcile")
    assert rc == 2 and doc["status"] == "repaired", doc
    assert doc["summary"]["managed_ports"] == 2 and doc["summary"]["managed_macvtaps"] == 1
    assert {c["device"] for c in doc["changes"]} >= {dev[M0], dev[M1]}
    for mac in (M0, M1):
        assert oracle.static_macs(lab.name, dev[mac]) == {mac: []}
        assert oracle.port_flags(lab.name, dev[mac]) == (False, False)
    assert oracle.view(oracle.snapshot(lab.name), [dev[M3], "up0"]) == untouched
    rc, doc = rig.json("reconcile")
    assert rc == 0 and doc["status"] == "in-sync" and doc["changes"] == [], doc


def test_guest_multicast_reaches_the_macvtap(rig):
    lab, g = rig.lab, rig.guest
    g.check(f"ip maddr add {GROUP} dev {rig.eth[M2]}")
    rc, doc = rig.json("reconcile")
    assert rc == 2, doc
    assert (rig.dev[M2], "multicast-add") in {(c["device"], c["action"])
                                              for c in doc["changes"]}
    mc = {a for d, _r, _g, a in oracle.dev_mcast(lab.name) if d == rig.dev[M2]}
    assert GROUP.replace(":", "") in mc
    assert rig.json("reconcile")[0] == 0
    g.check(f"ip maddr del {GROUP} dev {rig.eth[M2]}")
    rc, doc = rig.json("reconcile")
    assert rc == 2 and (rig.dev[M2], "multicast-delete") in {
        (c["device"], c["action"]) for c in doc["changes"]}
    mc = {a for d, _r, _g, a in oracle.dev_mcast(lab.name) if d == rig.dev[M2]}
    assert GROUP.replace(":", "") not in mc


def test_drift_by_hand_is_repaired_and_status_doctor_explain(rig):
    lab, dev = rig.lab, rig.dev
    assert rig.json("reconcile")[0] in (0, 2)
    lab.run("bridge", "link", "set", "dev", dev[M0], "learning", "on", "flood", "on")
    lab.run("bridge", "fdb", "del", M1, "dev", dev[M1], "master")
    rc, doc = rig.json("status")
    assert rc == 0
    rows = {r["mac"]: r for r in doc["interfaces"]}
    assert rows[M0]["state"] == "drift" and (rows[M0]["learning"], rows[M0]["flood"]) == \
        (True, True)
    assert rows[M1]["fdb"] is False and rows[M3]["state"] == "unmanaged"
    assert rows[M2]["rx"]["state"] in ("in-sync", "drift")
    rc, doc = rig.json("reconcile")
    assert rc == 2
    assert {(c["device"], c["action"]) for c in doc["changes"]} == {
        (dev[M0], "port-flags"), (dev[M1], "fdb-replace")}
    for mac in (M0, M1):
        assert oracle.static_macs(lab.name, dev[mac]) == {mac: []}
        assert oracle.port_flags(lab.name, dev[mac]) == (False, False)
    rc, doc = rig.json("status")
    assert {r["mac"]: r["state"] for r in doc["interfaces"]}[M0] == "ok"
    text = rig.netplug("status").stdout
    assert text.splitlines()[0].split()[:3] == ["DOMAIN", "INTERFACE", "TYPE"]
    rc, doc = rig.json("doctor")
    assert rc == 2
    br0 = next(b for b in doc["bridges"] if b["name"] == "br0")
    ports = {p["name"]: p for p in br0["ports"]}
    assert ports[dev[M3]]["owner"] == "guest" and not ports[dev[M3]]["managed"]
    assert ports["up0"]["owner"] == "uplink"
    assert ports["up0"]["promiscuity"] == oracle.link(lab.name, "up0")["promiscuity"]
    checks = {f["check"]: f for f in br0["findings"]}
    if br0["vlan_filtering_supported"] is False:  # this project's kernels
        assert "the uplink up0 stays promiscuous even though flooding to guests is off" in \
            checks["vlan-filtering"]["message"]
    flooding = [f for f in br0["findings"] if f["check"] == "guest-ports" and
                f["level"] == "warning"]
    assert flooding and f"{dev[M3]} (domain vm1" in flooding[0]["message"]
    host = {f["check"]: f for f in doc["findings"]}
    assert host["hooks"]["level"] == "warning"  # the lab has no netplug hooks installed


def test_stopped_guest_leaves_nothing_behind(rig):
    lab = rig.lab
    assert rig.json("reconcile")[0] in (0, 2)
    assert (rig.state / "domains" / "vm1.json").exists()
    lab.virsh("destroy", "vm1")
    rc, doc = rig.json("reconcile")
    # libvirt deleted the taps and the macvtap with the guest: nothing left to undo.
    assert rc == 0 and doc["changes"] == [], doc
    assert not (rig.state / "domains" / "vm1.json").exists()
    statics = {e["mac"] for e in oracle.master_entries(lab.name) if e.get("state") == "static"}
    assert not statics & {M0, M1, M2, M3}
