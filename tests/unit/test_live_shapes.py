"""Every shape of interface libvirt's live XML really shows, classified by the planners.

Samples: what a real libvirtd passed to the hooks (xml-samples/captured/, libvirt 9.0) and
what ``virsh dumpxml`` showed for running guests (xml-samples/live/<version>/, written by
tests/lab/capture_live_shapes.py). The shapes:

    type='network' on a libvirt bridge      <source network='N' portid bridge='nbr0'/>
    type='bridge' on a forward-bridge net   <source network='N' portid bridge='br1'/>
    type='bridge' on a host bridge          <source bridge='br0'/>
    type='direct' (macvtap)                 <source dev='low0' mode='bridge'/>
    type='direct' on a macvtap network      <source network='N' portid dev='low1' mode=…/>

Proves: each interface lands in exactly one planner (bridge ports or macvtap RX filters) and
takes its policy from where it really comes from: a network's metadata policy applies to its
ports whatever type the live XML gives them (the macvtap network's rxFilters were ignored for
running guests before), the config's [bridge.*]/[direct.*] to host bridges and lower devices.
And the engine (sync) really programs the macvtap of a type='direct' interface whose policy is
only in its network's metadata.
"""

from __future__ import annotations

import pytest

from conftest import SAMPLES as SAMPLES_DIR
from libvirt_netplug import values
from libvirt_netplug.model import parse_domain, parse_network
from libvirt_netplug.plan import bridge_intents
from libvirt_netplug.policy import config_from_dict, policy_from_mapping
from libvirt_netplug.rxfilter import RxFilter, macvtap_intents

CAPTURED = SAMPLES_DIR / "captured"
LIVE = SAMPLES_DIR / "live"
CONFIG = config_from_dict({"bridge": {"br0": {"promiscLinks": "no"}},
                           "direct": {"low0": {"rxFilters": "multicast"}}}, "test.toml")
# The captured networks carry no policy: give them the ones the live samples' networks carry
# in their metadata (as `virsh net-define` keeps it).
NET_POLICY = {"netplug-iso": {"promiscLinks": "no"},
              "netplug-hostbr": {"promiscLinks": "no", "sticky": "yes"},
              "netplug-macvtap": {"rxFilters": "multicast allmulti"}}


def networks_from(paths) -> dict:
    nets = {}
    for p in paths:
        net = parse_network(p.read_bytes(), lenient=True)
        if net.name in NET_POLICY:
            net = values.replace(net, policy=policy_from_mapping(
                NET_POLICY[net.name], f"network {net.name}"))
        assert not net.policy.is_empty(), f"{p}: no netplug policy in its metadata"
        nets[net.name] = net
    return nets


def samples() -> list:
    out = []
    nets = networks_from(sorted(CAPTURED.glob("*-network-started-*.xml")))
    for p in sorted(CAPTURED.glob("*-qemu-*.xml")):
        op = p.stem.split("-")[2]
        if op in ("start", "started", "reconnect"):
            out.append(pytest.param(p, nets, id=f"captured/{p.stem}"))
    for d in sorted(x for x in LIVE.glob("*") if x.is_dir()):
        nets = networks_from(sorted(d.glob("network-*.xml")))
        for p in sorted(d.glob("domain-*.xml")):
            out.append(pytest.param(p, nets, id=f"live/{d.name}/{p.stem}"))
    return out


@pytest.mark.parametrize("path,networks", samples())
def test_every_interface_is_classified_by_its_real_source(path, networks):
    domain = parse_domain(path.read_bytes())
    bridged = {i.interface.mac: i for i in bridge_intents(domain, networks, CONFIG)}
    macvtaps = {i.interface.mac: i for i in macvtap_intents(domain, networks, CONFIG)}
    for iface in domain.interfaces:
        assert (iface.mac in bridged) != (iface.mac in macvtaps), iface
        net = networks.get(iface.source_network or "")
        if iface.mac in bridged:
            it = bridged[iface.mac]
            assert iface.type in ("bridge", "network") and it.bridge == iface.source_bridge
            if net is not None:  # a network's port, whatever the type: the network's policy
                assert it.network == net.name and it.managed, it
                assert it.policy.sticky is (True if net.name.endswith("-hostbr") else None)
            else:
                assert it.policy == CONFIG.bridge_policy(it.bridge)
        else:
            it = macvtaps[iface.mac]
            assert iface.type == "direct" and it.lower == iface.source_dev
            if iface.source_network:
                assert net is not None and net.uses_macvtap
                assert it.network == net.name and it.policy.rx == {"multicast", "allmulti"}
                assert it.managed, it.reason
            else:
                assert it.network is None and it.policy.rx == {"multicast"}


def test_the_samples_hold_every_shape():
    shapes = set()
    for param in samples():
        path = param.values[0]
        for i in parse_domain(path.read_bytes()).interfaces:
            shapes.add((i.type, bool(i.source_network), bool(i.source_bridge),
                        bool(i.source_dev)))
    assert {("network", True, True, False), ("bridge", True, True, False),
            ("bridge", False, True, False), ("direct", False, False, True),
            ("direct", True, False, True)} <= shapes


def test_macvtap_network_policy_reaches_the_macvtap(fake, tmp_path):
    """The engine, as the agent and reconcile run it, on the captured live XML: a group the
    guest joins on its macvtap-network NIC is programmed on that macvtap (and only there)."""
    from libvirt_netplug.state import StateDir
    from libvirt_netplug.sync import Desired, sync

    domain = parse_domain((CAPTURED / "012-qemu-started-begin.xml").read_bytes())
    nets = networks_from(sorted(CAPTURED.glob("*-network-started-*.xml")))
    fake.add_veth("low1")
    fake.add("macvtap1", "macvtap", lower="low1", macvlan_mode="bridge",
             address="52:54:00:00:01:05")
    group = "01:00:5e:00:00:fb"

    def rx_source(d):
        return {"net4": RxFilter("net4", "52:54:00:00:01:05", multicast="all",
                                 multicast_table=(group,))}

    report = sync(fake, StateDir(str(tmp_path / "state")),
                  Desired((domain,), {"netplug-macvtap": nets["netplug-macvtap"]}, CONFIG),
                  rx_source=rx_source)
    assert not report.errors
    assert group in fake.devs["macvtap1"].mc and fake.devs["macvtap1"].allmulti
    [net4] = [i for d in report.domains for i in d.macvtap_intents if i.interface.alias == "net4"]
    assert net4.managed and net4.network == "netplug-macvtap"
