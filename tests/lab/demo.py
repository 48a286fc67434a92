"""`make demo`: netplug managing real bridges, shown before and after.

Part 1 replays the hook calls a real libvirtd made (xml-samples/captured) against real bridges
and taps in a throwaway network namespace, exactly as libvirtd runs hooks (argv, XML on stdin,
a bare environment), and probes with frames.

Part 2 runs a real libvirtd, QEMU and Linux guest in the lab (its own network and mount
namespaces; nothing on the host is touched): a network defined with `virsh net-define`
carrying promiscLinks='no', a guest started first without netplug's hooks and then with them,
and real traffic from a test host on the bridge's uplink.

Part 3 (tests/vlankernel/demo.py) boots Debian's own kernel under QEMU to show the bridge's
uplink leaving promiscuous mode, which needs bridge VLAN filtering (the host's kernel has none).

Run as root: python -m tests.lab.demo [--part 1|2|3]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests import oracle  # noqa: E402
from tests.netns import HookRig, NetNS  # noqa: E402

SAMPLES = REPO / "xml-samples" / "captured"
UNKNOWN = "02:de:ad:be:ef:01"
T0 = time.monotonic()


def progress(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def table(title: str, rows: list[dict]) -> None:
    print(f"\n  {title}")
    print(f"  {'port':<10} {'bridge':<8} {'learning':<9} {'flood':<6} static FDB entries")
    for r in rows:
        onoff = {True: "on", False: "off", None: "-"}
        print(f"  {r['port']:<10} {r['bridge'] or '-':<8} {onoff[r['learning']]:<9} "
              f"{onoff[r['flood']]:<6} {', '.join(r['static_fdb']) or '-'}")


def ns_table(ns: NetNS, ports: list[str]) -> list[dict]:
    bl = oracle.bridge_links(ns.name)
    rows = []
    for p in ports:
        link = bl.get(p, {})
        rows.append({"port": p, "bridge": link.get("master"), "learning": link.get("learning"),
                     "flood": link.get("flood"),
                     "static_fdb": sorted(e["mac"] for e in oracle.master_entries(ns.name, p)
                                          if e.get("state") == "static")})
    return rows


# -- part 1 ---------------------------------------------------------------------------------

# From 011-qemu-start-begin.xml: the guest's NICs, their taps, bridges and MACs.
PORTS = [  # (tap, bridge, guest MAC, what decides)
    ("vnet0", "nbr0", "52:54:00:00:01:01", "network netplug-iso: metadata promiscLinks='no'"),
    ("vnet1", "br1", "52:54:00:00:01:02", "network netplug-hostbr: no policy"),
    ("vnet2", "br0", "52:54:00:00:01:03", "host bridge br0: config promiscLinks = \"no\""),
]
EVENTS = [  # (kind, object, op, sample)
    ("network", "netplug-iso", "start", "001-network-start-begin.xml"),
    ("network", "netplug-iso", "started", "002-network-started-begin.xml"),
    ("network", "netplug-hostbr", "started", "004-network-started-begin.xml"),
    ("qemu", "vm1", "prepare", "007-qemu-prepare-begin.xml"),
    ("network", "netplug-iso", "port-created", "008-network-port-created-begin.xml"),
    ("qemu", "vm1", "start", "011-qemu-start-begin.xml"),
    ("qemu", "vm1", "started", "012-qemu-started-begin.xml"),
]
STOP_EVENTS = [
    ("qemu", "vm1", "stopped", "044-qemu-stopped-end.xml", "end"),
    ("network", "netplug-iso", "port-deleted", "045-network-port-deleted-begin.xml", "begin"),
    ("qemu", "vm1", "release", "048-qemu-release-end.xml", "end"),
]


def _probe(ns: NetNS, bridge: str, taps: list[str], macs: dict[str, str]) -> dict:
    frames = {"unknown-unicast": (UNKNOWN, "02:00:00:00:00:aa"),
              "broadcast": ("ff:ff:ff:ff:ff:ff", "02:00:00:00:00:aa")}
    for tap in taps:
        frames[f"to {tap}'s guest"] = (macs[tap], "02:00:00:00:00:aa")
    return ns.call(oracle.frame_probe, taps, f"up-{bridge}h", f"up-{bridge}", frames)


def part1() -> bool:
    progress("part 1: hooks replayed from a real libvirtd's calls, in a throwaway netns")
    ns = NetNS.create()
    ok = True
    try:
        with tempfile.TemporaryDirectory(prefix="netplug-demo-") as tmp:
            rig = HookRig(ns, tmp)
            rig.write_config('[bridge.br0]\npromiscLinks = "no"\n')
            for br in ("nbr0", "br1", "br0"):
                ns.add_bridge(br)
                ns.add_veth(f"up-{br}", f"up-{br}h", master=br)
            for tap, br, mac, _why in PORTS:
                ns.add_tap(tap, master=br, address="fe" + mac[2:])
            taps = [p[0] for p in PORTS]
            macs = {p[0]: p[2] for p in PORTS}
            print("\n== Part 1: libvirt hooks on real bridges (network namespace "
                  f"{ns.name}) ==")
            for tap, br, mac, why in PORTS:
                print(f"  {tap} in {br}: guest {mac}  ({why})")
            table("before (as libvirt leaves a tap):", ns_table(ns, taps))
            print("\n  libvirtd's hook calls, replayed with the installed shims:")
            for kind, obj, op, sample in EVENTS:
                r = rig.run(kind, obj, op, (SAMPLES / sample).read_bytes())
                print(f"    {kind} {obj} {op} begin -  -> exit {r.rc}, "
                      f"{r.elapsed * 1000:.0f} ms, stdout {len(r.stdout)} bytes")
                ok &= r.rc == 0 and not r.stdout
            after = ns_table(ns, taps)
            table("after:", after)
            want = {"vnet0": (False, False, ["52:54:00:00:01:01"]), "vnet1": (True, True, []),
                    "vnet2": (False, False, ["52:54:00:00:01:03"])}
            for row in after:
                ok &= (row["learning"], row["flood"], row["static_fdb"]) == want[row["port"]]

            print("\n  frame test: frames injected from each bridge's uplink; which taps got "
                  "them")
            for br in ("nbr0", "br1", "br0"):
                br_taps = [t for t, b, _m, _w in PORTS if b == br]
                got = _probe(ns, br, br_taps, macs)
                for tag, recv in got.items():
                    print(f"    {br:<5} {tag:<22} -> {', '.join(recv) or 'no tap'}")
                managed = br in ("nbr0", "br0")
                ok &= (got["unknown-unicast"] == []) == managed
                ok &= all(got[f"to {t}'s guest"] == [t] for t in br_taps)
                ok &= got["broadcast"] == br_taps

            print("\n  the guest stops: libvirtd's stop hooks")
            for kind, obj, op, sample, subop in STOP_EVENTS:
                r = rig.run(kind, obj, op, (SAMPLES / sample).read_bytes(), subop=subop)
                print(f"    {kind} {obj} {op} {subop} -  -> exit {r.rc}")
                ok &= r.rc == 0
            # libvirt deletes the taps after this; before it does, netplug has already put back
            # what it changed.
            cleaned = ns_table(ns, taps)
            table("after stop (netplug's changes undone):", cleaned)
            ok &= all(r["learning"] and r["flood"] and not r["static_fdb"] for r in cleaned)
            ok &= rig.domain_record("vm1") is None
    finally:
        ns.delete()
    print(f"\n  part 1: {'OK' if ok else 'UNEXPECTED RESULT'}")
    return ok


# -- part 2 ---------------------------------------------------------------------------------

NETWORK = """<network>
  <name>demo</name>
  <metadata>
    <netplug:policy xmlns:netplug="urn:x-libvirt-netplug:1" promiscLinks="no"/>
  </metadata>
  <bridge name='demobr0' stp='off' delay='0'/>
</network>"""


def part2() -> bool:
    from tests.lab import Lab
    from tests.lab.guest import build_guest
    from tests.lab.netplug import frames_reaching, install_netplug, port_table

    progress("part 2: a real libvirtd + QEMU + Linux guest in an isolated lab")
    progress("building or checking the cached guest image (kernel + busybox initramfs)")
    build_guest()
    ok = True
    with Lab() as lab:
        progress(f"lab {lab.name} up: libvirtd {lab.libvirtd_pid()} in its own namespaces")
        print(f"\n== Part 2: a real libvirtd and guest (lab {lab.name}) ==")
        print("  virsh net-define + net-start: network 'demo' (bridge demobr0) with "
              "<netplug:policy promiscLinks=\"no\"/> in its metadata")
        lab.define_network(NETWORK)
        uplink, peer = lab.add_uplink("demobr0")
        print(f"  test host: veth {peer} <-> {uplink} (the bridge's uplink port)")
        results = {}
        for phase in ("without netplug", "with netplug"):
            if phase == "with netplug":
                progress("installing netplug's hooks (netplug install-hooks --hooks-dir …) "
                         "and reloading libvirtd")
                install_netplug(lab)
            progress(f"starting guest vm1 {phase} (TCG boot, ~10 s)")
            lab.define_domain("vm1", ["network:demo"])
            guest = lab.start_domain("vm1")
            guest.wait_ready(180)
            mac = guest.macs["eth0"]
            tap = guest.targets()[mac]
            progress(f"guest up: eth0 {mac} on host tap {tap}; probing with 200-frame bursts")
            rows = port_table(lab, [tap, uplink])
            unknown = frames_reaching(lab, tap, peer, UNKNOWN)
            to_guest = frames_reaching(lab, tap, peer, mac)
            results[phase] = (rows, unknown, to_guest)
            table(f"{phase}:", rows)
            print(f"  traffic from the test host: 200 frames to unknown {UNKNOWN} -> "
                  f"{unknown} reached {tap}; 200 frames to the guest's {mac} -> {to_guest} "
                  f"reached {tap}")
            progress(f"virsh destroy vm1 ({phase})")
            lab.virsh("destroy", "vm1")
            lab.virsh("undefine", "vm1")
        rows, unknown, to_guest = results["with netplug"]
        before_rows, before_unknown, _ = results["without netplug"]
        ok &= before_rows[0]["learning"] and before_rows[0]["flood"] and before_unknown >= 200
        ok &= not rows[0]["learning"] and not rows[0]["flood"] and len(rows[0]["static_fdb"]) == 1
        ok &= unknown < 5 and to_guest >= 200
        ok &= rows[1]["learning"] and rows[1]["flood"]  # the uplink is not netplug's
        left = lab.run("bridge", "-j", "fdb", "show").stdout
        ok &= rows[0]["static_fdb"][0] not in left
        print(f"\n  after virsh destroy: no static entry for the guest's MAC left "
              f"({'yes' if rows[0]['static_fdb'][0] not in left else 'NO'})")
        progress("tearing the lab down")
    print(f"\n  part 2: {'OK' if ok else 'UNEXPECTED RESULT'}")
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("1", "2", "3"), help="run only this part")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("demo: needs root (it creates network namespaces, bridges and taps)",
              file=sys.stderr)
        return 1
    ok = True
    if args.part in (None, "1"):
        ok &= part1()
    if args.part in (None, "2"):
        ok &= part2()
    if args.part in (None, "3"):  # the uplink leaving promiscuous mode: tests/vlankernel/demo.py
        from tests.vlankernel.demo import part3
        ok &= part3(progress)
    progress(f"done: {'everything as expected' if ok else 'SOMETHING UNEXPECTED, see above'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
