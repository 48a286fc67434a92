"""Bridges with VLAN filtering, an uplink that can filter unicast, and 802.1Q frames.

Topology (``VlanWorld``), all in one test namespace:

    up0p ── veth ── up0l ── macvlan up0 (mode passthru nopromisc) ── br0 ── tapA, tapB … (taps)

- ``up0`` is the bridge's uplink. A macvlan has IFF_UNICAST_FLT, so br_manage_promisc() can take
  it out of promiscuous mode and program the guests' MACs into its unicast list; veth, tap and
  dummy cannot (they stay promiscuous whatever the bridge does: FIELD-NOTES).
- passthru hands the macvlan every frame its lower device receives, and ``nopromisc`` keeps the
  macvlan from making the veth promiscuous itself, so ``up0``'s promiscuity is the bridge's doing
  alone. Frames injected on ``up0p`` (the "outside" host) enter the bridge through ``up0``.

Reads go through iproute2's JSON (``ip -j -d link``, ``bridge -j fdb|vlan show``), never through
netplug. Frame helpers run inside the namespace (``NetNS.call``).
"""

from __future__ import annotations

import json
import struct
import subprocess
import time
from dataclasses import dataclass, field

import oracle
from fakes import tap_mac
from netns import NetNS

UPLINK, UPLINK_LOWER, OUTSIDE = "up0", "up0l", "up0p"
OUTSIDE_MAC = "02:00:00:00:00:5c"  # the host behind the uplink, source of injected frames
UNKNOWN = "52:54:00:99:99:99"      # nobody's MAC
BROADCAST = "ff:ff:ff:ff:ff:ff"
ETH_P_8021Q = 0x8100


# -- what the kernel says (iproute2 JSON) -----------------------------------------------------


def _json(argv: list[str]):
    p = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed: {p.stderr.strip()}")
    return json.loads(p.stdout) if p.stdout.strip() else []


def promiscuity(ns: NetNS, dev: str) -> int:
    """The device's promiscuity count (``flags`` never shows PROMISC set by the bridge)."""
    return oracle.link(ns.name, dev)["promiscuity"]


def unicast_list(ns: NetNS, dev: str) -> set[str]:
    """The addresses in the device's own unicast list: ``bridge fdb show dev DEV`` "self"
    entries that are not multicast."""
    return {e["mac"] for e in _json(["bridge", "-n", ns.name, "-j", "fdb", "show", "dev", dev])
            if "self" in e.get("flags", []) and not int(e["mac"][:2], 16) & 1}


def bridge_info(ns: NetNS, bridge: str) -> dict:
    return oracle.link(ns.name, bridge)["linkinfo"]["info_data"]


def vlan_filtering(ns: NetNS, bridge: str) -> int:
    return bridge_info(ns, bridge).get("vlan_filtering", 0)


def port_vlans(ns: NetNS, dev: str) -> dict[int, frozenset[str]]:
    """{vid: flags} of a bridge port (``bridge -j vlan show dev DEV``; ranges expanded)."""
    out: dict[int, frozenset[str]] = {}
    for port in _json(["bridge", "-n", ns.name, "-j", "vlan", "show", "dev", dev]):
        for v in port.get("vlans", []):
            for vid in range(v["vlan"], v.get("vlanEnd", v["vlan"]) + 1):
                out[vid] = frozenset(v.get("flags", []))
    return out


def entry_vlans(ns: NetNS, dev: str, mac: str) -> list[int | None]:
    """VLANs of the static bridge-table entries for ``mac`` on port ``dev`` (None: no VLAN)."""
    return sorted((e.get("vlan") for e in oracle.master_entries(ns.name, dev)
                   if e["mac"] == mac and e.get("state") == "static"),
                  key=lambda v: -1 if v is None else v)


def port_flags(ns: NetNS, dev: str) -> tuple[bool, bool]:
    return oracle.port_flags(ns.name, dev)


# -- the topology ---------------------------------------------------------------------------


@dataclass
class VlanWorld:
    ns: NetNS
    bridge: str = "br0"
    taps: dict[str, str] = field(default_factory=dict)  # tap -> guest MAC

    def build(self, *, vlan_filtering: bool = True, default_pvid: int | None = None,
              uplink_vlans: tuple[int, ...] = ()) -> "VlanWorld":
        """The bridge and its uplink; ``uplink_vlans`` are added to the uplink as tagged VLANs
        (the trunk to the outside), besides the bridge's default PVID."""
        opts = ["forward_delay", "0", "vlan_filtering", "1" if vlan_filtering else "0"]
        if default_pvid is not None:
            opts += ["vlan_default_pvid", str(default_pvid)]
        self.ns.ip("link", "add", self.bridge, "type", "bridge", *opts)
        self.ns.ip("link", "add", UPLINK_LOWER, "type", "veth", "peer", "name", OUTSIDE)
        self.ns.ip("link", "add", "link", UPLINK_LOWER, "name", UPLINK, "type", "macvlan",
                   "mode", "passthru", "nopromisc")
        self.ns.ip("link", "set", UPLINK, "master", self.bridge)
        for dev in (self.bridge, OUTSIDE, UPLINK_LOWER, UPLINK):
            self.ns.ip("link", "set", dev, "up")
        for vid in uplink_vlans:
            self.ns.bridge("vlan", "add", "dev", UPLINK, "vid", str(vid))
        return self

    def add_tap(self, tap: str, mac: str) -> "VlanWorld":
        """A guest's tap as libvirt leaves it: in the bridge, up, address fe:… of the guest's.
        (Not named vnet…: libvirt's test driver, which reconcile tests read domains from,
        drops target names with libvirt's own prefixes.)"""
        self.ns.add_tap(tap, self.bridge, address=tap_mac(mac))
        self.taps[tap] = mac
        return self

    def del_tap(self, tap: str) -> None:
        """What libvirt does after a guest's stop hooks."""
        self.ns.del_link(tap)
        del self.taps[tap]

    def set_port_vlans(self, dev: str, *specs: str) -> None:
        """Replace a port's VLANs, as libvirt (``<vlan>``) or an operator does with
        ``bridge vlan``: each spec is "VID", "VID pvid", "VID untagged" or "VID pvid untagged"."""
        for vid in port_vlans(self.ns, dev):
            self.ns.bridge("vlan", "del", "dev", dev, "vid", str(vid))
        for spec in specs:
            vid, *flags = spec.split()
            self.ns.bridge("vlan", "add", "dev", dev, "vid", vid, *flags)

    def probe(self, frames: dict[str, tuple[str, int | None]], taps: list[str] | None = None
              ) -> dict[str, list[tuple[str, int | None]]]:
        """Inject {name: (dst MAC, VLAN or None for untagged)} from the outside host and report,
        per frame, [(tap, VLAN tag it arrived with or None)] of the taps that received it."""
        return self.ns.call(probe, taps or list(self.taps), frames)


# -- frames (run inside the namespace) --------------------------------------------------------


def vlan_frame(dst: str, src: str, name: str, vid: int | None) -> bytes:
    """An Ethernet frame of the test ethertype, with an 802.1Q header when ``vid`` is set."""
    payload = name.encode().ljust(46, b"\0")
    tag = struct.pack("!HH", ETH_P_8021Q, vid) if vid is not None else b""
    return (oracle.mac_bytes(dst) + oracle.mac_bytes(src) + tag
            + struct.pack("!H", oracle.ETH_P_TEST) + payload)


def parse(raw: bytes) -> tuple[str | None, int | None]:
    """(frame name, VLAN id or None) of a frame read from a tap; name None if not ours."""
    vid = None
    if len(raw) >= 18 and struct.unpack("!H", raw[12:14])[0] == ETH_P_8021Q:
        vid = struct.unpack("!H", raw[14:16])[0] & 0x0FFF
        raw = raw[:12] + raw[16:]
    return oracle.tag_of(raw), vid


def probe(taps: list[str], frames: dict[str, tuple[str, int | None]], wait: float = 0.5
          ) -> dict[str, list[tuple[str, int | None]]]:
    readers = [oracle.TapReader(t) for t in taps]
    try:
        oracle.wait_forwarding([*taps, UPLINK], timeout=10)
        for r in readers:
            r.read_all(0.05)  # whatever arrived while the ports came up
        oracle.inject(OUTSIDE, [vlan_frame(dst, OUTSIDE_MAC, name, vid)
                                for name, (dst, vid) in frames.items()])
        time.sleep(wait)  # forwarding is synchronous; slack for a slow (TCG) machine
        got: dict[str, list[tuple[str, int | None]]] = {name: [] for name in frames}
        for r in readers:
            for raw in r.read_all(0.05):
                name, vid = parse(raw)
                if name in got:
                    got[name].append((r.name, vid))
        return {name: sorted(v, key=str) for name, v in got.items()}
    finally:
        for r in readers:
            r.close()


# -- collecting every mismatch of a test before failing --------------------------------------


class Findings:
    """Every way the outcome differs from the expected one, so one failing run tells the whole
    story (entries, flags, frames, the hook's own words) instead of its first symptom."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.context: list[str] = []

    def expect(self, what: str, got, want) -> None:
        if got != want:
            self.problems.append(f"{what}: got {got!r}, want {want!r}")

    def note(self, text: str) -> None:
        self.context.append(text)

    def check(self) -> None:
        if self.problems:
            raise AssertionError("\n".join(["", *self.problems, "--", *self.context]))
