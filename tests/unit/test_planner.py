"""The planner and applier, through the fake kernel: observe → plan_ports → apply → record.

Proves: apply twice → the second plan is empty and changes nothing; operations are ordered
(bridge first, then per port FDB entry before flags, ports sorted); a foreign static (or
permanent) entry for the guest's MAC on another port leaves the port unmanaged and untouched,
while a learned (dynamic) one is simply replaced; records drive cleanup, which undoes exactly
what was recorded and leaves a re-created tap (new ifindex) alone; a failed write rolls the
port back; a vanished tap stops only its own port.
"""

from __future__ import annotations

import errno

import pytest

from fakes import FakeKernel, bridge_iface, domain_xml, policy_xml
from libvirt_netplug.apply import apply, observe, record_ports
from libvirt_netplug.errors import DeviceGone, KernelError
from libvirt_netplug.model import parse_domain
from libvirt_netplug.ops import DeleteFdb, ReplaceFdb, SetPortFlags, SetVlanFiltering
from libvirt_netplug.plan import bridge_intents, plan_cleanup, plan_ports
from libvirt_netplug.policy import config_from_dict

CFG = config_from_dict({"bridge": {"br0": {"promiscLinks": "no"}}}, "test.toml")
MACS = ["52:54:00:00:00:01", "52:54:00:00:00:02", "52:54:00:00:00:03"]


@pytest.fixture
def world(fake: FakeKernel) -> FakeKernel:
    fake.add_bridge("br0")
    fake.add_veth("up0", "br0")
    for i in range(3):
        fake.add_tap(f"vnet{i}", "br0", address="fe" + MACS[i][2:])
    fake.add_bridge("br9")
    fake.add_tap("vnet9", "br9")
    return fake


def domain(n=3, metadata="", bridge="br0"):
    return parse_domain(domain_xml("vm1", [bridge_iface(bridge, f"vnet{i}", MACS[i], f"net{i}")
                                           for i in range(n)], metadata=metadata))


class Runner:
    """One hook run's worth of the pipeline, keeping the domain's record between runs."""

    def __init__(self, kernel, config=CFG):
        self.kernel, self.config, self.record = kernel, config, {"ports": {}}

    def run(self, dom):
        intents = bridge_intents(dom, {}, self.config)
        bridges = {i.bridge for i in intents if i.managed} | {
            r["bridge"] for r in self.record["ports"].values()}
        taps = {i.tap for i in intents if i.managed} | set(self.record["ports"])
        observed = observe(self.kernel, bridges, taps)
        plan = plan_ports(intents, observed, self.record["ports"])
        result = apply(plan.ops, self.kernel)
        record_ports(self.record, plan, observed, result)
        return plan, result


def managed_state(k, tap):
    link = k.links()[tap]
    return ({e.mac for e in k.fdb(link.master, tap) if e.state == "static"},
            (link.learning, link.flood))


def test_apply_twice_second_plan_is_empty(world):
    r = Runner(world)
    plan, result = r.run(domain())
    assert result.ok and len(plan.ops) == 6
    after_first = world.snapshot()
    journal = len(world.journal)
    plan2, _ = r.run(domain())
    assert plan2.ops == () and plan2.notes == ()
    assert world.snapshot() == after_first and len(world.journal) == journal
    for i in range(3):
        assert managed_state(world, f"vnet{i}") == ({MACS[i]}, (False, False))


def test_operation_order(world):
    plan, _ = Runner(world).run(domain())
    assert [(type(o).__name__, o.device) for o in plan.ops] == [
        ("ReplaceFdb", "vnet0"), ("SetPortFlags", "vnet0"),
        ("ReplaceFdb", "vnet1"), ("SetPortFlags", "vnet1"),
        ("ReplaceFdb", "vnet2"), ("SetPortFlags", "vnet2")]
    assert all(o.ctx.domain == "vm1" and o.ctx.bridge == "br0" for o in plan.ops)
    # the FDB entry is for the guest's MAC, never the tap's fe:… address
    assert [o.mac for o in plan.ops if isinstance(o, ReplaceFdb)] == MACS


def test_only_the_wrong_half_is_replanned(world):
    r = Runner(world)
    r.run(domain())
    world.set_port_flags("vnet1", flood=True)  # somebody turned flooding back on
    world.delete_fdb("vnet2", MACS[2])  # and removed an entry
    plan, _ = r.run(domain())
    assert [(type(o).__name__, o.device) for o in plan.ops] == [
        ("SetPortFlags", "vnet1"), ("ReplaceFdb", "vnet2")]


@pytest.mark.parametrize("state", ["static", "permanent"])
def test_foreign_entry_for_the_guest_mac_leaves_the_port_unmanaged(world, state):
    world.add_static("up0", MACS[1], state=state)
    before = world.snapshot()
    plan, result = Runner(world).run(domain())
    assert "vnet1" in plan.skipped
    (note,) = [n for n in plan.notes if n.level == "error"]
    if state == "static":
        assert f"{MACS[1]} is already a static entry on port up0" in note.message
    else:  # a permanent entry is host-local: the host's own address
        assert f"{MACS[1]} is a host-local entry of port up0" in note.message
    assert "interface net1" in note.message
    assert "vnet1" not in world.written_devices() and "up0" not in world.written_devices()
    assert world.fdb("br0", "up0") == [e for e in before_fdb(before, "up0")]
    assert managed_state(world, "vnet1") == (set(), (True, True))
    assert managed_state(world, "vnet0")[1] == (False, False)
    assert result.ok


def before_fdb(snapshot, port):
    from libvirt_netplug.kernel import FdbEntry

    return sorted(FdbEntry(p, mac, vlan, st, sticky=sticky)
                  for (b, mac, vlan), (p, st, sticky) in snapshot[1] if p == port)


def test_learned_entry_for_the_guest_mac_is_replaced(world):
    world.add_static("up0", MACS[0], state="dynamic")
    plan, result = Runner(world).run(domain())
    assert result.ok and "vnet0" not in plan.skipped
    assert [(e.port, e.state) for e in world.fdb("br0") if e.mac == MACS[0]] == [
        ("vnet0", "static")]


def test_tap_on_another_bridge_is_left_alone(world):
    world.devs["vnet1"].master = None
    world.enslave("vnet1", "br9")
    plan, _ = Runner(world).run(domain())
    assert "vnet1" in plan.skipped
    assert any("not a port of bridge br0 (master: br9)" in n.message for n in plan.notes)
    assert "vnet1" not in world.written_devices()


def test_records_drive_cleanup_of_exactly_what_was_added(world):
    world.add_static("vnet0", "02:00:00:00:00:99")  # an admin's extra entry on a managed tap
    pristine = world.snapshot()
    r = Runner(world)
    r.run(domain())
    assert sorted(r.record["ports"]) == ["vnet0", "vnet1", "vnet2"]
    assert r.record["ports"]["vnet0"]["fdb"] == [[MACS[0], None]]
    # The policy changes to "yes" for the whole domain: the next run cleans up, and keeps the
    # taps recorded as this domain's (nothing applied), so no other domain can claim them.
    plan, result = r.run(domain(metadata=policy_xml(promiscLinks="yes")))
    assert result.ok and set(plan.claimed) == {"vnet0", "vnet1", "vnet2"}
    assert [type(o) for o in plan.ops[:2]] == [SetPortFlags, DeleteFdb]  # flood back first
    assert world.snapshot() == pristine
    assert {tap: (p["fdb"], p["flags"]) for tap, p in r.record["ports"].items()} == {
        tap: ([], False) for tap in ("vnet0", "vnet1", "vnet2")}
    assert r.run(domain(metadata=policy_xml(promiscLinks="yes")))[0].ops == ()


def test_cleanup_leaves_a_recreated_tap_alone(world):
    r = Runner(world)
    r.run(domain(1))
    world.delete("vnet0")
    world.add_tap("vnet0", "br0")  # libvirt reused the name for another guest's tap
    world.set_port_flags("vnet0", False, False)
    before = world.snapshot()
    observed = observe(world, {"br0"}, {"vnet0"})
    assert plan_cleanup(r.record["ports"], observed).ops == ()
    assert world.snapshot() == before


def test_cleanup_without_observation_plans_everything_recorded():
    rec = {"vnet0": {"domain": "vm1", "mac": MACS[0], "bridge": "br0", "flags": True,
                     "saved": [True, False], "fdb": [[MACS[0], None], [MACS[0], 7]]}}
    ops = plan_cleanup(rec, None).ops
    # The VLAN entry before the "no VLAN" one: deleting that one makes the kernel delete the
    # MAC on every VLAN of the port.
    assert [(type(o).__name__, getattr(o, "vlan", None)) for o in ops] == [
        ("SetPortFlags", None), ("DeleteFdb", 7), ("DeleteFdb", None)]
    assert (ops[0].learning, ops[0].flood) == (True, False)


def test_failed_write_rolls_the_port_back(world):
    world.fail("set_port_flags", "vnet1", errno.EINVAL)
    before = managed_state(world, "vnet1")
    plan, result = Runner(world).run(domain())
    assert len(result.errors) == 1
    op, err = result.errors[0]
    assert isinstance(err, KernelError) and err.errno == errno.EINVAL and op.device == "vnet1"
    assert [type(o) for o in result.rolled_back] == [DeleteFdb]
    assert managed_state(world, "vnet1") == before
    assert managed_state(world, "vnet2") == ({MACS[2]}, (False, False))


def test_vanished_tap_stops_only_its_port(world):
    world.fail("replace_fdb", "vnet0", vanish=True)
    r = Runner(world)
    plan, result = r.run(domain())
    ((op, err),) = result.errors
    assert isinstance(err, DeviceGone) and op.device == "vnet0"
    assert result.rolled_back == []
    assert sorted(r.record["ports"]) == ["vnet1", "vnet2"]
    assert managed_state(world, "vnet1") == ({MACS[1]}, (False, False))


def test_sticky_policy_and_change_of_it(world):
    r = Runner(world)
    r.run(domain(1, metadata=policy_xml(sticky="yes")))
    assert [e.sticky for e in world.fdb("br0", "vnet0") if e.state == "static"] == [True]
    plan, _ = r.run(domain(1))
    assert [type(o).__name__ for o in plan.ops] == ["ReplaceFdb"]
    assert [e.sticky for e in world.fdb("br0", "vnet0") if e.state == "static"] == [False]


def test_with_vlan_filtering_entries_cover_every_vlan_of_the_port():
    """The kernel keys entries by (MAC, VLAN): a port in VLANs 10 and 20 (a trunk, as libvirt
    11 configures for <vlan trunk='yes'>) needs the guest's MAC on both, plus "no VLAN"."""
    k = FakeKernel(vlan_filtering_supported=True)
    k.add_bridge("br0", vlan_filtering=True)
    k.add_tap("vnet0", "br0", guest=MACS[0])
    k.add_tap("vnet1", "br0", guest=MACS[1])
    k.set_port_vlans("vnet0", {10, 20}, pvid=None)
    dom = parse_domain(domain_xml("vm1", [bridge_iface("br0", "vnet0", MACS[0]),
                                          bridge_iface("br0", "vnet1", MACS[1])]))
    r = Runner(k)
    plan, result = r.run(dom)
    assert result.ok
    # One request per port: with no VLAN the kernel adds every VLAN of the port too.
    assert [(o.device, o.vlan, o.also_vlans) for o in plan.ops if isinstance(o, ReplaceFdb)] \
        == [("vnet0", None, (10, 20)), ("vnet1", None, (1,))]
    assert sorted(((m, v) for (b, m, v), (p, st, _s) in k.table.items()
                   if p == "vnet0" and st == "static"), key=lambda e: e[1] or 0) == [
        (MACS[0], None), (MACS[0], 10), (MACS[0], 20)]
    assert r.record["ports"]["vnet0"]["fdb"] == [[MACS[0], None], [MACS[0], 10],
                                                 [MACS[0], 20]]
    assert r.run(dom)[0].ops == ()
    # The port joins VLAN 30 later: only that entry is added; leaves 10: its entry goes.
    k.set_port_vlans("vnet0", {20, 30}, pvid=None)
    plan, _ = r.run(dom)
    assert [(type(o).__name__, o.vlan) for o in plan.ops] == [("ReplaceFdb", 30),
                                                              ("DeleteFdb", 10)]
    assert r.record["ports"]["vnet0"]["fdb"] == [[MACS[0], None], [MACS[0], 20],
                                                 [MACS[0], 30]]
    # Stop: every VLAN's entry goes.
    plan, _ = r.run(domain(0))
    assert not [k2 for k2, (p, st, _s) in k.table.items() if p == "vnet0" and st == "static"]


def test_vlan_filtering_policy_switches_it_on_where_supported():
    k = FakeKernel(vlan_filtering_supported=True)
    k.add_bridge("br0")
    k.add_tap("vnet0", "br0", guest=MACS[0])
    r = Runner(k, config_from_dict({"bridge": {"br0": {"promiscLinks": "no",
                                                       "vlanFiltering": "yes"}}}, "c"))
    plan, _ = r.run(domain(1))
    assert isinstance(plan.ops[0], SetVlanFiltering) and k.devs["br0"].vlan_filtering
    # Entries were planned for the port's VLANs (the default PVID) already: nothing to redo.
    assert (MACS[0], 1) in [tuple(e) for e in r.record["ports"]["vnet0"]["fdb"]]
    assert r.run(domain(1))[0].ops == ()


def test_vlan_filtering_policy_without_kernel_support_warns_and_settles(world):
    r = Runner(world, config_from_dict({"bridge": {"br0": {"promiscLinks": "no",
                                                           "vlanFiltering": "yes"}}}, "c"))
    plan, _ = r.run(domain(1))
    assert [n.level for n in plan.notes] == ["warning"]
    assert r.run(domain(1))[0].ops == ()


ADOPT_BUG = ("bug: apply.record_ports adopts a static entry for the guest MAC that was already "
             "on the tap before netplug ran (and saves flags [on, on] when they were already "
             "off), so cleanup deletes an entry / changes flags netplug never created")


def test_cleanup_never_removes_an_entry_netplug_did_not_create(world):
    world.add_static("vnet0", MACS[0])  # put there by an admin (or libvirt) before the guest ran
    pristine = world.snapshot()
    r = Runner(world)
    r.run(domain(1))
    r.run(domain(1, metadata=policy_xml(promiscLinks="yes")))  # unmanage → cleanup
    assert world.snapshot() == pristine


def test_cleanup_never_changes_flags_netplug_did_not_change(world):
    world.set_port_flags("vnet0", False, False)  # an admin's choice, before netplug
    world.journal.clear()
    r = Runner(world)
    r.run(domain(1))
    r.run(domain(1, metadata=policy_xml(promiscLinks="yes")))
    assert managed_state(world, "vnet0")[1] == (False, False)


def test_trunk_vlan_entries_follow_the_vlans_libvirt_11_gave_the_tap():
    """libvirt >= 11 configures <vlan> on Linux-bridge taps itself (virNetDevBridgeSetupVlans,
    11.3): it removes VLAN 1 from the tap; for a trunk the tags are the tap's VLANs and the one
    with nativeMode is its PVID. netplug reads those VLANs from the kernel: the guest's MAC gets
    an entry on each (never on VLAN 1, which the port is not in: the kernel would refuse it)."""
    k = FakeKernel(vlan_filtering_supported=True)
    k.add_bridge("br0", vlan_filtering=True)
    k.add_tap("vnet0", "br0", guest=MACS[0])
    k.add_tap("vnet1", "br0", guest=MACS[1])
    k.set_port_vlans("vnet0", {42, 43}, pvid=43)  # nativeMode='untagged'
    k.set_port_vlans("vnet1", {44, 45}, pvid=45)  # nativeMode='tagged'
    dom = parse_domain(domain_xml("vm1", [
        bridge_iface("br0", "vnet0", MACS[0], extra="<vlan trunk='yes'><tag id='42'/>"
                                                    "<tag id='43' nativeMode='untagged'/></vlan>"),
        bridge_iface("br0", "vnet1", MACS[1], extra="<vlan trunk='yes'><tag id='44'/>"
                                                    "<tag id='45' nativeMode='tagged'/></vlan>")]))
    r = Runner(k)
    plan, result = r.run(dom)
    assert result.ok
    assert [(o.device, o.vlan, o.also_vlans) for o in plan.ops if isinstance(o, ReplaceFdb)] \
        == [("vnet0", None, (42, 43)), ("vnet1", None, (44, 45))]
    assert r.record["ports"]["vnet0"]["fdb"] == [[MACS[0], None], [MACS[0], 42],
                                                 [MACS[0], 43]]
