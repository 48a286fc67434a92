"""Every hook event, in libvirt's order, each replayed twice, through the installed shims.

Two guests: vm1 on the host bridge br0 (policy from the config file) and vm2 on the libvirt
network "mgd" (bridge nbr0, policy in the network's <metadata>). After each event the second
run must leave the oracle's view identical to the first and exit 0 with nothing on stdout;
the state at each checkpoint is what the requirement says; at the end nothing is left.
"""

from __future__ import annotations

import pytest

import oracle
from fakes import (domain_xml, guest_mac, hookdata, network_iface, network_xml,
                   networkport_xml, policy_xml, tap_mac)

from .topo import CONFIG, HostWorld

VM2_MAC = guest_mac(0x201)
OTHER_MAC = guest_mac(0x202)  # vm3's NIC on nbr0: promiscLinks='yes' for it, so unmanaged
MGD = network_xml("mgd", "nbr0", metadata=policy_xml(promiscLinks="no"))
MGD_PROMISC = network_xml("mgd", "nbr0", metadata=policy_xml(promiscLinks="yes"))


def vm2_xml(targets: bool = True) -> str:
    return domain_xml("vm2", [network_iface("mgd", "nbr0" if targets else None,
                                            "vnet10" if targets else None, VM2_MAC, "net0",
                                            portid="9e1c9f3c-0000-4000-8000-000000000001")])


def port_xml(network: str = MGD) -> str:
    return hookdata(network, networkport_xml("vm2", VM2_MAC))


@pytest.fixture
def two_guests(ns, hooks):
    world = HostWorld(ns).build()
    ns.add_bridge("nbr0")
    ns.add_tap("vnet10", "nbr0", address=tap_mac(VM2_MAC))
    ns.add_tap("vnet11", "nbr0", address=tap_mac(OTHER_MAC))
    hooks.write_config(CONFIG)
    return world


def twice(hooks, ns, kind, obj, op, xml, subop="begin"):
    """Run an event twice; the second run must change nothing the oracle can see."""
    first = hooks.run_ok(kind, obj, op, xml, subop)
    snap = oracle.snapshot(ns.name)
    second = hooks.run_ok(kind, obj, op, xml, subop)
    changes = oracle.diff(snap, oracle.snapshot(ns.name))
    assert changes == [], f"replaying {kind} {obj} {op} changed: {changes}\n{first}\n{second}"
    return snap


def managed(ns, tap, mac) -> bool:
    statics = oracle.static_macs(ns.name, tap)
    flags = oracle.port_flags(ns.name, tap)
    if statics == {mac: []} and flags == (False, False):
        return True
    assert statics == {} and flags == (True, True), f"{tap} half-managed: {statics} {flags}"
    return False


def test_lifecycle_every_event_twice(ns, hooks, two_guests):
    world = two_guests
    pristine = oracle.snapshot(ns.name)
    vm1 = world.xml()

    twice(hooks, ns, "network", "mgd", "start", hookdata(MGD))
    twice(hooks, ns, "network", "mgd", "started", hookdata(MGD))
    twice(hooks, ns, "qemu", "vm2", "prepare", vm2_xml(targets=False))
    twice(hooks, ns, "network", "mgd", "port-created", port_xml())
    assert oracle.diff(pristine, oracle.snapshot(ns.name)) == []  # nothing before the tap

    twice(hooks, ns, "qemu", "vm1", "start", vm1)
    twice(hooks, ns, "qemu", "vm2", "start", vm2_xml())
    assert managed(ns, "vnet10", VM2_MAC)
    assert not managed(ns, "vnet11", OTHER_MAC)
    assert all(managed(ns, t, m) for t, m in world.macs.items())
    running = oracle.snapshot(ns.name)

    for obj, xml in (("vm1", vm1), ("vm2", vm2_xml())):
        twice(hooks, ns, "qemu", obj, "started", xml)
        twice(hooks, ns, "qemu", obj, "reconnect", xml)
    twice(hooks, ns, "network", "mgd", "updated", hookdata(MGD))
    # The network driver restarting replays port-created for every port.
    twice(hooks, ns, "network", "mgd", "port-created", port_xml())
    assert oracle.diff(running, oracle.snapshot(ns.name)) == []

    twice(hooks, ns, "qemu", "vm2", "stopped", vm2_xml(), subop="end")
    assert not managed(ns, "vnet10", VM2_MAC)
    assert all(managed(ns, t, m) for t, m in world.macs.items())  # vm1 untouched
    twice(hooks, ns, "network", "mgd", "port-deleted", port_xml())
    twice(hooks, ns, "qemu", "vm2", "release", vm2_xml(), subop="end")
    twice(hooks, ns, "network", "mgd", "stopped", hookdata(MGD), subop="end")
    twice(hooks, ns, "qemu", "vm1", "stopped", vm1, subop="end")
    twice(hooks, ns, "qemu", "vm1", "release", vm1, subop="end")

    assert oracle.diff(pristine, oracle.snapshot(ns.name)) == []
    assert [f for f in hooks.state_files() if f.startswith("domains/")] == []


def test_port_deleted_cleans_up_that_port(ns, hooks, two_guests):
    pristine = oracle.view(oracle.snapshot(ns.name), ["vnet10"])
    hooks.run_ok("network", "mgd", "started", hookdata(MGD))
    hooks.run_ok("qemu", "vm2", "start", vm2_xml())
    assert managed(ns, "vnet10", VM2_MAC)

    # Hot-unplug of the NIC: libvirt deletes the port while the domain runs.
    twice(hooks, ns, "network", "mgd", "port-deleted", port_xml())
    assert oracle.diff(pristine, oracle.view(oracle.snapshot(ns.name), ["vnet10"])) == []
    assert hooks.domain_record("vm2") is None


def test_network_updated_to_promisc_links_yes_unmanages_its_ports(ns, hooks, two_guests):
    world = two_guests
    pristine = oracle.view(oracle.snapshot(ns.name), ["vnet10"])
    hooks.run_ok("network", "mgd", "started", hookdata(MGD))
    hooks.run_ok("qemu", "vm1", "start", world.xml())
    hooks.run_ok("qemu", "vm2", "start", vm2_xml())

    twice(hooks, ns, "network", "mgd", "updated", hookdata(MGD_PROMISC))
    assert oracle.diff(pristine, oracle.view(oracle.snapshot(ns.name), ["vnet10"])) == []
    assert all(managed(ns, t, m) for t, m in world.macs.items())  # other bridges: untouched


def test_release_alone_cleans_up(ns, hooks, two_guests):
    """`stopped` may be missed (libvirtd restarted in between); `release` alone cleans up."""
    world = two_guests
    pristine = oracle.snapshot(ns.name)
    hooks.run_ok("qemu", "vm1", "start", world.xml())
    twice(hooks, ns, "qemu", "vm1", "release", world.xml(), subop="end")
    assert oracle.diff(pristine, oracle.snapshot(ns.name)) == []


def test_mac_table_manager_libvirt_is_hands_off(ns, hooks, two_guests):
    ltm = network_xml("mgd", "nbr0", bridge_attrs={"macTableManager": "libvirt"},
                      metadata=policy_xml(promiscLinks="no"))
    pristine = oracle.snapshot(ns.name)
    for kind, obj, op, xml in (("network", "mgd", "start", hookdata(ltm)),
                               ("network", "mgd", "started", hookdata(ltm)),
                               ("network", "mgd", "port-created",
                                hookdata(ltm, networkport_xml("vm2", VM2_MAC))),
                               ("qemu", "vm2", "start", vm2_xml()),
                               ("qemu", "vm2", "started", vm2_xml()),
                               ("qemu", "vm2", "stopped", vm2_xml())):
        twice(hooks, ns, kind, obj, op, xml)
    assert oracle.diff(pristine, oracle.snapshot(ns.name)) == []
    assert hooks.domain_record("vm2") is None
