"""RX-filter policy: which macvtaps netplug syncs, with which tokens and caps, from where."""

from __future__ import annotations

import pytest

from fakes import NS, domain_xml, iface, network_xml, policy_xml
from libvirt_netplug.errors import PolicyError
from libvirt_netplug.model import parse_domain, parse_network
from libvirt_netplug.policy import DEFAULT_MAX_MULTICAST, config_from_dict
from libvirt_netplug.policy import Config
from libvirt_netplug.rxfilter import macvtap_intents, rx_intent_notes

MAC0, MAC1 = "52:54:00:00:00:01", "52:54:00:00:00:02"


def direct(mac=MAC0, dev="low0", mode="bridge", target="macvtap0", alias="net0", **kw):
    return iface("direct", mac=mac, source={"dev": dev, "mode": mode}, target=target,
                 alias=alias, **kw)


def intents(ifaces, metadata="", networks=(), config=None):
    dom = parse_domain(domain_xml("vm1", ifaces, metadata=metadata))
    nets = {n.name: n for n in (parse_network(x, lenient=True) for x in networks)}
    return macvtap_intents(dom, nets, config or Config())


def test_domain_policy_tokens_and_default_caps():
    [it] = intents([direct()], policy_xml(rxFilters="multicast allmulti"))
    assert it.managed and it.reason == "managed"
    assert it.policy.rx == {"multicast", "allmulti"}
    assert it.policy.multicast_cap == DEFAULT_MAX_MULTICAST == 64
    assert it.policy.unicast_cap == 64
    assert (it.dev, it.lower, it.mode) == ("macvtap0", "low0", "bridge")


def test_tokens_accept_commas_and_every_known_word():
    [it] = intents([direct()], policy_xml(rxFilters="multicast,allmulti mac promisc unicast",
                                          maxMulticast="8", maxUnicast="4"))
    assert it.policy.rx == {"multicast", "allmulti", "mac", "promisc", "unicast"}
    assert (it.policy.multicast_cap, it.policy.unicast_cap) == (8, 4)


@pytest.mark.parametrize("attrs,message", [
    ({"rxFilters": "multicast everything"}, "unknown token 'everything'"),
    ({"rxFilters": "multicast", "maxMulticast": "-1"}, "maxMulticast='-1' is not valid"),
    ({"rxFilters": "multicast", "maxMulticast": "100000"}, "from 0 to 4096"),
    ({"rxFilters": "multicast", "maxUnicast": "lots"}, "maxUnicast='lots' is not valid"),
])
def test_bad_policies_are_one_line_errors_naming_the_place(attrs, message):
    with pytest.raises(PolicyError, match=message) as e:
        intents([direct()], policy_xml(**attrs))
    assert "domain vm1" in str(e.value) and "\n" not in str(e.value)


def test_per_interface_policy_by_mac_overrides_the_domain_policy():
    meta = policy_xml(rxFilters="multicast",
                      interfaces={MAC1: {"rxFilters": "multicast mac", "maxMulticast": "2"}})
    a, b = intents([direct(), direct(MAC1, "low1", target="macvtap1", alias="net1")], meta)
    assert a.policy.rx == {"multicast"} and a.policy.multicast_cap == 64
    assert b.policy.rx == {"multicast", "mac"} and b.policy.multicast_cap == 2


def test_only_one_interface_enabled_by_mac():
    meta = policy_xml(interfaces={MAC1: {"rxFilters": "allmulti"}})
    a, b = intents([direct(), direct(MAC1, "low1", target="macvtap1", alias="net1")], meta)
    assert not a.managed and a.reason == "policy has no rxFilters"
    assert b.managed


def test_network_metadata_enables_macvtap_networks_and_domain_overrides_it():
    net = network_xml("mv", None, forward="bridge", forward_devs=("low0",),
                      metadata=policy_xml(rxFilters="multicast allmulti", maxMulticast="16"))
    nic = iface("network", mac=MAC0, source={"network": "mv", "dev": "low0", "mode": "bridge"},
                target="macvtap0", alias="net0")
    [it] = intents([nic], networks=[net])
    assert it.managed and it.network == "mv" and it.policy.multicast_cap == 16
    [it] = intents([nic], policy_xml(interfaces={MAC0: {"rxFilters": "promisc"}}),
                   networks=[net])
    assert it.policy.rx == {"promisc"} and it.policy.multicast_cap == 16


@pytest.mark.parametrize("mode", ["bridge", "private", "vepa", "passthrough"])
def test_every_macvtap_forward_mode_counts(mode):
    net = network_xml("mv", None, forward=mode, forward_devs=("low0",),
                      metadata=policy_xml(rxFilters="multicast"))
    nic = iface("network", mac=MAC0, source={"network": "mv", "dev": "low0", "mode": mode},
                target="macvtap0", alias="net0")
    [it] = intents([nic], networks=[net])
    assert it.managed and it.mode == mode


def test_bridged_interfaces_are_not_macvtaps():
    net = network_xml("nat", "virbr0", forward="nat", metadata=policy_xml(rxFilters="multicast"))
    nics = [iface("network", mac=MAC0, source={"network": "nat", "bridge": "virbr0"},
                  target="vnet0", alias="net0"),
            iface("bridge", mac=MAC1, source={"bridge": "br0"}, target="vnet1", alias="net1")]
    assert intents(nics, policy_xml(rxFilters="multicast"), networks=[net]) == []


def test_config_direct_section_is_the_lowest_layer():
    config = config_from_dict({"direct": {"low0": {"rxFilters": "multicast",
                                                   "maxMulticast": 4}}}, "/etc/x.toml")
    [it] = intents([direct()], config=config)
    assert it.managed and it.policy.multicast_cap == 4
    [it] = intents([direct()], policy_xml(maxMulticast="9"), config=config)
    assert it.policy.rx == {"multicast"} and it.policy.multicast_cap == 9


def test_trust_guest_rx_filters_makes_netplug_stand_aside_and_say_so_once():
    [it] = intents([direct(trust="yes")], policy_xml(rxFilters="multicast"))
    assert not it.managed
    assert it.reason.startswith("trustGuestRxFilters='yes'")
    [note] = rx_intent_notes([it])
    assert note.level == "info" and "stands aside" in note.message and note.once_key
    # Without a netplug policy there is nothing to stand aside from: no note.
    [quiet] = intents([direct(trust="yes")])
    assert rx_intent_notes([quiet]) == []


def test_invalid_network_policy_leaves_its_macvtaps_alone_with_an_error_note():
    net = network_xml("mv", None, forward="bridge", forward_devs=("low0",),
                      metadata=f'<netplug:policy xmlns:netplug="{NS}" rxFilters="bogus"/>')
    nic = iface("network", mac=MAC0, source={"network": "mv", "dev": "low0", "mode": "bridge"},
                target="macvtap0", alias="net0")
    [it] = intents([nic], networks=[net])
    assert not it.managed and it.reason.startswith("invalid policy")
    [note] = rx_intent_notes([it])
    assert note.level == "error" and "bogus" in note.message


def test_interfaces_not_yet_started_or_without_alias_are_not_managed():
    [no_target] = intents([direct(target=None)], policy_xml(rxFilters="multicast"))
    assert not no_target.managed and "no <target dev>" in no_target.reason
    [no_alias] = intents([direct(alias=None)], policy_xml(rxFilters="multicast"))
    assert not no_alias.managed and "no <alias>" in no_alias.reason
