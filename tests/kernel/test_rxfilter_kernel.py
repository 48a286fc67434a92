"""macvtap RX-filter sync on the real kernel: macvtaps on veth lower devices in a fresh
namespace, guest filters from the recorded lab replies, the shared engine (sync.sync with the
real NetlinkKernel), and outcomes read by the independent oracle (/proc/net/dev_mcast,
`ip -j -d link show`, `bridge -j fdb show`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import oracle
from fakes import domain_xml, iface, policy_xml

SAMPLES = Path(__file__).resolve().parents[2] / "xml-samples" / "rxfilter"
INDEX = json.loads((SAMPLES / "index.json").read_text())
MAC0, MAC1 = (n["mac"] for n in INDEX["nics"])  # net0 (bridge mode), net1 (passthrough)
ALL_HOSTS = "01005e000001"  # the kernel's own IPv4 membership on every up device


def reply_text(stem: str) -> str:
    [s] = [s for s in INDEX["samples"] if s["scenario"] == stem]
    return (SAMPLES / s["file"]).read_text()


def guest(stem: str) -> dict:
    """The recorded reply's table of net0/net1 (what the lab guest really had)."""
    return {e["name"]: e for e in json.loads(reply_text(stem))["return"]}


@pytest.fixture
def host(ns, tmp_path):
    ns.add_veth("low0", "low0p")
    ns.ip("link", "add", "link", "low0", "name", "macvtap0", "address", MAC0, "type", "macvtap",
          "mode", "bridge")
    ns.ip("link", "set", "macvtap0", "up")
    ns.add_veth("low1", "low1p")
    ns.ip("link", "add", "link", "low1", "name", "macvtap1", "address", MAC1, "type", "macvtap",
          "mode", "passthru")
    ns.ip("link", "set", "macvtap1", "up")
    return ns, str(tmp_path / "state")


def vm(tokens0: str = "multicast allmulti", tokens1: str = "unicast", **caps) -> str:
    policy = policy_xml(interfaces={MAC0: {"rxFilters": tokens0, **caps},
                                    MAC1: {"rxFilters": tokens1, **caps}})
    return domain_xml("vm1", [
        iface("direct", mac=MAC0, source={"dev": "low0", "mode": "bridge"}, target="macvtap0",
              alias="net0"),
        iface("direct", mac=MAC1, source={"dev": "low1", "mode": "passthrough"},
              target="macvtap1", alias="net1")], metadata=policy)


def _sync(xml: str, reply: str | None, state: str, running: bool = True) -> dict:
    """In the namespace: one sync.sync of vm1 with the real kernel; QEMU answers ``reply``."""
    from libvirt_netplug.kernel import NetlinkKernel
    from libvirt_netplug.model import parse_domain
    from libvirt_netplug.policy import Config
    from libvirt_netplug.rxfilter import parse_rx_filter_reply
    from libvirt_netplug.state import StateDir
    from libvirt_netplug.sync import Desired, sync

    dom = parse_domain(xml)
    desired = Desired((dom,) if running else (), {}, Config())
    with NetlinkKernel() as k:
        report = sync(k, StateDir(state), desired, only={"vm1"},
                      rx_source=(lambda d: parse_rx_filter_reply(reply)) if reply else None)
    return {"applied": [o.what() for o in report.applied],
            "errors": [str(e) for _o, e in report.errors],
            "notes": [n.message for n in report.notes]}


def sync_(host, xml, stem, running=True) -> dict:
    ns, state = host
    out = ns.call(_sync, xml, reply_text(stem) if stem else None, state, running)
    assert out["errors"] == [], out
    return out


def mcast(ns, dev) -> dict[str, int]:
    """{address: global use} of a device, from /proc/net/dev_mcast."""
    return {a: g for d, _r, g, a in oracle.dev_mcast(ns.name) if d == dev}


def flags(ns, dev) -> tuple[bool, bool, int, int]:
    link = oracle.link(ns.name, dev)
    return ("PROMISC" in link["flags"], "ALLMULTI" in link["flags"], link["promiscuity"],
            link.get("allmulti", -1))


def test_guest_groups_reach_the_macvtap_and_its_lower_device_and_leave_again(host):
    ns, _ = host
    before = oracle.view(oracle.snapshot(ns.name), ["macvtap0", "low0"])
    assert ALL_HOSTS in mcast(ns, "macvtap0")  # the kernel's own membership
    sync_(host, vm(), "join-ipv6-group")
    table = {oracle.hexmac(m) for m in guest("join-ipv6-group")["net0"]["multicast-table"]}
    assert len(table) == 5
    for dev in ("macvtap0", "low0"):  # the kernel propagates the macvtap's list downwards
        assert table <= set(mcast(ns, dev)), dev
    assert all(mcast(ns, "macvtap0")[a] == 1 for a in table)  # a user ("global") membership
    # Ensure-style: the same reply again changes nothing at all.
    snap = oracle.snapshot(ns.name)
    assert sync_(host, vm(), "join-ipv6-group")["applied"] == []
    assert oracle.diff(snap, oracle.snapshot(ns.name)) == []
    sync_(host, vm(), "leave-group")
    left = {oracle.hexmac("01:00:5e:01:02:03"), oracle.hexmac("33:33:00:00:12:34")}
    for dev in ("macvtap0", "low0"):
        assert not left & set(mcast(ns, dev)), dev
    # The guest stops: netplug's memberships go, the kernel's own one stays.
    sync_(host, vm(), None, running=False)
    assert ALL_HOSTS in mcast(ns, "macvtap0") and mcast(ns, "macvtap0")[ALL_HOSTS] == 0
    assert oracle.diff(before, oracle.view(oracle.snapshot(ns.name),
                                           ["macvtap0", "low0"])) == []


def test_allmulticast_and_promiscuous_follow_the_guest(host):
    ns, _ = host
    low_before = flags(ns, "low0")
    sync_(host, vm("multicast allmulti promisc"), "allmulti-on")
    p, a, _, _ = flags(ns, "macvtap0")
    assert (p, a) == (False, True)
    assert flags(ns, "low0")[3] == low_before[3] + 1  # the lower device's allmulti count
    sync_(host, vm("multicast allmulti promisc"), "promisc-on")  # allmulti back off
    p, a, _, _ = flags(ns, "macvtap0")
    assert (p, a) == (True, False)
    assert flags(ns, "low0")[2] == low_before[2] + 1  # promiscuity propagated
    sync_(host, vm("multicast allmulti promisc"), "promisc-off")
    assert flags(ns, "macvtap0")[:2] == (False, False)
    assert flags(ns, "low0") == low_before


def test_mac_change_refused_without_mac_and_followed_with_it(host):
    ns, _ = host
    out = sync_(host, vm("multicast"), "mac-change")
    assert oracle.link(ns.name, "macvtap0")["address"] == MAC0
    assert any("refused" in n and "52:54:00:0a:00:99" in n for n in out["notes"])
    sync_(host, vm("multicast mac"), "mac-change")
    assert oracle.link(ns.name, "macvtap0")["address"] == "52:54:00:0a:00:99"
    sync_(host, vm("multicast mac"), None, running=False)  # cleanup restores the configured MAC
    assert oracle.link(ns.name, "macvtap0")["address"] == MAC0


def _self_entries(ns, dev: str) -> set[str]:
    return {e["mac"] for e in oracle.fdb(ns.name) if e.get("ifname") == dev
            and not e.get("master")}


def test_passthrough_unicast_goes_through_the_macvtap_fdb_to_the_lower_device(host):
    ns, _ = host
    sync_(host, vm(), "macvlan-unicast")
    assert "02:00:00:00:00:01" in _self_entries(ns, "macvtap1")
    assert "02:00:00:00:00:01" in _self_entries(ns, "low1")  # the lower device's uc filter
    # The same guest table on the bridge-mode macvtap: refused with a reason, no error.
    bridged = domain_xml("vm1", [iface("direct", mac=MAC1, source={"dev": "low0",
                                                                   "mode": "bridge"},
                                       target="macvtap0", alias="net1")],
                         metadata=policy_xml(rxFilters="unicast"))
    ns.ip("link", "set", "macvtap0", "address", MAC1)
    out = sync_(host, bridged, "macvlan-unicast")
    assert any("only passthrough can" in n for n in out["notes"])
    assert "02:00:00:00:00:01" not in _self_entries(ns, "macvtap0")
    # Stop: the unicast address leaves the lower device again.
    sync_(host, vm(), None, running=False)
    assert "02:00:00:00:00:01" not in _self_entries(ns, "low1")


def test_beyond_the_cap_allmulticast_instead_never_unbounded(host):
    ns, _ = host
    out = sync_(host, vm("multicast", maxMulticast="2"), "join-ipv6-group")
    assert flags(ns, "macvtap0")[1] is True
    ours = {a for a, global_use in mcast(ns, "macvtap0").items() if global_use}
    assert ours == set()  # not one of the 5 groups was added (only the kernel's own remain)
    assert any("maxMulticast 2" in n for n in out["notes"])
    # QEMU's own overflow (70 groups recorded) is allmulticast too.
    sync_(host, vm("multicast"), "multicast-overflow")
    assert flags(ns, "macvtap0")[1] is True
    sync_(host, vm("multicast"), "multicast-overflow-cleared")
    assert flags(ns, "macvtap0")[1] is False


def test_unicast_cap_in_passthrough(host):
    ns, _ = host
    out = sync_(host, vm(tokens1="unicast promisc"), "unicast-overflow")
    assert flags(ns, "macvtap1")[0] is True  # promiscuous instead of 66 addresses
    assert any("overflowed" in n for n in out["notes"])
    sync_(host, vm(tokens1="unicast promisc"), "macvlan-unicast")
    assert flags(ns, "macvtap1")[0] is False
    assert "02:00:00:00:00:01" in _self_entries(ns, "low1")
