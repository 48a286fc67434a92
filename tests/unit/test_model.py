"""The typed model: what netplug reads from libvirt's XML, for every interface type.

Proves: each <interface> type (bridge, network on a bridge, network on macvtap, direct,
ethernet, hostdev, user, vhostuser) is parsed into the right fields; MACs are validated and
normalized; interface names are checked like the kernel's dev_valid_name(); networks and
network-hook ports parse into what the hooks need; only bridged NICs become bridge intents.
The MAC and name checks (by hand) accept exactly what the regular expressions they replace
accept, on arbitrary text (Unicode digits and spaces included).
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given, strategies as st

from conftest import SAMPLES
from fakes import bridge_iface, domain_xml, hookdata, network_xml, networkport_xml, policy_xml
from libvirt_netplug.errors import InputError, PolicyError
from libvirt_netplug.model import (IFNAMSIZ, check_ifname, check_mac, ifname_ok, _is_mac,
                                   parse_domain, parse_network, parse_network_port, Network)
from libvirt_netplug.plan import bridge_intents, interface_bridge
from libvirt_netplug.policy import Config


@pytest.fixture(scope="module")
def alltypes():
    return parse_domain((SAMPLES / "domain-all-types.xml").read_bytes())


def test_domain_identity(alltypes):
    assert alltypes.name == "alltypes"
    assert alltypes.uuid == "5f3c2a44-1d2e-4c6b-9a0e-0a1b2c3d4e01"
    assert len(alltypes.interfaces) == 8
    assert [i.index for i in alltypes.interfaces] == list(range(8))


# (index, type, mac, target, alias, source_bridge, source_network, source_dev, source_mode,
#  model, is_macvtap)
EXPECTED = [
    (0, "bridge", "52:54:00:a0:00:01", "vnet0", "net0", "br0", None, None, None, "virtio",
     False),
    (1, "network", "52:54:00:a0:00:02", "vnet1", "net1", "nbr0", "mgd", None, None, "virtio",
     False),
    (2, "direct", "52:54:00:a0:00:03", "macvtap0", "net2", None, None, "eth0", "bridge",
     "virtio", True),
    (3, "ethernet", "52:54:00:a0:00:04", "tap5", "net3", None, None, None, None, "virtio",
     False),
    (4, "hostdev", "52:54:00:a0:00:05", None, "hostdev0", None, None, None, None, None, False),
    (5, "user", "52:54:00:a0:00:06", None, "net5", None, None, None, None, "virtio", False),
    (6, "network", "52:54:00:a0:00:07", "macvtap1", "net6", None, "direct-net", "eth1",
     "bridge", "virtio", True),
    (7, "vhostuser", "52:54:00:a0:00:08", None, "net7", None, None, None, "server", "virtio",
     False),
]


@pytest.mark.parametrize("row", EXPECTED, ids=[f"{r[1]}-{r[4]}" for r in EXPECTED])
def test_every_interface_type(alltypes, row):
    i = alltypes.interfaces[row[0]]
    got = (i.index, i.type, i.mac, i.target, i.alias, i.source_bridge, i.source_network,
           i.source_dev, i.source_mode, i.model, i.is_macvtap)
    assert got == row


def test_network_interface_portid(alltypes):
    assert alltypes.interfaces[1].portid == "3b7e6f1a-5d2c-4f0b-8a71-1c2d3e4f5a60"


def test_only_bridged_interfaces_become_bridge_intents(alltypes):
    nets = {n.name: n for n in (
        parse_network((SAMPLES / "network-mgd.xml").read_bytes()),
        parse_network((SAMPLES / "network-direct.xml").read_bytes()))}
    intents = bridge_intents(alltypes, nets, Config())
    assert [(it.interface.alias, it.bridge) for it in intents] == [("net0", "br0"),
                                                                 ("net1", "nbr0")]
    assert interface_bridge(alltypes.interfaces[6], nets) is None  # macvtap network


def test_mac_is_normalized_to_lowercase():
    d = parse_domain(domain_xml("vm1", [bridge_iface("br0", "vnet0", "52:54:00:AB:cD:EF")]))
    assert d.interfaces[0].mac == "52:54:00:ab:cd:ef"


def test_interface_without_mac_is_parsed_but_never_managed():
    d = parse_domain(domain_xml("vm1", ["<interface type='bridge'><source bridge='br0'/>"
                                        "<target dev='vnet0'/></interface>"],
                                metadata=policy_xml(promiscLinks="no")))
    assert d.interfaces[0].mac is None
    (it,) = bridge_intents(d, {}, Config())
    assert not it.managed and "no <mac address>" in it.reason


def test_vlan_tag():
    d = parse_domain((SAMPLES / "domain-metadata.xml").read_bytes())
    assert [i.vlan_tag for i in d.interfaces] == [None, None, 42, None]  # trunk: no single tag


def test_trust_guest_rx_filters():
    d = parse_domain(domain_xml("vm1", [
        "<interface type='direct' trustGuestRxFilters='yes'><mac address='52:54:00:00:00:01'/>"
        "<source dev='eth0' mode='passthrough'/><target dev='macvtap0'/></interface>",
        "<interface type='direct'><mac address='52:54:00:00:00:02'/>"
        "<source dev='eth0' mode='bridge'/><target dev='macvtap1'/></interface>"]))
    assert [i.trust_guest_rx_filters for i in d.interfaces] == [True, False]
    assert d.interfaces[0].source_mode == "passthrough"


def test_domain_without_interfaces():
    d = parse_domain("<domain><name>empty</name></domain>")
    assert d.interfaces == () and d.uuid is None


def test_domain_metadata_policies():
    d = parse_domain((SAMPLES / "domain-metadata.xml").read_bytes())
    assert d.policy.promisc_links is False and d.policy.sticky is True
    assert d.interface_policy("52:54:00:c0:00:02").promisc_links is True
    assert d.interface_policy("52:54:00:c0:00:03").sticky is False
    assert d.interface_policy("52:54:00:c0:00:01").is_empty()


def test_unknown_element_in_netplug_policy_is_an_error():
    meta = ('<netplug:policy xmlns:netplug="urn:x-libvirt-netplug:1">'
            '<netplug:iface mac="52:54:00:00:00:01"/></netplug:policy>')
    with pytest.raises(PolicyError, match="unknown child element <iface>"):
        parse_domain(domain_xml("vm1", [], metadata=meta))


def test_other_namespaces_in_metadata_are_ignored():
    meta = '<x:policy xmlns:x="urn:example" promiscLinks="bogus"/>'
    d = parse_domain(domain_xml("vm1", [], metadata=meta))
    assert d.policy.is_empty()


# -- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize("mac,norm", [("52:54:00:00:00:01", "52:54:00:00:00:01"),
                                      ("52:54:00:AA:bb:CC", "52:54:00:aa:bb:cc"),
                                      ("02:00:00:00:00:01", "02:00:00:00:00:01"),
                                      ("fe:54:00:00:00:01", "fe:54:00:00:00:01")])
def test_valid_macs(mac, norm):
    assert check_mac(mac, "here") == norm


@pytest.mark.parametrize("mac", [None, "", "52:54:00:00:00", "52:54:00:00:00:01:02",
                                 "52-54-00-00-00-01", "5254.0000.0001", "52:54:00:00:00:1",
                                 "52:54:00:00:00:0g", " 52:54:00:00:00:01",
                                 "52:54:00:00:00:01\n",
                                 "01:00:5e:00:00:01",
                                 "ff:ff:ff:ff:ff:ff", "00:00:00:00:00:00"])
def test_invalid_macs_name_the_place(mac):
    with pytest.raises(InputError, match="^domain vm1 interface net0: "):
        check_mac(mac, "domain vm1 interface net0")


@pytest.mark.parametrize("name", ["v", "vnet0", "a" * 15, "br-lan.100", "vnet@x", "tap_0",
                                  "\u00e9" * 7])
def test_valid_ifnames(name):
    assert check_ifname(name, "here") == name


@pytest.mark.parametrize("name", [None, "", "a" * 16, "\u00e9" * 8, "a/b", "a:b", "a b", "a\tb",
                                  "a\nb", "a\x00b", ".", "..", " vnet0", "vnet0 ", "\ud800"])
def test_invalid_ifnames(name):
    with pytest.raises(InputError, match="^where: "):
        check_ifname(name, "where")


# -- networks and ports ------------------------------------------------------------------------


def test_parse_network():
    n = parse_network((SAMPLES / "network-mgd.xml").read_bytes())
    assert (n.name, n.bridge, n.forward_mode, n.mac_table_manager) == ("mgd", "nbr0", "nat", None)
    assert n.policy.promisc_links is False and not n.uses_macvtap


def test_parse_macvtap_network():
    n = parse_network((SAMPLES / "network-direct.xml").read_bytes())
    assert n.bridge is None and n.uses_macvtap and n.forward_devs == ("eth1", "eth2")


def test_network_record_round_trip():
    for f in ("network-mgd.xml", "network-ltm.xml", "network-override.xml",
              "network-direct.xml"):
        n = parse_network((SAMPLES / f).read_bytes())
        assert Network.from_record(n.to_record()) == n


def test_invalid_network_policy_is_recorded_when_lenient():
    xml = network_xml(metadata=policy_xml(promiscLinks="nope"))
    with pytest.raises(PolicyError, match="network mgd <metadata><netplug:policy>"):
        parse_network(xml)
    n = parse_network(xml, lenient=True)
    assert n.policy.is_empty() and "promiscLinks='nope'" in n.policy_error
    assert Network.from_record(n.to_record()).policy_error == n.policy_error


def test_network_inside_hookdata():
    n = parse_network(hookdata(network_xml("mgd", "nbr0")))
    assert n.name == "mgd" and n.bridge == "nbr0"


def test_parse_network_port():
    p = parse_network_port((SAMPLES / "hookdata-port-created.xml").read_bytes())
    assert (p.owner_name, p.mac, p.plug_type, p.plug_bridge) == ("nets", "52:54:00:d0:00:01",
                                                                 "network", "nbr0")
    assert p.network.name == "mgd" and p.network.policy.promisc_links is False


def test_network_port_names_its_owner_in_errors():
    with pytest.raises(InputError, match="network mgd port of domain vm9: invalid MAC"):
        parse_network_port(hookdata(network_xml(), networkport_xml("vm9", "nope")))


# -- MAC and interface-name checks: by hand, as the regular expressions they replace ----------

MAC_RE = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")
IFNAME_BAD = re.compile(r"[/:\s\x00]")
MACLIKE = st.text(alphabet="0123456789abcdefABCDEFgG:-\x00 ٠\u00a0", min_size=15, max_size=19)
NAMES = st.text(alphabet=st.characters(), max_size=17) | st.sampled_from(
    ["vnet0", "a b", "a\u2003b", "a\x1cb", "a\u0085b", "é" * 8, "a/b", "a:b", ".", "..",
     "\ud800", "vnet\udcff"])  # a lone surrogate (JSON can carry it), an argv escape


@given(st.one_of(MACLIKE, st.text(max_size=20),
                 st.lists(st.text(alphabet="0123456789abcdefABCDEF\u0661", min_size=2,
                                  max_size=2), min_size=6, max_size=6).map(":".join)))
def test_mac_check_matches_the_regular_expression(text):
    assert _is_mac(text) is (MAC_RE.fullmatch(text) is not None)


@given(NAMES)
def test_ifname_check_matches_the_regular_expression(name):
    try:
        size = len(name.encode("utf-8", "surrogateescape"))
    except UnicodeEncodeError:
        size = None  # no bytes give this name: not a name Linux can have
    want = bool(name) and size is not None and size < IFNAMSIZ and \
        name not in (".", "..") and IFNAME_BAD.search(name) is None
    assert ifname_ok(name) is want
