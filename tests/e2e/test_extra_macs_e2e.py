"""Guests that use more MACs than the one in their XML (issue 9), with a real libvirtd, QEMU and
Linux guest: the guest adds a macvlan with a VRRP-style MAC (what keepalived does), its
virtio-net driver programs it into the NIC's unicast filter, QEMU reports it
(NIC_RX_FILTER_CHANGED, query-rx-filter's unicast-table), and the agent mirrors it into a static
FDB entry on the guest's tap — only where the policy says rxFilters="unicast". With learning off
such a MAC would otherwise get no unicast at all.

vm1 has two NICs on br0 (a host bridge with an uplink; promiscLinks='no' from the config):
    eth0  domain metadata rxFilters="unicast"  -> its macvlan's MAC gets an entry, frames reach it
    eth1  no such policy                      -> its macvlan's MAC gets nothing
Frames are injected at the uplink's test-host end and counted as they leave each tap (a packet
socket on the tap: those frames only, not the guest's own multicast).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import oracle  # noqa: E402
from fakes import NS  # noqa: E402
from polling import wait_for  # noqa: E402
from tests.e2e.test_operator_e2e import LabAgent  # noqa: E402
from tests.lab import Lab  # noqa: E402
from tests.lab.lab import Nic  # noqa: E402
from tests.lab.netplug import frames_reaching, install_netplug  # noqa: E402

pytestmark = pytest.mark.e2e

M0, M1 = "52:54:00:4f:00:01", "52:54:00:4f:00:02"
VRRP0, VRRP1 = "00:00:5e:00:01:0a", "00:00:5e:00:01:0b"  # VRIDs 10 and 11


def metadata() -> str:
    return (f'<netplug:policy xmlns:netplug="{NS}">'
            f'<netplug:interface mac="{M0}" rxFilters="unicast"/></netplug:policy>')


def static_on(lab: Lab, tap: str) -> set[str]:
    return {e["mac"] for e in oracle.fdb(lab.name)
            if e.get("ifname") == tap and e.get("state") == "static"}


@pytest.fixture(scope="module")
def rig(tmp_path_factory, lab_release):
    tmp = tmp_path_factory.mktemp("extra-macs")
    lab = Lab(release=lab_release)
    lab.start()
    agent = None
    try:
        lab.add_host_bridge("br0")
        _up, peer = lab.add_uplink("br0", "up0")
        install_netplug(lab, config='[bridge.br0]\npromiscLinks = "no"\n')
        # The hooks' paths, which the agent reads from the installed shims.
        agent = LabAgent(lab, tmp / "agent.log")
        agent.wait_connected()
        guest = lab.start_guest("vm1", [Nic("bridge", "br0", mac=M0),
                                        Nic("bridge", "br0", mac=M1)],
                                metadata=metadata(), timeout=180)
        yield {"lab": lab, "agent": agent, "guest": guest, "peer": peer,
               "eth": {mac: name for name, mac in guest.macs.items()},
               "tap": guest.targets()}
    finally:
        if agent is not None:
            agent.stop()
        lab.stop()


def test_a_macvlan_mac_inside_the_guest_reaches_it_only_with_the_unicast_policy(rig):
    lab, guest, peer, eth, tap = rig["lab"], rig["guest"], rig["peer"], rig["eth"], rig["tap"]
    # Controls first: the hooks managed both ports (learning and flooding off), so a MAC the
    # guest has not told anyone about reaches neither tap.
    assert static_on(lab, tap[M0]) == {M0} and static_on(lab, tap[M1]) == {M1}
    for mac, vrrp in ((M0, VRRP0), (M1, VRRP1)):
        assert frames_reaching(lab, tap[mac], peer, vrrp) < 5
    # keepalived-style: a macvlan with the VRRP MAC on each NIC (the virtio driver puts it in
    # the NIC's unicast filter; QEMU reports it and raises NIC_RX_FILTER_CHANGED).
    for mac, vrrp, name in ((M0, VRRP0, "vr0"), (M1, VRRP1, "vr1")):
        guest.check(f"ip link add link {eth[mac]} name {name} address {vrrp} type macvlan "
                    f"mode bridge && ip link set {name} up")
    wait_for(lambda: static_on(lab, tap[M0]) == {M0, VRRP0}, 60,
             "the agent to give the VRRP MAC an entry on the tap with rxFilters='unicast'",
             rig["agent"].log)
    assert frames_reaching(lab, tap[M0], peer, VRRP0) >= 200
    # The NIC without the policy: nothing added, its VRRP MAC still gets nothing.
    assert static_on(lab, tap[M1]) == {M1}
    assert frames_reaching(lab, tap[M1], peer, VRRP1) < 5
    # keepalived gives up the address: the entry goes, and so do the frames.
    guest.check("ip link del vr0")
    wait_for(lambda: static_on(lab, tap[M0]) == {M0}, 60, "the VRRP entry to go",
             rig["agent"].log)
    assert frames_reaching(lab, tap[M0], peer, VRRP0) < 5
