"""``netplug reconcile``: repair drift between libvirt's live state and the kernel, now.

Desired state: the live XML of every running domain and active network (libvirt_io), plus the
config. Actual state: the kernel, read in bulk (one link dump, one FDB dump per bridge; see
apply.observe_all). What netplug owns: the state dir. The engine is sync.sync, the same one the
agent runs, with the hooks' planners and applier under the hooks' lock; this module only reads
libvirt, explains each planned operation (why it is needed) and reports.

Exit status: 0 in sync, 2 drift found (and, without --dry-run, repaired), 1 error (libvirt or
the kernel could not be read, an operation failed, or a managed interface is in a state netplug
cannot fix, e.g. its MAC is a static entry on another port). Output formats are documented in
docs/reconcile.md.

This module also holds what ``status`` and ``doctor`` share with it: reading libvirt
(``read_inputs``) and a read-only observation through the same engine (``observe_dry``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, TextIO

from .errors import NetplugError
from .ops import (AddMulticast, AddUnicast, DeleteFdb, DelMulticast, DelUnicast, Operation,
                  ReplaceFdb, SetAddress, SetAllmulti, SetPortFlags, SetPromisc,
                  SetVlanFiltering)
from .plan import Observed
from .state import StateDir
from .sync import Desired, RxSource, SyncReport, sync

log = logging.getLogger(__name__)

from .cli import JSON_VERSION  # noqa: E402 - one format version for every command
EXIT_IN_SYNC, EXIT_ERROR, EXIT_DRIFT = 0, 1, 2


# -- inputs: libvirt + config ---------------------------------------------------------------


@dataclass
class Inputs:
    """Everything read from libvirt and the config for one run."""

    uri: str
    desired: Desired
    rx_source: RxSource | None
    seconds: float = 0.0  # time spent reading libvirt (listing + every domain's live XML)
    config_error: str | None = None  # the config is invalid (read-only commands go on without)


def load_config_checked(config_path: str | None, lenient: bool):
    """The config, and why it is invalid (``lenient``: an empty config then, as the hooks use;
    otherwise the PolicyError is raised)."""
    from .errors import PolicyError
    from .policy import Config, load_config

    try:
        return load_config(config_path), None
    except PolicyError as e:
        if not lenient:
            raise
        return Config(), str(e)


def read_inputs(uri: str, config_path: str | None, names: Iterable[str] | None = None, *,
                guest_query: bool = True, lenient_config: bool = False) -> Inputs:
    """Connect to libvirt and read the desired state (raises NetplugError, one line).

    ``lenient_config``: an invalid config does not stop the run (status, doctor): it is read
    as the hooks read it (empty: nothing managed through it) and reported in ``config_error``.
    """
    from . import libvirt_io

    config, config_error = load_config_checked(config_path, lenient_config)
    t0 = time.monotonic()
    conn = libvirt_io.connect(uri)
    desired = libvirt_io.read_desired(conn, config, names)
    seconds = time.monotonic() - t0
    rx_source = libvirt_io.rx_source_for(conn) if guest_query else None
    return Inputs(uri, desired, rx_source, seconds, config_error)


def command_paths(args: argparse.Namespace, *, warn: bool = False):
    """The config and state dir this command uses: the same as the installed hooks' unless
    told otherwise (paths.resolve). ``warn``: say on stderr where they differ from the hooks'
    (a command that writes would work against them)."""
    from .paths import resolve

    paths = resolve(getattr(args, "config", None), getattr(args, "state_dir", None),
                    hooks_dir=getattr(args, "hooks_dir", None))
    if warn:
        for m in paths.mismatches():
            log.warning("%s: hooks and this command disagree about what netplug manages", m)
    return paths


def _new_kernel():
    # Looked up at call time: the one seam (tests put their fake kernel behind it).
    from . import kernel

    return kernel.NetlinkKernel()


def observe_dry(inputs: Inputs, state: StateDir, kernel=None) -> SyncReport:
    """The engine in dry-run mode: intents, observation and the operations a repair would do."""
    if kernel is not None:
        return sync(kernel, state, inputs.desired, rx_source=inputs.rx_source, dry_run=True)
    with _new_kernel() as k:
        return sync(k, state, inputs.desired, rx_source=inputs.rx_source, dry_run=True)


# -- why each operation is needed (pure) --------------------------------------------------------


def onoff(v: bool | None) -> str:
    return {True: "on", False: "off", None: "unknown"}[v]


def explain(op: Operation, running: bool, observed: Observed | None) -> str:
    """Why the planner wants ``op``: the drift it repairs, in words, from the observed state."""
    c = op.ctx
    gone = f"domain {c.domain} no longer runs"
    if isinstance(op, ReplaceFdb):
        entries = observed.entries_for_mac(c.bridge, op.mac) if observed and c.bridge else []
        same = [e for e in entries if e.vlan == op.vlan]
        here = [e for e in same if e.port == op.device]
        if here:
            e = here[0]
            if e.state != "static":
                return (f"{op.device} has only a {e.state} entry for {op.mac} "
                        f"({'learned' if e.state == 'dynamic' else 'host-local'}); a static one "
                        f"is needed")
            return (f"the entry is {'sticky' if e.sticky else 'not sticky'} but policy says "
                    f"sticky='{'yes' if op.sticky else 'no'}'")
        if same:
            e = same[0]
            return (f"{op.mac} is a {e.state} entry on port {e.port}, not on the guest's tap "
                    f"{op.device}")
        if entries:
            def vid(v: int | None) -> str:
                return "no VLAN" if v is None else f"VLAN {v}"

            have = ", ".join(vid(e.vlan) for e in entries)
            return f"{op.mac} has entries only on {have}; {vid(op.vlan)} is needed"
        return f"no FDB entry for the guest's MAC on {op.device}"
    if isinstance(op, SetPortFlags):
        if not running:
            return f"{gone}: restore the flags netplug changed"
        now = []
        if op.prev_learning is not False:
            now.append(f"learning is {onoff(op.prev_learning)}")
        if op.prev_flood is not False:
            now.append(f"flood is {onoff(op.prev_flood)}")
        return " and ".join(now) or "port flags differ"
    if isinstance(op, DeleteFdb):
        if not running:
            return f"{gone}: remove the entry netplug added"
        return ("netplug added this entry for an interface that no longer wants it (MAC "
                "changed, interface removed or no longer managed)")
    if isinstance(op, SetVlanFiltering):
        return "policy says vlanFiltering='yes' and the bridge has vlan_filtering off"
    if isinstance(op, AddMulticast):
        return f"the guest listens to {op.mac} and {op.device} does not pass it"
    if isinstance(op, AddUnicast):
        return f"the guest filters for {op.mac} and {op.device} does not pass it"
    if isinstance(op, (DelMulticast, DelUnicast)):
        if not running:
            return f"{gone}: remove what netplug added"
        return "netplug added it and the guest's filter (or the policy) no longer wants it"
    if isinstance(op, (SetAllmulti, SetPromisc)):
        mode = "allmulticast" if isinstance(op, SetAllmulti) else "promiscuous mode"
        if not running:
            return f"{gone}: turn off the {mode} netplug turned on"
        if op.on:
            return f"the guest's filter asks for {mode}"
        return f"netplug turned {mode} on and the guest's filter no longer asks for it"
    if isinstance(op, SetAddress):
        if not running:
            return f"{gone}: restore {op.device}'s original address"
        return f"{op.device} has address {op.prev_mac or 'unknown'}, the guest's MAC is {op.mac}"
    return "planned by netplug"


# -- the outcome of one run -----------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    op: Operation
    running: bool
    reason: str
    result: str  # planned | applied | failed | not-applied
    error: str | None = None

    _PREFIX = {"planned": "would repair", "applied": "repaired", "failed": "FAILED",
               "not-applied": "not applied"}

    def to_json(self) -> dict[str, Any]:
        c = self.op.ctx
        return {"domain": c.domain, "domain_running": self.running, "interface": c.interface,
                "mac": c.mac, "bridge": c.bridge, "network": c.network, "lower": c.lower,
                "device": self.op.device, "action": self.op.kind,
                "description": self.op.what(), "reason": self.reason, "result": self.result,
                "error": self.error, "operation": self.op.to_json()}

    def line(self) -> str:
        tail = f": {self.error}" if self.error else ""
        return (f"{self._PREFIX[self.result]}: {self.op.ctx.describe()}: {self.op.what()} "
                f"({self.reason}){tail}")


@dataclass
class Outcome:
    report: SyncReport
    changes: list[Change] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    uri: str | None = None

    @property
    def dry_run(self) -> bool:
        return self.report.dry_run

    @property
    def error_notes(self) -> list[str]:
        return [n.message for n in self.report.notes if n.level == "error"]

    @property
    def exit_status(self) -> int:
        if self.errors or self.error_notes:
            return EXIT_ERROR
        return EXIT_DRIFT if self.changes else EXIT_IN_SYNC

    @property
    def status(self) -> str:
        if self.exit_status == EXIT_ERROR:
            return "error"
        if not self.changes:
            return "in-sync"
        return "drift" if self.dry_run else "repaired"

    def counts(self) -> dict[str, int]:
        doms = self.report.domains
        return {
            "running_domains": sum(1 for d in doms if d.running),
            "retired_domains": sum(1 for d in doms if not d.running),
            "managed_ports": sum(1 for d in doms for i in d.bridge_intents if i.managed),
            "managed_macvtaps": sum(1 for d in doms for i in d.macvtap_intents if i.managed),
            "changes": len(self.changes),
            "applied": sum(1 for c in self.changes if c.result == "applied"),
            "failed": sum(1 for c in self.changes if c.result == "failed"),
            "domains_with_changes": len({c.op.ctx.domain for c in self.changes}),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "version": JSON_VERSION,
            "command": "reconcile",
            "connect": self.uri,
            "dry_run": self.dry_run,
            "status": self.status,
            "exit_status": self.exit_status,
            "summary": self.counts(),
            "changes": [c.to_json() for c in self.changes],
            "notes": [n.to_json() for n in self.report.notes],
            "errors": list(self.errors),
            "domains": [{"name": d.name, "running": d.running,
                         "managed_ports": sum(1 for i in d.bridge_intents if i.managed),
                         "managed_macvtaps": sum(1 for i in d.macvtap_intents if i.managed),
                         "changes": len(d.ops)} for d in self.report.domains],
            "timing": {k: round(v, 6) for k, v in self.timings.items()},
        }

    def lines(self) -> list[str]:
        out = [c.line() for c in self.changes]
        out += [f"{n.level}: {n.message}" for n in self.report.notes]
        out += [f"error: {e}" for e in self.errors]
        n = self.counts()
        managed = (f"{n['managed_ports']} managed port{'s' * (n['managed_ports'] != 1)}, "
                   f"{n['managed_macvtaps']} managed macvtap"
                   f"{'s' * (n['managed_macvtaps'] != 1)} in {n['running_domains']} running "
                   f"domain{'s' * (n['running_domains'] != 1)}")
        took = f"{self.timings.get('total', self.report.elapsed):.2f} s"
        what = (f"{n['changes']} change{'s' * (n['changes'] != 1)} for "
                f"{n['domains_with_changes']} domain{'s' * (n['domains_with_changes'] != 1)}")
        if self.status == "in-sync":
            out.append(f"in sync: {managed} ({took})")
        elif self.status == "drift":
            out.append(f"drift: {what} (dry run: nothing changed); {managed} ({took})")
        elif self.status == "repaired":
            out.append(f"drift repaired: {what}; {managed} ({took})")
        else:
            problems = len(self.errors) + len(self.error_notes) + n["failed"]
            out.append(f"errors: {problems} problem{'s' * (problems != 1)}"
                       + (f", {what}" if self.changes else "") + f"; {managed} ({took})")
        return out


def outcome_of(report: SyncReport, desired: Desired) -> Outcome:
    """Explain every planned operation and say what became of it."""
    applied = set(report.applied)
    failed = {op: str(e) for op, e in report.errors}
    observed = report.observed
    changes = []
    for ds in report.domains:
        for op in ds.ops:
            if report.dry_run:
                result, err = "planned", None
            elif op in failed:
                result, err = "failed", failed[op]
            elif op in applied:
                result, err = "applied", None
            else:
                # Another operation on the same device failed first; that port was rolled
                # back as a whole.
                result, err = "not-applied", None
            changes.append(Change(op, ds.running, explain(op, ds.running, observed), result,
                                  err))
    errors = list(desired.errors)
    errors += [f"failed to {op.describe()}: {e}" for op, e in report.errors]
    return Outcome(report, changes, errors)


def reconcile(kernel, state: StateDir, desired: Desired, *, rx_source: RxSource | None = None,
              dry_run: bool = False, only: Iterable[str] | None = None) -> Outcome:
    """One run of the engine, explained. ``kernel`` is the seam (NetlinkKernel or a fake)."""
    report = sync(kernel, state, desired, rx_source=rx_source, dry_run=dry_run, only=only)
    out = outcome_of(report, desired)
    out.timings["sync"] = report.elapsed
    return out


# -- the command ------------------------------------------------------------------------------


def add_common_arguments(sp: argparse.ArgumentParser, *, guest_query: bool = True) -> None:
    from .paths import DEFAULT_URI, add_path_arguments

    sp.add_argument("--connect", "-c", metavar="URI", default=DEFAULT_URI,
                    help=f"libvirt URI (default: {DEFAULT_URI})")
    add_path_arguments(sp)
    sp.add_argument("--json", action="store_true", help="print a JSON document "
                                                        "(docs/reconcile.md)")
    if guest_query:
        sp.add_argument("--no-guest-query", dest="guest_query", action="store_false",
                        help="do not ask QEMU for guests' RX filters (query-rx-filter); "
                             "compare macvtaps with what netplug last programmed instead")


def register(subparsers) -> None:
    sp = subparsers.add_parser(
        "reconcile", help="repair drift between libvirt's live state and the kernel",
        description="Compare every running domain's and active network's live XML with the "
                    "kernel (bridge FDB, port learning/flood, macvtap RX filters) and repair "
                    "what netplug manages. Exit status: 0 in sync, 2 drift found (repaired "
                    "unless --dry-run), 1 error.")
    sp.add_argument("--dry-run", "-n", action="store_true",
                    help="only print what would change")
    sp.add_argument("--domain", action="append", dest="domains", metavar="NAME",
                    help="only this domain (repeatable); records of other domains are left "
                         "alone")
    add_common_arguments(sp)
    sp.add_argument("--metrics-file", metavar="PATH",
                    help="write Prometheus text-format metrics here (node_exporter textfile "
                         "collector, e.g. /var/lib/prometheus/node-exporter/netplug.prom)")
    sp.add_argument("--verbose", "-v", action="store_true",
                    help="also log every kernel change on stderr")
    sp.set_defaults(func=cmd_reconcile)


def setup_logging(component: str, verbose: bool) -> None:
    """Changes go to syslog/journald at info; stderr gets warnings (everything with -v).

    The report itself goes to stdout, so a terminal does not see every line twice.
    """
    from . import logsetup

    root = logsetup.setup(component, None, logging.INFO)
    h = logging.StreamHandler(sys.stderr)
    h.setLevel(logging.INFO if verbose else logging.WARNING)
    h.setFormatter(logging.Formatter(f"netplug {component}: %(levelname)s: %(message)s"))
    root.addHandler(h)


def run(args: argparse.Namespace, out: TextIO, *,
        kernel_factory: Callable[[], Any] | None = None) -> int:
    """The command behind ``netplug reconcile`` (``kernel_factory`` replaces NetlinkKernel)."""
    from .errors import PolicyError
    from .metrics import Health

    t0 = time.monotonic()
    paths = command_paths(args, warn=True)
    state = StateDir(paths.state_dir.value)
    metrics_file = getattr(args, "metrics_file", None)
    health = Health()
    try:
        try:
            inputs = read_inputs(args.connect, paths.config.value, args.domains,
                                 guest_query=args.guest_query)
        except PolicyError as e:
            # Repairing with the config read as empty would undo what it manages.
            health.config_valid = False
            raise NetplugError(f"{e}; reconcile does not run with an invalid config: fix it "
                               f"(netplug check-config checks it)") from None
        health.invalid_policies = len(inputs.desired.errors)
        t1 = time.monotonic()
        with (kernel_factory or _new_kernel)() as kernel:
            outcome = reconcile(kernel, state, inputs.desired, rx_source=inputs.rx_source,
                                dry_run=args.dry_run, only=args.domains)
    except NetplugError:
        if metrics_file:
            try:
                _write_metrics(metrics_file, None, state, health)
            except NetplugError as e:  # the run's own error is the one to report
                log.warning("%s", e)
        raise
    health.state_record_errors = len(state.record_errors())
    outcome.uri = inputs.uri
    outcome.timings["libvirt_read"] = inputs.seconds
    outcome.timings["kernel_and_apply"] = time.monotonic() - t1
    outcome.timings["total"] = time.monotonic() - t0
    if args.json:
        json.dump(outcome.to_json(), out, indent=2)
        out.write("\n")
    else:
        for line in outcome.lines():
            out.write(line + "\n")
    if metrics_file:
        _write_metrics(metrics_file, outcome, state, health)
    return outcome.exit_status


def _write_metrics(path: str, outcome: Outcome | None, state: StateDir, health=None) -> None:
    from . import metrics

    if outcome is None:
        metrics.write_metrics(path, None, source="reconcile", success=False, state=state,
                              health=health)
        return
    metrics.write_metrics(path, outcome.report, source="reconcile",
                          success=outcome.exit_status != EXIT_ERROR, state=state,
                          duration=outcome.timings.get("total"), health=health)


def cmd_reconcile(args: argparse.Namespace) -> int:
    setup_logging("reconcile", args.verbose)
    return run(args, sys.stdout)
