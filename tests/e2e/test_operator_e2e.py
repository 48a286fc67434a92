"""What an operator does, against the real libvirt lab: policy only in a network's metadata,
hooks installed with non-default paths, the agent and the commands started with no options.

The lab has a macvtap network defined with `virsh net-define` whose netplug policy lives only
in its <metadata> (rxFilters="multicast allmulti"), a host bridge br0 managed by the config,
and one guest vm1 with a NIC on each. netplug is installed as an operator would: `netplug
install-hooks --config C --state-dir S` (lab-private paths) and `netplug agent` with no path
options, inside the lab's namespaces (where /etc/libvirt/hooks is the lab's).

Proves (issue 12, items 1 and 2):
- libvirt's live XML shows the macvtap-network NIC as type='direct' <source network=…>, and
  the network's policy applies to it: a group the guest joins reaches its macvtap and the
  lower device, allmulticast follows, a MAC change is refused (the macvtap keeps its MAC);
- the agent and `netplug reconcile/status/doctor` with no options use the hooks' config and
  state dir (read from the installed shim): reconcile finds nothing to change right after
  the hooks did their work; with another config it warns and shows what it would undo; an
  explicit --config that does not exist is an error.
Every outcome is read from the lab's kernel by the oracle.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from lxml import etree

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import oracle  # noqa: E402
from fakes import NS  # noqa: E402
from polling import wait_for  # noqa: E402
from tests.lab import Lab  # noqa: E402
from tests.lab.lab import Nic  # noqa: E402
from tests.lab.netplug import CONFIG, STATE, install_netplug  # noqa: E402

pytestmark = pytest.mark.e2e

MB, MM = "52:54:00:5e:00:01", "52:54:00:5e:00:02"
GROUP = "01:00:5e:01:02:04"
MACVTAP_NET = (f"<network><name>mvnet</name><metadata><netplug:policy xmlns:netplug='{NS}' "
               f"rxFilters='multicast allmulti'/></metadata><forward mode='bridge'>"
               f"<interface dev='low1'/></forward></network>")


def clean_env() -> dict[str, str]:
    """The test process's environment without netplug's variables: paths must come from the
    hooks, not from the test harness."""
    return {k: v for k, v in os.environ.items() if not k.startswith("NETPLUG_")}


class LabAgent:
    def __init__(self, lab: Lab, log: Path):
        self.lab, self.logfile = lab, log
        with open(log, "ab") as f:
            self.proc = subprocess.Popen(
                [*lab._nsenter(), sys.executable, "-m", "libvirt_netplug.cli", "agent",
                 "--verbose"], stdin=subprocess.DEVNULL, stdout=f, stderr=f, env=clean_env(),
                cwd=str(REPO), start_new_session=True)

    def log(self) -> str:
        return self.logfile.read_text(errors="replace") if self.logfile.exists() else ""

    def wait_connected(self) -> None:
        wait_for(lambda: "full resync (connected)" in self.log(), 30, "the agent", self.log)

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def rig(tmp_path_factory, lab_release):
    tmp = tmp_path_factory.mktemp("operator-e2e")
    lab = Lab(release=lab_release)
    lab.start()
    agent = None
    try:
        lab.add_host_bridge("br0")
        lab.add_uplink("br0", "up0")
        lab.add_lower_veth("low1")
        lab.define_network(MACVTAP_NET)
        np = install_netplug(lab, config='[bridge.br0]\npromiscLinks = "no"\n')
        agent = LabAgent(lab, tmp / "agent.log")
        agent.wait_connected()
        guest = lab.start_guest("vm1", [Nic("bridge", "br0", mac=MB),
                                        Nic("network", "mvnet", mac=MM)], timeout=180)
        yield {"lab": lab, "np": np, "agent": agent, "guest": guest, "tmp": tmp,
               "eth": {mac: name for name, mac in guest.macs.items()},
               "dev": guest.targets()}
    finally:
        rc = agent.stop() if agent else 0
        lab.stop()
    assert rc == 0, f"agent exit status {rc}"


def netplug(lab: Lab, *args: str, check: bool = False) -> subprocess.CompletedProcess:
    """The CLI inside the lab, with no path options and no NETPLUG_* variables."""
    return lab.run(sys.executable, "-m", "libvirt_netplug.cli", *args, check=check,
                   env=clean_env(), timeout=120)


def groups(ns: str, dev: str, users_only: bool = True) -> set[str]:
    return {a for d, _r, g, a in oracle.dev_mcast(ns) if d == dev and (g or not users_only)}


# -- item 1: a macvtap network's policy, only in its metadata ----------------------------------


def test_live_xml_shows_the_macvtap_network_nic_as_direct(rig):
    root = etree.fromstring(rig["guest"].dumpxml().encode())
    [nic] = [i for i in root.iterfind("devices/interface")
             if i.find("mac").get("address") == MM]
    src = nic.find("source")
    assert nic.get("type") == "direct"
    assert (src.get("network"), src.get("dev")) == ("mvnet", "low1")


def test_group_and_allmulticast_reach_the_macvtap_and_the_lower_device(rig):
    lab, agent, g = rig["lab"], rig["agent"], rig["guest"]
    mvt, eth = rig["dev"][MM], rig["eth"][MM]
    g.check(f"ip maddr add {GROUP} dev {eth}")
    wait_for(lambda: oracle.hexmac(GROUP) in groups(lab.name, mvt), 15,
             "the group on the macvtap", agent.log)
    assert oracle.hexmac(GROUP) in groups(lab.name, "low1", users_only=False)
    before = oracle.link(lab.name, "low1")["allmulti"]
    g.check(f"ip link set {eth} allmulticast on")
    wait_for(lambda: "ALLMULTI" in oracle.link(lab.name, mvt)["flags"], 15,
             "ALLMULTI on the macvtap", agent.log)
    assert oracle.link(lab.name, "low1")["allmulti"] == before + 1
    g.check(f"ip link set {eth} allmulticast off; ip maddr del {GROUP} dev {eth}")
    wait_for(lambda: "ALLMULTI" not in oracle.link(lab.name, mvt)["flags"], 15,
             "ALLMULTI off", agent.log)
    wait_for(lambda: oracle.hexmac(GROUP) not in groups(lab.name, mvt, users_only=False), 15,
             "the group gone", agent.log)
    assert oracle.link(lab.name, "low1")["allmulti"] == before


def test_mac_change_is_refused(rig):
    lab, agent, g = rig["lab"], rig["agent"], rig["guest"]
    mvt, eth = rig["dev"][MM], rig["eth"][MM]
    new = "52:54:00:5e:00:99"
    g.check(f"ip link set {eth} address {new}")
    try:
        wait_for(lambda: f"guest changed its MAC to {new}; refused" in agent.log(), 15,
                 "the refusal", agent.log)
        assert oracle.link(lab.name, mvt)["address"] == MM
    finally:
        g.check(f"ip link set {eth} address {MM}")


# -- item 2: one truth for paths -----------------------------------------------------------------


def test_the_agent_uses_the_hooks_paths(rig):
    log = rig["agent"].log()
    assert f"state dir {STATE} (from hooks /etc/libvirt/hooks/qemu.d/libvirt-netplug)" in log
    assert f"config {CONFIG} (from hooks /etc/libvirt/hooks/qemu.d/libvirt-netplug)" in log
    rec = wait_for(lambda: (rig["np"].domain_record("vm1") or {}).get("rx"), 15,
                   "the agent's RX record in the hooks' state dir", rig["agent"].log)
    assert rig["dev"][MM] in rec
    # And the hooks' own work (the bridge port) is in the same record.
    tap = rig["dev"][MB]
    assert tap in rig["np"].domain_record("vm1")["ports"]
    assert oracle.static_macs(rig["lab"].name, tap) == {MB: []}


def test_commands_without_options_use_the_hooks_paths(rig):
    lab, tmp = rig["lab"], rig["tmp"]
    tap = rig["dev"][MB]
    p = netplug(lab, "reconcile", "--dry-run", "--json")
    doc = json.loads(p.stdout)
    assert (p.returncode, doc["status"], doc["changes"]) == (0, "in-sync", []), p.stderr
    assert doc["summary"]["managed_ports"] == 1 and doc["summary"]["managed_macvtaps"] == 1
    st = json.loads(netplug(lab, "status", "--json").stdout)
    assert st["paths"]["config"] == CONFIG and st["paths"]["state_dir"] == STATE
    assert st["path_mismatches"] == []
    # With another config, what reconcile would undo is said, with a warning naming both.
    other = lab.dir / "other.toml"
    other.write_text("")
    p = netplug(lab, "reconcile", "--dry-run", "--config", str(other))
    assert p.returncode == 2
    assert f"config {other} (from --config) is not the hooks' {CONFIG}" in p.stderr
    assert "would repair: domain vm1, interface " in p.stdout and f"on {tap}" in p.stdout
    assert oracle.port_flags(lab.name, tap) == (False, False)  # a dry run changed nothing
    p = netplug(lab, "reconcile", "--config", str(tmp / "typo.toml"))
    assert p.returncode == 1 and len(p.stderr.splitlines()) == 1
    assert "typo.toml: no such file" in p.stderr and "Traceback" not in p.stderr


def test_doctor_in_the_lab(rig):
    p = netplug(rig["lab"], "doctor", "--json")
    doc = json.loads(p.stdout)
    by = {}
    for f in doc["findings"]:
        by.setdefault(f["check"], []).append(f)
    assert by["config"][0]["level"] == "ok" and CONFIG in by["config"][0]["message"]
    assert by["hooks"][0]["level"] == "ok" and "imports the hook" in by["hooks"][0]["message"]
    assert [f["level"] for f in by["paths"]] == ["ok"]
    [br] = doc["bridges"]
    gp = [f for f in br["findings"] if f["check"] == "guest-ports"]
    assert gp[0]["level"] == "ok" and gp[0]["message"].startswith("1 managed guest port")
