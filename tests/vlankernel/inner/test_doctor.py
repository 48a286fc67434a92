"""Issue 9, items 1 and 4, on a kernel that has bridge VLAN filtering: `netplug doctor`
explains, per managed bridge, whether the uplink left promiscuous mode and why not — naming the
port that still learns or floods and whose it is, an uplink whose driver cannot filter unicast,
vlan_filtering off, the bridge itself promiscuous — and each finding says what to do. The
oracle (iproute2's JSON) says what the kernel really did; doctor must agree with it.

Doctor runs as an operator would (`ip netns exec NS netplug doctor --json`), reading libvirt's
test driver for the running domains (no libvirtd in this VM).
"""

from __future__ import annotations

import json

from fakes import bridge_iface, domain_xml, guest_mac, policy_xml, tap_mac
from netns import netplug_cli

from .vlanworld import UPLINK, VlanWorld, promiscuity, unicast_list

A, B, X = guest_mac(0xA), guest_mac(0xB), guest_mac(0xC)
CONFIG = '[bridge.br0]\npromiscLinks = "no"\nvlanFiltering = "yes"\n'
VM1 = domain_xml("vm1", [bridge_iface("br0", "tapA", A, "net0"),
                         bridge_iface("br0", "tapB", B, "net1")])
VM2 = domain_xml("vm2", [bridge_iface("br0", "tapX", X, "net0")],
                 metadata=policy_xml(promiscLinks="yes"))


def doctor(ns, rig, tmp_path, *domains: str) -> dict:
    node = tmp_path / "node.xml"
    node.write_text("<node>" + "".join(domains) + "</node>")
    p = ns.run([*netplug_cli(), "doctor", "--connect", f"test://{node}", "--config", rig.config,
                "--state-dir", rig.state_dir, "--hooks-dir", rig.hooks_dir,
                "--no-guest-query", "--json"], timeout=180)
    assert p.stderr == b"" or b"Traceback" not in p.stderr, p.stderr
    return json.loads(p.stdout)


def bridge(doc: dict, name: str = "br0") -> tuple[dict, dict[str, dict]]:
    [br] = [b for b in doc["bridges"] if b["name"] == name]
    return br, {f["check"]: f for f in br["findings"]}


def test_doctor_says_the_goal_is_reached_and_names_the_port_that_undoes_it(ns, rig, tmp_path):
    world = VlanWorld(ns).build(vlan_filtering=False)
    world.add_tap("tapA", A).add_tap("tapB", B)
    rig.write_config(CONFIG)
    rig.run_ok("qemu", "vm1", "start", VM1)
    assert promiscuity(ns, UPLINK) == 0  # the oracle first: the kernel did it

    br, f = bridge(doctor(ns, rig, tmp_path, VM1))
    assert br["goal_reached"] and br["vlan_filtering"] is True, br
    assert f["goal"]["level"] == "ok" and f["uplink"]["level"] == "ok", f
    [up] = [p for p in br["ports"] if p["name"] == UPLINK]
    assert up["promiscuity"] == 0 and {A, B} <= set(up["unicast_filter"])
    assert set(up["unicast_filter"]) == unicast_list(ns, UPLINK)
    assert not [x for x in br["findings"] if x["level"] in ("warning", "error")], br["findings"]

    # A guest netplug leaves alone keeps its port learning and flooding: the kernel puts the
    # uplink back in promiscuous mode, and doctor must say so and name that port and whose.
    world.add_tap("tapX", X)
    rig.run_ok("qemu", "vm2", "start", VM2)
    assert promiscuity(ns, UPLINK) == 1
    br, f = bridge(doctor(ns, rig, tmp_path, VM1, VM2))
    assert not br["goal_reached"] and br["guests_isolated"], br
    assert "tapX" in f["auto-ports"]["message"] and "vm2" in f["auto-ports"]["message"], f
    assert f["auto-ports"]["advice"] and f["goal"]["level"] == "warning", f


def test_doctor_names_an_uplink_whose_driver_cannot_filter_unicast(ns, rig, tmp_path):
    """A veth uplink (no IFF_UNICAST_FLT): everything else allows it, yet the kernel keeps it
    promiscuous; doctor says why, measured, and that netplug cannot change it."""
    ns.ip("link", "add", "br0", "type", "bridge", "forward_delay", "0", "vlan_filtering", "1")
    ns.add_veth("up0", "up0p", master="br0")
    ns.add_tap("tapA", "br0", address=tap_mac(A))
    ns.add_tap("tapB", "br0", address=tap_mac(B))
    ns.ip("link", "set", "br0", "up")
    rig.write_config(CONFIG)
    rig.run_ok("qemu", "vm1", "start", VM1)
    assert promiscuity(ns, "up0") == 1  # the oracle: the kernel could not take it out
    br, f = bridge(doctor(ns, rig, tmp_path, VM1))
    assert br["guests_isolated"] and not br["goal_reached"], br
    assert "up0" in f["uplink-driver"]["message"] and "veth" in f["uplink-driver"]["message"]
    assert "netplug cannot change this" in f["uplink-driver"]["advice"]
    assert f["vlan-filtering"]["level"] == "ok"


def test_doctor_names_vlan_filtering_off_and_a_promiscuous_bridge(ns, rig, tmp_path):
    world = VlanWorld(ns).build(vlan_filtering=False)
    world.add_tap("tapA", A).add_tap("tapB", B)
    rig.write_config('[bridge.br0]\npromiscLinks = "no"\n')  # no vlanFiltering: stays off
    rig.run_ok("qemu", "vm1", "start", VM1)
    assert promiscuity(ns, UPLINK) == 1
    br, f = bridge(doctor(ns, rig, tmp_path, VM1))
    assert not br["goal_reached"] and f["vlan-filtering"]["level"] == "warning", f
    assert "vlanFiltering='yes'" in f["vlan-filtering"]["advice"]
    # Switched on, then the bridge itself made promiscuous (a capture on it).
    ns.ip("link", "set", "br0", "type", "bridge", "vlan_filtering", "1")
    ns.ip("link", "set", "br0", "promisc", "on")
    assert promiscuity(ns, UPLINK) == 1
    br, f = bridge(doctor(ns, rig, tmp_path, VM1))
    assert f["bridge-promisc"]["level"] == "warning" and "promisc off" in \
        f["bridge-promisc"]["advice"], f
    ns.ip("link", "set", "br0", "promisc", "off")
    assert promiscuity(ns, UPLINK) == 0
    br, f = bridge(doctor(ns, rig, tmp_path, VM1))
    assert br["goal_reached"], f
