"""netplug doctor, unit tier (in-memory kernel, libvirt's test driver, a fake sysfs and /proc).

Proves: per managed bridge, the verdict and its reasons: VLAN filtering missing in the kernel
(said plainly, with the uplink left promiscuous although flooding to guests is off), off, or
on; guest ports that still learn/flood by name and owner; the uplink's promiscuity and unicast
filter; conflicts with libvirt's own features; hooks installed or not; agent running or not;
every warning or error carries advice; exit status 0 only when all is well.
"""

from __future__ import annotations

import json
import os

import pytest

from fakes import FakeKernel, bridge_iface, domain_xml, guest_mac, iface, network_iface, \
    network_xml, policy_xml, tap_mac
from libvirt_netplug import cli, install
from libvirt_netplug.doctor import agent_pids, check_agent, check_hooks, diagnose, \
    vlan_filtering_support
from libvirt_netplug.kernel import Link
from libvirt_netplug.reconcile import read_inputs, reconcile
from libvirt_netplug.state import StateDir

pytest.importorskip("libvirt", reason="libvirt-python is not installed")

A, B, X, M = guest_mac(1), guest_mac(2), guest_mac(9), guest_mac(0x30)
CONFIG = '[bridge.br0]\npromiscLinks = "no"\n'


def fake_sysfs(root, bridges: dict[str, bool], k: FakeKernel) -> str:
    """/sys/class/net with ``bridge/`` dirs; True: the kernel has bridge/vlan_filtering."""
    for name, supported in bridges.items():
        d = root / name
        (d / "bridge").mkdir(parents=True)
        (d / "ifindex").write_text(f"{k.devs[name].index}\n")
        (d / "address").write_text(k.devs[name].address + "\n")
        if supported:
            (d / "bridge" / "vlan_filtering").write_text("0\n")
    return str(root)


def fake_proc(root, cmdlines: dict[int, list[str]]) -> str:
    root.mkdir(parents=True, exist_ok=True)
    for pid, argv in cmdlines.items():
        (root / str(pid)).mkdir(parents=True)
        (root / str(pid) / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    return str(root)


class World:
    def __init__(self, tmp_path, k: FakeKernel, config=CONFIG):
        self.tmp, self.k = tmp_path, k
        self.config = tmp_path / "config.toml"
        self.config.write_text(config)
        self.state = StateDir(str(tmp_path / "state"))
        self.node = tmp_path / "node.xml"
        self.hooks = tmp_path / "hooks"
        k.add_bridge("br0")
        k.add_veth("up0", master="br0")
        k.add_tap("tap0", master="br0", address=tap_mac(A))
        k.add_tap("tap1", master="br0", address=tap_mac(B))
        self.domains = [domain_xml("vm1", [bridge_iface("br0", "tap0", A, "ua-net0"),
                                           bridge_iface("br0", "tap1", B, "ua-net1")])]
        self.networks: list[str] = []
        self.write()

    def write(self) -> None:
        self.node.write_text("<node>" + "".join(self.domains + self.networks) + "</node>")

    def inputs(self):
        return read_inputs(f"test://{self.node}", str(self.config), guest_query=False)

    def reconcile(self) -> None:
        reconcile(self.k, self.state, self.inputs().desired)

    def diagnose(self, sysfs=None, proc=None):
        sysfs = sysfs or fake_sysfs(self.tmp / "sys", {"br0": False}, self.k)
        proc = proc or fake_proc(self.tmp / "proc", {})
        return diagnose(self.inputs(), self.state, self.k, hooks_dir=str(self.hooks),
                        sysfs=sysfs, proc=proc)


@pytest.fixture
def world(tmp_path, fake) -> World:
    return World(tmp_path, fake)


def by_check(findings, check):
    return [f for f in findings if f.check == check]


def test_kernel_without_vlan_filtering_is_said_plainly(world):
    world.reconcile()
    dx = world.diagnose()
    [br] = dx.bridges
    assert br.name == "br0" and br.guests_isolated and not br.uplink_filtered
    assert not br.goal_reached
    [vf] = by_check(br.findings, "vlan-filtering")
    assert vf.level == "warning"
    assert vf.message == ("this kernel lacks bridge VLAN filtering (CONFIG_BRIDGE_VLAN_FILTERING "
                          "is not set: sysfs has no bridge/vlan_filtering knob), so the uplink "
                          "up0 stays promiscuous even though flooding to guests is off")
    assert "CONFIG_BRIDGE_VLAN_FILTERING=y" in vf.advice
    [goal] = by_check(br.findings, "goal")
    assert goal.message == ("goal not reached: flooding to guests is off but the uplink up0 "
                            "stays promiscuous because the kernel lacks VLAN filtering and "
                            "up0's driver cannot filter unicast")
    [drv] = by_check(br.findings, "uplink-driver")
    assert drv.message.startswith("up0 is a veth, whose driver cannot filter unicast (no "
                                  "IFF_UNICAST_FLT)") and drv.advice
    [up] = by_check(br.findings, "uplink")
    assert up.message == ("uplink promiscuous: up0: promiscuity 1, learning on, flood on, "
                          "unicast filter [empty]")
    lines = dx.lines()
    assert lines[0] == "bridge br0: goal NOT reached"
    assert f"  [WARNING] bridge br0: {vf.message}" in lines
    assert dx.exit_status == 2


def test_vlan_filtering_off_but_supported(tmp_path, monkeypatch):
    k = FakeKernel(vlan_filtering_supported=True).install_into(monkeypatch)
    w = World(tmp_path, k)
    w.reconcile()
    dx = w.diagnose(sysfs=fake_sysfs(w.tmp / "sys", {"br0": True}, k))
    [vf] = by_check(dx.bridges[0].findings, "vlan-filtering")
    assert vf.message.startswith("vlan_filtering is off on br0, so the kernel keeps every port "
                                 "promiscuous: the uplink up0 stays promiscuous")
    assert "vlanFiltering='yes'" in vf.advice


def test_vlan_filtering_on(tmp_path, monkeypatch):
    k = FakeKernel(vlan_filtering_supported=True).install_into(monkeypatch)
    w = World(tmp_path, k)
    k.devs["br0"].vlan_filtering = True
    k.devs["up0"].kind = None  # a physical NIC, whose driver filters unicast
    w.reconcile()
    dx = w.diagnose()
    br = dx.bridges[0]
    assert by_check(br.findings, "vlan-filtering")[0].level == "ok"
    # The fake cannot take a port out of promiscuous mode as the kernel does: the uplink stays
    # promiscuous although everything allows taking it out, which is what a driver without
    # IFF_UNICAST_FLT (or a capture) looks like: doctor infers it from the measured facts.
    assert by_check(br.findings, "uplink")[0].level == "info"  # the causes carry the warning
    [drv] = by_check(br.findings, "uplink-driver")
    assert drv.level == "warning" and "no IFF_PROMISC of its own" in drv.message
    assert "up0's driver cannot filter unicast" in by_check(br.findings, "goal")[0].message


def test_ports_that_still_learn_or_flood_by_name_and_owner(world):
    world.k.add_tap("tapx", master="br0", address=tap_mac(X))
    world.domains.append(domain_xml("vm3", [bridge_iface("br0", "tapx", X, "ua-net0")],
                                    metadata=policy_xml(promiscLinks="yes")))
    world.write()
    world.reconcile()
    world.k.set_port_flags("tap1", flood=True)  # drift on a managed port
    dx = world.diagnose()
    gp = by_check(dx.bridges[0].findings, "guest-ports")
    err = next(f for f in gp if f.level == "error")
    assert err.message == ("1 managed guest port drifted: tap1 (domain vm1 interface ua-net1): "
                           "learning off, flood on, FDB entry present")
    assert err.advice == "run netplug reconcile"
    warn = next(f for f in gp if f.level == "warning")
    assert warn.message == ("guest ports that still learn or flood (not managed): tapx (domain "
                            "vm3 interface ua-net0): learning on, flood on (policy says "
                            "promiscLinks='yes')")
    ports = {p.name: p for p in dx.bridges[0].ports}
    assert (ports["up0"].owner, ports["tapx"].owner, ports["tapx"].domain) == \
        ("uplink", "guest", "vm3")
    assert dx.bridges[0].findings[-1].advice == "run netplug reconcile"


def test_uplink_unicast_filter_is_reported(world):
    world.k.devs["up0"].uc.add("02:00:00:00:0c:01")
    world.reconcile()
    dx = world.diagnose()
    [up] = [p for p in dx.bridges[0].ports if p.owner == "uplink"]
    assert up.unicast_filter == ["02:00:00:00:0c:01"] and up.promiscuity == 1
    assert "unicast filter [02:00:00:00:0c:01]" in by_check(dx.bridges[0].findings,
                                                              "uplink")[0].message


def test_conflicts_with_libvirts_own_features(tmp_path, fake):
    w = World(tmp_path, fake, CONFIG + '\n[direct.low0]\nrxFilters = "multicast"\n')
    fake.add_bridge("lbr0")
    fake.add_veth("low0")
    fake.add("mvt0", "macvtap", lower="low0", macvlan_mode="bridge", address=M)
    w.networks.append(network_xml("lnet", "lbr0", forward=None,
                                  bridge_attrs={"macTableManager": "libvirt"},
                                  metadata=policy_xml(promiscLinks="no")))
    w.domains.append(domain_xml("vm4", [iface("direct", mac=M, target="mvt0", alias="ua-net0",
                                              source={"dev": "low0", "mode": "bridge"},
                                              trust="yes")]))
    w.write()
    dx = w.diagnose()
    conflicts = {f.subject: f for f in by_check(dx.findings, "policy-conflict")}
    net = conflicts["network lnet"]
    assert net.level == "warning" and "macTableManager='libvirt'" in net.message
    assert "drop one" in net.advice
    dom = conflicts["domain vm4 interface ua-net0"]
    assert "trustGuestRxFilters='yes'" in dom.message and "mvt0" in dom.message
    assert dom.advice.startswith("remove trustGuestRxFilters='yes'")
    assert "lbr0" not in [b.name for b in dx.bridges]  # libvirt's, not netplug's


def test_hooks(tmp_path):
    hooks = str(tmp_path / "hooks")
    f = check_hooks(hooks)
    assert f.level == "warning" and "hooks not installed" in f.message
    assert f.advice == f"run netplug install-hooks --hooks-dir {hooks}, then systemctl reload " \
                       f"libvirtd (or, with the modular daemons, systemctl reload virtqemud " \
                       f"virtnetworkd)"
    install.install(hooks)
    f = check_hooks(hooks)
    assert f.level == "ok", f
    path = os.path.join(hooks, "qemu.d", install.SHIM_NAME)
    os.chmod(path, 0o644)
    assert check_hooks(hooks).level == "error"
    os.unlink(path)
    with open(path, "w") as fh:
        fh.write("#!/bin/sh\nexit 0\n")
    f = check_hooks(hooks)
    assert f.level == "error" and "not installed by netplug" in f.message


def test_agent(tmp_path):
    proc = fake_proc(tmp_path / "p1", {
        100: ["/usr/bin/python3", "/opt/netplug/bin/netplug", "agent", "--connect",
              "qemu:///system"],
        101: ["/opt/netplug/bin/netplug", "doctor"],
        102: ["vim", "netplug-agent.txt"],
    })
    assert agent_pids(proc) == [100]
    assert check_agent(0, proc).level == "ok"
    assert "pid 100" in check_agent(0, proc).message
    proc2 = fake_proc(tmp_path / "p2", {7: ["python", "-m", "libvirt_netplug.cli", "agent"]})
    assert agent_pids(proc2) == [7]
    empty = fake_proc(tmp_path / "p3", {})
    assert check_agent(0, empty).level == "info"
    f = check_agent(2, empty)
    assert f.level == "warning" and "2 managed macvtaps" in f.message and f.advice


def test_vlan_filtering_support_probe(tmp_path, fake):
    fake.add_bridge("br0")
    # Kernels without CONFIG_BRIDGE_VLAN_FILTERING report no VLAN attributes (None) ...
    link = fake.link("br0")
    assert link.vlan_filtering is None and vlan_filtering_support(link) is False
    assert vlan_filtering_support(Link(**{**link.__dict__, "vlan_filtering": True})) is True
    # ... but a reader that sees only IFLA_BR_VLAN_FILTERING = 0 cannot tell: sysfs decides,
    # and any bridge sysfs shows answers (the option is kernel-wide).
    link = Link(**{**link.__dict__, "vlan_filtering": False})
    assert vlan_filtering_support(link, str(tmp_path / "none")) is None
    fake.add_bridge("other")
    sysfs = fake_sysfs(tmp_path / "s1", {"other": False}, fake)
    assert vlan_filtering_support(link, sysfs) is False
    sysfs = fake_sysfs(tmp_path / "s2", {"other": True}, fake)
    assert vlan_filtering_support(link, sysfs) is True


def test_all_good_is_exit_0(tmp_path, monkeypatch):
    """No uplink (an isolated network), every port managed, hooks in, agent up."""
    k = FakeKernel().install_into(monkeypatch)
    k.add_bridge("nbr0")
    k.add_tap("tap2", master="nbr0", address=tap_mac(A))
    node = tmp_path / "node.xml"
    node.write_text("<node>" + domain_xml("vm2", [network_iface("mgd", "nbr0", "tap2", A,
                                                                "ua-net0")])
                    + network_xml("mgd", "nbr0", forward=None,
                                  metadata=policy_xml(promiscLinks="no")) + "</node>")
    state = StateDir(str(tmp_path / "state"))
    inputs = read_inputs(f"test://{node}", None, guest_query=False)
    reconcile(k, state, inputs.desired)
    install.install(str(tmp_path / "hooks"))
    proc = fake_proc(tmp_path / "proc", {5: ["/usr/bin/netplug", "agent"]})
    dx = diagnose(inputs, state, k, hooks_dir=str(tmp_path / "hooks"), sysfs=str(tmp_path),
                  proc=proc)
    assert [f.level for f in dx.all()] == ["ok", "info", "ok", "ok", "ok"], dx.lines()
    assert dx.bridges[0].goal_reached and dx.exit_status == 0


def test_cli_json(world, capsys):
    world.reconcile()
    capsys.readouterr()
    rc = cli.main(["doctor", "--json", "--connect", f"test://{world.node}", "--config",
                   str(world.config), "--state-dir", world.state.path, "--hooks-dir",
                   str(world.hooks), "--no-guest-query"])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 2 and doc["exit_status"] == 2
    assert set(doc) == {"version", "command", "connect", "exit_status", "summary", "paths",
                        "bridges", "findings"}
    [br] = doc["bridges"]
    assert set(br) == {"name", "exists", "goal_reached", "guests_isolated", "uplink_filtered",
                       "vlan_filtering", "vlan_filtering_supported", "promiscuity", "ports",
                       "findings"}
    assert {p["name"]: p["owner"] for p in br["ports"]} == {"up0": "uplink", "tap0": "guest",
                                                            "tap1": "guest"}
    for f in br["findings"] + doc["findings"]:
        assert set(f) == {"level", "subject", "check", "message", "advice"}
        assert f["level"] in ("ok", "info") or f["advice"], f
