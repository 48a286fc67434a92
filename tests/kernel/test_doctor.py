"""netplug doctor against the real kernel (run as an operator would, ``ip netns exec NS``,
which also gives it the namespace's own sysfs).

Proves, on this machine's kernel (no CONFIG_BRIDGE_VLAN_FILTERING): doctor says plainly that
the kernel lacks VLAN filtering so the uplink stays promiscuous although flooding to guests is
off, and names every other reason (a veth uplink cannot filter unicast; a guest port that
still floods) with what to do; the promiscuity and unicast filter it reports are the oracle's;
ports that still learn or flood are named with their owner; doctor changes nothing.
"""

from __future__ import annotations

import json
import os

import pytest

import oracle
from fakes import bridge_iface, domain_xml, guest_mac, policy_xml, tap_mac
from netns import netplug_cli

A, B, X = guest_mac(1), guest_mac(2), guest_mac(0x0a)
UC = "02:00:00:00:0c:01"


def _lacks_vlan_filtering() -> bool:
    for name in os.listdir("/sys/class/net"):
        if os.path.isdir(f"/sys/class/net/{name}/bridge"):
            return not os.path.exists(f"/sys/class/net/{name}/bridge/vlan_filtering")
    return True  # no bridge to look at here: the namespace run below decides


@pytest.fixture
def setup(ns, tmp_path):
    ns.add_bridge("br0")
    ns.add_veth("up0", "up0p", master="br0")
    ns.bridge("fdb", "add", UC, "dev", "up0", "self", "permanent")  # the uplink's uc filter
    ns.add_tap("tap0", "br0", address=tap_mac(A))
    ns.add_tap("tap1", "br0", address=tap_mac(B))
    ns.add_tap("tapx", "br0", address=tap_mac(X))
    (tmp_path / "config.toml").write_text('[bridge.br0]\npromiscLinks = "no"\n')
    (tmp_path / "node.xml").write_text("<node>" + domain_xml(
        "vm1", [bridge_iface("br0", "tap0", A, "ua-net0"),
                bridge_iface("br0", "tap1", B, "ua-net1"),
                bridge_iface("br0", "tapx", X, "ua-net2")],
        metadata=policy_xml(interfaces={X: {"promiscLinks": "yes"}})) + "</node>")
    common = ["--connect", f"test://{tmp_path}/node.xml", "--config",
              str(tmp_path / "config.toml"), "--state-dir", str(tmp_path / "state"),
              "--no-guest-query"]

    def run(cmd, *extra):
        argv = [*netplug_cli(), cmd, *common, *extra]
        if cmd == "doctor":
            argv += ["--hooks-dir", str(tmp_path / "hooks")]
        return ns.run(argv, timeout=60)
    return run


def test_doctor_explains_the_uplink_on_this_kernel(ns, setup):
    p = setup("reconcile")
    assert p.returncode == 2, p.stderr
    before = oracle.snapshot(ns.name)
    p = setup("doctor", "--json")
    assert p.returncode == 2 and not p.stderr, p.stderr
    doc = json.loads(p.stdout)
    assert oracle.snapshot(ns.name)["fdb"] == before["fdb"]
    assert oracle.bridge_links(ns.name) == before["ports"]
    [br] = doc["bridges"]
    ports = {pt["name"]: pt for pt in br["ports"]}
    links = oracle.links(ns.name)
    for name, pt in ports.items():
        assert pt["promiscuity"] == links[name]["promiscuity"], name
        flags = oracle.bridge_links(ns.name)[name]
        assert (pt["learning"], pt["flood"]) == (flags["learning"], flags["flood"]), name
    uc = sorted(e["mac"] for e in oracle.fdb(ns.name) if e.get("ifname") == "up0"
                and "self" in e.get("flags", []) and not int(e["mac"][:2], 16) & 1)
    assert ports["up0"]["owner"] == "uplink" and ports["up0"]["unicast_filter"] == uc == [UC]
    assert ports["tapx"]["owner"] == "guest" and ports["tapx"]["domain"] == "vm1"
    findings = {f["check"]: f for f in br["findings"]}
    assert br["guests_isolated"] and not br["goal_reached"]
    if _lacks_vlan_filtering():
        assert br["vlan_filtering_supported"] is False
        assert findings["vlan-filtering"]["message"] == (
            "this kernel lacks bridge VLAN filtering (CONFIG_BRIDGE_VLAN_FILTERING is not set: "
            "sysfs has no bridge/vlan_filtering knob), so the uplink up0 stays promiscuous even "
            "though flooding to guests is off")
        assert "stays promiscuous because the kernel lacks VLAN filtering" in \
            findings["goal"]["message"]
    # Every other reason is named too, with its owner and what to do: a veth cannot filter
    # unicast (its kind), and a guest port that still floods keeps a second auto port.
    assert findings["uplink-driver"]["message"].startswith(
        "up0 is a veth, whose driver cannot filter unicast (no IFF_UNICAST_FLT)")
    assert links["up0"]["linkinfo"]["info_kind"] == "veth"
    assert "tapx (domain vm1 interface ua-net2)" in findings["auto-ports"]["message"]
    assert "up0's driver cannot filter unicast" in findings["goal"]["message"]
    for f in br["findings"]:
        assert f["level"] in ("ok", "info") or f["advice"], f
    assert links["up0"]["promiscuity"] >= 1
    flooding = [f for f in br["findings"] if f["check"] == "guest-ports"
                and f["level"] == "warning"]
    assert flooding and "tapx (domain vm1 interface ua-net2): learning on, flood on" in \
        flooding[0]["message"]

    text = setup("doctor").stdout.decode()
    assert text.splitlines()[0] == "bridge br0: goal NOT reached"
    assert "the uplink up0 stays promiscuous even though flooding to guests is off" in text


def test_doctor_sees_drift(ns, setup):
    assert setup("reconcile").returncode == 2
    ns.bridge("link", "set", "dev", "tap1", "flood", "on")
    doc = json.loads(setup("doctor", "--json").stdout)
    errs = [f for f in doc["bridges"][0]["findings"] if f["level"] == "error"]
    assert errs and errs[0]["message"].startswith("1 managed guest port drifted: tap1 (domain "
                                                  "vm1 interface ua-net1): learning off, "
                                                  "flood on")
    assert errs[0]["advice"] == "run netplug reconcile"
    assert oracle.port_flags(ns.name, "tap1") == (False, True)  # doctor repaired nothing
