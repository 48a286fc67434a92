"""A guest that uses a MAC besides its own (keepalived's VRRP MAC, a macvlan inside it) on a
managed bridge port, against the real kernel: with learning off it gets no unicast for that
MAC unless netplug mirrors the guest's RX-filter unicast table (policy rxFilters 'unicast').

The guest's filter is what QEMU's query-rx-filter would report (the e2e tier gets it from a
real guest); the engine (sync.py, what the agent runs) applies it through NetlinkKernel in the
namespace; frames injected from the uplink's side show who receives them.
"""

from __future__ import annotations

import oracle
from fakes import bridge_iface, domain_xml, guest_mac, policy_xml, tap_mac

A, B = guest_mac(0xA), guest_mac(0xB)
VRRP = "00:00:5e:00:01:0a"
SRC = "02:00:00:00:00:5c"
FRAMES = {"to-vrrp": (VRRP, SRC), "to-A": (A, SRC)}


def _sync(xml_a: str, table: tuple[str, ...], state_dir: str):
    """In the namespace: one engine run for vm1 with the given guest unicast table."""
    from libvirt_netplug.kernel import NetlinkKernel
    from libvirt_netplug.model import parse_domain
    from libvirt_netplug.policy import Config
    from libvirt_netplug.rxfilter import RxFilter
    from libvirt_netplug.state import StateDir
    from libvirt_netplug.sync import Desired, sync

    want = Desired((parse_domain(xml_a),), {}, Config())
    with NetlinkKernel() as k:
        report = sync(k, StateDir(state_dir), want, rx_source=lambda d: {
            "net0": RxFilter("net0", A, unicast_table=table)})
    return [str(e) for _op, e in report.errors], [n.message for n in report.notes]


def topology(ns):
    ns.add_bridge("br0")
    ns.add_veth("up0", "up0p", master="br0")
    ns.add_tap("vnetA", "br0", address=tap_mac(A))
    ns.add_tap("vnetB", "br0", address=tap_mac(B))


def probe(ns):
    return ns.call(oracle.frame_probe, ["vnetA", "vnetB"], "up0p", "up0", FRAMES)


def vm1(policy: dict) -> str:
    return domain_xml("vm1", [bridge_iface("br0", "vnetA", A, "net0")],
                      metadata=policy_xml(**policy))


def test_with_the_unicast_policy_the_vrrp_mac_reaches_the_guest(ns, tmp_path):
    topology(ns)
    state = str(tmp_path / "state")
    errors, _ = ns.call(_sync, vm1({"promiscLinks": "no", "rxFilters": "unicast"}), (VRRP,),
                        state)
    assert errors == []
    assert oracle.static_macs(ns.name, "vnetA") == {A: [], VRRP: []}
    assert probe(ns) == {"to-vrrp": ["vnetA"], "to-A": ["vnetA"]}
    # The guest drops the MAC (keepalived became backup): the entry goes, the frames stop.
    ns.call(_sync, vm1({"promiscLinks": "no", "rxFilters": "unicast"}), (), state)
    assert oracle.static_macs(ns.name, "vnetA") == {A: []}
    assert probe(ns)["to-vrrp"] == ["vnetB"]  # unknown again: only the flooding port


def test_without_the_policy_the_vrrp_mac_gets_nothing(ns, tmp_path):
    topology(ns)
    errors, _ = ns.call(_sync, vm1({"promiscLinks": "no"}), (VRRP,), str(tmp_path / "state"))
    assert errors == []
    assert oracle.static_macs(ns.name, "vnetA") == {A: []}
    # Learning and flooding are off on vnetA and nothing learned the MAC: no guest gets it
    # (vnetB, unmanaged, still floods).
    assert probe(ns) == {"to-vrrp": ["vnetB"], "to-A": ["vnetA"]}
