"""The engine: QEMU is asked outside the state lock; bulk runs pause the cyclic garbage
collector and always give it back."""

from __future__ import annotations

import gc

import pytest

from fakes import FakeKernel, bridge_iface, domain_xml, iface, policy_xml, state_lock_held
from libvirt_netplug.errors import NetplugError
from libvirt_netplug.model import parse_domain
from libvirt_netplug.policy import Config
from libvirt_netplug.rxfilter import RxFilter
from libvirt_netplug.state import StateDir
from libvirt_netplug.sync import Desired, gc_paused, sync

GUEST = "52:54:00:aa:00:01"


class SpyKernel(FakeKernel):
    """Notes whether the collector was on each time the engine reads links."""

    def __init__(self):
        super().__init__()
        self.gc_seen: list[bool] = []

    def links(self):
        self.gc_seen.append(gc.isenabled())
        return super().links()

    def fdb(self, bridge, port=None):
        self.gc_seen.append(gc.isenabled())
        return super().fdb(bridge, port)


def desired() -> Desired:
    xml = domain_xml("vm1", [bridge_iface("br0", "vnet0", GUEST)],
                     metadata=policy_xml(promiscLinks="no"))
    return Desired((parse_domain(xml),), {}, Config())


@pytest.fixture
def kernel() -> SpyKernel:
    k = SpyKernel()
    k.add_bridge("br0")
    k.add_tap("vnet0", master="br0", guest=GUEST)
    return k


def test_sync_runs_with_the_collector_paused_and_turns_it_back_on(kernel, state_path):
    assert gc.isenabled()
    report = sync(kernel, StateDir(str(state_path)), desired())
    assert report.applied and not report.errors
    assert kernel.gc_seen and not any(kernel.gc_seen)
    assert gc.isenabled()


def test_the_collector_comes_back_when_the_run_fails(kernel, state_path):
    def broken():
        raise RuntimeError("boom")

    kernel.links = broken
    with pytest.raises(RuntimeError):
        sync(kernel, StateDir(str(state_path)), desired())
    assert gc.isenabled()


def test_a_nested_pause_leaves_re_enabling_to_the_outer_one():
    with gc_paused():
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()


def test_a_collector_the_caller_turned_off_stays_off():
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


MVT_MAC = "52:54:00:aa:00:02"
GROUP = "01:00:5e:00:00:fb"


def macvtap_desired(*names: str) -> Desired:
    doms = []
    for n, name in enumerate(names):
        xml = domain_xml(name, [iface("direct", mac=MVT_MAC, source={"dev": "low0",
                                                                   "mode": "bridge"},
                                      target=f"mvt{n}", alias="net0")],
                         metadata=policy_xml(rxFilters="multicast"))
        doms.append(parse_domain(xml))
    return Desired(tuple(doms), {}, Config())


def test_qemu_is_asked_before_the_state_lock_and_a_failure_is_per_domain(state_path):
    """reconcile, status and doctor pass an rx_source too: hooks must never wait on the lock
    while it goes round libvirtd to QEMU's monitor. A domain QEMU cannot answer for is
    reported on its own; the others are synced."""
    k = FakeKernel()
    k.add("low0", "veth", up=True)
    for n in range(2):
        k.add(f"mvt{n}", "macvtap", address=MVT_MAC, up=True, lower="low0",
              macvlan_mode="bridge")
    state = StateDir(str(state_path))
    lock_held = []

    def rx_source(domain):
        lock_held.append(state_lock_held(state.path))
        if domain.name == "vm2":
            raise NetplugError("query-rx-filter: domain is not running")
        return {"net0": RxFilter("net0", MVT_MAC, multicast_table=(GROUP,))}

    report = sync(k, state, macvtap_desired("vm1", "vm2"), rx_source=rx_source)
    assert lock_held == [False, False]
    by_name = {ds.name: ds for ds in report.domains}
    assert by_name["vm1"].rx_queried and by_name["vm1"].rx_error is None
    assert by_name["vm2"].rx_queried and "not running" in str(by_name["vm2"].rx_error)
    assert GROUP in k.devs["mvt0"].mc and GROUP not in k.devs["mvt1"].mc
    assert any("vm2: cannot read guest RX filters" in n.message for n in report.notes)


# -- guests that use more MACs than their own (policy 'unicast' on a bridge port) -------------

VRRP = "00:00:5e:00:01:0a"  # keepalived's virtual MAC for VRID 10
INNER = "52:54:00:aa:00:33"  # a macvlan inside the guest


def unicast_world(state_path, policy="no"):
    k = FakeKernel()
    br = k.add_bridge("br0")
    k.add_veth("up0", master="br0")
    k.add_tap("vnet0", master="br0", guest=GUEST)
    k.add_tap("vnet1", master="br0", guest="52:54:00:aa:00:02")
    attrs = {"promiscLinks": "no"}
    if policy == "no":
        attrs["rxFilters"] = "unicast"
    xml = domain_xml("vm1", [bridge_iface("br0", "vnet0", GUEST, alias="net0")],
                     metadata=policy_xml(**attrs))
    return k, br, Desired((parse_domain(xml),), {}, Config()), StateDir(str(state_path))


def statics(k, port):
    return sorted(m for (b, m, v), (p, st, _s) in k.table.items() if p == port and st == "static")


def test_the_guests_extra_unicast_macs_get_entries_on_its_tap_and_go_when_dropped(state_path):
    k, _br, want, state = unicast_world(state_path)
    table = [VRRP, INNER]
    asked = []

    def rx_source(domain):
        asked.append(domain.name)
        return {"net0": RxFilter("net0", GUEST, unicast_table=tuple(table))}

    report = sync(k, state, want, rx_source=rx_source)
    assert asked == ["vm1"] and not report.errors
    assert statics(k, "vnet0") == sorted([GUEST, VRRP, INNER])
    assert state.domain("vm1")["ports"]["vnet0"]["extra"] == sorted([VRRP, INNER])
    # A hook (which cannot ask QEMU) keeps what the agent recorded: nothing is replanned.
    assert sync(k, state, want).planned == []
    table.remove(VRRP)  # keepalived gave up the master role
    sync(k, state, want, rx_source=rx_source)
    assert statics(k, "vnet0") == sorted([GUEST, INNER])
    # Stop: every entry goes.
    sync(k, state, Desired((), {}, Config()))
    assert statics(k, "vnet0") == []


def test_without_the_unicast_policy_extra_macs_are_ignored(state_path):
    k, _br, want, state = unicast_world(state_path, policy="none")
    report = sync(k, state, want, rx_source=lambda d: {"net0": RxFilter(
        "net0", GUEST, unicast_table=(VRRP,))})
    assert statics(k, "vnet0") == [GUEST] and not report.errors
    assert report.domains[0].rx_queried is False  # nothing to ask QEMU for


def test_an_extra_mac_that_is_not_the_guests_to_claim_is_refused(state_path):
    k, br, want, state = unicast_world(state_path)
    k.add_static("vnet1", "52:54:00:aa:00:44")  # another port's static entry
    up_addr = k.devs["up0"].address
    table = (br.address, up_addr, "52:54:00:aa:00:44", VRRP)
    report = sync(k, state, want, rx_source=lambda d: {"net0": RxFilter(
        "net0", GUEST, unicast_table=table)})
    assert statics(k, "vnet0") == sorted([GUEST, VRRP])
    assert k.table[("br0", br.address, None)] == ("br0", "permanent", False)
    assert k.table[("br0", up_addr, None)][0] == "up0"
    errors = [n.message for n in report.notes if n.level == "error"]
    assert len(errors) == 3 and all("not claiming the guest's extra MAC" in e for e in errors)


def test_extra_macs_are_capped_by_max_unicast(state_path):
    k, _br, _want, state = unicast_world(state_path)
    xml = domain_xml("vm1", [bridge_iface("br0", "vnet0", GUEST, alias="net0")],
                     metadata=policy_xml(promiscLinks="no", rxFilters="unicast", maxUnicast="2"))
    want = Desired((parse_domain(xml),), {}, Config())
    table = tuple(f"02:00:00:00:01:{i:02x}" for i in range(5))
    report = sync(k, state, want, rx_source=lambda d: {"net0": RxFilter(
        "net0", GUEST, unicast_table=table)})
    assert statics(k, "vnet0") == sorted([GUEST, *table[:2]])
    assert any("maxUnicast=2" in n.message for n in report.notes)
