"""Issue 9, item 3: FDB entries that match the VLANs each managed port is in.

With vlan_filtering on, the bridge looks entries up by (MAC, VID), a tagged frame by its tag and
an untagged one by the ingress port's PVID. A guest's entry must exist for every VLAN its port
is in, or frames on the other VLANs reach it only by flooding, which netplug turned off. Each
case asserts the outcome a correct netplug gives, all at once (vlanworld.Findings):

- static entries for the guest's MAC on its tap for exactly the port's VLANs (an entry without a
  VLAN, which the kernel also files under VID 0, is tolerated: it matches no lookup);
- the port stays out of learning and flooding (not rolled back);
- frames from the outside host on each of the port's VLANs reach that guest and no other,
  unknown unicast reaches nobody;
- the hook exits 0 without errors.

The port VLANs are set as libvirt 11 sets them for ``<vlan>`` on a Linux bridge with
vlan_filtering on (``bridge vlan`` on the tap before the start hook: the default PVID removed,
then the tags), or as an operator sets them.
"""

from __future__ import annotations

import json

import pytest

from fakes import bridge_iface, domain_xml, guest_mac
from netns import netplug_cli

from .vlanworld import UNKNOWN, UPLINK, Findings, VlanWorld, entry_vlans, port_flags, \
    port_vlans, promiscuity, vlan_filtering

A, B = guest_mac(0xA), guest_mac(0xB)
CONFIG = '[bridge.br0]\npromiscLinks = "no"\nvlanFiltering = "yes"\n'


def hook(rig, f: Findings, domain: str, op: str, xml: str, subop: str = "begin"):
    """Run the hook's entry point (in-process: the shims are exercised by test_headline.py)."""
    r = rig.run_inprocess("qemu", domain, op, xml, subop)
    f.expect(f"hook {op}: exit status, stdout, errors", (r.rc, r.stdout, r.errors),
             (0, b"", []))
    f.note(f"hook {op} {subop} stderr:\n{r.stderr.rstrip() or '(empty)'}")
    return r


def expect_managed(f: Findings, ns, tap: str, mac: str) -> None:
    vids = sorted(port_vlans(ns, tap))
    got = [v for v in entry_vlans(ns, tap, mac) if v]
    f.expect(f"{tap}: VLANs of the static entries for {mac} (port VLANs {vids})", got, vids)
    f.expect(f"{tap}: (learning, flood)", port_flags(ns, tap), (False, False))


def expect_frames(f: Findings, world: VlanWorld, want: dict) -> None:
    frames = {name: spec for name, (spec, _taps) in want.items()}
    got = world.probe(frames)
    for name, (spec, taps) in want.items():
        f.expect(f"frame {name} (dst, VLAN)={spec}: received by [(tap, tag)]", got[name], taps)


def test_vlan_filtering_switched_on_under_running_guests(ns, rig):
    """vm1 is managed on a bridge without VLAN filtering; then the policy asks for it and vm2's
    start switches it on. vm1 must not lose its traffic."""
    f = Findings()
    world = VlanWorld(ns).build(vlan_filtering=False)
    world.add_tap("tapA", A).add_tap("tapB", B)
    rig.write_config('[bridge.br0]\npromiscLinks = "no"\n')
    vm1 = domain_xml("vm1", [bridge_iface("br0", "tapA", A, "net0")])
    hook(rig, f, "vm1", "start", vm1)
    f.expect("before: vlan_filtering", vlan_filtering(ns, "br0"), 0)

    rig.write_config(CONFIG)
    hook(rig, f, "vm2", "start", domain_xml("vm2", [bridge_iface("br0", "tapB", B, "net0")]))
    f.expect("after vm2's start: vlan_filtering", vlan_filtering(ns, "br0"), 1)
    expect_managed(f, ns, "tapA", A)
    expect_managed(f, ns, "tapB", B)
    f.expect("uplink promiscuity", promiscuity(ns, UPLINK), 0)
    expect_frames(f, world, {"to-A": ((A, None), [("tapA", None)]),
                             "to-B": ((B, None), [("tapB", None)]),
                             "unknown": ((UNKNOWN, None), [])})
    f.check()


def test_bridge_with_its_own_vlan_plan(ns, rig):
    """vlan_default_pvid 10; the operator put tapB in VLAN 20 (PVID, untagged); the uplink
    carries VLAN 10 untagged (its PVID) and VLAN 20 tagged."""
    f = Findings()
    world = VlanWorld(ns).build(default_pvid=10, uplink_vlans=(20,))
    world.add_tap("tapA", A).add_tap("tapB", B)
    world.set_port_vlans("tapB", "20 pvid untagged")
    assert sorted(port_vlans(ns, "tapA")) == [10] and sorted(port_vlans(ns, "tapB")) == [20]
    rig.write_config(CONFIG)

    hook(rig, f, "vm1", "start", domain_xml("vm1", [bridge_iface("br0", "tapA", A, "net0"),
                                             bridge_iface("br0", "tapB", B, "net1")]))
    expect_managed(f, ns, "tapA", A)
    expect_managed(f, ns, "tapB", B)
    expect_frames(f, world, {
        "to-A untagged (VLAN 10)": ((A, None), [("tapA", None)]),
        "to-B on VLAN 20": ((B, 20), [("tapB", None)]),
        "to-A on VLAN 20": ((A, 20), []),  # A is not in VLAN 20
        "unknown untagged": ((UNKNOWN, None), []),
        "unknown on VLAN 20": ((UNKNOWN, 20), []),
    })
    f.check()


# libvirt's <vlan> on an <interface type='bridge'>, and what libvirt 11 then does to the tap.
VLAN_CASES = {
    "one-tag": ("<vlan><tag id='10'/></vlan>", ["10 pvid untagged"]),
    "trunk": ("<vlan trunk='yes'><tag id='10'/><tag id='20'/></vlan>", ["10", "20"]),
    "native-untagged": ("<vlan trunk='yes'><tag id='10' nativeMode='untagged'/>"
                        "<tag id='20'/></vlan>", ["10 pvid untagged", "20"]),
    "native-tagged": ("<vlan trunk='yes'><tag id='10' nativeMode='tagged'/><tag id='20'/>"
                      "</vlan>", ["10 pvid", "20"]),
}


def vlan_guest(world: VlanWorld, case: str) -> str:
    """tapA with the case's VLANs, as libvirt leaves it at `start begin`; vm1's XML."""
    vlan_xml, specs = VLAN_CASES[case]
    world.add_tap("tapA", A)
    world.set_port_vlans("tapA", *specs)
    return domain_xml("vm1", [bridge_iface("br0", "tapA", A, "net0", extra=vlan_xml)])


def expected_tag(world: VlanWorld, tap: str, vid: int) -> int | None:
    """The tag a frame on ``vid`` carries when it leaves ``tap`` (none if egress untagged)."""
    return None if "Egress Untagged" in port_vlans(world.ns, tap)[vid] else vid


@pytest.mark.parametrize("case", list(VLAN_CASES))
def test_libvirt_vlan_on_linux_bridge(ns, rig, case):
    f = Findings()
    world = VlanWorld(ns).build(uplink_vlans=(10, 20))
    xml = vlan_guest(world, case)
    rig.write_config(CONFIG)

    hook(rig, f, "vm1", "start", xml)
    expect_managed(f, ns, "tapA", A)
    port = port_vlans(ns, "tapA")
    want = {f"to-A on VLAN {vid}": ((A, vid), [("tapA", expected_tag(world, "tapA", vid))]
                                    if vid in port else [])
            for vid in (10, 20)}
    want["to-A untagged (uplink PVID 1)"] = ((A, None), [])  # A is not in VLAN 1
    want["unknown on VLAN 10"] = ((UNKNOWN, 10), [])
    expect_frames(f, world, want)
    f.check()


def test_port_vlans_changed_after_start_reconcile_repairs_entries(ns, rig, tmp_path):
    """The operator trunks VLAN 30 to a running guest's port; `netplug reconcile` must give the
    guest its entry on VLAN 30 (the kernel files a new port VLAN under no existing entry)."""
    f = Findings()
    world = VlanWorld(ns).build(uplink_vlans=(10, 30))
    xml = vlan_guest(world, "one-tag")
    rig.write_config(CONFIG)
    hook(rig, f, "vm1", "start", xml)
    ns.bridge("vlan", "add", "dev", "tapA", "vid", "30")
    # The drift is real: no entry on VLAN 30, so frames to A on VLAN 30 reach nobody.
    assert 30 not in entry_vlans(ns, "tapA", A)
    f.expect("before reconcile: frame to A on VLAN 30",
             world.probe({"x": (A, 30)})["x"], [])

    node = tmp_path / "node.xml"
    node.write_text(f"<node>{xml}</node>")  # libvirt's test driver: vm1 running, same XML
    argv = [*netplug_cli(), "reconcile", "--connect", f"test://{node}", "--config",
            rig.config, "--state-dir", rig.state_dir, "--no-guest-query", "--json"]
    p = ns.run(argv, timeout=180)
    f.expect("reconcile exit status (2: drift found and repaired)", p.returncode, 2)
    f.note(f"reconcile stderr: {p.stderr.decode(errors='replace').strip() or '(empty)'}")
    try:
        changes = json.loads(p.stdout).get("changes")
        f.note("reconcile changes: " + json.dumps(changes))
        f.expect("the repair", [(c["device"], c["action"], c["operation"].get("vlan"))
                                for c in changes], [("tapA", "fdb-replace", 30)])
    except ValueError:
        f.note(f"reconcile stdout: {p.stdout[:2000]!r}")
    f.expect("a second reconcile's exit status (0: in sync)",
             ns.run(argv, timeout=180).returncode, 0)
    expect_managed(f, ns, "tapA", A)
    expect_frames(f, world, {"to-A on VLAN 10": ((A, 10), [("tapA", None)]),
                             "to-A on VLAN 30": ((A, 30), [("tapA", 30)]),
                             "unknown on VLAN 30": ((UNKNOWN, 30), [])})
    f.check()


def test_stop_removes_the_entries_of_every_vlan(ns, rig):
    f = Findings()
    world = VlanWorld(ns).build(uplink_vlans=(10, 20))
    xml = vlan_guest(world, "native-untagged")
    rig.write_config(CONFIG)
    hook(rig, f, "vm1", "start", xml)
    f.expect("after start: VLANs of A's entries on tapA",
             [v for v in entry_vlans(ns, "tapA", A) if v], [10, 20])

    hook(rig, f, "vm1", "stopped", xml, subop="end")
    f.expect("after stop: static entries for A on tapA (any VLAN)",
             entry_vlans(ns, "tapA", A), [])
    f.expect("after stop: tapA (learning, flood)", port_flags(ns, "tapA"), (True, True))
    f.expect("after stop: vm1's record", rig.domain_record("vm1"), None)
    f.check()
