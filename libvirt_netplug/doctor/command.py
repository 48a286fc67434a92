"""``netplug doctor``: the diagnosis, its output and the command."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Any, Callable, TextIO

from ..errors import NetplugError
from ..reconcile import (Inputs, JSON_VERSION, add_common_arguments, command_paths, observe_dry,
                         read_inputs, setup_logging, _new_kernel)
from ..state import StateDir
from .bridges import BridgeView, bridge_view, managed_bridges
from .findings import Finding, LEVELS
from .host import (SYSTEMD_DIRS, check_agent, check_config, check_hooks, check_kernel,
                   check_paths, check_state_dir, running_agent_paths, unit_agent_paths)
from .policies import macvtap_findings, policy_findings


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
    state = StateDir(paths.state_dir.value)
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
