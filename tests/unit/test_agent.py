"""The agent's worker, queue and libvirt session, against the in-memory kernel.

libvirt is faked at the agent's own seam (``connect(queue) -> Session``): FakeLibvirt holds
domains, networks and guest RX filters, and "events" are what libvirt's callbacks do: mark
the queue. One test drives the real LibvirtSession through libvirt's in-process test driver
(test:///default), with real events on libvirt's event loop.
"""

from __future__ import annotations

import logging
import threading
import time

import pytest

from fakes import FakeKernel, bridge_iface, domain_xml, iface, policy_xml, state_lock_held
from polling import wait_for
from libvirt_netplug.agent import Agent, AgentOptions, WorkQueue, lifecycle_reason, rx_reason
from libvirt_netplug.errors import NetplugError
from libvirt_netplug.model import parse_domain, parse_network
from libvirt_netplug.policy import Config
from libvirt_netplug.rxfilter import PartialFilters, RxFilter
from libvirt_netplug.state import StateDir
from libvirt_netplug.sync import Desired

GUEST, GUEST2 = "52:54:00:00:00:01", "52:54:00:00:00:02"
GROUP1, GROUP2 = "01:00:5e:01:02:03", "01:00:5e:01:02:04"


# --------------------------------------------------------------------------- a fake libvirt


class FakeLibvirt:
    """libvirtd as the agent sees it: live domain XML, running or not, and QEMU's filters."""

    def __init__(self):
        self.xml: dict[str, str] = {}
        self.running: dict[str, bool] = {}
        self.networks: dict[str, str] = {}
        self.filters: dict[str, dict[str, RxFilter]] = {}
        self.refuse = False  # libvirtd down: connecting fails
        self.fail_query: set[str] = set()
        self.queries: list[str] = []
        self.asked: list[tuple[str, ...] | None] = []  # per query: the NICs named (None: all)
        self.reads: list[tuple[str, ...] | None] = []
        self.sessions: list[FakeSession] = []
        self.lock = threading.Lock()

    def connect(self, queue: WorkQueue) -> "FakeSession":
        if self.refuse:
            raise NetplugError("cannot connect to libvirt at test:///fake: connection refused")
        s = FakeSession(self, queue)
        self.sessions.append(s)
        return s

    # -- what libvirt's callbacks would do
    def event(self, name: str, reason: str) -> None:
        self.sessions[-1].queue.mark(name, reason)

    def disconnect(self) -> None:
        """libvirtd went away: the session dies and its close callback fires."""
        s = self.sessions[-1]
        s.dead = True
        s.queue.lost("connection to test:///fake closed (end of file)")


class FakeSession:
    def __init__(self, lib: FakeLibvirt, queue: WorkQueue):
        self.lib, self.queue, self.dead, self.closed = lib, queue, False, False

    def desired(self, config: Config, names=None) -> Desired:
        if self.dead:
            raise NetplugError("cannot list domains: end of file while reading data")
        lib = self.lib
        with lib.lock:
            lib.reads.append(tuple(sorted(names)) if names is not None else None)
            wanted = set(lib.xml) if names is None else set(names)
            domains = [parse_domain(lib.xml[n]) for n in sorted(wanted)
                       if n in lib.xml and lib.running.get(n)]
            nets = {n.name: n for n in (parse_network(x, lenient=True)
                                        for x in lib.networks.values())}
        return Desired(tuple(domains), nets, config)

    def rx_filters(self, domain, nics=None):
        if self.dead:
            raise NetplugError("query-rx-filter: end of file while reading data")
        with self.lib.lock:
            self.lib.queries.append(domain.name)
            self.lib.asked.append(None if nics is None else tuple(sorted(nics)))
            if domain.name in self.lib.fail_query:
                raise NetplugError("query-rx-filter: Requested operation is not valid: "
                                   "domain is not running")
            filters = dict(self.lib.filters.get(domain.name, {}))
            if nics is None:
                return filters
            # QEMU answers only for the NIC named (query-rx-filter's "name" argument).
            return PartialFilters({n: f for n, f in filters.items() if n in nics}, nics)

    def alive(self) -> bool:
        return not self.dead

    def close(self) -> None:
        self.closed = True


# --------------------------------------------------------------------------- fixtures


MACVTAP_POLICY = policy_xml(promiscLinks="no", rxFilters="multicast allmulti")


def vm_xml(name="vm1", *, bridge_tap="vnet0", macvtap="macvtap0", extra=(), metadata=None,
           trust=None):
    nics = []
    if bridge_tap:
        nics.append(bridge_iface("br0", bridge_tap, GUEST, alias="net0"))
    if macvtap:
        nics.append(iface("direct", mac=GUEST2, source={"dev": "low0", "mode": "bridge"},
                          target=macvtap, alias="net1", trust=trust))
    nics += list(extra)
    return domain_xml(name, nics, metadata=MACVTAP_POLICY if metadata is None else metadata)


def guest_filter(*groups, allmulti=False, alias="net1", mac=GUEST2) -> dict[str, RxFilter]:
    return {alias: RxFilter(alias, mac, multicast="all" if allmulti else "normal",
                            multicast_table=tuple(sorted(groups)))}


@pytest.fixture
def world(fake: FakeKernel):
    fake.add_bridge("br0")
    fake.add_veth("upl0", master="br0")
    fake.add_tap("vnet0", master="br0", guest=GUEST)
    fake.add("low0", "veth", up=True)
    fake.add("macvtap0", "macvtap", address=GUEST2, up=True, lower="low0",
             macvlan_mode="bridge")
    lib = FakeLibvirt()
    lib.xml["vm1"] = vm_xml()
    lib.running["vm1"] = True
    lib.filters["vm1"] = guest_filter(GROUP1)
    return fake, lib


class Running:
    """An Agent whose worker runs in a thread; stopped (and checked to stop) at teardown."""

    def __init__(self, lib: FakeLibvirt, kernel: FakeKernel, state: StateDir, **opts):
        options = dict(debounce=0.0, min_interval=0.0, reconnect_min=0.02, reconnect_max=0.1,
                       retry_min=0.05, retry_max=0.2, resync_interval=0)
        options.update(opts.pop("options", {}))
        self.agent = Agent(AgentOptions(uri="test:///fake", **options), state=state,
                           config=opts.pop("config", Config()), connect=lib.connect,
                           kernel_factory=lambda: kernel, **opts)
        self.thread = threading.Thread(target=self.agent.run, daemon=True)

    def __enter__(self) -> Agent:
        self.thread.start()
        assert self.agent.ready.wait(5), "no full resync within 5 s"
        return self.agent

    def __exit__(self, *exc) -> None:
        self.agent.stop()
        self.thread.join(5)
        assert not self.thread.is_alive(), "the worker did not stop"


def idle(agent: Agent, timeout=5.0):
    """Wait until nothing is pending (the worker finished what was marked)."""
    time.sleep(0.02)
    wait_for(lambda: not agent.queue.pending(), timeout, "an idle queue")
    time.sleep(0.05)


def fdb_on(kernel: FakeKernel, port: str) -> set[str]:
    return {e.mac for e in kernel.fdb("br0", port) if e.state == "static"}


@pytest.fixture
def state(state_path) -> StateDir:
    return StateDir(str(state_path))


# --------------------------------------------------------------------------- the queue


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_queue_coalesces_a_burst_into_one_entry_per_domain():
    q = WorkQueue()
    for i in range(1000):
        q.mark("vm1", "rx-filter")
        q.mark("vm2" if i % 2 else "vm3", "lifecycle RESUMED")
    work = q.take(timeout=0)
    assert work.domains == {"vm1": ("rx-filter",), "vm2": ("lifecycle RESUMED",),
                            "vm3": ("lifecycle RESUMED",)}
    assert q.take(timeout=0).domains == {}
    assert q.counts == {"rx-filter": 1000, "lifecycle": 1000}


def test_queue_debounce():
    clock = Clock()
    q = WorkQueue(debounce=0.005, clock=clock)
    q.mark("vm1", "rx-filter")
    assert q.take(timeout=0).domains == {}  # not yet: debounce
    clock.t += 0.004
    q.mark("vm1", "rx-filter net0")  # a later mark does not push it further out
    clock.t += 0.001
    assert q.take(timeout=0).domains == {"vm1": ("rx-filter", "rx-filter net0")}


def test_queue_token_bucket_allows_a_short_burst_then_one_per_min_interval():
    clock = Clock()
    q = WorkQueue(min_interval=0.05, burst=3, clock=clock)
    for _ in range(3):  # a change that arrives in steps is synced without waiting
        q.mark("vm1", "rx-filter")
        assert list(q.take(timeout=0).domains) == ["vm1"]
        q.done(["vm1"])
        clock.t += 0.001
    q.mark("vm1", "rx-filter")
    q.mark("vm2", "rx-filter")  # other domains have their own bucket
    assert list(q.take(timeout=0).domains) == ["vm2"]
    q.done(["vm2"])
    clock.t += 0.045
    assert q.take(timeout=0).domains == {}
    clock.t += 0.005
    assert list(q.take(timeout=0).domains) == ["vm1"]
    q.done(["vm1"])
    clock.t += 1.0  # idle: the bucket refills (and is forgotten)
    q.mark("vm1", "rx-filter")
    assert list(q.take(timeout=0).domains) == ["vm1"]
    assert "vm2" not in q._tokens


def test_queue_full_resync_covers_pending_domains_and_lost_comes_first():
    q = WorkQueue()
    q.mark("vm1", "rx-filter")
    q.mark_full("connected")
    q.lost("connection closed (end of file)")
    assert q.take(timeout=0).lost == "connection closed (end of file)"
    assert q.take(timeout=0).full == "connected"
    assert q.take(timeout=0).domains == {}  # vm1 was covered by the full resync


def test_queue_keeps_the_earliest_full_resync_and_delayed_retries():
    clock = Clock()
    q = WorkQueue(clock=clock)
    q.mark_full("periodic", 300)
    q.mark_full("after error", 1)
    q.mark("vm1", "retry", delay=0.5)
    assert q.take(timeout=0) .domains == {} and q.take(timeout=0).full is None
    clock.t += 0.5
    assert list(q.take(timeout=0).domains) == ["vm1"]
    clock.t += 0.5
    assert q.take(timeout=0).full == "after error"


def test_queue_stop_wakes_a_blocked_take():
    q = WorkQueue()
    got = []
    t = threading.Thread(target=lambda: got.append(q.take()))
    t.start()
    time.sleep(0.05)
    q.stop()
    t.join(2)
    assert got == [None]


# --------------------------------------------------------------------------- the worker


def test_start_is_a_full_resync_of_bridge_ports_and_macvtaps(world, state):
    fake, lib = world
    with Running(lib, fake, state) as agent:
        assert agent.stats["full"] == 1
        assert fdb_on(fake, "vnet0") == {GUEST}
        assert (fake.devs["vnet0"].learning, fake.devs["vnet0"].flood) == (False, False)
        assert GROUP1 in fake.devs["macvtap0"].mc
        assert lib.reads == [None] and lib.queries == ["vm1"]
        assert set(state.domain("vm1")["rx"]) == {"macvtap0"}


def test_rx_filter_event_requeries_qemu_without_rereading_the_xml(world, state):
    fake, lib = world
    with Running(lib, fake, state) as agent:
        lib.filters["vm1"] = guest_filter(GROUP2, allmulti=True)
        lib.event("vm1", "rx-filter net1")
        wait_for(lambda: GROUP2 in fake.devs["macvtap0"].mc, what="the new group")
        idle(agent)
        assert GROUP1 not in fake.devs["macvtap0"].mc
        assert fake.devs["macvtap0"].allmulti
        assert lib.queries == ["vm1", "vm1"]
        # The guest's filter is not in the XML: the XML read at start is reused ...
        assert lib.reads == [None]
        # ... until an event that can change the XML.
        lib.event("vm1", "device-added net7")
        idle(agent)
        assert lib.reads == [None, ("vm1",)]


def test_rx_filter_event_asks_only_its_nic_and_keeps_the_others_state(world, state):
    """Two synced macvtaps; an event for one asks QEMU about that NIC only (a smaller reply,
    and no other NIC's event re-armed); the other's groups and record stay as they are."""
    fake, lib = world
    fake.add("macvtap2", "macvtap", address="52:54:00:00:00:22", up=True, lower="low0",
             macvlan_mode="bridge")
    lib.xml["vm1"] = vm_xml(extra=[iface("direct", mac="52:54:00:00:00:22",
                                         source={"dev": "low0", "mode": "bridge"},
                                         target="macvtap2", alias="net2")])
    lib.filters["vm1"] = {**guest_filter(GROUP1),
                          **guest_filter(GROUP1, alias="net2", mac="52:54:00:00:00:22")}
    with Running(lib, fake, state) as agent:
        assert lib.asked == [None]  # the start-up resync asks for every NIC
        rec2 = state.domain("vm1")["rx"]["macvtap2"]
        assert GROUP1 in fake.devs["macvtap2"].mc
        # The guest moves net1 to GROUP2; net2's filter is unchanged and sends no event.
        lib.filters["vm1"] = {**guest_filter(GROUP2),
                              **guest_filter(GROUP1, alias="net2", mac="52:54:00:00:00:22")}
        lib.event("vm1", "rx-filter net1")
        wait_for(lambda: GROUP2 in fake.devs["macvtap0"].mc, what="the new group")
        idle(agent)
        assert lib.asked == [None, ("net1",)]
        assert GROUP1 not in fake.devs["macvtap0"].mc
        assert GROUP1 in fake.devs["macvtap2"].mc
        assert state.domain("vm1")["rx"]["macvtap2"] == rec2
        # An event that names no NIC asks for all of them.
        lib.event("vm1", "rx-filter")
        idle(agent)
        assert lib.asked[-1] is None


def test_rx_filter_event_of_a_nic_netplug_does_not_sync_is_ignored(world, state):
    """libvirt syncs trustGuestRxFilters NICs itself; their events are not ours."""
    fake, lib = world
    lib.xml["vm1"] = vm_xml(extra=[iface("direct", mac="52:54:00:00:00:09",
                                         source={"dev": "low0", "mode": "bridge"},
                                         target="macvtap9", alias="net9", trust="yes")])
    with Running(lib, fake, state) as agent:
        for _ in range(20):
            lib.event("vm1", "rx-filter net9")
        idle(agent)
        assert lib.queries == ["vm1"] and agent.stats["skipped"] >= 1
        lib.event("vm1", "rx-filter net1")
        wait_for(lambda: lib.queries == ["vm1", "vm1"], what="a query for net1")


def test_a_burst_of_events_costs_bounded_syncs_and_ends_in_the_final_state(world, state):
    fake, lib = world
    with Running(lib, fake, state, options={"min_interval": 0.05}) as agent:
        n_before = agent.stats["domain"]
        t0 = time.monotonic()
        groups = [f"01:00:5e:00:{i >> 8:02x}:{i & 0xff:02x}" for i in range(400)]
        for g in groups:  # the guest rewrites its filter 400 times, each with an event
            lib.filters["vm1"] = guest_filter(g)
            lib.event("vm1", "rx-filter")
            time.sleep(0.001)
        burst = time.monotonic() - t0
        idle(agent)
        syncs = agent.stats["domain"] - n_before
        # The bucket's 3 tokens, one per 50 ms of burst, and the sync after the last event.
        assert syncs <= burst / 0.05 + 3 + 1, f"{syncs} syncs for a {burst:.2f} s burst"
        assert fake.devs["macvtap0"].mc & set(groups) == {groups[-1]}
        assert state.domain("vm1")["rx"]["macvtap0"]["mc"] == [groups[-1]]


def test_suspend_removes_and_resume_restores(world, state):
    fake, lib = world
    with Running(lib, fake, state) as agent:
        lib.running["vm1"] = False  # paused counts as not running
        lib.event("vm1", "lifecycle SUSPENDED")
        wait_for(lambda: not fdb_on(fake, "vnet0"), what="FDB entry removed")
        idle(agent)
        assert (fake.devs["vnet0"].learning, fake.devs["vnet0"].flood) == (True, True)
        assert GROUP1 not in fake.devs["macvtap0"].mc
        assert state.domains() == {}
        lib.running["vm1"] = True
        lib.event("vm1", "lifecycle RESUMED")
        wait_for(lambda: fdb_on(fake, "vnet0") == {GUEST}, what="FDB entry restored")
        wait_for(lambda: GROUP1 in fake.devs["macvtap0"].mc, what="group restored")


def test_hotplugged_bridge_interface_gets_its_fdb_entry_and_flags(world, state):
    fake, lib = world
    with Running(lib, fake, state):
        fake.add_tap("vnet1", master="br0", guest="52:54:00:00:00:03")
        lib.xml["vm1"] = vm_xml(extra=[bridge_iface("br0", "vnet1", "52:54:00:00:00:03",
                                                    alias="net2")])
        lib.event("vm1", "device-added net2")
        wait_for(lambda: fdb_on(fake, "vnet1") == {"52:54:00:00:00:03"}, what="FDB entry")
        wait_for(lambda: not fake.devs["vnet1"].flood, what="flood off")
        # Unplug: libvirt deletes the tap (and its entries); the record goes too.
        fake.delete("vnet1")
        lib.xml["vm1"] = vm_xml()
        lib.event("vm1", "device-removed net2")
        wait_for(lambda: "vnet1" not in state.domain("vm1")["ports"], what="record dropped")


def test_stopped_domain_is_cleaned_up(world, state):
    fake, lib = world
    with Running(lib, fake, state):
        del lib.xml["vm1"]  # a transient domain: gone entirely
        lib.event("vm1", "lifecycle STOPPED")
        wait_for(lambda: not fdb_on(fake, "vnet0"), what="FDB entry removed")
        wait_for(lambda: state.domains() == {}, what="records retired")


def test_apply_error_schedules_a_full_resync(world, state, caplog):
    fake, lib = world
    fake.fail("set_port_flags", "vnet0", 16)  # EBUSY, once
    with Running(lib, fake, state) as agent:
        wait_for(lambda: agent.stats["full"] >= 2, what="a second full resync")
        idle(agent)
        assert (fake.devs["vnet0"].learning, fake.devs["vnet0"].flood) == (False, False)
        assert fdb_on(fake, "vnet0") == {GUEST}
    assert any("full resync in" in r.getMessage() for r in caplog.records)


def test_a_failed_query_is_retried_because_only_a_query_rearms_qemu(world, state):
    fake, lib = world
    with Running(lib, fake, state):
        lib.fail_query.add("vm1")
        lib.filters["vm1"] = guest_filter(GROUP2)
        lib.event("vm1", "rx-filter")
        wait_for(lambda: lib.queries.count("vm1") >= 3, what="retries")
        lib.fail_query.clear()
        wait_for(lambda: GROUP2 in fake.devs["macvtap0"].mc, what="the retry to succeed")


def test_lost_connection_reconnects_with_backoff_and_resyncs(world, state, caplog):
    fake, lib = world
    with Running(lib, fake, state) as agent:
        lib.refuse = True
        lib.disconnect()
        wait_for(lambda: lib.sessions[0].closed, what="the dead session to be closed")
        time.sleep(0.3)  # several refused attempts
        # Meanwhile the guest changed its filter and nobody was listening.
        lib.filters["vm1"] = guest_filter(GROUP2)
        fake.delete_fdb("vnet0", GUEST)  # and somebody removed the entry
        lib.refuse = False
        wait_for(lambda: len(lib.sessions) == 2, what="a new session")
        wait_for(lambda: agent.stats["full"] >= 2, what="the full resync")
        wait_for(lambda: GROUP2 in fake.devs["macvtap0"].mc, what="the resync")
        assert fdb_on(fake, "vnet0") == {GUEST}
        assert agent.stats["connects"] == 2
    assert any("reconnecting" in r.getMessage() for r in caplog.records)


def test_libvirtd_down_at_start_is_retried_not_fatal(world, state):
    fake, lib = world
    lib.refuse = True
    r = Running(lib, fake, state)
    r.thread.start()
    try:
        time.sleep(0.3)
        assert r.thread.is_alive() and not r.agent.ready.is_set()
        lib.refuse = False
        assert r.agent.ready.wait(5)
        assert fdb_on(fake, "vnet0") == {GUEST}
    finally:
        r.__exit__(None, None, None)


def test_rx_event_for_a_domain_without_managed_macvtaps_costs_nothing(world, state):
    fake, lib = world
    lib.xml["vm2"] = vm_xml("vm2", bridge_tap=None, macvtap=None)
    lib.running["vm2"] = True
    with Running(lib, fake, state) as agent:
        reads = len(lib.reads)
        for _ in range(50):
            lib.event("vm2", "rx-filter")
        idle(agent)
        assert len(lib.reads) == reads and agent.stats["skipped"] >= 1
        lib.event("vm2", "lifecycle RESUMED")  # anything else is always synced
        wait_for(lambda: len(lib.reads) == reads + 1, what="a sync")


def test_trust_guest_rx_filters_stands_aside_and_logs_once(world, state, caplog):
    fake, lib = world
    lib.xml["vm1"] = vm_xml(trust="yes")
    caplog.set_level(logging.INFO, logger="libvirt_netplug")
    with Running(lib, fake, state) as agent:
        for _ in range(3):
            lib.event("vm1", "lifecycle RESUMED")
            idle(agent)
        agent.resync()
        idle(agent)
    assert GROUP1 not in fake.devs["macvtap0"].mc
    assert "vm1" not in lib.queries
    said = [r for r in caplog.records if "stands aside" in r.getMessage()]
    assert len(said) == 1 and said[0].levelname == "INFO"


def test_reload_rereads_the_config(world, state, tmp_path):
    fake, lib = world
    lib.xml["vm1"] = vm_xml(macvtap=None, metadata="")  # no policy in XML: config decides
    cfg = tmp_path / "netplug.toml"
    cfg.write_text("")
    with Running(lib, fake, state, config=Config(), config_path=str(cfg)) as agent:
        assert fdb_on(fake, "vnet0") == set()
        cfg.write_text('[bridge.br0]\npromiscLinks = "no"\n')
        agent.reload()
        wait_for(lambda: fdb_on(fake, "vnet0") == {GUEST}, what="the new policy applied")
        cfg.write_text("[bridge.br0]\npromiscLinks = 'maybe'\n")  # broken: keep the old one
        agent.reload()
        idle(agent)
        assert fdb_on(fake, "vnet0") == {GUEST}


def test_metrics_file_uses_the_shared_names_with_source_agent(world, state, tmp_path):
    fake, lib = world
    prom = tmp_path / "netplug-agent.prom"
    with Running(lib, fake, state, metrics_file=str(prom)) as agent:
        lib.event("vm1", "rx-filter")
        idle(agent)
    from prometheus_client.parser import text_string_to_metric_families

    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(prom.read_text())
               for s in fam.samples}
    assert samples[("netplug_managed_ports", (("bridge", "br0"), ("source", "agent")))] == 1
    assert samples[("netplug_managed_macvtaps", (("lower", "low0"), ("source", "agent")))] == 1
    key = ("netplug_rx_filter_entries", (("device", "macvtap0"), ("domain", "vm1"),
                                         ("interface", "net1"), ("list", "multicast"),
                                         ("source", "agent")))
    assert samples[key] == 1
    assert samples[("netplug_apply_errors_total", (("source", "agent"),))] == 0
    assert samples[("netplug_last_success_timestamp_seconds", (("source", "agent"),))] > 0
    assert samples[("netplug_agent_connected", (("source", "agent"),))] == 0  # stopped
    assert samples[("netplug_agent_events_total", (("event", "rx-filter"),
                                                   ("source", "agent")))] == 1


def test_qemu_is_asked_outside_the_state_lock(world, state, monkeypatch):
    """Hooks share the lock: they must never wait for a round trip to QEMU's monitor."""
    fake, lib = world
    held = []
    query = FakeSession.rx_filters

    def rx_filters(self, domain, nics=None):
        held.append(state_lock_held(state.path))
        return query(self, domain, nics)

    monkeypatch.setattr(FakeSession, "rx_filters", rx_filters)
    with Running(lib, fake, state) as agent:
        lib.event("vm1", "rx-filter net1")
        wait_for(lambda: len(held) >= 2, what="two queries")
        idle(agent)
    assert held and not any(held)


def test_rx_reason_names_the_nic_from_qemus_event_details():
    assert rx_reason('{"name": "net0", "path": "/machine/peripheral/net0/virtio-backend"}') \
        == "rx-filter net0"
    assert rx_reason(None) == rx_reason("not json") == rx_reason("[]") == "rx-filter"


def test_lifecycle_reasons_name_migration_and_restore():
    assert lifecycle_reason(4, 1) == "lifecycle RESUMED (migrated)"
    assert lifecycle_reason(5, 3) == "lifecycle STOPPED (migrated)"
    assert lifecycle_reason(2, 2) == "lifecycle STARTED (restored)"
    assert lifecycle_reason(3, 0) == "lifecycle SUSPENDED"
    assert lifecycle_reason(42, 0) == "lifecycle 42"


# --------------------------------------------------------------------------- real libvirt


def test_libvirt_session_on_the_test_driver_delivers_real_events(fake, state):
    """libvirt's in-process test driver: real connection, callbacks on the real event loop."""
    libvirt = pytest.importorskip("libvirt")
    from libvirt_netplug.agent import LibvirtSession

    fake.add_bridge("br0")
    for i in range(4):  # the test driver names targets testnetN whatever the XML says
        fake.add_tap(f"testnet{i}", master="br0", guest=GUEST)
    uri = "test:///default"
    xml = domain_xml("np-agent-test", [bridge_iface("br0", "vnettest0", GUEST)],
                     metadata=policy_xml(promiscLinks="no"))
    sessions: list[LibvirtSession] = []

    def connect(q):
        s = LibvirtSession(uri, q)
        sessions.append(s)
        return s

    agent = Agent(AgentOptions(uri=uri, debounce=0, min_interval=0, resync_interval=0),
                  state=state, config=Config(), connect=connect, kernel_factory=lambda: fake)
    t = threading.Thread(target=agent.run, daemon=True)
    t.start()
    other = libvirt.open(uri)  # test:///default state is shared inside one process
    dom = None
    try:
        assert agent.ready.wait(5)
        dom = other.createXML(xml, 0)  # a transient domain: STARTED
        tap = parse_domain(dom.XMLDesc(0)).interfaces[0].target
        wait_for(lambda: fdb_on(fake, tap) == {GUEST}, what="STARTED applied")
        dom.suspend()
        wait_for(lambda: fdb_on(fake, tap) == set(), what="SUSPENDED cleaned")
        assert fake.devs[tap].learning and fake.devs[tap].flood
        dom.resume()
        wait_for(lambda: fdb_on(fake, tap) == {GUEST}, what="RESUMED applied")
        dom.destroy()
        wait_for(lambda: fdb_on(fake, tap) == set(), what="STOPPED cleaned")
        assert agent.queue.counts.get("lifecycle", 0) >= 4
        assert sessions and sessions[0].rx_events is False  # the test driver has no QEMU
    finally:
        agent.stop()
        t.join(5)
        if dom is not None:  # leave the process-wide test driver as we found it
            try:
                dom.destroy()
            except libvirt.libvirtError:
                pass  # already gone (the test destroyed it)
        other.close()
    assert not t.is_alive()


# --------------------------------------------------------------------------- CLI


def netplug(argv: list[str]) -> int:
    from libvirt_netplug import cli

    return cli.main(argv)


def test_cli_registers_the_agent_subcommand(capsys):
    with pytest.raises(SystemExit) as e:
        netplug(["agent", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--connect", "--config", "--state-dir", "--metrics-file", "--resync-interval",
                "--debounce", "--min-interval"):
        assert opt in out
    with pytest.raises(SystemExit) as e:
        netplug(["agent", "--debounce", "-3"])
    assert e.value.code == 2
    assert "use a number >= 0" in capsys.readouterr().err


def test_cli_broken_config_is_one_line_and_exit_1(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[bridge.br0]\npromiscLinks = 'perhaps'\n")
    assert netplug(["agent", "--config", str(cfg), "--connect", "test:///default"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("netplug agent: error: config ") and "promiscLinks" in err[-1]



@pytest.mark.parametrize("module", ["workqueue", "events", "command"])
def test_agent_pieces_stand_alone(module):
    """The queue, the event vocabulary and the command's arguments load nothing of libvirt,
    the engine or the kernel: each can be read and tested on its own."""
    import subprocess
    import sys

    code = (f"import sys, libvirt_netplug.agent.{module}; "
            "heavy = [m for m in ('libvirt', 'libvirt_netplug.sync', 'libvirt_netplug.kernel', "
            "'libvirt_netplug.agent.session', 'libvirt_netplug.agent.worker') "
            "if m in sys.modules]; assert not heavy, heavy")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
