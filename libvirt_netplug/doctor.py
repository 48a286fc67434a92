"""``netplug doctor``: per managed bridge, is the goal reached, and if not, why and what to do.

The goal on a bridge with promiscLinks='no': every guest tap has a static FDB entry for its
guest's MAC with learning and flood off (guests get only their own unicast), and the uplink is
out of promiscuous mode. The second half is the kernel's job (br_manage_promisc() in
net/bridge/br_if.c): only with vlan_filtering on, and exactly one port still learning or
flooding, does it take that port out of promiscuous mode and copy the static entries into its
unicast filter. Doctor reads the same state as reconcile (the engine in dry-run mode, one bulk
kernel read) plus each uplink's address lists, and checks hooks, agent and policy conflicts.
Read-only. Output: findings as text or JSON (docs/reconcile.md).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, TextIO

from .errors import DeviceGone, KernelError
from .kernel import Link
from .reconcile import (Inputs, JSON_VERSION, add_common_arguments, observe_dry, onoff,
                        read_inputs, setup_logging, _new_kernel)
from .state import StateDir
from .sync import SyncReport

LEVELS = ("ok", "info", "warning", "error")


@dataclass(frozen=True)
class Finding:
    level: str  # ok | info | warning | error
    subject: str  # "bridge br0", "hooks", "agent", "network mgd", ...
    check: str  # a stable id: vlan-filtering, guest-ports, uplink, goal, hooks, agent, ...
    message: str
    advice: str | None = None  # what to do (None when there is nothing to do)

    def to_json(self) -> dict[str, Any]:
        return {"level": self.level, "subject": self.subject, "check": self.check,
                "message": self.message, "advice": self.advice}

    def lines(self) -> list[str]:
        out = [f"[{self.level.upper()}] {self.subject}: {self.message}"]
        if self.advice:
            out.append(f"    -> {self.advice}")
        return out


@dataclass
class PortView:
    name: str
    owner: str  # guest | uplink
    domain: str | None = None
    interface: str | None = None
    mac: str | None = None
    managed: bool = False
    reason: str | None = None
    kind: str | None = None
    learning: bool | None = None
    flood: bool | None = None
    promiscuity: int | None = None
    fdb: bool | None = None  # guests: a static entry for the guest's MAC is present
    unicast_filter: list[str] | None = None  # uplinks: the device's own unicast list

    @property
    def auto(self) -> bool:
        """A port the bridge still learns on or floods to (br_auto_port())."""
        return self.learning is not False or self.flood is not False

    def who(self) -> str:
        if self.owner == "guest":
            return f"{self.name} (domain {self.domain} interface {self.interface})"
        return f"{self.name} (uplink)"

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class BridgeView:
    name: str
    exists: bool
    vlan_filtering: bool | None = None
    vlan_filtering_supported: bool | None = None
    promiscuity: int | None = None
    ports: list[PortView] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    guests_isolated: bool = False
    uplink_filtered: bool = False

    @property
    def goal_reached(self) -> bool:
        return self.guests_isolated and self.uplink_filtered

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "exists": self.exists, "goal_reached": self.goal_reached,
                "guests_isolated": self.guests_isolated,
                "uplink_filtered": self.uplink_filtered,
                "vlan_filtering": self.vlan_filtering,
                "vlan_filtering_supported": self.vlan_filtering_supported,
                "promiscuity": self.promiscuity,
                "ports": [p.to_json() for p in self.ports],
                "findings": [f.to_json() for f in self.findings]}


# -- kernel capability --------------------------------------------------------------------------


def vlan_filtering_support(link: Link, sysfs: str = "/sys/class/net") -> bool | None:
    """Does this kernel have bridge VLAN filtering (CONFIG_BRIDGE_VLAN_FILTERING)?

    Netlink alone cannot always tell: kernels without it still report IFLA_BR_VLAN_FILTERING
    as 0 (measured here), so a False is settled through sysfs, whose ``bridge/vlan_filtering``
    file exists only with that option. The option is kernel-wide, so any bridge sysfs shows
    answers (sysfs shows the namespace it was mounted in, not necessarily ours). None: cannot
    tell (no bridge visible in sysfs).
    """
    if link.vlan_filtering is None:
        return False
    if link.vlan_filtering:
        return True
    candidates = [link.name]
    try:
        candidates += sorted(n for n in os.listdir(sysfs) if n != link.name)
    except OSError:
        return None
    for name in candidates:
        bdir = os.path.join(sysfs, name, "bridge")
        if os.path.isdir(bdir):
            return os.path.exists(os.path.join(bdir, "vlan_filtering"))
    return None


# -- hooks and agent ---------------------------------------------------------------------------


def check_hooks(hooks_dir: str) -> Finding:
    from . import install

    paths = install._paths(hooks_dir)
    missing, foreign, broken = [], [], []
    for kind, path in sorted(paths.items()):
        if not os.path.exists(path):
            missing.append(path)
        elif not install._ours(path):
            foreign.append(path)
        elif not os.access(path, os.X_OK):
            broken.append(f"{path} is not executable")
        else:
            python = _shebang(path)
            if python and not os.access(python, os.X_OK):
                broken.append(f"{path} runs {python}, which does not exist")
    fix = f"netplug install-hooks --hooks-dir {hooks_dir}, then systemctl reload libvirtd"
    if foreign:
        return Finding("error", "hooks", "hooks", f"{', '.join(foreign)} exists but was not "
                       f"installed by netplug", f"move it away, then run {fix}")
    if broken:
        return Finding("error", "hooks", "hooks", "; ".join(broken), f"run {fix}")
    if missing:
        return Finding("warning", "hooks", "hooks",
                       f"hooks not installed ({', '.join(missing)} missing): guests are "
                       f"managed only when reconcile or the agent runs, not when they start",
                       f"run {fix}")
    return Finding("ok", "hooks", "hooks",
                   f"hooks installed in {hooks_dir} (libvirtd reads them at start or reload; "
                   f"if they were installed while it ran, reload it)")


def _shebang(path: str) -> str | None:
    try:
        with open(path, errors="replace") as f:
            first = f.readline()
    except OSError:
        return None
    if not first.startswith("#!"):
        return None
    argv = first[2:].split()
    if not argv or argv[0].endswith("/env"):
        return None
    return argv[0]


_AGENT_RE = re.compile(r"(^|[/ ])netplug agent( |$)|libvirt_netplug(\.cli)? agent( |$)")


def agent_pids(proc: str = "/proc") -> list[int]:
    """Processes whose command line runs ``netplug agent`` (any interpreter, any path)."""
    pids = []
    me = os.getpid()
    try:
        entries = os.listdir(proc)
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(os.path.join(proc, entry, "cmdline"), "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        cmd = " ".join(a.decode(errors="replace") for a in argv if a)
        if _AGENT_RE.search(cmd):
            pids.append(int(entry))
    return sorted(pids)


def check_agent(managed_macvtaps: int, proc: str = "/proc") -> Finding:
    pids = agent_pids(proc)
    if pids:
        return Finding("ok", "agent", "agent",
                       f"agent running (pid {', '.join(map(str, pids))})")
    if managed_macvtaps:
        return Finding("warning", "agent", "agent",
                       f"agent not running: the RX filters of {managed_macvtaps} managed "
                       f"macvtap{'s' * (managed_macvtaps != 1)} follow their guests only "
                       f"when reconcile runs",
                       "systemctl enable --now netplug-agent")
    return Finding("info", "agent", "agent",
                   "agent not running: hotplugged NICs, resumed or migrated guests are repaired "
                   "only when reconcile runs",
                   "systemctl enable --now netplug-agent (or netplug-reconcile.timer)")


# -- bridges ------------------------------------------------------------------------------------


def managed_bridges(report: SyncReport, inputs: Inputs, records: dict[str, Any]) -> list[str]:
    """Bridges with a promiscLinks='no' policy: managed guest ports, records, config, networks."""
    names = {i.bridge for d in report.domains for i in d.bridge_intents
             if i.managed and i.bridge}
    names |= {r.get("bridge") for rec in records.values()
              for r in rec.get("ports", {}).values() if r.get("bridge")}
    names |= {b for b, p in inputs.desired.config.bridges.items() if p.manages_bridge_port}
    names |= {n.bridge for n in inputs.desired.networks.values()
              if n.bridge and n.policy.manages_bridge_port and n.mac_table_manager != "libvirt"}
    return sorted(names)


def bridge_view(name: str, report: SyncReport, kernel, sysfs: str = "/sys/class/net"
                ) -> BridgeView:
    observed = report.observed
    links = observed.links if observed else {}
    br = links.get(name)
    subj = f"bridge {name}"
    if br is None or br.kind != "bridge":
        v = BridgeView(name, False)
        v.findings.append(Finding("error", subj, "exists",
                                  f"{name} does not exist or is not a bridge, but a policy "
                                  f"says promiscLinks='no' for it",
                                  "create the bridge (or start its libvirt network), or drop "
                                  "the policy"))
        return v
    v = BridgeView(name, True, br.vlan_filtering, vlan_filtering_support(br, sysfs),
                   br.promiscuity)
    guests = {i.tap: (d, i) for d in report.domains for i in d.bridge_intents
              if i.tap and i.bridge == name}
    for pname, link in sorted(links.items()):
        if link.master != name:
            continue
        p = PortView(pname, "guest" if pname in guests else "uplink", kind=link.kind,
                     learning=link.learning, flood=link.flood, promiscuity=link.promiscuity)
        if pname in guests:
            d, it = guests[pname]
            p.domain, p.interface, p.mac = d.name, it.ctx.interface, it.mac
            p.managed, p.reason = it.managed, it.reason
            if it.mac and observed is not None:
                p.fdb = any(e.port == pname and e.state == "static"
                            for e in observed.entries_for_mac(name, it.mac))
        else:
            try:
                p.unicast_filter = kernel.device_addresses(pname)[0]
            except (DeviceGone, KernelError):
                p.unicast_filter = None
        v.ports.append(p)
    _explain_bridge(v)
    return v


def _explain_bridge(v: BridgeView) -> None:
    subj = f"bridge {v.name}"
    f = v.findings
    managed = [p for p in v.ports if p.owner == "guest" and p.managed]
    unmanaged = [p for p in v.ports if p.owner == "guest" and not p.managed]
    uplinks = [p for p in v.ports if p.owner == "uplink"]
    auto = [p for p in v.ports if p.auto]

    # 1. Guest ports: flooding to guests off?
    drift = [p for p in managed if p.auto or not p.fdb]
    if drift:
        what = "; ".join(f"{p.who()}: learning {onoff(p.learning)}, flood {onoff(p.flood)}, "
                         f"FDB entry {'present' if p.fdb else 'missing'}" for p in drift)
        f.append(Finding("error", subj, "guest-ports",
                         f"{len(drift)} managed guest port{'s' * (len(drift) != 1)} drifted: "
                         f"{what}", "run netplug reconcile"))
    elif managed:
        f.append(Finding("ok", subj, "guest-ports",
                         f"{len(managed)} managed guest port{'s' * (len(managed) != 1)}: "
                         f"static entry present, learning off, flood off"))
    else:
        f.append(Finding("info", subj, "guest-ports", "no managed guest ports right now "
                         "(no running guest on this bridge)"))
    flooding = [p for p in unmanaged if p.auto]
    if flooding:
        f.append(Finding("warning", subj, "guest-ports",
                         "guest ports that still learn or flood (not managed): "
                         + "; ".join(f"{p.who()}: learning {onoff(p.learning)}, flood "
                                     f"{onoff(p.flood)} ({p.reason})" for p in flooding),
                         "give these interfaces promiscLinks='no' (config [bridge."
                         f"{v.name}], network or domain metadata) if they should be isolated, "
                         "then run netplug reconcile"))
    v.guests_isolated = bool(managed) and not drift

    # 2. The uplink: can the kernel take it out of promiscuous mode?
    promisc_uplinks = [p for p in uplinks if (p.promiscuity or 0) > 0]
    up_desc = "; ".join(
        f"{p.name}: promiscuity {p.promiscuity if p.promiscuity is not None else '?'}, learning "
        f"{onoff(p.learning)}, flood {onoff(p.flood)}, unicast filter "
        f"[{', '.join(p.unicast_filter or []) or 'empty'}]" for p in uplinks)
    names = ", ".join(p.name for p in promisc_uplinks) or ", ".join(p.name for p in uplinks)
    guests_off = ("even though flooding to guests is off" if v.guests_isolated
                  else "and flooding to guests is not fully off either")
    if not uplinks:
        f.append(Finding("info", subj, "uplink", "no uplink port (every port is a guest's): "
                         "nothing to take out of promiscuous mode"))
        v.uplink_filtered = True
    elif v.vlan_filtering_supported is False:
        f.append(Finding("warning", subj, "vlan-filtering",
                         f"this kernel lacks bridge VLAN filtering (CONFIG_BRIDGE_VLAN_FILTERING "
                         f"is not set: sysfs has no bridge/vlan_filtering knob), so the uplink "
                         f"{names} stays promiscuous {guests_off}",
                         "nothing to repair on this host: each guest still gets only its "
                         "own unicast. To get the uplink out of promiscuous mode, "
                         "boot a kernel built with CONFIG_BRIDGE_VLAN_FILTERING=y and set "
                         f"vlanFiltering='yes' in {v.name}'s policy"))
    elif not v.vlan_filtering:
        unknown = " (this kernel may lack it: cannot tell from here)" \
            if v.vlan_filtering_supported is None else ""
        f.append(Finding("warning", subj, "vlan-filtering",
                         f"vlan_filtering is off on {v.name}{unknown}, so the kernel keeps "
                         f"every port promiscuous: the uplink {names} stays promiscuous "
                         f"{guests_off}",
                         f"set vlanFiltering='yes' in {v.name}'s policy (config [bridge."
                         f"{v.name}] or network metadata) and run netplug reconcile; untagged "
                         f"traffic then uses the default PVID 1"))
    else:
        f.append(Finding("ok", subj, "vlan-filtering", f"vlan_filtering is on on {v.name}"))
    if uplinks:
        if (v.promiscuity or 0) > 0:
            f.append(Finding("warning", subj, "bridge-promisc",
                             f"{v.name} itself is promiscuous (promiscuity {v.promiscuity}, e.g. "
                             f"a packet capture on it): the kernel then keeps every port "
                             f"promiscuous",
                             f"stop the capture, or `ip link set {v.name} promisc off` if it was "
                             f"set by hand"))
        if len(auto) > 1 and v.vlan_filtering:
            f.append(Finding("warning", subj, "auto-ports",
                             f"{len(auto)} ports still learn or flood ("
                             f"{', '.join(p.who() for p in auto)}): the kernel takes the uplink "
                             f"out of promiscuous mode only when exactly one does",
                             "manage the guest ports (promiscLinks='no') and keep a single "
                             "uplink"))
        if promisc_uplinks:
            f.append(Finding("warning" if v.vlan_filtering else "info", subj, "uplink",
                             f"uplink promiscuous: {up_desc}"))
        else:
            f.append(Finding("ok", subj, "uplink", f"uplink not promiscuous: {up_desc}"))
            for up in uplinks:
                lacking = sorted(p.mac for p in managed if p.fdb and p.mac and
                                 p.mac not in (up.unicast_filter or []))
                if lacking and up.unicast_filter is not None:
                    f.append(Finding("error", subj, "uplink-filter",
                                     f"uplink {up.name} filters unicast and its filter lacks "
                                     f"guest MACs {', '.join(lacking)}: a real NIC drops "
                                     f"frames for those guests",
                                     f"check that {v.name} has vlan_filtering on and "
                                     f"{up.name} is the only port that learns or floods; "
                                     f"`bridge fdb show dev {up.name}` shows its list"))
        v.uplink_filtered = not promisc_uplinks

    # 3. The verdict.
    if v.goal_reached:
        f.append(Finding("ok", subj, "goal", "goal reached: guests get only their own unicast "
                         "and the uplink is not promiscuous"))
    else:
        why = []
        if not managed:
            why.append("no managed guest port")
        elif not v.guests_isolated:
            why.append("guest ports drifted (see above)")
        else:
            why.append("flooding to guests is off")
        if not v.uplink_filtered:
            cause = ("the kernel lacks VLAN filtering" if v.vlan_filtering_supported is False
                     else "vlan_filtering is off" if not v.vlan_filtering
                     else "more than one port learns or floods" if len(auto) > 1
                     else f"{v.name} is promiscuous" if (v.promiscuity or 0) > 0
                     else "the kernel has not synced it")
            why.append(f"but the uplink {names} stays promiscuous because {cause}")
        advice = next((x.advice for x in f if x.advice and x.level in ("error", "warning")),
                      None)
        f.append(Finding("warning" if managed else "info", subj, "goal",
                         "goal not reached: " + " ".join(why), advice))


# -- policies that conflict with libvirt's own -------------------------------------------------


def policy_findings(report: SyncReport, inputs: Inputs) -> list[Finding]:
    out = []
    for net in sorted(inputs.desired.networks.values(), key=lambda n: n.name):
        subj = f"network {net.name}"
        if net.policy_error:
            out.append(Finding("error", subj, "policy", f"invalid netplug policy: "
                               f"{net.policy_error}; the network stays unmanaged",
                               "fix the <netplug:policy> in the network's metadata "
                               "(virsh net-edit)"))
        if net.mac_table_manager == "libvirt" and net.policy.manages_bridge_port:
            out.append(Finding("warning", subj, "policy-conflict",
                               "both libvirt (<bridge macTableManager='libvirt'>) and a "
                               "netplug policy (promiscLinks='no') claim this network's MAC "
                               "table; netplug stays hands-off",
                               "drop one: remove macTableManager='libvirt' (it needs "
                               "vlan_filtering and manages only type='network' ports) or the "
                               "netplug policy"))
    for d in report.domains:
        for it in d.macvtap_intents:
            if it.interface.trust_guest_rx_filters and it.policy.rx:
                out.append(Finding(
                    "warning", f"domain {d.name} interface {it.ctx.interface}",
                    "policy-conflict",
                    f"trustGuestRxFilters='yes' and netplug rxFilters="
                    f"'{it.policy.to_json().get('rxFilters')}' both want {it.dev or 'its macvtap'}"
                    f"; libvirt syncs it (all-or-nothing: the guest may also change its MAC) "
                    f"and netplug stands aside",
                    "remove trustGuestRxFilters='yes' to get netplug's split trust, or drop "
                    "the rxFilters policy"))
    for e in inputs.desired.errors:
        out.append(Finding("error", "libvirt", "read", e, "fix the XML or policy it names"))
    return out


# -- lower devices of managed macvtaps ------------------------------------------------------


def macvtap_findings(report: SyncReport) -> list[Finding]:
    links = report.observed.links if report.observed else {}
    out = []
    lowers: dict[str, list[str]] = {}
    for d in report.domains:
        for it in d.macvtap_intents:
            if it.managed and it.lower:
                lowers.setdefault(it.lower, []).append(f"{d.name} {it.ctx.interface}")
    for lower, who in sorted(lowers.items()):
        link = links.get(lower)
        if link is None:
            out.append(Finding("error", f"lower device {lower}", "macvtap-lower",
                               f"{lower} does not exist (macvtaps of {', '.join(who)})"))
        elif (link.promiscuity or 0) > 0:
            out.append(Finding("info", f"lower device {lower}", "macvtap-lower",
                               f"{lower} is promiscuous (promiscuity {link.promiscuity}; "
                               f"passthrough macvtaps without nopromisc, or guests in "
                               f"promiscuous mode): RX filters of {', '.join(who)} do not "
                               f"narrow what it receives"))
        else:
            out.append(Finding("ok", f"lower device {lower}", "macvtap-lower",
                               f"{lower} is not promiscuous; RX filters of {', '.join(who)} "
                               f"decide what it receives"))
    return out


# -- the command ----------------------------------------------------------------------------


@dataclass
class Diagnosis:
    bridges: list[BridgeView]
    findings: list[Finding]  # not tied to one bridge

    def all(self) -> list[Finding]:
        return [f for b in self.bridges for f in b.findings] + self.findings

    @property
    def exit_status(self) -> int:
        return 2 if any(f.level in ("warning", "error") for f in self.all()) else 0

    def to_json(self, uri: str | None) -> dict[str, Any]:
        counts = {lvl: sum(1 for f in self.all() if f.level == lvl) for lvl in LEVELS}
        return {"version": JSON_VERSION, "command": "doctor", "connect": uri,
                "exit_status": self.exit_status, "summary": counts,
                "bridges": [b.to_json() for b in self.bridges],
                "findings": [f.to_json() for f in self.findings]}

    def lines(self) -> list[str]:
        out = []
        for b in self.bridges:
            verdict = "goal reached" if b.goal_reached else "goal NOT reached"
            out.append(f"bridge {b.name}: {verdict}")
            for f in b.findings:
                out += ["  " + ln for ln in f.lines()]
        if self.findings:
            out.append("host:")
            for f in self.findings:
                out += ["  " + ln for ln in f.lines()]
        if not self.bridges:
            out.append("no managed bridges (no promiscLinks='no' policy in the config, "
                       "networks or running domains)")
        return out


def diagnose(inputs: Inputs, state: StateDir, kernel, *, hooks_dir: str,
             sysfs: str = "/sys/class/net", proc: str = "/proc") -> Diagnosis:
    report = observe_dry(inputs, state, kernel)
    records = report.records
    # Bridges named only by config or network policy are not in the engine's observation of
    # FDBs; the link dump has every device, which is all doctor needs for them.
    bridges = [bridge_view(b, report, kernel, sysfs)
               for b in managed_bridges(report, inputs, records)]
    managed_macvtaps = sum(1 for d in report.domains for i in d.macvtap_intents if i.managed)
    findings = policy_findings(report, inputs) + macvtap_findings(report)
    findings.append(check_hooks(hooks_dir))
    findings.append(check_agent(managed_macvtaps, proc))
    for n in report.notes:
        if n.level == "error":
            findings.append(Finding("error", "reconcile", "plan", n.message,
                                    "see the message; then run netplug reconcile"))
    return Diagnosis(bridges, findings)


def register(subparsers) -> None:
    from .install import DEFAULT_HOOKS_DIR

    sp = subparsers.add_parser(
        "doctor", help="explain, per managed bridge, whether the goal is reached and why not",
        description="Per managed bridge: VLAN filtering support, ports that still learn or "
                    "flood (with their owner), the uplink's promiscuity and unicast filter; "
                    "policies that conflict with libvirt's own; hooks installed; agent "
                    "running. Each finding says what to do. Read-only. Exit status: 0 all "
                    "good, 2 warnings or errors found, 1 could not check.")
    add_common_arguments(sp)
    sp.add_argument("--hooks-dir", default=DEFAULT_HOOKS_DIR,
                    help=f"libvirt hooks directory (default: {DEFAULT_HOOKS_DIR})")
    sp.set_defaults(func=cmd_doctor)


def run(args: argparse.Namespace, out: TextIO, *,
        kernel_factory: Callable[[], Any] | None = None) -> int:
    state = StateDir(args.state_dir)
    inputs = read_inputs(args.connect, args.config, guest_query=args.guest_query)
    with (kernel_factory or _new_kernel)() as kernel:
        dx = diagnose(inputs, state, kernel, hooks_dir=args.hooks_dir)
    if args.json:
        json.dump(dx.to_json(inputs.uri), out, indent=2)
        out.write("\n")
    else:
        for line in dx.lines():
            out.write(line + "\n")
    return dx.exit_status


def cmd_doctor(args: argparse.Namespace) -> int:
    setup_logging("doctor", False)
    return run(args, sys.stdout)


__all__ = ["Finding", "BridgeView", "PortView", "Diagnosis", "diagnose", "register",
           "vlan_filtering_support", "agent_pids", "check_hooks", "check_agent"]
