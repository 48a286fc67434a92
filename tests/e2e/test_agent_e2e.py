"""`netplug agent` against the real libvirt lab: a private libvirtd, one Linux guest (booted
once for the whole module), the agent as a separate process in the lab's network namespace.

The guest vm1 has:
    eth0  macvtap on low0 (bridge mode), policy rxFilters="multicast allmulti"
    eth1  macvtap on low1 (bridge mode), policy rxFilters="multicast allmulti mac"
    eth2  macvtap on low2 with trustGuestRxFilters='yes' (libvirt syncs it; netplug stands aside)
    eth3  bridge br0 (host bridge with an uplink), policy promiscLinks="no"
and a fifth interface (br0 too) is hot-plugged with `virsh attach-device`.

Every outcome is read from the lab's kernel by the oracle (/proc/net/dev_mcast, `ip -j -d
link show`, `bridge -j fdb show`); the agent's log is only used to see *why*.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import oracle  # noqa: E402
from fakes import NS  # noqa: E402
from netns import netplug_cli  # noqa: E402
from polling import wait_for  # noqa: E402
from tests.lab import Lab  # noqa: E402
from tests.lab.lab import Nic  # noqa: E402

pytestmark = pytest.mark.e2e

M0, M1, M2, M3, M4 = (f"52:54:00:4e:00:0{i}" for i in range(5))
GROUP = "01:00:5e:01:02:03"


class AgentProc:
    """The agent as a process in the lab's network namespace, talking to the lab's libvirtd."""

    def __init__(self, lab: Lab, tmp: Path):
        self.lab = lab
        self.tmp = tmp
        self.logfile = tmp / "agent.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        (self.tmp / "no-config.toml").write_text("")  # an explicit --config must exist
        with open(self.logfile, "ab") as log:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.lab.name, *netplug_cli(), "agent", "--connect",
                 self.lab.host_uri, "--state-dir", str(self.tmp / "state"), "--config",
                 str(self.tmp / "no-config.toml"), "--metrics-file",
                 str(self.tmp / "agent.prom"), "--verbose"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)

    def log(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")
        except OSError:
            return ""

    def count(self, text: str) -> int:
        return self.log().count(text)

    def kill(self) -> None:
        assert self.proc
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


def metadata() -> str:
    return (f'<netplug:policy xmlns:netplug="{NS}" promiscLinks="no">'
            f'<netplug:interface mac="{M0}" rxFilters="multicast allmulti"/>'
            f'<netplug:interface mac="{M1}" rxFilters="multicast allmulti mac"/>'
            f'<netplug:interface mac="{M2}" rxFilters="multicast allmulti"/>'
            f'</netplug:policy>')


@pytest.fixture(scope="module")
def rig(tmp_path_factory, lab_release):
    tmp = tmp_path_factory.mktemp("agent-e2e")
    lab = Lab(release=lab_release)  # a fresh random name: no clash with another run
    lab.start()
    agent = AgentProc(lab, tmp)
    try:
        for low in ("low0", "low1", "low2"):
            lab.add_lower_veth(low)
        lab.add_host_bridge("br0")
        lab.add_uplink("br0", "up0")
        agent.start()
        wait_for(lambda: "full resync (connected)" in agent.log(), 20, "the agent", agent.log)
        guest = lab.start_guest("vm1", [
            Nic("direct", "low0", mac=M0), Nic("direct", "low1", mac=M1),
            Nic("direct", "low2", mac=M2, attrs="trustGuestRxFilters='yes'"),
            Nic("bridge", "br0", mac=M3)], metadata=metadata(), timeout=180)
        eth = {mac: name for name, mac in guest.macs.items()}
        targets = guest.targets()
        yield {"lab": lab, "agent": agent, "guest": guest, "eth": eth, "dev": targets,
               "tmp": tmp}
    finally:
        rc = agent.stop()
        lab.stop()
    assert rc in (0, -9), f"agent exit status {rc}"


def groups(ns: str, dev: str, users_only: bool = True) -> set[str]:
    return {a for d, _r, g, a in oracle.dev_mcast(ns) if d == dev and (g or not users_only)}


def flags(ns: str, dev: str) -> list[str]:
    return oracle.link(ns, dev)["flags"]


def test_group_join_and_leave_reach_the_macvtap_and_the_lower_device(rig):
    lab, agent, g = rig["lab"], rig["agent"], rig["guest"]
    mvt = rig["dev"][M0]
    g.check(f"ip maddr add {GROUP} dev {rig['eth'][M0]}")
    wait_for(lambda: oracle.hexmac(GROUP) in groups(lab.name, mvt), 10, "the group on the macvtap",
             agent.log)
    assert oracle.hexmac(GROUP) in groups(lab.name, "low0", users_only=False)
    g.check(f"ip maddr del {GROUP} dev {rig['eth'][M0]}")
    wait_for(lambda: oracle.hexmac(GROUP) not in groups(lab.name, mvt, users_only=False), 10,
             "the group to leave the macvtap", agent.log)
    assert oracle.hexmac(GROUP) not in groups(lab.name, "low0", users_only=False)


def test_allmulticast_follows_the_guest(rig):
    lab, agent, g = rig["lab"], rig["agent"], rig["guest"]
    mvt = rig["dev"][M0]
    g.check(f"ip link set {rig['eth'][M0]} allmulticast on")
    wait_for(lambda: "ALLMULTI" in flags(lab.name, mvt), 10, "ALLMULTI", agent.log)
    g.check(f"ip link set {rig['eth'][M0]} allmulticast off")
    wait_for(lambda: "ALLMULTI" not in flags(lab.name, mvt), 10, "ALLMULTI off", agent.log)


def test_mac_change_refused_without_mac_and_followed_with_it(rig):
    lab, agent, g = rig["lab"], rig["agent"], rig["guest"]
    new0, new1 = "52:54:00:4e:00:90", "52:54:00:4e:00:91"
    g.check(f"ip link set {rig['eth'][M0]} address {new0}")
    wait_for(lambda: f"guest changed its MAC to {new0}; refused" in agent.log(), 10,
             "the refusal", agent.log)
    assert oracle.link(lab.name, rig["dev"][M0])["address"] == M0
    g.check(f"ip link set {rig['eth'][M1]} address {new1}")
    wait_for(lambda: oracle.link(lab.name, rig["dev"][M1])["address"] == new1, 10,
             "the macvtap to follow the guest's MAC", agent.log)
    g.check(f"ip link set {rig['eth'][M1]} address {M1}; ip link set {rig['eth'][M0]} "
            f"address {M0}")
    wait_for(lambda: oracle.link(lab.name, rig["dev"][M1])["address"] == M1, 10,
             "the MAC back", agent.log)


def test_trust_guest_rx_filters_interface_is_left_to_libvirt(rig):
    lab, agent, g = rig["lab"], rig["agent"], rig["guest"]
    assert agent.count("trustGuestRxFilters='yes': libvirt syncs this interface itself") == 1
    g.check(f"ip maddr add {GROUP} dev {rig['eth'][M2]}")
    # libvirt programs it (on the macvtap only); netplug never adds anything there.
    wait_for(lambda: oracle.hexmac(GROUP) in groups(lab.name, rig["dev"][M2]), 15,
             "libvirt's own sync", agent.log)
    state = Path(rig["tmp"]) / "state" / "domains" / "vm1.json"
    assert rig["dev"][M2] not in state.read_text()


def test_hotplugged_bridge_interface_gets_its_fdb_entry_and_flags(rig):
    lab, agent = rig["lab"], rig["agent"]
    xml = (f"<interface type='bridge'><mac address='{M4}'/><source bridge='br0'/>"
           f"<model type='virtio'/></interface>")
    path = lab.dir / "xml" / "hotplug.xml"
    path.write_text(xml)
    lab.virsh("attach-device", "vm1", str(path), "--live")
    tap = wait_for(lambda: rig["guest"].targets().get(M4), 10, "the new tap")
    wait_for(lambda: oracle.static_macs(lab.name, tap) == {M4: []}, 10, "the FDB entry",
             agent.log)
    wait_for(lambda: oracle.port_flags(lab.name, tap) == (False, False), 10, "flags", agent.log)
    assert "device-added" in agent.log()


def test_suspend_removes_the_fdb_entry_and_resume_restores_it(rig):
    lab, agent = rig["lab"], rig["agent"]
    tap = rig["dev"][M3]
    wait_for(lambda: oracle.static_macs(lab.name, tap) == {M3: []}, 10, "the entry", agent.log)
    lab.virsh("suspend", "vm1")
    wait_for(lambda: oracle.static_macs(lab.name, tap) == {}, 10, "the entry removed", agent.log)
    assert oracle.port_flags(lab.name, tap) == (True, True)
    assert M3 not in {e["mac"] for e in oracle.master_entries(lab.name) if
                      e.get("state") == "static"}
    lab.virsh("resume", "vm1")
    wait_for(lambda: oracle.static_macs(lab.name, tap) == {M3: []}, 10, "the entry back",
             agent.log)
    assert oracle.port_flags(lab.name, tap) == (False, False)


def test_agent_killed_filter_changed_restarted_is_resynced(rig):
    lab, agent, g = rig["lab"], rig["agent"], rig["guest"]
    mvt, eth0 = rig["dev"][M0], rig["eth"][M0]
    agent.kill()
    missed = "01:00:5e:0a:0b:0c"
    g.check(f"ip maddr add {missed} dev {eth0}")
    time.sleep(0.5)
    assert oracle.hexmac(missed) not in groups(lab.name, mvt)  # nobody listening
    agent.start()
    wait_for(lambda: oracle.hexmac(missed) in groups(lab.name, mvt), 20, "the start-up resync",
             agent.log)
    # The resync's query re-armed QEMU's event: the next change arrives as an event.
    after = "01:00:5e:0a:0b:0d"
    g.check(f"ip maddr add {after} dev {eth0}")
    wait_for(lambda: oracle.hexmac(after) in groups(lab.name, mvt), 10, "an event after restart",
             agent.log)
    g.check(f"ip maddr del {missed} dev {eth0}; ip maddr del {after} dev {eth0}")
    wait_for(lambda: not {oracle.hexmac(missed), oracle.hexmac(after)} & groups(lab.name, mvt), 10,
             "the groups gone", agent.log)


def test_libvirtd_restart_under_the_agent_reconnects_and_resyncs(rig):
    lab, agent, g = rig["lab"], rig["agent"], rig["guest"]
    mvt, eth0, tap = rig["dev"][M0], rig["eth"][M0], rig["dev"][M3]
    connects = agent.count("connected to ")
    pid = lab.libvirtd_pid()
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: "reconnecting" in agent.log(), 15, "the agent to notice", agent.log)
    # While libvirtd is down: the guest changes its filter and someone deletes the FDB entry.
    lost = "01:00:5e:0a:0b:0e"
    g.check(f"ip maddr add {lost} dev {eth0}")
    lab.run("bridge", "fdb", "del", M3, "dev", tap, "master")
    assert oracle.static_macs(lab.name, tap) == {}
    lab.restart_libvirtd()
    wait_for(lambda: agent.count("connected to ") > connects, 60, "the reconnection", agent.log)
    wait_for(lambda: oracle.static_macs(lab.name, tap) == {M3: []}, 20, "the FDB resync",
             agent.log)
    wait_for(lambda: oracle.hexmac(lost) in groups(lab.name, mvt), 20, "the RX-filter resync", agent.log)
    # Events flow on the new connection.
    g.check(f"ip maddr del {lost} dev {eth0}")
    wait_for(lambda: oracle.hexmac(lost) not in groups(lab.name, mvt, users_only=False), 10,
             "an event on the new connection", agent.log)
    assert agent.proc.poll() is None  # it never exited


def test_agent_stops_cleanly_on_sigterm_and_its_log_is_clean(rig):
    agent = rig["agent"]
    assert agent.stop() == 0
    log = agent.log()
    assert "Traceback" not in log and "internal error" not in log
    assert log.rstrip().endswith("netplug agent: INFO: stopped")
