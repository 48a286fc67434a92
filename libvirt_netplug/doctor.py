"""``netplug doctor``: is netplug set up right on this host, and per managed bridge, is the goal
reached; if not, why and what to do.

The goal on a bridge with promiscLinks='no': every guest tap has a static FDB entry for its
guest's MAC with learning and flood off (guests get only their own unicast), and the uplink is
out of promiscuous mode. The second half is the kernel's job (br_manage_promisc() in
net/bridge/br_if.c): only with vlan_filtering on, the bridge itself not promiscuous, and
exactly one port still learning or flooding, does it take that port out of promiscuous mode
and copy the static entries into its unicast filter, and only if the port's driver can filter
unicast (IFF_UNICAST_FLT: most NICs, virtio_net, macvlan; not veth, tap or dummy).

Doctor checks, without libvirtd: the paths (config, state dir) that hooks, agent and this
command use agree; the hooks are installed and start with a working interpreter; the config
is valid; the state dir is usable and every record in it readable; the kernel's capabilities;
the agent. With libvirtd: what reconcile reads (the engine in dry-run mode, one bulk kernel
read) plus each uplink's address lists, per managed bridge, and policies that conflict with
libvirt's own. Findings never contradict each other: the verdict of a bridge is built from
its findings. Read-only. Output: findings as text or JSON (docs/reconcile.md).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, TextIO

from .errors import DeviceGone, KernelError, NetplugError
from .kernel import Link
from .reconcile import (Inputs, JSON_VERSION, add_common_arguments, command_paths,
                        load_config_checked, observe_dry, onoff, read_inputs, setup_logging,
                        _new_kernel)
from .state import StateDir
from .statefile import reading_state, record_errors
from .sync import SyncReport

LEVELS = ("ok", "info", "warning", "error")
RELOAD = ("systemctl reload libvirtd (or, with the modular daemons, systemctl reload "
          "virtqemud virtnetworkd)")
# Drivers without IFF_UNICAST_FLT (by rtnetlink kind): the kernel keeps such a port
# promiscuous whatever the bridge does (FIELD-NOTES, measured on a VLAN-filtering kernel).
NO_UNICAST_FILTER = {"veth": "veth", "tun": "tap", "dummy": "dummy"}


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
    promisc: bool | None = None  # IFF_PROMISC asked for by a user (ip link ... promisc on)
    fdb: bool | None = None  # guests: a static entry for the guest's MAC is present
    unicast_filter: list[str] | None = None  # uplinks: the device's own unicast list
    recorded: bool = False  # netplug's state says it manages this port

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


def kernel_vlan_filtering(sysfs: str = "/sys/class/net", boot: str = "/boot",
                          proc: str = "/proc") -> tuple[bool | None, str]:
    """Whether the running kernel has CONFIG_BRIDGE_VLAN_FILTERING, and how that is known,
    without a bridge of ours to ask: any bridge in sysfs, else the kernel's config file."""
    try:
        names = sorted(os.listdir(sysfs))
    except OSError:
        names = []
    for name in names:
        bdir = os.path.join(sysfs, name, "bridge")
        if os.path.isdir(bdir):
            return (os.path.exists(os.path.join(bdir, "vlan_filtering")),
                    f"sysfs of bridge {name}")
    release = os.uname().release
    for path in (os.path.join(boot, f"config-{release}"), os.path.join(proc, "config.gz")):
        try:
            if path.endswith(".gz"):
                import gzip

                with gzip.open(path, "rt", errors="replace") as f:
                    text = f.read()
            else:
                with open(path, errors="replace") as f:
                    text = f.read()
        except OSError:
            continue
        return "\nCONFIG_BRIDGE_VLAN_FILTERING=y" in "\n" + text, path
    return None, "no bridge in sysfs and no kernel config file to read"


def check_kernel(kernel, sysfs: str = "/sys/class/net", boot: str = "/boot",
                 proc: str = "/proc") -> list[Finding]:
    out = []
    try:
        kernel.links()
    except (KernelError, OSError) as e:
        out.append(Finding("error", "kernel", "netlink", f"cannot read network devices over "
                           f"netlink: {e}", "run doctor as root, in the host's network "
                           "namespace"))
    supported, how = kernel_vlan_filtering(sysfs, boot, proc)
    if supported is True:
        out.append(Finding("ok", "kernel", "kernel-vlan-filtering",
                           f"the kernel has bridge VLAN filtering ({how})"))
    elif supported is False:
        out.append(Finding("info", "kernel", "kernel-vlan-filtering",
                           f"the kernel lacks bridge VLAN filtering (CONFIG_BRIDGE_VLAN_"
                           f"FILTERING, {how}): guests still get only their own unicast, but "
                           f"every bridge uplink stays promiscuous"))
    else:
        out.append(Finding("info", "kernel", "kernel-vlan-filtering",
                           f"cannot tell whether the kernel has bridge VLAN filtering ({how})"))
    return out


# -- paths, hooks, config, state dir ----------------------------------------------------------


def check_paths(paths, agent: "AgentPaths | None") -> list[Finding]:
    """Do hooks, the agent and this command use the same config and state dir?"""
    out = []
    hooks = paths.hooks
    if hooks is not None and hooks.problem:
        out.append(Finding("error", "paths", "paths", hooks.problem,
                           "run netplug install-hooks once with the paths you want; it "
                           "writes both shims"))
    for m in paths.mismatches():
        out.append(Finding("warning", "paths", "paths",
                           f"this command's {m}: reconcile run like this would work against "
                           f"the hooks", "drop the option or variable so the command uses the "
                           "hooks' paths, or install the hooks with these paths"))
    if agent is not None and hooks is not None:
        for what, mine, theirs in (("config", agent.config, hooks.config),
                                   ("state dir", agent.state_dir, hooks.state_dir)):
            if mine is not None and os.path.normpath(mine) != os.path.normpath(theirs):
                out.append(Finding("error", "paths", "agent-paths",
                                   f"the agent ({agent.where}) uses {what} {mine}, the hooks "
                                   f"use {theirs}: each undoes what the other does",
                                   f"remove the agent's --{what.replace(' ', '-')} (it reads "
                                   f"the hooks' paths) or reinstall the hooks with it, then "
                                   f"restart the agent"))
        if agent.error:
            out.append(Finding("error", "paths", "agent-paths",
                               f"the agent ({agent.where}) cannot start: {agent.error}",
                               "fix its unit (systemctl edit netplug-agent)"))
    if not out:
        same = (f"the same as the hooks' ({hooks.shim})" if hooks else
                "no hooks installed to compare with")
        out.append(Finding("ok", "paths", "paths",
                           f"config {paths.config.describe()}, state dir "
                           f"{paths.state_dir.describe()}: {same}"
                           + (f"; the agent ({agent.where}) uses the same" if agent else "")))
    return out


def check_hooks(hooks_dir: str, *, interpreter: bool = True) -> Finding:
    """Installed, ours, executable, and (``interpreter``) starting a Python that imports
    everything a hook needs, exactly as libvirtd would start it."""
    from . import install

    paths = install.shim_paths(hooks_dir)
    missing, foreign, broken = [], [], []
    shims = {}
    for kind, path in sorted(paths.items()):
        if not os.path.lexists(path):
            missing.append(path)
            continue
        shim = install.read_shim(path)
        if shim is None:
            foreign.append(path)
        elif not os.access(path, os.X_OK):
            broken.append(f"{path} is not executable")
        elif shim.python and not os.access(shim.python, os.X_OK):
            broken.append(f"{path} runs {shim.python}, which does not exist")
        else:
            shims[path] = shim
    fix = f"netplug install-hooks --hooks-dir {hooks_dir}, then {RELOAD}"
    if foreign:
        return Finding("error", "hooks", "hooks", f"{', '.join(foreign)} exists but was not "
                       f"installed by netplug", f"move it away, then run {fix}")
    if interpreter:
        for path, shim in sorted(shims.items()):
            if shim.python:
                why = install.probe(shim.python, shim.flags, shim.sys_path)
                if why:
                    broken.append(f"{path}: {shim.python} {shim.flags} cannot import the hook "
                                  f"({why})")
    if broken:
        return Finding("error", "hooks", "hooks", "; ".join(broken), f"run {fix}")
    if missing:
        return Finding("warning", "hooks", "hooks",
                       f"hooks not installed ({', '.join(missing)} missing): guests are "
                       f"managed only when reconcile or the agent runs, not when they start",
                       f"run {fix}")
    python = next((s.python for s in shims.values() if s.python), None)
    return Finding("ok", "hooks", "hooks",
                   f"hooks installed in {hooks_dir}"
                   + (f", bound to {python}, which imports the hook" if python and interpreter
                      else "")
                   + f" (libvirt reads them when its daemon starts or reloads: after "
                     f"installing them, {RELOAD})")


def check_config(paths) -> Finding:
    setting = paths.config
    if not os.path.exists(setting.value):
        return Finding("info", "config", "config",
                       f"no config file at {setting.describe()}: only policies in network and "
                       f"domain metadata apply")
    config, error = load_config_checked(setting.value, lenient=True)
    if error:
        return Finding("error", "config", "config",
                       f"{error}; hooks manage nothing through it until it is fixed, "
                       f"reconcile refuses to run",
                       f"fix {setting.value} (netplug check-config checks it and every "
                       f"network's and domain's policy)")
    return Finding("ok", "config", "config",
                   f"config {setting.describe()} is valid: policies for "
                   f"{_plural(len(config.bridges), 'bridge')} and "
                   f"{_plural(len(config.direct), 'macvtap lower device')}")


def check_state_dir(state: StateDir) -> list[Finding]:
    subj = "state dir"
    path = state.path
    if not os.path.exists(path):
        return [Finding("info", subj, "state-dir",
                        f"{path} does not exist yet (the first hook or reconcile creates it): "
                        f"netplug manages nothing here so far")]
    if not os.path.isdir(path):
        return [Finding("error", subj, "state-dir", f"{path} is not a directory",
                        "move it away; netplug creates the directory itself")]
    if not os.access(path, os.W_OK | os.X_OK):
        return [Finding("error", subj, "state-dir", f"{path} is not writable by this user: "
                        f"hooks and reconcile cannot record what they change",
                        "run as root (hooks run as root under libvirtd)")]
    out = []
    try:
        with state.lock(timeout=2.0):
            pass
    except NetplugError as e:
        out.append(Finding("warning", subj, "state-lock", f"{e}",
                           "a hook, reconcile or the agent holds it; if this persists, find "
                           f"the holder with fuser {os.path.join(path, 'lock')}"))
    errors = record_errors(state)
    for name, why in sorted(errors.items()):
        out.append(Finding("error", f"domain {name}", "state-record", why,
                           f"delete {os.path.join(path, 'domains', name + '.json')} and run "
                           f"netplug reconcile (it rebuilds what it can see in the kernel)"))
    if not out:
        out.append(Finding("ok", subj, "state-dir", f"{path} is usable and every record in it "
                           f"is readable"))
    return out


# -- the agent --------------------------------------------------------------------------------


_AGENT_RE = re.compile(r"(^|[/ ])netplug agent( |$)|libvirt_netplug(\.cli)? agent( |$)"
                       r"|libvirt_netplug\.agent( |$)")
SYSTEMD_DIRS = ("/etc/systemd/system", "/run/systemd/system", "/lib/systemd/system",
                "/usr/lib/systemd/system")
AGENT_UNIT = "netplug-agent.service"


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
        argv = _proc_argv(proc, int(entry))
        if argv and _AGENT_RE.search(" ".join(argv)):
            pids.append(int(entry))
    return sorted(pids)


def _proc_argv(proc: str, pid: int) -> list[str] | None:
    try:
        with open(os.path.join(proc, str(pid), "cmdline"), "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return None


def _proc_environ(proc: str, pid: int) -> dict[str, str]:
    try:
        with open(os.path.join(proc, str(pid), "environ"), "rb") as f:
            raw = f.read().split(b"\0")
    except OSError:
        return {}
    return dict(a.decode(errors="replace").split("=", 1) for a in raw if b"=" in a)


@dataclass(frozen=True)
class AgentPaths:
    where: str  # "pid 123", "unit /lib/systemd/system/netplug-agent.service"
    config: str | None
    state_dir: str | None
    error: str | None = None


def _option(argv: list[str], name: str) -> str | None:
    value = None
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.startswith(name + "="):
            value = a.split("=", 1)[1]
    return value


def agent_paths_of(argv: list[str], environ: Mapping[str, str], where: str) -> AgentPaths:
    """The paths an agent started with this command line and environment uses."""
    from .paths import resolve

    try:
        p = resolve(_option(argv, "--config"), _option(argv, "--state-dir"),
                    hooks_dir=_option(argv, "--hooks-dir"), environ=environ)
    except NetplugError as e:
        return AgentPaths(where, None, None, str(e))
    return AgentPaths(where, p.config.value, p.state_dir.value)


def running_agent_paths(proc: str = "/proc") -> AgentPaths | None:
    for pid in agent_pids(proc):
        argv = _proc_argv(proc, pid) or []
        return agent_paths_of(argv, _proc_environ(proc, pid), f"pid {pid}")
    return None


def unit_agent_paths(dirs=SYSTEMD_DIRS, unit: str = AGENT_UNIT) -> AgentPaths | None:
    """The paths the installed agent unit would give the agent (its last ExecStart=, its
    Environment= and EnvironmentFile=, drop-ins included); None without a unit."""
    main = next((os.path.join(d, unit) for d in dirs if os.path.isfile(os.path.join(d, unit))),
                None)
    if main is None:
        return None
    files = [main]
    for d in dirs:
        dropins = os.path.join(d, unit + ".d")
        if os.path.isdir(dropins):
            files += [os.path.join(dropins, f) for f in sorted(os.listdir(dropins))
                      if f.endswith(".conf")]
    exec_start: list[str] = []
    env: dict[str, str] = {}
    for path in files:
        try:
            with open(path, errors="replace") as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        for line in lines:
            key, _, value = line.strip().partition("=")
            if key == "ExecStart":
                exec_start = shlex.split(value.lstrip("-@+!:")) if value.strip() else []
            elif key == "Environment":
                for assignment in shlex.split(value):
                    k, _, v = assignment.partition("=")
                    env[k] = v
            elif key == "EnvironmentFile":
                env.update(_env_file(value.lstrip("-")))
    return agent_paths_of(exec_start, env, f"unit {main}")


def _env_file(path: str) -> dict[str, str]:
    out = {}
    try:
        with open(path, errors="replace") as f:
            for line in f:
                line = line.strip()
                if line and not line.startswith("#") and "=" in line:
                    k, _, v = line.partition("=")
                    out[k.strip()] = v.strip().strip("'\"")
    except OSError:
        pass
    return out


def check_agent(managed_macvtaps: int | None, proc: str = "/proc") -> Finding:
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
    recorded = {tap for rec in report.records.values()
                for tap, r in rec.get("ports", {}).items() if r.get("bridge") == name}
    for pname, link in sorted(links.items()):
        if link.master != name:
            continue
        p = PortView(pname, "guest" if pname in guests else "uplink", kind=link.kind,
                     learning=link.learning, flood=link.flood, promiscuity=link.promiscuity,
                     promisc=link.promisc, recorded=pname in recorded)
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
    explain_bridge(v)
    return v


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"


def explain_bridge(v: BridgeView) -> None:
    """The findings and verdict of one bridge, from its view alone (pure: testable with any
    combination of ports, flags, kinds and promiscuity)."""
    subj = f"bridge {v.name}"
    f = v.findings
    guests = [p for p in v.ports if p.owner == "guest"]
    managed = [p for p in guests if p.managed]
    unmanaged = [p for p in guests if not p.managed]
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
    elif guests:
        f.append(Finding("info", subj, "guest-ports",
                         f"none of the {_plural(len(guests), 'guest port')} on {v.name} is "
                         f"managed (see below)"))
    else:
        f.append(Finding("info", subj, "guest-ports", "no managed guest ports right now "
                         "(no running guest on this bridge)"))
    reverting = [p for p in unmanaged if p.recorded]
    if reverting:
        f.append(Finding("warning", subj, "guest-ports",
                         "netplug's records say it manages these ports, but the policy it "
                         "reads now does not: "
                         + "; ".join(f"{p.who()} ({p.reason})" for p in reverting)
                         + "; reconcile would hand them back to the bridge (learning and "
                           "flood on, entry removed)",
                         "if they should stay managed, check that this command reads the "
                         "hooks' config and state dir (see 'paths') and the policy; if not, "
                         "run netplug reconcile"))
    flooding = [p for p in unmanaged if p.auto and not p.recorded]
    if flooding:
        f.append(Finding("warning", subj, "guest-ports",
                         "guest ports that still learn or flood (not managed): "
                         + "; ".join(f"{p.who()}: learning {onoff(p.learning)}, flood "
                                     f"{onoff(p.flood)} ({p.reason})" for p in flooding),
                         "give these interfaces promiscLinks='no' (config [bridge."
                         f"{v.name}], network or domain metadata) if they should be isolated, "
                         "then run netplug reconcile"))
    v.guests_isolated = bool(managed) and not drift
    guest_fix = None if v.guests_isolated or not managed else "run netplug reconcile"

    # 2. The uplink: can the kernel take it out of promiscuous mode?
    promisc_uplinks = [p for p in uplinks if (p.promiscuity or 0) > 0]
    up_desc = "; ".join(
        f"{p.name}: promiscuity {p.promiscuity if p.promiscuity is not None else '?'}, learning "
        f"{onoff(p.learning)}, flood {onoff(p.flood)}, unicast filter "
        f"[{', '.join(p.unicast_filter or []) or 'empty'}]" for p in uplinks)
    names = ", ".join(p.name for p in promisc_uplinks) or ", ".join(p.name for p in uplinks)
    guests_off = ("even though flooding to guests is off" if v.guests_isolated
                  else "and flooding to guests is not fully off either")
    causes: list[str] = []
    lacking_filter: list[str] = []
    if not uplinks:
        f.append(Finding("info", subj, "uplink", "no uplink port (every port is a guest's): "
                         "nothing to take out of promiscuous mode"))
        v.uplink_filtered = True
    else:
        kernel_fix = ("boot a kernel built with CONFIG_BRIDGE_VLAN_FILTERING=y and set "
                      f"vlanFiltering='yes' in {v.name}'s policy")
        if v.vlan_filtering_supported is False:
            first = ("nothing netplug can repair here: each guest already gets only its own "
                     "unicast" if v.guests_isolated else
                     "first repair the guest ports (run netplug reconcile)"
                     if guest_fix else "first manage the guest ports (promiscLinks='no')")
            f.append(Finding("warning", subj, "vlan-filtering",
                             f"this kernel lacks bridge VLAN filtering "
                             f"(CONFIG_BRIDGE_VLAN_FILTERING is not set: sysfs has no "
                             f"bridge/vlan_filtering knob), so the uplink {names} stays "
                             f"promiscuous {guests_off}",
                             f"{first}. To get the uplink out of promiscuous mode, "
                             f"{kernel_fix}"))
            causes.append("the kernel lacks VLAN filtering")
        elif not v.vlan_filtering:
            unknown = " (this kernel may lack it: cannot tell from here)" \
                if v.vlan_filtering_supported is None else ""
            f.append(Finding("warning", subj, "vlan-filtering",
                             f"vlan_filtering is off on {v.name}{unknown}, so the kernel keeps "
                             f"every port promiscuous: the uplink {names} stays promiscuous "
                             f"{guests_off}",
                             f"set vlanFiltering='yes' in {v.name}'s policy (config [bridge."
                             f"{v.name}] or network metadata) and run netplug reconcile; "
                             f"untagged traffic then uses the default PVID 1"))
            causes.append("vlan_filtering is off")
        else:
            f.append(Finding("ok", subj, "vlan-filtering", f"vlan_filtering is on on {v.name}"))
        if (v.promiscuity or 0) > 0:
            f.append(Finding("warning", subj, "bridge-promisc",
                             f"{v.name} itself is promiscuous (promiscuity {v.promiscuity}, e.g. "
                             f"a packet capture on it): the kernel then keeps every port "
                             f"promiscuous",
                             f"stop the capture, or `ip link set {v.name} promisc off` if it "
                             f"was set by hand"))
            causes.append(f"{v.name} is promiscuous")
        if len(auto) > 1:
            f.append(Finding("warning" if v.vlan_filtering else "info", subj, "auto-ports",
                             f"{len(auto)} ports still learn or flood ("
                             f"{', '.join(p.who() for p in auto)}): the kernel takes the uplink "
                             f"out of promiscuous mode only when exactly one does",
                             "manage the guest ports (promiscLinks='no', then netplug "
                             "reconcile) and keep a single uplink"))
            causes.append("more than one port learns or floods")
        for up in uplinks:
            if up.promisc:
                f.append(Finding("warning", subj, "uplink-promisc",
                                 f"{up.name} was put in promiscuous mode by a user "
                                 f"(IFF_PROMISC: `ip link set {up.name} promisc on`, or a "
                                 f"packet capture on it)",
                                 f"stop the capture, or `ip link set {up.name} promisc off`"))
                causes.append(f"{up.name} was set promiscuous by hand")
            kind = NO_UNICAST_FILTER.get(up.kind or "")
            measured = (v.vlan_filtering and auto == [up] and not (v.promiscuity or 0) and
                        (up.promiscuity or 0) > 0 and not up.promisc)
            if kind or measured:
                how = (f"{up.name} is a {kind}, whose driver cannot filter unicast "
                       f"(no IFF_UNICAST_FLT)" if kind else
                       f"vlan_filtering is on, {up.name} is the only port that learns or "
                       f"floods and {v.name} is not promiscuous, yet {up.name} stays "
                       f"promiscuous with no IFF_PROMISC of its own: its driver "
                       f"({up.kind or 'a physical NIC'}) cannot filter unicast (no "
                       f"IFF_UNICAST_FLT), or a packet capture on it holds it promiscuous")
                f.append(Finding("warning" if v.vlan_filtering else "info", subj,
                                 "uplink-driver",
                                 f"{how}: the kernel keeps such a port promiscuous even when "
                                 f"everything else allows taking it out",
                                 "use an uplink whose driver filters unicast (most physical "
                                 "NICs, virtio_net, macvlan); netplug cannot change this"))
                causes.append(f"{up.name}'s driver cannot filter unicast")
        if promisc_uplinks:
            # The causes above carry the warnings and what to do; this is the measurement.
            f.append(Finding("info" if causes or not v.vlan_filtering else "warning", subj,
                             "uplink", f"uplink promiscuous: {up_desc}",
                             None if causes else
                             "wait a moment and run doctor again; if it persists, the kernel "
                             "did not sync the uplink (check `ip -d link show` for it)"))
        else:
            f.append(Finding("ok", subj, "uplink", f"uplink not promiscuous: {up_desc}"))
            for up in uplinks:
                lacking = sorted(p.mac for p in managed if p.fdb and p.mac and
                                 p.mac not in (up.unicast_filter or []))
                if lacking and up.unicast_filter is not None:
                    lacking_filter.append(up.name)
                    f.append(Finding("error", subj, "uplink-filter",
                                     f"uplink {up.name} filters unicast and its filter lacks "
                                     f"guest MACs {', '.join(lacking)}: a real NIC drops "
                                     f"frames for those guests",
                                     f"check that {v.name} has vlan_filtering on and "
                                     f"{up.name} is the only port that learns or floods; "
                                     f"`bridge fdb show dev {up.name}` shows its list"))
        v.uplink_filtered = not promisc_uplinks and not lacking_filter

    # 3. The verdict, from the findings above (never a different story).
    if v.goal_reached:
        f.append(Finding("ok", subj, "goal", "goal reached: managed guests get only their own "
                         "unicast and the uplink is not promiscuous"))
        return
    why = []
    if not managed:
        why.append("no managed guest port")
    elif not v.guests_isolated:
        why.append("guest ports drifted (see above)")
    else:
        why.append("flooding to guests is off")
    if promisc_uplinks:
        cause = (", ".join(causes[:-1]) + " and " + causes[-1] if len(causes) > 1 else
                 causes[0] if causes else "the kernel has not synced it")
        why.append(f"but the uplink {names} stays promiscuous because {cause}")
    elif lacking_filter:
        why.append(f"but the unicast filter of {', '.join(lacking_filter)} lacks guest MACs")
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
    paths: Any = None  # paths.Paths, when resolved

    def all(self) -> list[Finding]:
        return [f for b in self.bridges for f in b.findings] + self.findings

    @property
    def exit_status(self) -> int:
        return 2 if any(f.level in ("warning", "error") for f in self.all()) else 0

    def to_json(self, uri: str | None) -> dict[str, Any]:
        counts = {lvl: sum(1 for f in self.all() if f.level == lvl) for lvl in LEVELS}
        return {"version": JSON_VERSION, "command": "doctor", "connect": uri,
                "exit_status": self.exit_status, "summary": counts,
                "paths": self.paths.to_json() if self.paths is not None else None,
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
                       "networks or running domains)" if not any(
                           f.check == "libvirt" for f in self.findings)
                       else "bridges not checked: libvirt could not be read (see above)")
        return out


def diagnose(inputs: Inputs, state: StateDir, kernel, *, hooks_dir: str,
             sysfs: str = "/sys/class/net", proc: str = "/proc") -> Diagnosis:
    """What needs libvirt: the bridges, policy conflicts, macvtap lower devices, plus the
    hooks and the agent (``host_findings`` adds the rest)."""
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


def host_findings(paths, state: StateDir, kernel, *, sysfs: str = "/sys/class/net",
                  proc: str = "/proc", boot: str = "/boot",
                  systemd_dirs=SYSTEMD_DIRS) -> list[Finding]:
    """What doctor checks without libvirt: paths, config, state dir, kernel."""
    agent = running_agent_paths(proc) or unit_agent_paths(systemd_dirs)
    return (check_paths(paths, agent) + [check_config(paths)] + check_state_dir(state)
            + check_kernel(kernel, sysfs, boot, proc))


def register(subparsers) -> None:
    sp = subparsers.add_parser(
        "doctor", help="explain, per managed bridge, whether the goal is reached and why not",
        description="Host: the paths hooks, agent and commands use agree; hooks installed "
                    "and bound to a working interpreter; config valid; state dir usable; "
                    "kernel capabilities; agent running (all without libvirtd). Per managed "
                    "bridge: VLAN filtering support, ports that still learn or flood (with "
                    "their owner), the uplink's promiscuity, driver and unicast filter; "
                    "policies that conflict with libvirt's own. Each finding says what to "
                    "do. Read-only. Exit status: 0 all good, 2 warnings or errors found, 1 "
                    "could not check.")
    add_common_arguments(sp)
    sp.set_defaults(func=cmd_doctor)


def run(args: argparse.Namespace, out: TextIO, *,
        kernel_factory: Callable[[], Any] | None = None, sysfs: str = "/sys/class/net",
        proc: str = "/proc", boot: str = "/boot", systemd_dirs=SYSTEMD_DIRS) -> int:
    paths = command_paths(args)
    state = reading_state(paths.state_dir.value)
    with (kernel_factory or _new_kernel)() as kernel:
        host = host_findings(paths, state, kernel, sysfs=sysfs, proc=proc, boot=boot,
                             systemd_dirs=systemd_dirs)
        try:
            inputs = read_inputs(args.connect, paths.config.value,
                                 guest_query=args.guest_query, lenient_config=True)
        except NetplugError as e:
            dx = Diagnosis([], host + [
                Finding("error", "libvirt", "libvirt", f"{e}; bridges, policies and guests "
                        f"were not checked", "start libvirt's daemon (libvirtd, or virtqemud "
                        "and virtnetworkd) or give --connect URI; the host checks above did "
                        "not need it"),
                check_hooks(args.hooks_dir), check_agent(None, proc)])
        else:
            dx = diagnose(inputs, state, kernel, hooks_dir=args.hooks_dir, sysfs=sysfs,
                          proc=proc)
            dx.findings[:0] = host
    dx.paths = paths
    if args.json:
        json.dump(dx.to_json(args.connect), out, indent=2)
        out.write("\n")
    else:
        for line in dx.lines():
            out.write(line + "\n")
    return dx.exit_status


def cmd_doctor(args: argparse.Namespace) -> int:
    setup_logging("doctor", False)
    return run(args, sys.stdout)


__all__ = ["Finding", "BridgeView", "PortView", "Diagnosis", "diagnose", "host_findings",
           "register", "vlan_filtering_support", "kernel_vlan_filtering", "agent_pids",
           "check_hooks", "check_agent", "check_config", "check_paths", "check_state_dir",
           "explain_bridge", "unit_agent_paths", "running_agent_paths"]
