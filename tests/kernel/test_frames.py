"""What the guests actually receive: frames read from the taps.

Bridge br0 with a veth uplink (frames injected from its peer with an AF_PACKET socket) and two
guest taps, attached through /dev/net/tun (that gives them carrier, so the bridge forwards to
them). Proves, with the hook applied: unknown unicast reaches no managed tap, a frame to guest
A's MAC reaches only A's tap, broadcast reaches both. The controls — before netplug, and with
flood switched back on for one tap — show the same probe does see flooding, so the test can
fail.
"""

from __future__ import annotations

import oracle
from fakes import bridge_iface, domain_xml, guest_mac, tap_mac

from .topo import CONFIG

A, B = guest_mac(0xA), guest_mac(0xB)
UNKNOWN = "52:54:00:99:99:99"
SRC = "02:00:00:00:00:5c"  # the "outside" host behind the uplink
FRAMES = {"unknown": (UNKNOWN, SRC), "to-A": (A, SRC), "to-B": (B, SRC),
          "broadcast": ("ff:ff:ff:ff:ff:ff", SRC)}


def probe(ns):
    return ns.call(oracle.frame_probe, ["vnetA", "vnetB"], "up0p", "up0", FRAMES)


def test_frames_reach_only_their_guest(ns, hooks):
    ns.add_bridge("br0")
    ns.add_veth("up0", "up0p", master="br0")
    ns.add_tap("vnetA", "br0", address=tap_mac(A))
    ns.add_tap("vnetB", "br0", address=tap_mac(B))
    hooks.write_config(CONFIG)

    # Control: before netplug, learning/flood are on, nothing is known, everything floods.
    assert probe(ns) == {"unknown": ["vnetA", "vnetB"], "to-A": ["vnetA", "vnetB"],
                         "to-B": ["vnetA", "vnetB"], "broadcast": ["vnetA", "vnetB"]}

    xml = domain_xml("vm1", [bridge_iface("br0", "vnetA", A, "net0"),
                             bridge_iface("br0", "vnetB", B, "net1")])
    hooks.run_ok("qemu", "vm1", "start", xml)
    assert probe(ns) == {"unknown": [], "to-A": ["vnetA"], "to-B": ["vnetB"],
                         "broadcast": ["vnetA", "vnetB"]}

    # Control: flood back on for B (as an unmanaged port would be): unknown unicast reaches B.
    ns.bridge("link", "set", "dev", "vnetB", "flood", "on")
    assert probe(ns)["unknown"] == ["vnetB"]

    # And after `stopped`, the bridge floods to both again.
    ns.bridge("link", "set", "dev", "vnetB", "flood", "off")
    hooks.run_ok("qemu", "vm1", "stopped", xml, subop="end")
    assert probe(ns)["unknown"] == ["vnetA", "vnetB"]
