"""Issue 9, items 1 and 2: what users set promiscLinks='no' for, on a kernel that can do it.

With bridge VLAN filtering on and every port but the uplink out of learning and flooding, the
kernel (br_manage_promisc) takes the uplink out of promiscuous mode and puts the guests' MACs in
its unicast filter. The uplink is a macvlan (it can filter unicast; see vlanworld.py), so its
``promiscuity`` shows the effect; one test uses the VM's virtio-net NIC instead, with QEMU's
view of the device's RX filter as a second oracle. Frames injected from the outside host show what the guests
receive. Controls (before netplug, a port that still floods, after stop) show the same reads do
see the opposite, so the tests can fail.
"""

from __future__ import annotations

import subprocess

from fakes import bridge_iface, domain_xml, guest_mac, hookdata, network_iface, network_xml, \
    policy_xml

from .qmp import nic_rx_filter, virtio_nic
from .test_doctor import bridge, doctor
from .vlanworld import BROADCAST, UNKNOWN, UPLINK, VlanWorld, port_flags, promiscuity, \
    unicast_list, vlan_filtering

A, B, X = guest_mac(0xA), guest_mac(0xB), guest_mac(0xC)
CONFIG = '[bridge.br0]\npromiscLinks = "no"\nvlanFiltering = "yes"\n'
FRAMES = {"to-A": (A, None), "to-B": (B, None), "unknown": (UNKNOWN, None),
          "broadcast": (BROADCAST, None)}
ISOLATED = {"to-A": [("tapA", None)], "to-B": [("tapB", None)], "unknown": [],
            "broadcast": [("tapA", None), ("tapB", None)]}
FLOODED = {name: [("tapA", None), ("tapB", None)] for name in FRAMES}


def test_uplink_leaves_promiscuous_mode_when_netplug_manages_every_guest_port(ns, rig):
    world = VlanWorld(ns).build(vlan_filtering=False)
    world.add_tap("tapA", A).add_tap("tapB", B)
    rig.write_config(CONFIG)
    # Control: the bridge as libvirt leaves it; every port floods, the uplink is promiscuous.
    assert (vlan_filtering(ns, "br0"), promiscuity(ns, UPLINK)) == (0, 1)
    assert not {A, B} & unicast_list(ns, UPLINK)

    vm1 = domain_xml("vm1", [bridge_iface("br0", "tapA", A, "net0"),
                             bridge_iface("br0", "tapB", B, "net1")])
    r = rig.run_ok("qemu", "vm1", "start", vm1)  # the installed shim, as libvirtd runs it

    assert vlan_filtering(ns, "br0") == 1, r  # netplug switched it on (vlanFiltering="yes")
    assert (port_flags(ns, "tapA"), port_flags(ns, "tapB")) == ((False, False),) * 2, r
    assert promiscuity(ns, UPLINK) == 0, r
    assert {A, B} <= unicast_list(ns, UPLINK), r
    assert world.probe(FRAMES) == ISOLATED

    # A guest netplug leaves alone (promiscLinks='yes') keeps its port learning and flooding:
    # the kernel must make the uplink promiscuous again, and empties its unicast list.
    world.add_tap("tapX", X)
    vm2 = domain_xml("vm2", [bridge_iface("br0", "tapX", X, "net0")],
                     metadata=policy_xml(promiscLinks="yes"))
    rig.run_ok("qemu", "vm2", "start", vm2)
    assert port_flags(ns, "tapX") == (True, True)
    assert promiscuity(ns, UPLINK) == 1
    assert not {A, B} & unicast_list(ns, UPLINK)
    # ... until that guest goes (libvirt deletes its tap after the stop hooks).
    rig.run_ok("qemu", "vm2", "stopped", vm2, subop="end")
    world.del_tap("tapX")
    assert promiscuity(ns, UPLINK) == 0
    assert {A, B} <= unicast_list(ns, UPLINK)

    # vm1 stops: netplug gives its ports back their flooding; the uplink is promiscuous again.
    r = rig.run_ok("qemu", "vm1", "stopped", vm1, subop="end")
    assert (port_flags(ns, "tapA"), port_flags(ns, "tapB")) == ((True, True),) * 2, r
    assert promiscuity(ns, UPLINK) == 1
    assert not {A, B} & unicast_list(ns, UPLINK)
    assert world.probe(FRAMES) == FLOODED


def test_frames_with_vlan_filtering_reach_only_their_guest(ns, rig):
    """The same through a libvirt network whose metadata carries the policy (network hook)."""
    world = VlanWorld(ns, bridge="nbr0").build(vlan_filtering=False)
    world.add_tap("tapA", A).add_tap("tapB", B)
    assert world.probe(FRAMES) == FLOODED  # control: before netplug everything floods

    net = network_xml("mgd", "nbr0", forward=None,
                      metadata=policy_xml(promiscLinks="no", vlanFiltering="yes"))
    vm1 = domain_xml("vm1", [network_iface("mgd", "nbr0", "tapA", A, "net0"),
                             network_iface("mgd", "nbr0", "tapB", B, "net1")])
    for kind, obj, op, xml in (("network", "mgd", "started", hookdata(net)),
                               ("qemu", "vm1", "start", vm1)):
        r = rig.run_inprocess(kind, obj, op, xml)
        assert (r.rc, r.stdout, r.errors) == (0, b"", []), r

    assert vlan_filtering(ns, "nbr0") == 1
    assert promiscuity(ns, UPLINK) == 0
    assert world.probe(FRAMES) == ISOLATED


def test_a_virtio_nic_uplink_leaves_promiscuous_mode_in_the_device(ns, rig, tmp_path):
    """The same effect on a NIC driver, as on a host: the VM's virtio-net NIC (QEMU's
    virtio-net-pci) as the bridge's uplink. Two oracles: the guest kernel (promiscuity, the
    NIC's unicast list) and QEMU, outside the guest kernel, which reports what the driver told
    the device (`query-rx-filter`: promiscuous or not, and the unicast table)."""
    nic = virtio_nic()
    # Into the test namespace; a NIC goes back to the initial one when the namespace is deleted.
    subprocess.run(["ip", "link", "set", "dev", nic, "netns", ns.name], check=True, timeout=20)
    ns.ip("link", "add", "br0", "type", "bridge", "forward_delay", "0", "vlan_filtering", "0")
    ns.ip("link", "set", nic, "master", "br0")
    for dev in (nic, "br0"):
        ns.ip("link", "set", dev, "up")
    world = VlanWorld(ns)
    world.add_tap("tapA", A).add_tap("tapB", B)
    rig.write_config(CONFIG)
    # Control: every port floods; the NIC is promiscuous, in the kernel and in the device.
    assert promiscuity(ns, nic) == 1
    assert nic_rx_filter()["promiscuous"] is True

    vm1 = domain_xml("vm1", [bridge_iface("br0", "tapA", A, "net0"),
                             bridge_iface("br0", "tapB", B, "net1")])
    r = rig.run_ok("qemu", "vm1", "start", vm1)
    assert vlan_filtering(ns, "br0") == 1, r
    assert promiscuity(ns, nic) == 0, r
    assert {A, B} <= unicast_list(ns, nic), r
    device = nic_rx_filter()
    assert device["promiscuous"] is False, device
    assert {A, B} <= set(device["unicast-table"]), device
    br, f = bridge(doctor(ns, rig, tmp_path, vm1))
    assert br["goal_reached"] and f["uplink"]["level"] == "ok", br

    r = rig.run_ok("qemu", "vm1", "stopped", vm1, subop="end")
    assert promiscuity(ns, nic) == 1, r
    device = nic_rx_filter()
    assert device["promiscuous"] is True and not {A, B} & set(device["unicast-table"]), device
