"""netplug doctor: why an uplink stays promiscuous (a pure matrix), findings that never
contradict each other, and the host checks that need no libvirtd.

Proves: per bridge, each cause of a promiscuous uplink is named with what to do: VLAN
filtering missing or off, the bridge itself promiscuous, ports that still learn or flood (and
whose), a user's IFF_PROMISC, a driver without IFF_UNICAST_FLT (by kind: veth, tap, dummy;
or measured: everything allows it, yet it stays promiscuous); the verdict repeats the causes
and its advice is the first finding's; "nothing to repair" never stands beside a drifted port;
"no managed guest ports" never beside managed ones. Without libvirtd doctor still checks the
paths, the hooks (bound to an interpreter that really imports the hook), the config, the
state dir (a corrupt record is one domain's error), the kernel and the agent, and exits 2 with
one libvirt error instead of failing. Paths that differ between hooks, this command and the
agent (running, or only its unit) are reported.
"""

from __future__ import annotations

import json
import os

import pytest

from fakes import bridge_iface, domain_xml, guest_mac, tap_mac
from libvirt_netplug import cli, install
from libvirt_netplug.doctor import (BridgeView, PortView, check_hooks, explain_bridge,
                                    unit_agent_paths)
from netns import venv_python

A, B = guest_mac(1), guest_mac(2)


def guest(name, mac, managed=True, learning=False, flood=False, fdb=True, recorded=None,
          domain="vm1", reason="managed"):
    return PortView(name, "guest", domain=domain, interface=f"net-{name}", mac=mac,
                    managed=managed, reason=reason, kind="tun", learning=learning,
                    flood=flood, promiscuity=1, promisc=False, fdb=fdb,
                    recorded=managed if recorded is None else recorded)


def uplink(name="up0", kind=None, promiscuity=1, promisc=False, learning=True, flood=True,
           unicast_filter=()):
    return PortView(name, "uplink", kind=kind, learning=learning, flood=flood,
                    promiscuity=promiscuity, promisc=promisc,
                    unicast_filter=list(unicast_filter))


def view(*ports, vlan=True, supported=True, bridge_promiscuity=0) -> BridgeView:
    v = BridgeView("br0", True, vlan, supported, bridge_promiscuity, list(ports))
    explain_bridge(v)
    assert_consistent(v)
    return v


def checks(v: BridgeView) -> dict[str, list]:
    out: dict[str, list] = {}
    for f in v.findings:
        out.setdefault(f.check, []).append(f)
    return out


def assert_consistent(v: BridgeView) -> None:
    """What a reader must never see on one bridge."""
    fs = v.findings
    goal = [f for f in fs if f.check == "goal"]
    assert len(goal) == 1 and goal[0] is fs[-1]
    problems = [f for f in fs if f.level in ("warning", "error")]
    if v.goal_reached:
        assert goal[0].level == "ok" and not [f for f in problems if f.level == "error"]
    else:
        assert goal[0].level != "ok"
        first = next((f.advice for f in problems if f.advice and f is not goal[0]), None)
        assert goal[0].advice == first
    for f in problems:
        assert f.advice, f
    if any(f.level == "error" and "netplug reconcile" in (f.advice or "") for f in fs):
        assert not any("nothing netplug can repair" in (f.advice or "") for f in fs)
    managed = [f for f in fs if f.check == "guest-ports" and "managed guest port" in f.message
               and f.level in ("ok", "error")]
    if managed:
        assert not any("no managed guest ports" in f.message for f in fs)


# -- why the uplink stays promiscuous -----------------------------------------------------------


def test_goal_reached_when_the_kernel_took_the_uplink_out():
    v = view(guest("tap0", A), guest("tap1", B), uplink(promiscuity=0, unicast_filter=(A, B)))
    assert v.goal_reached and checks(v)["uplink"][0].level == "ok"
    # The kernel took it out but its filter lacks a guest: frames for it would be dropped.
    v = view(guest("tap0", A), guest("tap1", B), uplink(promiscuity=0, unicast_filter=(A,)))
    assert not v.goal_reached and checks(v)["uplink-filter"][0].level == "error"
    assert checks(v)["goal"][0].message.endswith("but the unicast filter of up0 lacks guest "
                                                 "MACs")


def test_kernel_without_vlan_filtering():
    v = view(guest("tap0", A), uplink(), vlan=None, supported=False)
    [f] = checks(v)["vlan-filtering"]
    assert "lacks bridge VLAN filtering" in f.message
    assert f.advice.startswith("nothing netplug can repair here: each guest already gets only "
                               "its own unicast")
    assert "CONFIG_BRIDGE_VLAN_FILTERING=y" in f.advice


def test_no_nothing_to_repair_while_a_port_drifted():
    """Seen: 'nothing to repair on this host' right after an ERROR saying 'run netplug
    reconcile'."""
    v = view(guest("tap0", A, flood=True), uplink(), vlan=None, supported=False)
    [err] = [f for f in checks(v)["guest-ports"] if f.level == "error"]
    assert err.advice == "run netplug reconcile"
    [vf] = checks(v)["vlan-filtering"]
    assert vf.advice.startswith("first repair the guest ports (run netplug reconcile)")
    assert checks(v)["goal"][0].advice == "run netplug reconcile"


def test_vlan_filtering_off():
    v = view(guest("tap0", A), uplink(), vlan=False)
    [f] = checks(v)["vlan-filtering"]
    assert f.level == "warning" and "vlanFiltering='yes'" in f.advice
    assert "because vlan_filtering is off" in checks(v)["goal"][0].message


def test_bridge_itself_promiscuous():
    v = view(guest("tap0", A), uplink(), bridge_promiscuity=1)
    [f] = checks(v)["bridge-promisc"]
    assert "br0 itself is promiscuous" in f.message and "promisc off" in f.advice
    assert "br0 is promiscuous" in checks(v)["goal"][0].message


def test_ports_that_still_learn_or_flood_and_whose():
    x = guest("tapx", guest_mac(9), managed=False, learning=True, flood=True, fdb=False,
              domain="vm3", reason="policy says promiscLinks='yes'")
    v = view(guest("tap0", A), x, uplink())
    [f] = checks(v)["auto-ports"]
    assert f.level == "warning"
    assert "tapx (domain vm3 interface net-tapx)" in f.message and "up0 (uplink)" in f.message
    assert "promiscLinks='no'" in f.advice
    assert "more than one port learns or floods" in checks(v)["goal"][0].message


def test_user_promisc_on_the_uplink():
    v = view(guest("tap0", A), uplink(promisc=True))
    [f] = checks(v)["uplink-promisc"]
    assert "IFF_PROMISC" in f.message and "ip link set up0 promisc off" in f.advice
    assert "uplink-driver" not in checks(v)  # IFF_PROMISC explains it: no driver inference


@pytest.mark.parametrize("kind,word", [("veth", "veth"), ("tun", "tap"), ("dummy", "dummy")])
def test_driver_without_unicast_filter_by_kind(kind, word):
    v = view(guest("tap0", A), uplink(kind=kind))
    [f] = checks(v)["uplink-driver"]
    assert f.message.startswith(f"up0 is a {word}, whose driver cannot filter unicast")
    assert "virtio_net" in f.advice
    assert "up0's driver cannot filter unicast" in checks(v)["goal"][0].message


def test_driver_without_unicast_filter_measured():
    """A NIC of unknown kind: vlan_filtering on, the only port that learns or floods, the
    bridge not promiscuous, no IFF_PROMISC, and still promiscuous."""
    v = view(guest("tap0", A), uplink(kind=None))
    [f] = checks(v)["uplink-driver"]
    assert "stays promiscuous with no IFF_PROMISC of its own" in f.message
    # Not inferred when something else explains it.
    v = view(guest("tap0", A), uplink(kind=None), vlan=False)
    assert "uplink-driver" not in checks(v)


def test_no_guest_ports_versus_unmanaged_ones():
    v = view(uplink())
    assert checks(v)["guest-ports"][0].message == ("no managed guest ports right now (no "
                                                   "running guest on this bridge)")
    x = guest("tapx", A, managed=False, learning=True, flood=True, fdb=False,
              reason="policy does not say promiscLinks='no'")
    v = view(x, uplink())
    assert checks(v)["guest-ports"][0].message == ("none of the 1 guest port on br0 is "
                                                   "managed (see below)")


def test_records_the_policy_no_longer_covers():
    """What a reconcile with another config would undo (the issue's 'set learning on flood on
    on vnet0; delete FDB entry') is said before it happens."""
    x = guest("tap0", A, managed=False, recorded=True,
              reason="policy does not say promiscLinks='no'")
    v = view(x, uplink())
    [f] = [f for f in checks(v)["guest-ports"] if f.level == "warning"]
    assert "netplug's records say it manages these ports" in f.message
    assert "tap0 (domain vm1 interface net-tap0)" in f.message and "'paths'" in f.advice


# -- host checks without libvirtd ---------------------------------------------------------------


def hooks_installed(tmp_path, config, state):
    hooks = tmp_path / "hooks"
    install.install(str(hooks), venv_python(), str(config), str(state))
    return hooks


def doctor_json(capsys, *argv):
    capsys.readouterr()
    rc = cli.main(["doctor", "--json", *argv])
    out, err = capsys.readouterr()
    return rc, json.loads(out), err


def test_without_libvirtd_the_host_is_still_checked(tmp_path, capsys, monkeypatch, fake):
    monkeypatch.delenv("NETPLUG_CONFIG")
    monkeypatch.delenv("NETPLUG_STATE_DIR")
    config, state = tmp_path / "config.toml", tmp_path / "state"
    config.write_text('[bridge.br0]\npromiscLinks = "no"\n')
    hooks = hooks_installed(tmp_path, config, state)
    rc, doc, err = doctor_json(capsys, "--connect", "qemu+unix:///system?socket=/nonexistent",
                               "--hooks-dir", str(hooks))
    assert rc == 2 and "Traceback" not in err
    by = {}
    for f in doc["findings"]:
        by.setdefault(f["check"], []).append(f)
    assert by["paths"][0]["level"] == "ok" and str(config) in by["paths"][0]["message"]
    assert doc["paths"]["config_source"].startswith("hooks ")
    assert by["hooks"][0]["level"] == "ok" and "imports the hook" in by["hooks"][0]["message"]
    assert by["config"][0]["level"] == "ok"
    assert by["state-dir"][0]["level"] == "info"  # not created yet
    assert "kernel-vlan-filtering" in by
    [lv] = by["libvirt"]
    assert lv["level"] == "error" and "cannot connect to libvirt" in lv["message"]
    assert "virtqemud" in lv["advice"]
    assert doc["bridges"] == []


def test_invalid_config_is_an_error_naming_the_file(tmp_path, capsys, monkeypatch, fake):
    config = tmp_path / "config.toml"
    config.write_text('[bridge.br0]\npromiscLinks = "maybe"\n')
    node = tmp_path / "node.xml"
    node.write_text("<node/>")
    rc, doc, err = doctor_json(capsys, "--connect", f"test://{node}", "--config", str(config),
                               "--state-dir", str(tmp_path / "s"), "--hooks-dir",
                               str(tmp_path / "hooks"), "--no-guest-query")
    [f] = [f for f in doc["findings"] if f["check"] == "config"]
    assert f["level"] == "error" and str(config) in f["message"] and "maybe" in f["message"]
    assert f["advice"].startswith(f"fix {config}")
    assert rc == 2 and not [x for x in doc["findings"] if x["check"] == "libvirt"]


def test_broken_hook_interpreter_is_an_error(tmp_path):
    hooks = tmp_path / "hooks"
    install.install(str(hooks), venv_python(), sys_path=("/nonexistent",))
    f = check_hooks(str(hooks))
    assert f.level == "error" and "cannot import the hook" in f.message
    assert "No module named 'libvirt_netplug'" in f.message and "install-hooks" in f.advice


def test_one_corrupt_record_is_its_domains_error(tmp_path, capsys, fake):
    fake.add_bridge("br0")
    fake.add_tap("tap0", master="br0", address=tap_mac(A))
    node = tmp_path / "node.xml"
    node.write_text("<node>" + domain_xml("vm1", [bridge_iface("br0", "tap0", A, "net0")])
                    + "</node>")
    state = tmp_path / "state"
    (state / "domains").mkdir(parents=True)
    (state / "domains" / "vm9.json").write_text("{not json")
    (state / "domains" / "vm8.json").write_text('{"domain": "vm8", "ports": []}')
    config = tmp_path / "c.toml"
    config.write_text('[bridge.br0]\npromiscLinks = "no"\n')
    common = ["--connect", f"test://{node}", "--config", str(config), "--state-dir",
              str(state), "--hooks-dir", str(tmp_path / "hooks"), "--no-guest-query"]
    rc, doc, err = doctor_json(capsys, *common)
    recs = {f["subject"]: f for f in doc["findings"] if f["check"] == "state-record"}
    assert set(recs) == {"domain vm8", "domain vm9"} and "Traceback" not in err
    assert "'ports' is a list" in recs["domain vm8"]["message"]
    assert [b["name"] for b in doc["bridges"]] == ["br0"]  # vm1 is still diagnosed
    capsys.readouterr()
    assert cli.main(["status", *common]) == 0
    out = capsys.readouterr().out
    assert "error: domain vm9: state file" in out and "error: domain vm8: state file" in out
    assert " tap0 " in out


# -- paths: hooks, this command, the agent ----------------------------------------------------


def test_paths_that_differ_from_the_hooks(tmp_path, capsys, monkeypatch, fake):
    monkeypatch.delenv("NETPLUG_CONFIG")
    monkeypatch.delenv("NETPLUG_STATE_DIR")
    hooks_cfg, mine = tmp_path / "hooks.toml", tmp_path / "mine.toml"
    hooks_cfg.write_text("")
    mine.write_text("")
    hooks = hooks_installed(tmp_path, hooks_cfg, tmp_path / "state")
    node = tmp_path / "node.xml"
    node.write_text("<node/>")
    rc, doc, _ = doctor_json(capsys, "--connect", f"test://{node}", "--config", str(mine),
                             "--hooks-dir", str(hooks), "--no-guest-query")
    [f] = [f for f in doc["findings"] if f["check"] == "paths"]
    assert f["level"] == "warning" and str(mine) in f["message"] and str(hooks_cfg) in \
        f["message"] and "(from --config)" in f["message"]
    # The state dir came from the hooks: no second finding for it.
    assert doc["paths"]["state_dir"] == str(tmp_path / "state")


def test_agent_unit_paths(tmp_path, monkeypatch):
    monkeypatch.delenv("NETPLUG_CONFIG")
    monkeypatch.delenv("NETPLUG_STATE_DIR")
    lib, etc = tmp_path / "lib", tmp_path / "etc"
    lib.mkdir()
    (lib / "netplug-agent.service").write_text(
        "[Service]\nEnvironmentFile=-" + str(tmp_path / "default") + "\n"
        "ExecStart=/usr/bin/netplug agent --connect qemu:///system\n")
    (tmp_path / "default").write_text("NETPLUG_STATE_DIR=/run/other\n")
    a = unit_agent_paths((str(etc), str(lib)))
    assert (a.config, a.state_dir) == ("/etc/libvirt-netplug/config.toml", "/run/other")
    drop = etc / "netplug-agent.service.d"
    drop.mkdir(parents=True)
    cfg = tmp_path / "agent.toml"
    cfg.write_text("")
    (drop / "override.conf").write_text(f"[Service]\nExecStart=\nExecStart=/usr/bin/netplug "
                                        f"agent --config {cfg}\n")
    a = unit_agent_paths((str(etc), str(lib)))
    assert a.config == str(cfg) and a.where == f"unit {lib}/netplug-agent.service"
    assert unit_agent_paths((str(tmp_path / "none"),)) is None


def test_running_agent_with_other_paths_is_an_error(tmp_path, monkeypatch):
    from libvirt_netplug.doctor import check_paths, running_agent_paths
    from libvirt_netplug.paths import resolve

    monkeypatch.delenv("NETPLUG_CONFIG")
    monkeypatch.delenv("NETPLUG_STATE_DIR")
    hooks = hooks_installed(tmp_path, tmp_path / "c.toml", tmp_path / "state")
    proc = tmp_path / "proc" / "42"
    proc.mkdir(parents=True)
    (proc / "cmdline").write_bytes(b"\0".join([b"/usr/bin/python3", b"/usr/bin/netplug",
                                               b"agent", b"--hooks-dir", str(hooks).encode()])
                                   + b"\0")
    (proc / "environ").write_bytes(b"NETPLUG_STATE_DIR=/run/elsewhere\0PATH=/bin\0")
    agent = running_agent_paths(str(tmp_path / "proc"))
    assert (agent.where, agent.state_dir) == ("pid 42", "/run/elsewhere")
    assert agent.config == str(tmp_path / "c.toml")  # read from the hooks, like the CLI
    found = check_paths(resolve(hooks_dir=str(hooks)), agent)
    [f] = [f for f in found if f.check == "agent-paths"]
    assert f.level == "error" and "/run/elsewhere" in f.message and f.advice
    assert not os.path.exists("/run/elsewhere")
