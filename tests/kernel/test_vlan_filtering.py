"""vlanFiltering='yes' on a kernel without bridge VLAN filtering (this one).

The kernel reports vlan_filtering 0 over netlink and refuses to set it (EOPNOTSUPP). Required:
exactly one clear warning, and netplug carries on managing the ports; a replay is a no-op.
"""

from __future__ import annotations


import oracle
from fakes import bridge_iface, domain_xml, guest_mac, hookdata, network_iface, network_xml, \
    policy_xml, tap_mac

A, B = guest_mac(1), guest_mac(2)
VLAN_BUG = ("bug: the bridge reports vlan_filtering=0 (False, not None) on this kernel, so "
            "plan.plan_ports plans SetVlanFiltering on every run instead of warning; "
            "SetVlanFiltering.run ignores set_vlan_filtering()'s False and apply logs it as done")


def _bridge(ns, br):
    ns.add_bridge(br)
    ns.add_tap("vnet0", br, address=tap_mac(A))
    ns.add_tap("vnet1", br, address=tap_mac(B))


def _vlan_warnings(runs):
    return [ln for r in runs for ln in r.warnings if "vlan" in ln.lower()]


def _check_no_vlan_filtering(ns, br):
    info = oracle.link(ns.name, br)["linkinfo"]["info_data"]
    assert info.get("vlan_filtering", 0) == 0


def test_network_policy_warns_once_and_manages_ports(ns, hooks):
    net = network_xml("mgd", "nbr0", metadata=policy_xml(promiscLinks="no", vlanFiltering="yes"))
    _bridge(ns, "nbr0")
    xml = domain_xml("vm1", [network_iface("mgd", "nbr0", "vnet0", A, "net0"),
                             network_iface("mgd", "nbr0", "vnet1", B, "net1")])
    runs = [hooks.run_ok("network", "mgd", "start", hookdata(net)),
            hooks.run_ok("network", "mgd", "started", hookdata(net)),
            hooks.run_ok("network", "mgd", "started", hookdata(net)),
            hooks.run_ok("qemu", "vm1", "start", xml),
            hooks.run_ok("qemu", "vm1", "start", xml)]
    warnings = _vlan_warnings(runs)
    assert len(warnings) == 1, runs
    assert "nbr0" in warnings[0] and "VLAN filtering" in warnings[0]
    for tap, mac in (("vnet0", A), ("vnet1", B)):
        assert oracle.static_macs(ns.name, tap) == {mac: []}
        assert oracle.port_flags(ns.name, tap) == (False, False)
    _check_no_vlan_filtering(ns, "nbr0")


def test_replayed_start_plans_nothing_and_claims_nothing(ns, hooks):
    net = network_xml("mgd", "nbr0", metadata=policy_xml(promiscLinks="no", vlanFiltering="yes"))
    _bridge(ns, "nbr0")
    xml = domain_xml("vm1", [network_iface("mgd", "nbr0", "vnet0", A, "net0")])
    hooks.run_ok("network", "mgd", "started", hookdata(net))
    first = hooks.run_ok("qemu", "vm1", "start", xml)
    second = hooks.run_ok("qemu", "vm1", "start", xml)
    _check_no_vlan_filtering(ns, "nbr0")
    # The log must not say vlan_filtering was switched on: the oracle says it is off.
    assert not [ln for ln in first.lines + second.lines if "vlan_filtering on" in ln], \
        (first, second)
    assert second.lines == [], second  # a replay has nothing to do


def test_config_policy_on_host_bridge_warns_once(ns, hooks):
    _bridge(ns, "br0")
    hooks.write_config('[bridge.br0]\npromiscLinks = "no"\nvlanFiltering = "yes"\n')
    xml = domain_xml("vm1", [bridge_iface("br0", "vnet0", A, "net0"),
                             bridge_iface("br0", "vnet1", B, "net1")])
    runs = [hooks.run_ok("qemu", "vm1", "start", xml), hooks.run_ok("qemu", "vm1", "start", xml)]
    for tap, mac in (("vnet0", A), ("vnet1", B)):
        assert oracle.static_macs(ns.name, tap) == {mac: []}
        assert oracle.port_flags(ns.name, tap) == (False, False)
    assert len(_vlan_warnings(runs)) == 1, runs
