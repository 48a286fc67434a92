"""A libvirt host in a network namespace, driven one event at a time, with the invariants netplug
owes it checked after every step (issue 10 item 9). Used by the stateful test
(test_invariants.py) and by the plain regression tests it produced
(test_invariant_regressions.py).

The host (built fresh per example; every address fixed, so a failure reads the same every run):

  br0   host bridge managed by the config ([bridge.br0] promiscLinks = "no")
        up0   veth uplink (peer up0p); an admin's static entry FOREIGN_UP on it
        ftap  foreign tap: learning/flood off by hand, a static sticky entry FOREIGN_F
        itap  idle foreign tap, flags as created, no entry
        guest taps of <interface type='bridge'><source bridge='br0'/>
  nbr0  bridge of libvirt network 'mgd' (metadata policy promiscLinks='no')
        guest taps of <interface type='network'><source network='mgd'/>
  brU   bridge nobody manages
        upU   veth uplink (peer upUp); a static sticky entry FOREIGN_UU
        fU    foreign tap: learning off by hand, a static entry FOREIGN_FU
        guest taps of <interface type='bridge'><source bridge='brU'/> (never managed, unless
        the domain's own metadata asks for it)

What libvirtd does, modelled: a guest's taps are created (address: the guest MAC with first
byte 0xfe, enslaved, up) after `network port-created` and before `qemu start begin`; they are
deleted after `qemu stopped end` and before `network port-deleted` and `qemu release end`.
Hooks run in-process (HookRig.run_inprocess: fork + hook.main, what the shim calls).

The model keeps, per guest interface, what it must look like: MANAGED (exactly its static entry
for the guest MAC on its own tap, learning and flood off), UNTOUCHED (as libvirt made it), or
EITHER (one of those two, never half: a guest that started while the config or its policy was
invalid). An interface becomes "dirty" when a hook was killed in the middle of its domain's
event or somebody changed its port by hand: it may then hold only its own entry and any flags,
until the next hook, stop or reconcile of its domain must converge it. Expectations change only
when a hook (or reconcile) for that domain completes, from the policy in force at that moment;
an invalid config or domain policy keeps what was applied (issue 10 item 3: fail closed).

Everything is read through tests/oracle.py (iproute2 JSON), never through netplug's own view.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from typing import Any

import oracle
from fakes import (bridge_iface, domain_xml, hookdata, network_iface, network_xml,
                   networkport_xml, policy_xml, tap_mac)
from netns import HookRig, HookRun, NetNS
from polling import wait_for

MANAGED, UNTOUCHED, EITHER = "managed", "untouched", "either"

BR0_ADDR = "02:00:00:00:b0:00"
NBR0_ADDR = "02:00:00:00:b1:00"
BRU_ADDR = "02:00:00:00:b2:00"
UP0_ADDR = "02:00:00:00:a0:01"
FTAP_ADDR = "02:00:00:00:a0:03"
ITAP_ADDR = "02:00:00:00:a0:04"
FOREIGN_UP = "02:00:00:00:0f:01"  # an admin's static entry on the uplink
FOREIGN_F = "02:00:00:00:0f:02"  # static sticky, on the foreign tap
FOREIGN_UU = "02:00:00:00:0f:03"  # static sticky, on the unmanaged bridge's uplink
FOREIGN_FU = "02:00:00:00:0f:04"  # static, on the unmanaged bridge's foreign tap
EVIL_MAC = "52:54:00:ee:ee:01"

FOREIGN_DEVS = ("br0", "up0", "up0p", "ftap", "itap", "nbr0", "brU", "upU", "upUp", "fU")
BRIDGE_OF_KIND = {"br0": "br0", "net": "nbr0", "brU": "brU"}

# Port options iproute2 reports that no hook may change (learning/flood are checked apart);
# "state" and "flags" follow carrier, which libvirt's taps (nobody attached) never get.
PORT_VOLATILE = ("state", "flags")
# Link fields that move by themselves (carrier, counters) or are the device's identity.
LINK_KEYS = ("address", "master", "mtu", "promiscuity", "allmulti", "link")
BRIDGE_KEYS = ("vlan_filtering", "stp_state", "ageing_time", "forward_delay", "group_fwd_mask",
               "mcast_snooping", "no_linklocal_learn")

NETWORK = "mgd"
# The network's metadata policy (net-update/net-define + the `updated` hook): promiscLinks.
NET_POLICIES = {"no": "no", "yes": "yes", "invalid": "maybe"}


def network_doc(policy: str = "no") -> str:
    return network_xml(NETWORK, "nbr0", forward=None,
                       metadata=policy_xml(promiscLinks=NET_POLICIES[policy]))

# Config file variants: (text, valid, br0 managed, sticky)
CONFIGS: dict[str, tuple[str, bool, bool, bool]] = {
    "managed": ('[bridge.br0]\npromiscLinks = "no"\n', True, True, False),
    "sticky": ('[bridge.br0]\npromiscLinks = "no"\nsticky = "yes"\n', True, True, True),
    "unmanaged": ("# br0 is not managed any more\n", True, False, False),
    "unknown-key": ('[bridge.br0]\npromiscLinks = "no"\npromiscLink = "no"\n', False, True,
                    False),
    "bad-value": ('[bridge.br0]\npromiscLinks = "nope"\n', False, True, False),
    "bad-toml": ('[bridge.br0\npromiscLinks = "no"\n', False, True, False),
    "unknown-section": ('[bridge.br0]\npromiscLinks = "no"\n[bridges.br1]\nx = 1\n', False,
                        True, False),
}
VALID_CONFIGS = tuple(k for k, v in CONFIGS.items() if v[1])
INVALID_CONFIGS = tuple(k for k, v in CONFIGS.items() if not v[1])
# Domain <metadata> variants, set live (virsh metadata --live): seen by the next event.
METAS = ("none", "first-yes", "all-no", "invalid")

TEST_NS = "http://libvirt.org/schemas/domain/test/1.0"


class InvariantViolation(AssertionError):
    pass


@dataclass
class Iface:
    domain: str
    index: int
    kind: str  # "br0" | "net" | "brU"
    tap: str
    mac: str
    exp: str = UNTOUCHED
    sticky: bool | None = False  # None: either (an EITHER interface)
    dirty: bool = False
    fresh: bool = True  # no hook has completed for it since its tap was created

    @property
    def bridge(self) -> str:
        return BRIDGE_OF_KIND[self.kind]

    @property
    def alias(self) -> str:
        return f"net{self.index}"

    @property
    def portid(self) -> str:
        d, i = int(self.domain[2:]), self.index
        return f"9e1c9f3c-0000-4000-8000-0000000{d:02d}{i:03d}"


@dataclass
class Dom:
    name: str
    ifaces: list[Iface]
    phase: str = "off"  # off | running | stopped (stopped hook ran; taps still there)
    meta: str = "none"

    @property
    def uuid(self) -> str:
        return f"00000000-0000-4000-8000-{int(self.name[2:]):012d}"


@dataclass
class Evil:
    """A domain whose XML someone hostile wrote (issue 10 items 1-2): its <target dev> names a
    device that is not its own tap, or its MAC is an address somebody else owns. Its domain
    policy says promiscLinks='no' for every interface."""

    source: str  # <source bridge>
    target: str  # <target dev>
    mac: str
    own_tap: bool  # libvirt made it a tap of its own (evtap)
    phase: str = "off"

    TAP = "evtap"

    def xml(self) -> str:
        return domain_xml("evil", [bridge_iface(self.source, self.target, self.mac, "net0")],
                          uuid="00000000-0000-4000-8000-0000000000ee",
                          metadata=policy_xml(promiscLinks="no"))


def mac_of(d: int, i: int) -> str:
    return f"52:54:00:00:{d + 1:02x}:{i + 1:02x}"


def make_domains(spec: list[list[str]]) -> list[Dom]:
    """spec: per domain, the kind of each interface ("br0", "net" or "brU")."""
    doms = []
    for d, kinds in enumerate(spec):
        name = f"vm{d}"
        doms.append(Dom(name, [Iface(name, i, k, f"vn{d}{i}", mac_of(d, i))
                               for i, k in enumerate(kinds)]))
    return doms


# -- running code in the namespace -------------------------------------------------------------


def _hook_killed(argv: list[str], kind: str, data: bytes, config: str, state_dir: str,
                 kill_after: int, out_path: str, err_path: str) -> None:
    """In the child: hook.main as the shim calls it, killed (exit 137, like SIGKILL: no
    cleanup, no flush) right after its ``kill_after``-th kernel write request. Only this
    child's copy of Netlink.request is wrapped; the production code knows nothing of it."""
    import io

    from libvirt_netplug import hook, netlink

    original = netlink.Netlink.request
    calls = [0]

    def request(self, *a, **kw):
        try:
            return original(self, *a, **kw)
        finally:
            calls[0] += 1
            if calls[0] == kill_after:
                os._exit(137)

    netlink.Netlink.request = request
    out = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(out, 1)
    with open(err_path, "w", buffering=1) as err:  # line-buffered: survives os._exit
        rc = hook.main(argv, io.BytesIO(data), err, kind=kind, config=config,
                       state_dir=state_dir)
    if rc:
        raise AssertionError(f"hook exit status {rc}")


def _reconcile(argv: list[str], out_path: str, err_path: str) -> int:
    """In the child: `netplug reconcile ARGV` (cli.main), stdout/stderr into files."""
    import sys

    from libvirt_netplug import cli

    with open(out_path, "w") as out, open(err_path, "w") as err:
        sys.stdout, sys.stderr = out, err
        rc = cli.main(argv)
        out.flush()
        err.flush()
    return rc


class InprocessRig(HookRig):
    """HookRig without installing the shims (`netplug install-hooks`, a subprocess that costs
    a third of a new host): every hook here runs in-process (run_inprocess); other tests run
    the real shims."""

    def install(self) -> None:
        pass  # the paths only: run_inprocess needs no shim


# -- the world ---------------------------------------------------------------------------------


class World:
    def __init__(self, ns: NetNS, root: str, domains: list[Dom]):
        self.ns = ns
        self.root = root
        self.doms = {d.name: d for d in domains}
        self.steps: list[str] = []
        self.config = "managed"
        self.net_policy = "no"
        self.evil: Evil | None = None
        self.rig = InprocessRig(ns, root)
        self.node = os.path.join(root, "node.xml")
        self._build()
        self.rig.write_config(CONFIGS[self.config][0])
        self._hook("network", NETWORK, "start", hookdata(network_doc(self.net_policy)))
        self._hook("network", NETWORK, "started", hookdata(network_doc(self.net_policy)))
        snap = oracle.snapshot(ns.name)
        self.base_foreign = self._foreign_view(snap)
        self.base_entries = {e for e in self._entries(snap)
                             if e[0] in FOREIGN_DEVS}
        self.default_port = self._port_options(snap["ports"]["itap"])

    # -- topology ------------------------------------------------------------------------------

    def _build(self) -> None:
        # Two batches (one `ip`, one `bridge` process) instead of ~25 commands: a new host is
        # built for every example, and shrinking a failure builds hundreds.
        ip = []
        for br, addr in (("br0", BR0_ADDR), ("nbr0", NBR0_ADDR), ("brU", BRU_ADDR)):
            ip += [f"link add {br} address {addr} type bridge forward_delay 0",
                   f"link set {br} up"]
        for dev, peer, br, a, b in (("up0", "up0p", "br0", UP0_ADDR, "02:00:00:00:a0:02"),
                                    ("upU", "upUp", "brU", "02:00:00:00:a0:05",
                                     "02:00:00:00:a0:06")):
            ip += [f"link add {dev} address {a} type veth peer name {peer} address {b}",
                   f"link set {dev} master {br} up", f"link set {peer} up"]
        for tap, br, addr in (("ftap", "br0", FTAP_ADDR), ("itap", "br0", ITAP_ADDR),
                              ("fU", "brU", "02:00:00:00:a0:07")):
            ip += [f"tuntap add dev {tap} mode tap",
                   f"link set {tap} address {addr} master {br} up"]
        self._batch("ip", ip)
        self._batch("bridge", [
            "link set dev ftap learning off flood off",
            "link set dev fU learning off",
            f"fdb add {FOREIGN_UP} dev up0 master static",
            f"fdb add {FOREIGN_F} dev ftap master static sticky",
            f"fdb add {FOREIGN_UU} dev upU master static sticky",
            f"fdb add {FOREIGN_FU} dev fU master static"])

    def _batch(self, tool: str, lines: list[str]) -> None:
        p = subprocess.run([tool, "-n", self.ns.name, "-batch", "-"], input="\n".join(lines),
                           capture_output=True, text=True, timeout=30)
        if p.returncode != 0:
            raise AssertionError(f"{tool} -batch in {self.ns.name}: {p.stderr.strip()}")

    def _create_taps(self, dom: Dom) -> None:
        # As libvirt does: a tap with the guest MAC's 0xfe twin, enslaved, up.
        self._batch("ip", [cmd for f in dom.ifaces for cmd in (
            f"tuntap add dev {f.tap} mode tap",
            f"link set {f.tap} address {tap_mac(f.mac)} master {f.bridge} up")])

    def _delete_taps(self, dom: Dom) -> None:
        self._batch("ip", [f"link del {f.tap}" for f in dom.ifaces])

    # -- XML -----------------------------------------------------------------------------------

    def domain_xml(self, dom: Dom) -> str:
        ifaces = []
        for f in dom.ifaces:
            if f.kind == "net":
                ifaces.append(network_iface(NETWORK, "nbr0", f.tap, f.mac, f.alias,
                                            portid=f.portid))
            else:
                ifaces.append(bridge_iface(f.bridge, f.tap, f.mac, f.alias))
        meta = {"none": "",
                "first-yes": policy_xml(interfaces={dom.ifaces[0].mac: {"promiscLinks": "yes"}}),
                "all-no": policy_xml(promiscLinks="no"),
                "invalid": policy_xml(promiscLinks="maybe")}[dom.meta]
        return domain_xml(dom.name, ifaces, uuid=dom.uuid, metadata=meta)

    def port_xml(self, dom: Dom, f: Iface) -> str:
        port = networkport_xml(dom.name, f.mac, NETWORK, "nbr0", uuid=f.portid)
        return hookdata(network_doc(self.net_policy), port)

    # -- hooks ---------------------------------------------------------------------------------

    def _hook(self, kind: str, obj: str, op: str, xml: str, subop: str = "begin",
              may_fail: bool = False) -> HookRun:
        r = self.rig.run_inprocess(kind, obj, op, xml, subop)
        problems = []
        if r.rc != 0 and not (may_fail and r.rc == 1):
            problems.append(f"exit status {r.rc}")
        if r.stdout:
            problems.append(f"wrote to stdout: {r.stdout[:200]!r}")
        if "Traceback" in r.stderr:
            problems.append("a traceback on stderr")
        if problems:
            raise InvariantViolation(f"{kind} {obj} {op} {subop}: {'; '.join(problems)}\n"
                                     f"{r}\n{self._history()}")
        return r

    def _hook_killed(self, kind: str, obj: str, op: str, xml: str, subop: str,
                     kill_after: int) -> bool:
        """Run a hook that dies right after its kill_after-th kernel write; True if it died
        (False: it made fewer writes and finished)."""
        argv = self.rig.argv(kind, obj, op, subop)
        out, err = os.path.join(self.root, "killed.out"), os.path.join(self.root, "killed.err")
        status, _ = self.ns.fork_call(_hook_killed, argv, kind, xml.encode(), self.rig.config,
                                      self.rig.state_dir, kill_after, out, err, timeout=60)
        with open(out, "rb") as f:
            stdout = f.read()
        with open(err) as f:
            stderr = f.read()
        if stdout or "Traceback" in stderr or status not in (0, 137):
            raise InvariantViolation(f"{kind} {obj} {op} (to be killed after write "
                                     f"{kill_after}): status {status}, stdout {stdout[:200]!r}"
                                     f"\n{stderr}\n{self._history()}")
        return status == 137

    # -- the model: what a completed event means ----------------------------------------------

    @property
    def config_valid(self) -> bool:
        return CONFIGS[self.config][1]

    def desired(self, dom: Dom, f: Iface) -> tuple[str, bool] | None:
        """What the policy in force says for this interface; None: the config or the domain
        policy is invalid, so whatever was applied is kept."""
        if not self.config_valid or dom.meta == "invalid" or (
                f.kind == "net" and self.net_policy == "invalid"):
            return None
        _text, _valid, br0_managed, sticky = CONFIGS[self.config]
        promisc: bool | None = None  # promiscLinks, through the layers
        if f.kind == "br0":
            promisc = False if br0_managed else None
        elif f.kind == "net":
            promisc = self.net_policy == "yes"
        if dom.meta == "all-no":
            promisc = False
        if dom.meta == "first-yes" and f.index == 0:
            promisc = True
        if promisc is False:
            return MANAGED, (sticky if f.kind == "br0" else False)
        return UNTOUCHED, False

    def _applied(self, dom: Dom) -> None:
        """A start/started/reconnect (or reconcile) of ``dom`` completed."""
        for f in dom.ifaces:
            want = self.desired(dom, f)
            if want is None:
                if f.fresh:
                    f.exp, f.sticky = EITHER, None
            else:
                f.exp, f.sticky = want
                f.dirty = False
            f.fresh = False

    def _cleaned(self, dom: Dom) -> None:
        for f in dom.ifaces:
            f.exp, f.sticky, f.dirty, f.fresh = UNTOUCHED, False, False, False

    def _killed(self, dom: Dom) -> None:
        for f in dom.ifaces:
            f.dirty = True

    # -- steps: a guest's life ----------------------------------------------------------------

    def _log(self, step: str) -> None:
        self.steps.append(step)

    def boot(self, name: str, kill_after: int | None = None) -> None:
        """virsh start: port-created for each network interface, the taps, `start begin`."""
        dom = self.doms[name]
        assert dom.phase == "off"
        self._log(f"boot({name!r}, kill_after={kill_after})")
        for f in dom.ifaces:
            if f.kind == "net":
                self._hook("network", NETWORK, "port-created", self.port_xml(dom, f))
        self._create_taps(dom)
        for f in dom.ifaces:
            f.exp, f.sticky, f.dirty, f.fresh = UNTOUCHED, False, False, True
        dom.phase = "running"
        self._qemu(dom, "start", kill_after)
        self.check(self.steps[-1])

    def _qemu(self, dom: Dom, op: str, kill_after: int | None) -> None:
        subop = "end" if op in ("stopped", "release") else "begin"
        xml = self.domain_xml(dom)
        if kill_after is not None and self._hook_killed("qemu", dom.name, op, xml, subop,
                                                        kill_after):
            self._log(f"  ({op} of {dom.name} killed after kernel write {kill_after})")
            self._killed(dom)
            return
        self._hook("qemu", dom.name, op, xml, subop)
        if op == "stopped":
            self._cleaned(dom)
        elif op in ("start", "started", "reconnect"):
            self._applied(dom)

    def event(self, name: str, op: str, kill_after: int | None = None) -> None:
        """started or reconnect of a running guest."""
        dom = self.doms[name]
        assert dom.phase == "running" and op in ("started", "reconnect")
        self._log(f"event({name!r}, {op!r}, kill_after={kill_after})")
        self._qemu(dom, op, kill_after)
        self.check(self.steps[-1])

    def stop(self, name: str, kill_after: int | None = None) -> None:
        """`qemu stopped end`, while the taps still exist: they must be as libvirt made them."""
        dom = self.doms[name]
        assert dom.phase == "running"
        self._log(f"stop({name!r}, kill_after={kill_after})")
        dom.phase = "stopped"
        self._qemu(dom, "stopped", kill_after)
        self.check(self.steps[-1])

    def release(self, name: str) -> None:
        """The taps go, then port-deleted for each network interface, then `release end`."""
        dom = self.doms[name]
        assert dom.phase == "stopped"
        self._log(f"release({name!r})")
        self._delete_taps(dom)
        dom.phase = "off"
        for f in dom.ifaces:
            if f.kind == "net":
                self._hook("network", NETWORK, "port-deleted", self.port_xml(dom, f))
        self._hook("qemu", dom.name, "release", self.domain_xml(dom), "end")
        self._cleaned(dom)
        self.check(self.steps[-1])

    def network_restart(self) -> None:
        """The network driver restarts: `network started`, then port-created for every port."""
        self._log("network_restart()")
        self._hook("network", NETWORK, "started", hookdata(network_doc(self.net_policy)))
        for dom in self.doms.values():
            if dom.phase == "running":
                for f in dom.ifaces:
                    if f.kind == "net":
                        self._hook("network", NETWORK, "port-created", self.port_xml(dom, f))
        # A re-plug may repair a port but promises nothing new: expectations stay.
        self.check(self.steps[-1])

    def network_update(self, variant: str) -> None:
        """The network's policy edited (virsh net-update / net-edit): the `updated` hook."""
        self._log(f"network_update({variant!r})")
        self.net_policy = variant
        self._hook("network", NETWORK, "updated", hookdata(network_doc(variant)))
        if variant == "yes":
            # No longer managed: its ports may be handed back now or at their next event.
            for dom in self.doms.values():
                if dom.phase != "running":
                    continue
                for f in dom.ifaces:
                    if f.kind == "net" and not f.dirty and f.exp == MANAGED:
                        f.exp, f.sticky = EITHER, None
        self.check(self.steps[-1])

    # -- steps: the operator -------------------------------------------------------------------

    def edit_config(self, variant: str) -> None:
        self._log(f"edit_config({variant!r})")
        self.config = variant
        self.rig.write_config(CONFIGS[variant][0])
        self.check(self.steps[-1])

    def edit_meta(self, name: str, variant: str) -> None:
        """virsh metadata --live: the next event of the domain sees it."""
        self._log(f"edit_meta({name!r}, {variant!r})")
        self.doms[name].meta = variant
        self.check(self.steps[-1])

    def drift_flags(self, name: str, index: int, learning: bool, flood: bool) -> None:
        f = self.doms[name].ifaces[index]
        self._log(f"drift_flags({name!r}, {index}, learning={learning}, flood={flood})")
        self.ns.bridge("link", "set", "dev", f.tap, "learning", "on" if learning else "off",
                       "flood", "on" if flood else "off")
        f.dirty = True
        self.check(self.steps[-1])

    def drift_fdb(self, name: str, index: int, how: str) -> None:
        """how: "delete" the guest's entry, or "move" it (learned on the uplink instead)."""
        f = self.doms[name].ifaces[index]
        self._log(f"drift_fdb({name!r}, {index}, {how!r})")
        if how == "delete":
            self.ns.bridge("fdb", "del", f.mac, "dev", f.tap, "master")
        else:
            up = {"br0": "up0", "brU": "upU", "net": None}[f.kind]
            if up is None:  # nbr0 has no uplink: the entry is simply gone
                self.ns.bridge("fdb", "del", f.mac, "dev", f.tap, "master")
            else:
                # The kernel learns (and lets one add a learned entry) only on a forwarding
                # port: the uplink gets there a moment after the host is built.
                wait_for(lambda: oracle.bridge_links(self.ns.name)[up].get("state") ==
                         "forwarding", timeout=5, what=f"{up} forwarding")
                self.ns.bridge("fdb", "replace", f.mac, "dev", up, "master", "dynamic")
        f.dirty = True
        self.check(self.steps[-1])

    def reconcile(self) -> int:
        """`netplug reconcile` against libvirt's test driver holding the same domains."""
        self._log("reconcile()")
        self._write_node()
        out, err = os.path.join(self.root, "rec.out"), os.path.join(self.root, "rec.err")
        argv = ["reconcile", "--connect", f"test://{self.node}", "--config", self.rig.config,
                "--state-dir", self.rig.state_dir, "--no-guest-query"]
        status, rc = self.ns.fork_call(_reconcile, argv, out, err, timeout=60)
        with open(err) as f:
            stderr = f.read()
        if status != 0 or rc not in (0, 1, 2) or "Traceback" in stderr:
            raise InvariantViolation(f"reconcile: status {status}, exit {rc}\n{stderr}\n"
                                     f"{self._history()}")
        if self.config_valid:
            for dom in self.doms.values():
                if dom.phase == "running":
                    self._applied(dom)
                elif dom.phase == "stopped":
                    self._cleaned(dom)
        self.check(self.steps[-1])
        return rc

    def _write_node(self) -> None:
        doms = []
        for dom in self.doms.values():
            xml = self.domain_xml(dom)
            if dom.phase != "running":
                xml = xml.replace("<domain type='qemu'>",
                                  f"<domain type='qemu' xmlns:test='{TEST_NS}'>").replace(
                    "</name>", "</name><test:runstate>5</test:runstate>", 1)
            doms.append(xml)
        if self.evil is not None and self.evil.phase == "running":
            doms.append(self.evil.xml())
        with open(self.node, "w") as f:
            f.write("<node>" + "".join(doms) + network_doc(self.net_policy) + "</node>")

    # -- steps: someone hostile ----------------------------------------------------------------

    def evil_start(self, source: str, target: str, mac: str) -> None:
        """A domain with hostile XML starts: start and started hooks."""
        assert self.evil is None or self.evil.phase == "off"
        own = target == Evil.TAP
        self.evil = Evil(source, target, mac, own)
        self._log(f"evil_start({source!r}, {target!r}, {mac!r})")
        if own:
            self.ns.add_tap(Evil.TAP, source, address=tap_mac(mac))
        self.evil.phase = "running"
        xml = self.evil.xml()
        self._hook("qemu", "evil", "start", xml, may_fail=True)
        self._hook("qemu", "evil", "started", xml, may_fail=True)
        self.check(self.steps[-1])

    def evil_event(self, op: str) -> None:
        assert self.evil is not None and self.evil.phase == "running"
        self._log(f"evil_event({op!r})")
        self._hook("qemu", "evil", op, self.evil.xml(), may_fail=op != "reconnect")
        self.check(self.steps[-1])

    def evil_stop(self) -> None:
        assert self.evil is not None and self.evil.phase == "running"
        self._log("evil_stop()")
        xml = self.evil.xml()
        self._hook("qemu", "evil", "stopped", xml, "end")
        if self.evil.own_tap:
            self.ns.del_link(Evil.TAP)
        self._hook("qemu", "evil", "release", xml, "end")
        self.evil.phase = "off"
        self.check(self.steps[-1])

    def stolen_macs(self) -> set[str]:
        """Addresses a running hostile domain uses, its MAC and its tap's (their owners may not
        boot meanwhile: which of two guests with one MAC gets it is first come, first served,
        and of two ports with one address the bridge keeps one local entry)."""
        if self.evil is None or self.evil.phase != "running":
            return set()
        return {self.evil.mac, tap_mac(self.evil.mac)}

    def may_boot(self, dom: Dom) -> bool:
        stolen = self.stolen_macs()
        return not any({f.mac, tap_mac(f.mac)} & stolen for f in dom.ifaces)

    # -- the invariants -----------------------------------------------------------------------

    @staticmethod
    def _entries(snap: dict) -> set[tuple[str, str, str, bool]]:
        """Bridge-table entries that are not learned: (port, mac, state, sticky)."""
        out = set()
        for e in snap["fdb"]:
            # Learned entries: iproute2 prints their state as "" (no NUD flag it names).
            if not e.get("master") or e.get("state", "") in ("", "dynamic"):
                continue
            out.add((e["ifname"], e["mac"], e["state"], "sticky" in e.get("flags", [])))
        return out

    @staticmethod
    def _port_options(port: dict) -> dict:
        return {k: v for k, v in port.items()
                if k not in PORT_VOLATILE + ("ifindex", "ifname", "master", "learning", "flood")}

    @staticmethod
    def _foreign_view(snap: dict) -> dict:
        view = {}
        for dev in FOREIGN_DEVS:
            link = snap["links"].get(dev, {})
            rec = {k: link.get(k) for k in LINK_KEYS}
            data = link.get("linkinfo", {}).get("info_data", {})
            if link.get("linkinfo", {}).get("info_kind") == "bridge":
                rec["bridge"] = {k: data.get(k) for k in BRIDGE_KEYS}
            port = snap["ports"].get(dev)
            rec["port"] = {k: v for k, v in port.items() if k not in PORT_VOLATILE} \
                if port else None
            rec["mcast"] = sorted(r for r in snap["dev_mcast"] if r[0] == dev)
            view[dev] = rec
        return view

    def _history(self) -> str:
        return "steps so far:\n  " + "\n  ".join(self.steps)

    def check(self, step: str) -> None:
        snap = oracle.snapshot(self.ns.name)
        problems = self.problems(snap)
        if problems:
            raise InvariantViolation(f"after {step}:\n  - " + "\n  - ".join(problems) +
                                     f"\n{self._history()}")

    def problems(self, snap: dict) -> list[str]:
        out = []
        # 1. Foreign state, bit for bit (flags, options, addresses, multicast lists).
        now = self._foreign_view(snap)
        for dev in FOREIGN_DEVS:
            for d in oracle.diff(self.base_foreign[dev], now[dev], f"{dev}"):
                out.append(f"foreign device changed: {d}")
        # 2. Every non-learned bridge-table entry is accounted for.
        actual = self._entries(snap)
        required = set(self.base_entries)
        optional: set[tuple[str, str, str, bool]] = set()
        guest_taps: dict[str, tuple[Iface | None, str]] = {}
        for dom in self.doms.values():
            if dom.phase == "off":
                continue
            for f in dom.ifaces:
                guest_taps[f.tap] = (f, dom.name)
                required.add((f.tap, tap_mac(f.mac), "permanent", False))
                if f.dirty:
                    optional |= {(f.tap, f.mac, "static", s) for s in (False, True)}
                elif f.exp == MANAGED:
                    required.add((f.tap, f.mac, "static", bool(f.sticky)))
                elif f.exp == EITHER:
                    optional |= {(f.tap, f.mac, "static", s) for s in (False, True)}
        ev = self.evil
        if ev is not None and ev.phase == "running" and ev.own_tap:
            # Its own tap: whatever its own MAC may legitimately get (nobody else holds it)
            # is allowed; what it must never get is somebody else's entry (checked above).
            # Its own address is a local entry unless a guest's tap has the same address
            # (a stolen MAC gives the same 0xfe twin): then the bridge keeps the first one.
            optional.add((Evil.TAP, tap_mac(ev.mac), "permanent", False))
            optional |= {(Evil.TAP, ev.mac, "static", s) for s in (False, True)}
        for e in sorted(required - actual):
            owner = f" ({guest_taps[e[0]][1]}'s)" if e[0] in guest_taps else ""
            out.append(f"missing entry{owner}: {e[1]} {e[2]}{' sticky' if e[3] else ''} "
                       f"on {e[0]}")
        for e in sorted(actual - required - optional):
            out.append(f"unexpected entry: {e[1]} {e[2]}{' sticky' if e[3] else ''} on {e[0]}")
        # 3. Guest taps: flags as expected, every other port option as created.
        for tap, (f, dname) in sorted(guest_taps.items()):
            port = snap["ports"].get(tap)
            if port is None:
                out.append(f"{dname}'s tap {tap} is not a bridge port any more")
                continue
            if port.get("master") != f.bridge:
                out.append(f"{dname}'s tap {tap} moved to bridge {port.get('master')}")
            opts = self._port_options(port)
            if opts != self.default_port:
                out.append(f"{dname}'s tap {tap}: port options changed: "
                           f"{oracle.diff(self.default_port, opts)}")
            flags = (port["learning"], port["flood"])
            has_entry = any(e[0] == tap and e[1] == f.mac and e[2] == "static" for e in actual)
            if f.dirty:
                continue
            if f.exp == MANAGED and flags != (False, False):
                out.append(f"{dname} {f.alias} ({tap}) is managed but learning={flags[0]} "
                           f"flood={flags[1]}")
            elif f.exp == UNTOUCHED and flags != (True, True):
                out.append(f"{dname} {f.alias} ({tap}) must be untouched but learning="
                           f"{flags[0]} flood={flags[1]}")
            elif f.exp == EITHER and not (
                    (flags == (False, False) and has_entry) or
                    (flags == (True, True) and not has_entry)):
                out.append(f"{dname} {f.alias} ({tap}) is half managed: learning={flags[0]} "
                           f"flood={flags[1]}, entry {'present' if has_entry else 'absent'}")
        if ev is not None and ev.phase == "running" and ev.own_tap:
            port = snap["ports"].get(Evil.TAP)
            if port is None or self._port_options(port) != self.default_port:
                out.append(f"{Evil.TAP}: port options changed")
        # 4. A stopped or released guest leaves no entry for its MACs anywhere.
        for dom in self.doms.values():
            if dom.phase == "running":
                continue
            for f in dom.ifaces:
                if f.dirty:
                    continue
                for e in actual:
                    held = ev is not None and ev.phase == "running" and e[0] == Evil.TAP
                    if e[1] == f.mac and e[2] == "static" and not held:
                        out.append(f"{dom.name} is {dom.phase} but {f.mac} is still a static "
                                   f"entry on {e[0]}")
        return out

    # -- diagnostics ---------------------------------------------------------------------------

    def describe(self) -> str:
        lines = [f"config {self.config}, network policy {self.net_policy}"]
        for dom in self.doms.values():
            lines.append(f"{dom.name} {dom.phase} meta={dom.meta}: " + ", ".join(
                f"{f.tap}/{f.kind}/{f.exp}{'/dirty' if f.dirty else ''}" for f in dom.ifaces))
        return "\n".join(lines)

    def state_records(self) -> dict[str, Any]:
        out = {}
        d = os.path.join(self.rig.state_dir, "domains")
        for name in sorted(os.listdir(d)) if os.path.isdir(d) else []:
            with open(os.path.join(d, name)) as f:
                out[name] = json.load(f)
        return out


__all__ = ["World", "Dom", "Iface", "Evil", "make_domains", "CONFIGS", "VALID_CONFIGS",
           "INVALID_CONFIGS", "METAS", "NET_POLICIES", "MANAGED", "UNTOUCHED", "EITHER",
           "InvariantViolation", "EVIL_MAC", "BR0_ADDR", "UP0_ADDR", "FTAP_ADDR", "FOREIGN_UP",
           "FOREIGN_F"]
