"""The fake kernel (tests/fakes.py) behaves like the real NetlinkKernel.

One script of seam calls — reads, writes, idempotent repeats, and the error cases unit tests
rely on (missing device, non-port, VLAN on a non-filtering bridge, replacing another port's
entry) — runs against FakeKernel and against NetlinkKernel in a fresh namespace; the outcomes
must be identical. If the kernel or the seam changes, this fails before the unit tier lies.
"""

from __future__ import annotations

from fakes import FakeKernel

ADDR = {"br0": "02:00:00:00:00:b0", "vnet0": "fe:54:00:00:00:01", "vnet1": "fe:54:00:00:00:02",
        "lone": "02:00:00:00:00:10"}
G1, G2 = "52:54:00:00:00:01", "52:54:00:00:00:02"

SCRIPT = [
    ("ports", lambda k: sorted(k.bridge_ports("br0"))),
    ("fdb", lambda k: k.fdb("br0")),
    ("fdb vnet0", lambda k: k.fdb("br0", "vnet0")),
    ("replace", lambda k: k.replace_fdb("vnet0", G1)),
    ("replace again", lambda k: k.replace_fdb("vnet0", G1)),
    ("fdb", lambda k: k.fdb("br0")),
    ("replace moves from another port", lambda k: k.replace_fdb("vnet1", G1)),
    ("fdb", lambda k: k.fdb("br0")),
    ("replace sticky", lambda k: k.replace_fdb("vnet1", G2, sticky=True)),
    ("replace with vlan, no filtering", lambda k: k.replace_fdb("vnet1", G2, vlan=5)),
    ("replace on another port's own address", lambda k: k.replace_fdb("vnet1", ADDR["vnet0"])),
    ("fdb", lambda k: k.fdb("br0")),
    ("get", lambda k: k.fdb_get("br0", G1)),
    ("get the bridge's own address", lambda k: k.fdb_get("br0", ADDR["br0"])),
    ("get a port's own address", lambda k: k.fdb_get("br0", ADDR["vnet1"])),
    ("get an absent entry", lambda k: k.fdb_get("br0", "52:54:00:00:00:99")),
    ("get on a missing bridge", lambda k: k.fdb_get("gone0", G1)),
    ("port vlans without vlan filtering", lambda k: k.port_vlans("vnet0")),
    ("delete", lambda k: k.delete_fdb("vnet1", G1)),
    ("delete again", lambda k: k.delete_fdb("vnet1", G1)),
    ("delete on the wrong port", lambda k: k.delete_fdb("vnet0", G2)),
    ("flags", lambda k: k.set_port_flags("vnet0", learning=False, flood=False)),
    ("flags again", lambda k: k.set_port_flags("vnet0", learning=False, flood=False)),
    ("flags learning only", lambda k: k.set_port_flags("vnet1", learning=False)),
    ("port flags", lambda k: [(n, l.learning, l.flood, l.bridge_port, l.master)
                              for n, l in sorted(k.bridge_ports("br0").items())]),
    ("vlan filtering", lambda k: k.set_vlan_filtering("br0", True)),
    ("vlan filtering reported", lambda k: k.link("br0").vlan_filtering),
    ("vlan filtering on a tap", lambda k: k.set_vlan_filtering("lone", True)),
    ("replace on a non-port", lambda k: k.replace_fdb("lone", G1)),
    ("flags on a non-port", lambda k: k.set_port_flags("lone", False, False)),
    ("flags on the bridge", lambda k: k.set_port_flags("br0", False, False)),
    ("replace on a missing tap", lambda k: k.replace_fdb("gone0", G1)),
    ("delete on a missing tap", lambda k: k.delete_fdb("gone0", G1)),
    ("flags on a missing tap", lambda k: k.set_port_flags("gone0", False, False)),
    ("link of a missing tap", lambda k: k.link("gone0")),
    ("fdb of a missing bridge", lambda k: k.fdb("gone0")),
    ("ports of a missing bridge", lambda k: k.bridge_ports("gone0")),
    ("fdb of a non-bridge", lambda k: k.fdb("lone")),
    ("links", lambda k: sorted((l.name, l.kind, l.address, l.master, l.bridge_port, l.learning,
                                l.flood, l.vlan_filtering, l.promisc)
                               for l in k.links().values())),
    ("multicast add", lambda k: k.add_multicast("lone", "01:00:5e:01:02:03")),
    ("multicast add again", lambda k: k.add_multicast("lone", "01:00:5e:01:02:03")),
    ("addresses", lambda k: k.device_addresses("lone")),
    ("multicast del", lambda k: k.del_multicast("lone", "01:00:5e:01:02:03")),
    ("multicast del again", lambda k: k.del_multicast("lone", "01:00:5e:01:02:03")),
    ("promisc", lambda k: (k.set_promisc("lone", True), k.link("lone").promisc)),
    ("multicast address as MAC", lambda k: k.set_address("lone", "01:54:00:aa:bb:cc")),
]


def run_script(kernel) -> list:
    out = []
    for label, step in SCRIPT:
        try:
            out.append((label, "ok", step(kernel)))
        except Exception as e:  # noqa: BLE001 - the outcome (class, errno, message) is compared
            out.append((label, "raised", type(e).__name__, getattr(e, "errno", None), str(e)))
    return out


def _real_outcomes():
    from libvirt_netplug.kernel import NetlinkKernel

    with NetlinkKernel() as k:
        return run_script(k)


def test_fake_matches_the_real_kernel(ns):
    ns.add_bridge("br0", up=False)
    ns.ip("link", "set", "br0", "address", ADDR["br0"])
    ns.add_tap("vnet0", "br0", address=ADDR["vnet0"], up=False)
    ns.add_tap("vnet1", "br0", address=ADDR["vnet1"], up=False)
    ns.add_tap("lone", address=ADDR["lone"], up=False)
    real = ns.call(_real_outcomes)

    fake = FakeKernel()
    fake.add_bridge("br0", address=ADDR["br0"])
    fake.add_tap("vnet0", "br0", address=ADDR["vnet0"])
    fake.add_tap("vnet1", "br0", address=ADDR["vnet1"])
    fake.add_tap("lone", address=ADDR["lone"])
    faked = run_script(fake)

    mismatches = [(r, f) for r, f in zip(real, faked) if r != f]
    assert mismatches == []
