"""Observe the kernel, apply a plan port by port, and record what netplug now owns.

A port is a transaction: if any of its operations fails, the ones already done are undone in
reverse (so a half-applied port goes back to learning/flooding and the guest keeps
connectivity), and the error is reported with the port's domain, interface and MAC.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterable, MutableMapping, TYPE_CHECKING

from .errors import DeviceGone, NetplugError
from .ops import Operation, SetPortFlags, ReplaceFdb
from .plan import Observed, Plan

if TYPE_CHECKING:  # annotations only: the hook loads netlink only when it has work
    from .kernel import Kernel, Link

log = logging.getLogger(__name__)


def observe(kernel: Kernel, bridges: Iterable[str], taps: Iterable[str] = ()) -> Observed:
    """Read what the planner needs: each bridge's ports and FDB, plus any stray taps.

    One filtered link dump and one FDB dump per bridge, whatever the number of ports.
    """
    links: dict[str, Link] = {}
    fdb = {}
    for br in sorted(set(b for b in bridges if b)):
        try:
            links[br] = kernel.link(br)
            links.update(kernel.bridge_ports(br))
            fdb[br] = tuple(kernel.fdb(br))
        except DeviceGone:
            continue
    for tap in taps:
        if tap and tap not in links:
            try:
                links[tap] = kernel.link(tap)
            except DeviceGone:
                pass
    return Observed(links, fdb)


def observe_all(kernel: Kernel, bridges: Iterable[str]) -> Observed:
    """Bulk observation for reconcile: one link dump for everything, one FDB dump per bridge."""
    links = kernel.links()
    fdb = {}
    for br in sorted(set(bridges)):
        if br in links:
            try:
                fdb[br] = tuple(kernel.fdb(br))
            except DeviceGone:
                pass
    return Observed(links, fdb)


@dataclass
class ApplyResult:
    applied: list[Operation] = field(default_factory=list)
    errors: list[tuple[Operation, NetplugError]] = field(default_factory=list)
    rolled_back: list[Operation] = field(default_factory=list)

    @property
    def failed_devices(self) -> set[str]:
        return {op.device for op, _ in self.errors}

    @property
    def ok(self) -> bool:
        return not self.errors


def _groups(ops: Iterable[Operation]) -> list[list[Operation]]:
    groups: list[list[Operation]] = []
    for op in ops:
        if groups and groups[-1][-1].device == op.device:
            groups[-1].append(op)
        else:
            groups.append([op])
    return groups


def apply(ops: Iterable[Operation], kernel: Kernel,
          logger: logging.Logger | None = None) -> ApplyResult:
    logger = logger or log
    result = ApplyResult()
    for group in _groups(ops):
        done: list[Operation] = []
        for op in group:
            try:
                op.run(kernel)
            except NetplugError as e:
                logger.error("failed to %s: %s", op.describe(), e)
                result.errors.append((op, e))
                if not isinstance(e, DeviceGone):
                    _rollback(done, kernel, logger, result)
                break
            logger.info("%s", op.describe())
            done.append(op)
        else:
            result.applied.extend(done)
    return result


def _rollback(done: list[Operation], kernel: Kernel, logger: logging.Logger,
              result: ApplyResult) -> None:
    for op in reversed(done):
        inv = op.inverse()
        if inv is None:
            continue
        try:
            inv.run(kernel)
            logger.warning("rolled back: %s", inv.describe())
            result.rolled_back.append(inv)
        except NetplugError as e:
            logger.error("rollback failed to %s: %s", inv.describe(), e)


def record_ports(record: MutableMapping[str, Any], plan: Plan, observed: Observed,
                 result: ApplyResult) -> None:
    """Update a domain's state record after applying ``plan``.

    Managed ports whose operations all succeeded are recorded with the entries netplug owns
    and the flags it saved; ports the plan cleaned up are dropped.
    """
    ports = record.setdefault("ports", {})
    for tap in plan.cleaned:
        if tap not in result.failed_devices:
            ports.pop(tap, None)
    for it in plan.intents:
        if not it.managed or it.tap in result.failed_devices or it.tap in plan.skipped:
            continue
        link = observed.links.get(it.tap)
        if link is None or link.master != it.bridge:
            continue
        prev = ports.get(it.tap) or {}
        if prev.get("ifindex") != link.index:
            prev = {}  # a different tap under a reused name: nothing of ours is on it
        # Only what netplug itself did is recorded, so cleanup never removes an entry or
        # turns on flags that someone else set: entries this run added, plus the earlier
        # record; flags as they were before netplug first changed them.
        entries = {tuple(e) for e in prev.get("fdb", [])}
        flags = bool(prev.get("flags"))
        saved = prev.get("saved")
        for op in result.applied:
            if op.device != it.tap:
                continue
            if isinstance(op, ReplaceFdb):
                entries.add((op.mac, op.vlan))
            elif isinstance(op, SetPortFlags) and not flags:
                flags = True
                saved = [op.prev_learning if op.prev_learning is not None else True,
                         op.prev_flood if op.prev_flood is not None else True]
        ports[it.tap] = {
            "domain": it.domain, "interface": it.ctx.interface, "mac": it.mac,
            "bridge": it.bridge, "network": it.network, "ifindex": link.index,
            "fdb": sorted([list(e) for e in entries], key=lambda e: (e[0], e[1] or 0)),
            "flags": flags, "saved": saved if flags else None,
            "policy": it.policy.to_json(),
        }
