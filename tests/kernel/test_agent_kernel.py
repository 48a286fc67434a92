"""The agent on the real kernel: its worker runs in a thread inside a fresh namespace (the
real NetlinkKernel), libvirt is scripted at the agent's Session seam; and the `netplug agent`
daemon itself, run as systemd would, against libvirt's test driver. Outcomes come from the
oracle (`bridge -j fdb show`, `bridge -j -d link show`, /proc/net/dev_mcast)."""

from __future__ import annotations

import signal
import threading
import time

import pytest

import oracle
from fakes import bridge_iface, domain_xml, iface, policy_xml, tap_mac
from netns import netplug_cli, setns
from polling import wait_for

GUEST, MVT = "52:54:00:00:00:01", "52:54:00:00:00:02"


class Script:
    """libvirt as the agent's Session sees it: vm1's XML, run state and guest filter."""

    def __init__(self):
        self.running = True
        self.groups: tuple[str, ...] = ()
        self.queue = None
        self.queries = 0
        self.xml = domain_xml("vm1", [
            bridge_iface("br0", "vnet0", GUEST, alias="net0"),
            iface("direct", mac=MVT, source={"dev": "low0", "mode": "bridge"},
                  target="macvtap0", alias="net1")],
            metadata=policy_xml(promiscLinks="no", rxFilters="multicast allmulti"))

    def connect(self, queue):
        self.queue = queue
        return self

    def desired(self, config, names=None):
        from libvirt_netplug.model import parse_domain
        from libvirt_netplug.sync import Desired

        if self.running:
            return Desired((parse_domain(self.xml),), {}, config)
        return Desired((), {}, config)

    def rx_filters(self, domain, nics=None):
        from libvirt_netplug.rxfilter import RxFilter

        self.queries += 1
        return {"net1": RxFilter("net1", MVT, multicast_table=self.groups)}

    def alive(self):
        return True

    def close(self):
        pass


@pytest.fixture
def world(ns, tmp_path):
    ns.add_bridge("br0")
    ns.add_veth("up0", "up0p", master="br0")
    ns.add_tap("vnet0", "br0", address=tap_mac(GUEST))
    ns.add_veth("low0", "low0p")
    ns.ip("link", "add", "link", "low0", "name", "macvtap0", "address", MVT, "type", "macvtap",
          "mode", "bridge")
    ns.ip("link", "set", "macvtap0", "up")
    return ns, tmp_path


def start_agent(ns, tmp_path, script, **opts):
    from libvirt_netplug.agent import Agent, AgentOptions
    from libvirt_netplug.policy import Config
    from libvirt_netplug.state import StateDir

    options = AgentOptions(uri="script:///", resync_interval=0, debounce=0.0,
                           **{"min_interval": 0.0, **opts})
    agent = Agent(options, state=StateDir(str(tmp_path / "state")), config=Config(),
                  connect=script.connect)
    errors = []

    def worker():
        try:
            setns(ns.name)  # this thread only: every kernel call of the worker happens here
            agent.run()
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    t = threading.Thread(target=worker, daemon=True)
    t.start()
    assert agent.ready.wait(10), errors
    return agent, t, errors


def stop_agent(agent, t, errors):
    agent.stop()
    t.join(10)
    assert not t.is_alive() and not errors, errors


def groups_on(ns, dev) -> set[str]:
    """Addresses a user (netplug) holds on DEV: /proc/net/dev_mcast rows with global use."""
    return {a for d, _r, g, a in oracle.dev_mcast(ns.name) if d == dev and g}


def test_lifecycle_and_rx_events_on_the_real_kernel(world):
    ns, tmp = world
    script = Script()
    script.groups = ("01:00:5e:01:02:03",)
    agent, t, errors = start_agent(ns, tmp, script)
    try:
        assert oracle.static_macs(ns.name, "vnet0") == {GUEST: []}
        assert oracle.port_flags(ns.name, "vnet0") == (False, False)
        assert oracle.hexmac("01:00:5e:01:02:03") in groups_on(ns, "macvtap0")
        assert oracle.hexmac("01:00:5e:01:02:03") in {a for d, _r, _g, a in oracle.dev_mcast(ns.name)
                                               if d == "low0"}
        # The guest joins a second group: QEMU's event → one sync of vm1.
        script.groups = ("01:00:5e:01:02:03", "33:33:00:00:12:34")
        script.queue.mark("vm1", "rx-filter")
        wait_for(lambda: oracle.hexmac("33:33:00:00:12:34") in groups_on(ns, "macvtap0"),
                 what="the second group")
        # virsh suspend: the FDB entry of a paused guest must not linger; flags come back.
        script.running = False
        script.queue.mark("vm1", "lifecycle SUSPENDED")
        wait_for(lambda: oracle.static_macs(ns.name, "vnet0") == {}, what="FDB entry removed")
        wait_for(lambda: oracle.port_flags(ns.name, "vnet0") == (True, True), what="flags")
        wait_for(lambda: not groups_on(ns, "macvtap0"), what="groups removed")
        # virsh resume
        script.running = True
        script.queue.mark("vm1", "lifecycle RESUMED")
        wait_for(lambda: oracle.static_macs(ns.name, "vnet0") == {GUEST: []}, what="restored")
        wait_for(lambda: len(groups_on(ns, "macvtap0")) == 2, what="groups restored")
    finally:
        stop_agent(agent, t, errors)


def test_a_flood_of_filter_changes_costs_bounded_syncs_and_ends_right(world):
    ns, tmp = world
    script = Script()
    agent, t, errors = start_agent(ns, tmp, script, min_interval=0.05)
    try:
        base = agent.stats["domain"]
        t0 = time.monotonic()
        last = None
        for i in range(300):  # ~300 changes a second, each one a QEMU event
            last = f"01:00:5e:00:{i >> 8:02x}:{i & 0xff:02x}"
            script.groups = (last,)
            script.queue.mark("vm1", "rx-filter")
            time.sleep(0.003)
        burst = time.monotonic() - t0
        wait_for(lambda: groups_on(ns, "macvtap0") == {oracle.hexmac(last)}, what="the final state")
        time.sleep(0.2)
        syncs = agent.stats["domain"] - base
        # The token bucket: 3 back to back, then one per min_interval, plus the tail sync;
        # whatever the event rate.
        assert syncs <= burst / 0.05 + 3 + 1, (syncs, burst)
        assert groups_on(ns, "macvtap0") == {oracle.hexmac(last)}
        low = {a for d, _r, _g, a in oracle.dev_mcast(ns.name) if d == "low0"}
        assert oracle.hexmac(last) in low
        assert not {oracle.hexmac(f"01:00:5e:00:00:{i:02x}") for i in range(250)} & low - {
            oracle.hexmac(last), "01005e000001"}
    finally:
        stop_agent(agent, t, errors)


def test_the_daemon_resyncs_at_start_reloads_on_sighup_and_stops_on_sigterm(world):
    """`netplug agent` as systemd runs it (libvirt's test driver with a node file whose
    domain names this namespace's tap)."""
    ns, tmp = world
    # libvirt drops target names it would generate itself (vnetN, macvtapN) from defined XML.
    ns.add_tap("tap0", "br0", address=tap_mac(GUEST))
    node = tmp / "node.xml"
    node.write_text("<node>" + domain_xml("vm1", [bridge_iface("br0", "tap0", GUEST, "net0")],
                                          metadata=policy_xml(promiscLinks="no")) + "</node>")
    prom = tmp / "agent.prom"
    (tmp / "empty.toml").write_text("")  # an explicit --config must exist
    proc = ns.popen([*netplug_cli(), "agent", "--connect", f"test://{node}", "--state-dir",
                     str(tmp / "state"), "--config", str(tmp / "empty.toml"),
                     "--metrics-file", str(prom)],
                    stdout=open(tmp / "out", "wb"), stderr=open(tmp / "err", "wb"))
    try:
        wait_for(lambda: oracle.static_macs(ns.name, "tap0") == {GUEST: []}, 20,
                 "the start-up resync")
        assert oracle.port_flags(ns.name, "tap0") == (False, False)
        # Metrics are written at most once a second; the rest is flushed when idle.
        wait_for(lambda: prom.exists() and 'netplug_managed_ports{bridge="br0",source="agent"}'
                 ' 1.0' in prom.read_text(), 5, "the metrics file")
        assert 'netplug_agent_connected{source="agent"} 1.0' in prom.read_text()
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: b"reloading" in (tmp / "err").read_bytes(), 5, "SIGHUP handled")
        wait_for(lambda: (tmp / "err").read_bytes().count(b"full resync") >= 2, 5,
                 "the reload's resync")
        proc.send_signal(signal.SIGTERM)
        # systemd gives it TimeoutStopSec=30; the wait only catches a hang.
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = (tmp / "err").read_text()
    assert "netplug agent: INFO: SIGTERM: stopping" in err and err.rstrip().endswith("stopped")
    assert "Traceback" not in err
    assert (tmp / "out").read_bytes() == b""
    # Stopping the agent leaves the guest's port as it is (the agent is not the guest).
    assert oracle.static_macs(ns.name, "tap0") == {GUEST: []}
    assert 'netplug_agent_connected{source="agent"} 0.0' in prom.read_text()
