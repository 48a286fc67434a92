"""Policy: parsing, the precedence of its five sources, and config-file errors.

Proves: config < <bridge promiscLinks> < network metadata < domain metadata < per-interface
(by MAC), exhaustively for promiscLinks over every combination of unset/yes/no in the five
layers (and for host bridges, which have only three); the other settings layer the same way;
every config error is one line naming the file (and the table and key); a broken config file
does not stop the hook and is reported once.
"""

from __future__ import annotations

import os

import itertools

import pytest

from fakes import (bridge_iface, domain_xml, network_iface, network_xml, policy_xml)
from libvirt_netplug.errors import PolicyError
from libvirt_netplug.model import parse_domain, parse_network
from libvirt_netplug.plan import bridge_intents
from libvirt_netplug.policy import Policy, config_from_dict, load_config, policy_from_mapping

MAC = "52:54:00:00:00:01"
LEVELS = (None, "yes", "no")


def _cfg(value):
    return config_from_dict({"bridge": {"nbr0": {"promiscLinks": value}}} if value else {},
                            "/etc/netplug.toml")


def effective(config=None, attr=None, net_meta=None, dom_meta=None, iface_meta=None,
              host_bridge=False):
    """The promiscLinks an interface ends up with, through the real parsers and planner."""
    dom_attrs = {"promiscLinks": dom_meta} if dom_meta else {}
    ifaces = {MAC: {"promiscLinks": iface_meta}} if iface_meta else {}
    meta = policy_xml(interfaces=ifaces, **dom_attrs) if (dom_attrs or ifaces) else ""
    if host_bridge:
        dom = parse_domain(domain_xml("vm1", [bridge_iface("nbr0", "vnet0", MAC)],
                                      metadata=meta))
        networks = {}
    else:
        dom = parse_domain(domain_xml("vm1", [network_iface("mgd", "nbr0", "vnet0", MAC)],
                                      metadata=meta))
        net = parse_network(network_xml(
            "mgd", "nbr0", bridge_attrs={"promiscLinks": attr} if attr else None,
            metadata=policy_xml(promiscLinks=net_meta) if net_meta else ""))
        networks = {"mgd": net}
    (it,) = bridge_intents(dom, networks, _cfg(config))
    return it.policy.promisc_links, it.managed


def _expected(*layers):
    last = [v for v in layers if v is not None]
    return {"yes": True, "no": False}[last[-1]] if last else None


COMBOS = list(itertools.product(LEVELS, repeat=5))


@pytest.mark.parametrize("combo", COMBOS,
                         ids=["cfg={}_attr={}_net={}_dom={}_if={}".format(*c) for c in COMBOS])
def test_precedence_network_interface(combo):
    got, managed = effective(*combo)
    want = _expected(*combo)
    assert got is want
    assert managed == (want is False)


HOST = list(itertools.product(LEVELS, repeat=3))


@pytest.mark.parametrize("combo", HOST,
                         ids=["cfg={}_dom={}_if={}".format(*c) for c in HOST])
def test_precedence_host_bridge(combo):
    cfg, dom, iface = combo
    got, managed = effective(cfg, dom_meta=dom, iface_meta=iface, host_bridge=True)
    assert got is _expected(cfg, dom, iface)
    assert managed == (got is False)


def test_layers_merge_field_by_field():
    """A later layer overrides only the settings it names."""
    cfg = config_from_dict({"bridge": {"nbr0": {"promiscLinks": "no", "sticky": True,
                                                "maxMulticast": 7}}}, "c.toml")
    net = parse_network(network_xml("mgd", "nbr0", metadata=policy_xml(sticky="no")))
    dom = parse_domain(domain_xml(
        "vm1", [network_iface("mgd", "nbr0", "vnet0", MAC)],
        metadata=policy_xml(strict="yes", interfaces={MAC: {"sticky": "yes"}})))
    (it,) = bridge_intents(dom, {"mgd": net}, cfg)
    p = it.policy
    assert (p.promisc_links, p.sticky, p.strict, p.max_multicast) == (False, True, True, 7)
    assert p.sources[0].startswith("config c.toml [bridge.nbr0]")


def test_per_interface_policy_only_applies_to_its_mac():
    other = "52:54:00:00:00:02"
    dom = parse_domain(domain_xml(
        "vm1", [bridge_iface("br0", "vnet0", MAC), bridge_iface("br0", "vnet1", other)],
        metadata=policy_xml(interfaces={other.upper(): {"promiscLinks": "no"}})))
    a, b = bridge_intents(dom, {}, config_from_dict({}, "c"))
    assert (a.managed, b.managed) == (False, True)


def test_mac_table_manager_libvirt_wins_over_any_policy():
    net = parse_network(network_xml("mgd", "nbr0", bridge_attrs={"macTableManager": "libvirt"},
                                    metadata=policy_xml(promiscLinks="no")))
    dom = parse_domain(domain_xml("vm1", [network_iface("mgd", "nbr0", "vnet0", MAC)],
                                  metadata=policy_xml(promiscLinks="no")))
    (it,) = bridge_intents(dom, {"mgd": net}, _cfg("no"))
    assert not it.managed and "macTableManager='libvirt'" in it.reason


# -- values ------------------------------------------------------------------------------------


@pytest.mark.parametrize("value,want", [("yes", True), ("no", False), ("YES", True),
                                        (" off ", False), ("on", True), ("true", True),
                                        ("False", False), (True, True), (False, False)])
def test_boolean_words(value, want):
    assert policy_from_mapping({"promiscLinks": value}, "w").promisc_links is want


@pytest.mark.parametrize("key,value,msg", [
    ("promiscLinks", "maybe", "promiscLinks='maybe' is not valid; use 'yes' or 'no'"),
    ("promiscLinks", 1, "promiscLinks=1 is not valid"),
    ("promiscLinks", "", "promiscLinks='' is not valid"),
    ("maxMulticast", "-1", "use a number from 0 to 4096"),
    ("maxMulticast", "4097", "use a number from 0 to 4096"),
    ("maxUnicast", "ten", "use a number from 0 to 4096"),
    ("maxUnicast", True, "use a number from 0 to 4096"),
    ("rxFilters", "multicast bogus", "unknown token 'bogus'"),
    ("rxFilters", 3, "is not valid"),
    ("promisclinks", "no", "unknown policy setting 'promisclinks'"),
])
def test_bad_values_name_the_place_and_key(key, value, msg):
    with pytest.raises(PolicyError) as e:
        policy_from_mapping({key: value}, "network mgd <metadata><netplug:policy>")
    assert str(e.value).startswith("network mgd <metadata><netplug:policy>: ")
    assert msg in str(e.value)
    assert "\n" not in str(e.value)


def test_policy_over_and_json():
    base = Policy(promisc_links=False, sticky=True)
    top = Policy(sticky=False, rx_filters=frozenset({"mac", "multicast"}))
    merged = top.over(base)
    assert merged.to_json() == {"promiscLinks": "no", "sticky": "no",
                                "rxFilters": "multicast mac"}
    assert Policy().is_empty() and not merged.is_empty()


# -- the config file ---------------------------------------------------------------------------


CONFIG_ERRORS = [
    ("invalid-toml", b"[bridge.br0\npromiscLinks = 'no'\n", ["invalid TOML"]),
    ("not-utf8", b"[bridge.br0]\npromiscLinks = '\xff'\n", ["invalid TOML"]),
    ("unknown-section", b"[bridges.br0]\npromiscLinks = 'no'\n",
     ["unknown setting or section 'bridges'"]),
    ("unknown-top-level-key", b"strcit = true\n", ["unknown setting or section 'strcit'"]),
    ("bridge-not-a-table", b"bridge = 1\n", ["[bridge] must be a table of tables"]),
    ("bridge-entry-not-a-table", b"bridge.br0 = 'no'\n", ["[bridge.br0]: must be a table"]),
    ("bad-value", b"[bridge.br0]\npromiscLinks = 'perhaps'\n", ["[bridge.br0]",
                                                                  "promiscLinks='perhaps'"]),
    ("unknown-key", b"[direct.eth0]\nrxFilter = 'mac'\n", ["[direct.eth0]",
                                                           "unknown policy setting 'rxFilter'"]),
    ("bad-strict", b"strict = 'sometimes'\n", ["strict='sometimes'"]),
    ("bridge-name-invalid", b"[bridge.'br 0']\npromiscLinks = 'no'\n",
     ["[bridge.br 0]", "not a valid Linux interface name"]),
    ("bridge-name-too-long", b"[bridge.abcdefghijklmnopq]\npromiscLinks = 'no'\n",
     ["not a valid Linux interface name"]),
    ("direct-name-slash", b"[direct.'a/b']\nrxFilters = 'mac'\n",
     ["not a valid Linux interface name"]),
    ("over-256KiB", b"#" * (10 * 1024 * 1024), ["over 256 KiB"]),
    ("nested-too-deep", b"a = " + b"[" * 20000 + b"]" * 20000, ["nested too deeply"]),
    ("cap-out-of-range", b"[direct.eth0]\nmaxMulticast = 100000\n", ["0 to 4096"]),
]


@pytest.mark.parametrize("name,text,words", CONFIG_ERRORS, ids=[c[0] for c in CONFIG_ERRORS])
def test_config_errors_name_the_file(tmp_path, name, text, words):
    path = tmp_path / "netplug.toml"
    path.write_bytes(text)
    with pytest.raises(PolicyError) as e:
        load_config(str(path))
    msg = str(e.value)
    assert msg.startswith(f"config {path}"), msg
    assert "\n" not in msg
    for w in words:
        assert w in msg


def test_config_directory_cannot_be_read(tmp_path):
    with pytest.raises(PolicyError, match=f"config {tmp_path}: cannot read: Is a directory"):
        load_config(str(tmp_path))


def test_a_fifo_in_place_of_the_config_does_not_hang(tmp_path):
    fifo = tmp_path / "config.toml"
    os.mkfifo(fifo)  # nobody writes: a blocking open would wait forever
    with pytest.raises(PolicyError, match="not a regular file"):
        load_config(str(fifo))


def test_missing_config_is_empty(tmp_path):
    c = load_config(str(tmp_path / "absent.toml"))
    assert c.bridges == {} and c.direct == {} and not c.strict


def test_config_path_from_environment(tmp_path, monkeypatch):
    path = tmp_path / "env.toml"
    path.write_text("strict = true\n[bridge.br7]\npromiscLinks = false\n")
    monkeypatch.setenv("NETPLUG_CONFIG", str(path))
    c = load_config()
    assert c.strict and c.bridge_policy("br7").promisc_links is False


@pytest.mark.parametrize("name,text,words", CONFIG_ERRORS[:4], ids=[c[0] for c in
                                                                     CONFIG_ERRORS[:4]])
def test_hook_reports_a_broken_config_once_and_carries_on(run_hook, fake, config_path, name,
                                                           text, words):
    config_path.write_bytes(text)
    fake.add_bridge("br0")
    fake.add_tap("vnet0", "br0", guest=MAC)
    r = run_hook("qemu", "vm1", "start", domain_xml("vm1", [bridge_iface("br0", "vnet0", MAC)]))
    assert r.rc == 0 and r.stdout == ""
    assert len(r.lines) == 1 and str(config_path) in r.lines[0] and "ERROR" in r.lines[0]
    assert fake.journal == []  # the broken config's bridges are not managed


def test_host_bridge_network_policy_applies_to_its_running_interfaces():
    """libvirt shows a running NIC of a <forward mode='bridge'> network as type='bridge' with
    <source network=… bridge=…> (xml-samples/captured/011-qemu-start-begin.xml): the
    network's policy must still apply."""
    net = parse_network(network_xml("hostnet", "br1", forward="bridge",
                                    metadata=policy_xml(promiscLinks="no")))
    running = ("<interface type='bridge'><mac address='52:54:00:00:01:02'/>"
               "<source network='hostnet' portid='874f104f-9302-4ee9-bed2-f0e52b3adb1d' "
               "bridge='br1'/><target dev='vnet1'/><alias name='net1'/></interface>")
    dom = parse_domain(domain_xml("vm1", [running]))
    (it,) = bridge_intents(dom, {"hostnet": net}, config_from_dict({}, "c"))
    assert it.managed, it.reason
