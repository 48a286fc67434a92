"""netplug reconcile against the real kernel (a fresh network namespace per test).

Desired state comes from libvirt's test driver (``test:///path/node.xml``: running domains
whose live XML names real taps and macvtaps created here), so no guest boots; the command runs
as an operator would run it (``ip netns exec NS netplug reconcile …``). Every outcome is read
back with the independent oracle (ip/bridge JSON, /proc/net/dev_mcast).

What this proves:
- a host full of foreign bridges, ports, macvtaps and static entries stays bit-for-bit the
  same through a repair, an in-sync run and a dry run;
- each kind of drift made by hand (flags flipped, entries deleted, replaced, learned
  elsewhere, added by hand, records of a stopped domain, a macvtap's multicast list) is
  repaired exactly — the JSON lists exactly those changes — and --dry-run changes nothing;
- reconcile waits for the lock the hooks hold, and runs concurrently with hooks without
  losing anything.
"""

from __future__ import annotations

import json
import time

import pytest

import oracle
from fakes import bridge_iface, domain_xml, guest_mac, iface, network_iface, network_xml, \
    policy_xml, tap_mac
from netns import NetNS, netplug_cli

TEST_NS = "http://libvirt.org/schemas/domain/test/1.0"
A, B, C, D, X, U, M = (guest_mac(n) for n in (1, 2, 3, 4, 0x0a, 0x0b, 0x30))
MDNS4, MDNS6, OTHER = "01:00:5e:00:00:fb", "33:33:00:00:00:fb", "01:00:5e:00:00:aa"
CONFIG = ('[bridge.br0]\npromiscLinks = "no"\n\n[direct.low0]\n'
          'rxFilters = "multicast allmulti"\n')

# Devices netplug must never change (and, for br0/nbr0, FDB entries on these ports).
FOREIGN = ["up0", "up0p", "tapz", "brF", "upF", "upFp", "tapF1", "tapF2", "brU", "tapU",
           "lowF", "lowFp", "mvF", "tapx"]


def stopped(xml: str) -> str:
    return xml.replace("<domain type='qemu'>", f"<domain type='qemu' xmlns:test='{TEST_NS}'>"
                       ).replace("</name>", "</name><test:runstate>5</test:runstate>", 1)


def settle(ns: NetNS, quiet: float = 1.5, timeout: float = 8.0) -> None:
    """Wait until link states stop changing by themselves, so before/after snapshots compare
    only what a command changed: the kernel's linkwatch applies carrier/operstate changes of
    new bridges and ports in batches at most once a second."""
    deadline = time.monotonic() + timeout
    prev, since = oracle.snapshot(ns.name), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.25)
        cur = oracle.snapshot(ns.name)
        if cur != prev:
            prev, since = cur, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
    raise AssertionError(f"namespace {ns.name} did not settle within {timeout} s")


class Host:
    """br0 (config policy): uplink up0 (an admin's static entry on it), tap0/tap1 of vm1,
    tapx of vm1 with promiscLinks='yes', tapz (nobody's tap, learning off, a static entry).
    nbr0 (network 'mgd', metadata policy): tap2 of vm2. brU (no policy): tapU of vm1 with a
    static entry. brF: a foreign bridge with ports, flags and entries. low0: lower device of
    vm3's macvtap mvt0 (config [direct.low0]). lowF/mvF: a foreign macvtap with a multicast
    address added by hand."""

    def __init__(self, ns: NetNS, tmp_path):
        self.ns = ns
        self.tmp = tmp_path
        self.config = tmp_path / "config.toml"
        self.config.write_text(CONFIG)
        self.state = tmp_path / "state"
        self.node = tmp_path / "node.xml"
        ns.add_bridge("br0")
        ns.add_veth("up0", "up0p", master="br0")
        ns.add_tap("tap0", "br0", address=tap_mac(A))
        ns.add_tap("tap1", "br0", address=tap_mac(B))
        ns.add_tap("tapx", "br0", address=tap_mac(X))
        ns.add_tap("tapz", "br0")
        ns.bridge("link", "set", "dev", "tapz", "learning", "off")
        ns.fdb_add("02:00:00:00:0f:01", "up0", "static")
        ns.fdb_add("02:00:00:00:0f:02", "tapz", "static", "sticky")
        ns.add_bridge("nbr0")
        ns.add_tap("tap2", "nbr0", address=tap_mac(C))
        ns.add_bridge("brU")
        ns.add_tap("tapU", "brU", address=tap_mac(U))
        ns.fdb_add("02:00:00:00:0f:03", "tapU", "static")
        ns.add_bridge("brF")
        ns.add_veth("upF", "upFp", master="brF")
        ns.add_tap("tapF1", "brF")
        ns.add_tap("tapF2", "brF")
        ns.bridge("link", "set", "dev", "tapF2", "learning", "off", "flood", "off")
        ns.fdb_add(guest_mac(0x40), "tapF2", "static")
        ns.fdb_add(guest_mac(0x41), "tapF1", "static", "sticky")
        ns.add_veth("low0", "low0p")
        ns.ip("link", "add", "link", "low0", "name", "mvt0", "type", "macvtap", "mode", "bridge")
        ns.ip("link", "set", "mvt0", "address", M, "up")
        ns.add_veth("lowF", "lowFp")
        ns.ip("link", "add", "link", "lowF", "name", "mvF", "type", "macvtap", "mode", "bridge")
        ns.ip("link", "set", "mvF", "up")
        ns.ip("maddr", "add", OTHER, "dev", "mvF")
        self.vm1 = domain_xml("vm1", [bridge_iface("br0", "tap0", A, "ua-net0"),
                                      bridge_iface("br0", "tap1", B, "ua-net1"),
                                      bridge_iface("br0", "tapx", X, "ua-net2"),
                                      bridge_iface("brU", "tapU", U, "ua-net3")],
                              metadata=policy_xml(interfaces={X: {"promiscLinks": "yes"}}))
        self.vm2 = domain_xml("vm2", [network_iface("mgd", "nbr0", "tap2", C, "ua-net0")])
        self.vm3 = domain_xml("vm3", [iface("direct", mac=M, target="mvt0", alias="ua-net0",
                                            source={"dev": "low0", "mode": "bridge"})])
        self.net = network_xml("mgd", "nbr0", forward=None,
                               metadata=policy_xml(promiscLinks="no"))
        self.set_domains(self.vm1, self.vm2, self.vm3)
        self.uri = f"test://{self.node}"
        settle(ns)

    def set_domains(self, *domains: str) -> None:
        self.node.write_text("<node>" + "".join(domains) + self.net + "</node>")

    def reconcile(self, *extra: str) -> tuple[int, dict]:
        p = self.ns.run([*netplug_cli(), "reconcile", "--connect", self.uri, "--config",
                         str(self.config), "--state-dir", str(self.state), "--no-guest-query",
                         "--json", *extra], timeout=60)
        assert not p.stderr, p.stderr.decode()
        return p.returncode, json.loads(p.stdout)

    def snapshot(self) -> dict:
        return oracle.snapshot(self.ns.name)

    def foreign(self, snap=None) -> dict:
        return oracle.view(snap or self.snapshot(), FOREIGN)

    def managed_ok(self, tap: str, mac: str) -> bool:
        return (oracle.static_macs(self.ns.name, tap) == {mac: []}
                and oracle.port_flags(self.ns.name, tap) == (False, False))


@pytest.fixture
def host(ns, tmp_path) -> Host:
    return Host(ns, tmp_path)


def changes(doc: dict) -> set[tuple[str, str, str]]:
    return {(c["device"], c["action"], c["description"]) for c in doc["changes"]}


def test_foreign_host_stays_bit_for_bit(host):
    before = host.snapshot()
    rc, doc = host.reconcile("--dry-run")
    assert rc == 2 and doc["status"] == "drift"
    assert oracle.diff(before, host.snapshot()) == []  # the dry run changed nothing
    rc, doc = host.reconcile()
    assert rc == 2 and doc["status"] == "repaired", doc
    assert {c["device"] for c in doc["changes"]} == {"tap0", "tap1", "tap2"}
    assert all(c["result"] == "applied" for c in doc["changes"])
    for tap, mac in (("tap0", A), ("tap1", B), ("tap2", C)):
        assert host.managed_ok(tap, mac), tap
    after = host.snapshot()
    assert oracle.diff(host.foreign(before), host.foreign(after)) == []
    assert after["links"]["br0"] == before["links"]["br0"]
    assert after["links"]["nbr0"] == before["links"]["nbr0"]
    # The guest MACs moved nowhere else; the bridges hold nothing else new.
    assert oracle.where_is(host.ns.name, A) == [("tap0", "static")]
    rc, doc = host.reconcile()
    assert rc == 0 and doc["status"] == "in-sync" and doc["changes"] == []
    assert oracle.diff(after, host.snapshot()) == []


def _flip(host, what):
    ns = host.ns
    if what == "learning-on":
        ns.bridge("link", "set", "dev", "tap1", "learning", "on")
        return {("tap1", "port-flags", "set learning off flood off on tap1")}
    if what == "flood-on":
        ns.bridge("link", "set", "dev", "tap1", "flood", "on")
        return {("tap1", "port-flags", "set learning off flood off on tap1")}
    if what == "entry-deleted":
        ns.bridge("fdb", "del", B, "dev", "tap1", "master")
        return {("tap1", "fdb-replace", f"add static FDB entry {B} on tap1")}
    if what == "entry-permanent":  # made host-local: frames would go to the host, not the guest
        ns.bridge("fdb", "replace", B, "dev", "tap1", "master", "permanent")
        return {("tap1", "fdb-replace", f"add static FDB entry {B} on tap1")}
    if what == "entry-learned-on-uplink":
        ns.bridge("fdb", "replace", B, "dev", "up0", "master", "dynamic")
        return {("tap1", "fdb-replace", f"add static FDB entry {B} on tap1")}
    if what == "hand-added-entry":  # an admin's own entry on a managed tap: not netplug's
        ns.bridge("fdb", "add", "02:00:00:00:0e:01", "dev", "tap1", "master", "static")
        return set()
    if what == "flags-and-entry-on-two-domains":
        ns.bridge("link", "set", "dev", "tap0", "learning", "on", "flood", "on")
        ns.bridge("fdb", "del", C, "dev", "tap2", "master")
        return {("tap0", "port-flags", "set learning off flood off on tap0"),
                ("tap2", "fdb-replace", f"add static FDB entry {C} on tap2")}
    if what == "multicast-deleted":
        ns.ip("maddr", "del", MDNS4, "dev", "mvt0")
        ns.ip("maddr", "add", OTHER, "dev", "mvt0")  # an admin's: not netplug's to remove
        return {("mvt0", "multicast-add", f"add multicast {MDNS4} to mvt0")}
    raise AssertionError(what)


def _seed_macvtap(uri: str, config: str, state: str, groups: tuple[str, ...]) -> int:
    """In the namespace: a reconcile that can ask "QEMU" (vm3's guest listens to groups)."""
    from libvirt_netplug.kernel import NetlinkKernel
    from libvirt_netplug.reconcile import read_inputs, reconcile
    from libvirt_netplug.rxfilter import RxFilter
    from libvirt_netplug.state import StateDir

    inputs = read_inputs(uri, config, guest_query=False)

    def rx_source(domain):
        return {"ua-net0": RxFilter("ua-net0", M, multicast_table=groups)} \
            if domain.name == "vm3" else {}

    with NetlinkKernel() as k:
        out = reconcile(k, StateDir(state), inputs.desired, rx_source=rx_source)
    assert not out.errors, out.lines()
    return out.exit_status


def _mcast(host, dev):
    return sorted(a for d, _r, _g, a in oracle.dev_mcast(host.ns.name) if d == dev)


@pytest.mark.parametrize("drift", ["learning-on", "flood-on", "entry-deleted", "entry-permanent",
                                   "entry-learned-on-uplink", "hand-added-entry",
                                   "flags-and-entry-on-two-domains", "multicast-deleted"])
def test_repairs_exactly_the_drift(host, drift):
    assert host.ns.call(_seed_macvtap, host.uri, str(host.config), str(host.state),
                        (MDNS4, MDNS6)) == 2
    for dev in ("mvt0", "low0"):  # the macvtap's list reaches its lower device
        assert {oracle.hexmac(MDNS4), oracle.hexmac(MDNS6)} <= set(_mcast(host, dev)), dev
    rc, doc = host.reconcile()
    assert rc == 0, doc  # the seed left everything in sync
    foreign = host.foreign()
    expected = _flip(host, drift)
    drifted = host.snapshot()
    rc, doc = host.reconcile("--dry-run")
    assert rc == (2 if expected else 0), doc
    assert changes(doc) == expected
    assert host.snapshot() == drifted  # dry run: nothing changed
    rc, doc = host.reconcile()
    assert rc == (2 if expected else 0), doc
    assert changes(doc) == expected
    assert {c["result"] for c in doc["changes"]} <= {"applied"}
    for tap, mac in (("tap0", A), ("tap2", C)):
        assert host.managed_ok(tap, mac), tap
    if drift == "hand-added-entry":
        assert oracle.static_macs(host.ns.name, "tap1") == {B: [], "02:00:00:00:0e:01": []}
    else:
        assert host.managed_ok("tap1", B)
    if drift == "entry-learned-on-uplink":
        assert oracle.where_is(host.ns.name, B) == [("tap1", "static")]
    mc = _mcast(host, "mvt0")
    assert oracle.hexmac(MDNS4) in mc and oracle.hexmac(MDNS6) in mc
    if drift == "multicast-deleted":
        assert oracle.hexmac(OTHER) in mc  # the admin's address stays
    assert oracle.diff(foreign, host.foreign()) == []
    after = host.snapshot()
    rc, doc = host.reconcile()
    assert rc == 0 and doc["changes"] == [], doc
    assert host.snapshot() == after


def test_guest_filter_change_follows_the_guest(host):
    assert host.ns.call(_seed_macvtap, host.uri, str(host.config), str(host.state),
                        (MDNS4, MDNS6)) == 2
    host.ns.ip("maddr", "add", OTHER, "dev", "mvt0")  # somebody else's, same group later
    assert host.ns.call(_seed_macvtap, host.uri, str(host.config), str(host.state),
                        (MDNS6, "01:00:5e:00:00:fc")) == 2
    mc = _mcast(host, "mvt0")
    assert oracle.hexmac(MDNS4) not in mc
    assert {oracle.hexmac(MDNS6), oracle.hexmac("01:00:5e:00:00:fc"), oracle.hexmac(OTHER)} <= set(mc)


def test_stopped_domain_stale_entries_are_undone(host):
    rc, _ = host.reconcile()
    assert rc == 2
    foreign = host.foreign()
    # vm1 stopped, but its taps are still there (no hook ran: not installed, or crashed).
    host.set_domains(stopped(host.vm1), host.vm2, host.vm3)
    rc, doc = host.reconcile("--dry-run")
    assert rc == 2 and all(not c["domain_running"] for c in doc["changes"])
    rc, doc = host.reconcile()
    assert rc == 2, doc
    assert changes(doc) == {
        ("tap0", "port-flags", "set learning on flood on on tap0"),
        ("tap1", "port-flags", "set learning on flood on on tap1"),
        ("tap0", "fdb-delete", f"delete FDB entry {A} on tap0"),
        ("tap1", "fdb-delete", f"delete FDB entry {B} on tap1")}
    for tap in ("tap0", "tap1"):
        assert oracle.static_macs(host.ns.name, tap) == {}
        assert oracle.port_flags(host.ns.name, tap) == (True, True)
    assert host.managed_ok("tap2", C)
    assert not (host.state / "domains" / "vm1.json").exists()
    assert oracle.diff(foreign, host.foreign()) == []
    assert host.reconcile()[0] == 0
    # A stopped domain whose taps are gone (the usual case) leaves nothing to do.
    host.set_domains(host.vm1, host.vm2, host.vm3)
    assert host.reconcile()[0] == 2
    host.set_domains(host.vm1, stopped(host.vm2), host.vm3)
    host.ns.del_link("tap2")
    rc, doc = host.reconcile()
    assert rc == 0 and doc["changes"] == [], doc
    assert not (host.state / "domains" / "vm2.json").exists()


def test_waits_for_the_hooks_lock(host):
    from libvirt_netplug.state import StateDir

    with StateDir(str(host.state)).lock():
        p = host.ns.popen([*netplug_cli(), "reconcile", "--connect", host.uri, "--config",
                           str(host.config), "--state-dir", str(host.state),
                           "--no-guest-query"], stdout=-1, stderr=-1)
        time.sleep(1.5)
        assert p.poll() is None, "reconcile did not wait for the lock"
        assert oracle.port_flags(host.ns.name, "tap0") == (True, True)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 2, err
    assert host.managed_ok("tap0", A)


def test_concurrent_with_hooks(ns, tmp_path, hooks):
    """Hooks (starting guests) and reconcile runs at once, one state dir: nothing is lost."""
    ns.add_bridge("br0")
    ns.add_veth("up0", "up0p", master="br0")
    hooks.write_config('[bridge.br0]\npromiscLinks = "no"\n')
    doms, taps = [], {}
    for i in range(6):
        mac = guest_mac(0x100 + i)
        ns.add_tap(f"tap{i}", "br0", address=tap_mac(mac))
        taps[f"tap{i}"] = mac
        doms.append(domain_xml(f"vm{i}", [bridge_iface("br0", f"tap{i}", mac, "ua-net0")]))
    node = tmp_path / "node.xml"
    node.write_text("<node>" + "".join(doms) + "</node>")
    argv = [*netplug_cli(), "reconcile", "--connect", f"test://{node}", "--config",
            hooks.config, "--state-dir", hooks.state_dir, "--no-guest-query"]
    procs = []
    for i, xml in enumerate(doms):
        procs.append(("hook", hooks.spawn("qemu", f"vm{i}", "start", xml)))
        procs.append(("reconcile", ns.popen(argv, stdout=-1, stderr=-1)))
    for i, (kind, p) in enumerate(procs):
        if kind == "hook":
            out, err = p.communicate(doms[i // 2].encode(), timeout=60)
            assert p.returncode == 0 and b"ERROR" not in err, err
        else:
            out, err = p.communicate(timeout=60)
            assert p.returncode in (0, 2), (out, err)
    p = ns.run(argv)
    assert p.returncode == 0, p.stdout.decode() + p.stderr.decode()
    for tap, mac in taps.items():
        assert oracle.static_macs(ns.name, tap) == {mac: []}
        assert oracle.port_flags(ns.name, tap) == (False, False)
        rec = hooks.domain_record(f"vm{tap[3:]}")
        assert rec and rec["ports"][tap]["mac"] == mac
