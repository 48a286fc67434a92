"""What doctor checks without libvirt: the kernel, the paths hooks/agent/commands use, the
hooks and their interpreter, the config, the state dir, the agent (running or its unit)."""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass
from typing import Mapping

from ..errors import KernelError, NetplugError
from ..reconcile import load_config_checked
from ..state import StateDir
from .findings import Finding, RELOAD, plural


def sysfs_vlan_filtering(sysfs: str = "/sys/class/net", first: str | None = None
                         ) -> tuple[bool, str] | None:
    """Whether a bridge in sysfs offers ``vlan_filtering`` (the kernel has
    CONFIG_BRIDGE_VLAN_FILTERING), and which bridge said so — ``first`` asked before the
    others; None when sysfs shows no bridge."""
    try:
        names = sorted(n for n in os.listdir(sysfs) if n != first)
    except OSError:
        return None
    for name in ([first] if first else []) + names:
        bdir = os.path.join(sysfs, name, "bridge")
        if os.path.isdir(bdir):
            return os.path.exists(os.path.join(bdir, "vlan_filtering")), name
    return None


def kernel_vlan_filtering(sysfs: str = "/sys/class/net", boot: str = "/boot",
                          proc: str = "/proc") -> tuple[bool | None, str]:
    """Whether the running kernel has CONFIG_BRIDGE_VLAN_FILTERING, and how that is known,
    without a bridge of ours to ask: any bridge in sysfs, else the kernel's config file."""
    seen = sysfs_vlan_filtering(sysfs)
    if seen is not None:
        return seen[0], f"sysfs of bridge {seen[1]}"
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


def check_hooks(hooks_dir: str) -> Finding:
    """Installed, ours, executable, and starting a Python that imports everything a hook
    needs, exactly as libvirtd would start it."""
    from .. import install

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
                   + (f", bound to {python}, which imports the hook" if python else "")
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
                   f"{plural(len(config.bridges), 'bridge')} and "
                   f"{plural(len(config.direct), 'macvtap lower device')}")


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
    errors = state.record_errors()
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
    from ..paths import resolve

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
