"""Observe the kernel, apply a plan port by port, and record what netplug now owns.

A port is a transaction: if any of its operations fails, the ones already done are undone in
reverse (so a half-applied port goes back to learning/flooding and the guest keeps
connectivity), and the error is reported with the port's domain, interface and MAC.

Records are written AHEAD of the kernel changes (``apply_recorded``): before netplug adds an
entry or turns a port's flooding off, the domain's record already says so. A run killed at
any point (SIGKILL, the hook's alarm, a full or read-only state dir) therefore leaves at most
a record that claims a little more than the kernel has, never a kernel change that no record
names; the next hook, stop or reconcile converges from it (cleanup deletes only entries it
finds, static, on that very tap).
"""

from __future__ import annotations

from .errors import DeviceGone, NetplugError, NotSupported
from .ops import DeleteFdb, Operation, SetPortFlags, ReplaceFdb
from .plan import Observed, Plan, PortIntent, entry_vlans
from .state import copy_record
from .values import field, mutable

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~2 ms a hook)
if TYPE_CHECKING:  # annotations only: the hook loads netlink only when it has work
    from logging import Logger
    from typing import Any, Callable, Iterable, Mapping, MutableMapping

    from .hooklog import HookLogger
    from .kernel import Kernel, Link, PortVlans
    from .state import StateDir


def _module_logger() -> Logger:
    """The default logger (the agent's, reconcile's): logging's, imported only then — the
    hooks pass their own (hooklog), and importing logging costs a hook ~12 ms."""
    import logging

    return logging.getLogger(__name__)


# -- observing ----------------------------------------------------------------------------------


def _port_vlans(kernel: Kernel, tap: str) -> PortVlans | None:
    try:
        return kernel.port_vlans(tap)
    except (DeviceGone, NotSupported):
        return None


def observe_ports(kernel: Kernel, intents: Iterable[PortIntent],
                  records: Mapping[str, Mapping[str, Any]],
                  owner_of: Callable[[str, int], str | None] | None = None) -> Observed:
    """What a hook's planner needs, and nothing more: the intents' and records' taps and
    bridges, each tap's VLANs, and the bridge's entry for each (MAC, VLAN) the plan may touch
    — a handful of requests per port, whatever the number of other ports on the bridge.

    ``owner_of(tap, ifindex)``: which domain's record holds a tap (StateDir.port_owner).
    """
    intents = [i for i in intents if i.managed and i.tap and i.bridge]
    links: dict[str, Link] = {}
    for name in sorted({i.bridge for i in intents} | {i.tap for i in intents} |
                       {r.get("bridge") for r in records.values()} | set(records)):
        if name and name not in links:
            try:
                links[name] = kernel.link(name)
            except DeviceGone:
                pass
    vlans: dict[str, PortVlans] = {}
    keys: set[tuple[str, str, int | None]] = set()
    for it in intents:
        link, br = links.get(it.tap), links.get(it.bridge)
        if link is None or br is None or link.master != it.bridge:
            continue
        if br.vlan_filtering is not None:
            pv = _port_vlans(kernel, it.tap)
            if pv is not None:
                vlans[it.tap] = pv
        for mac in (it.mac, *it.extra_macs):
            keys |= {(it.bridge, mac, v) for v in entry_vlans(br, vlans.get(it.tap))}
    for tap, rec in records.items():
        keys |= {(rec.get("bridge"), m, v) for m, v in rec.get("fdb", [])}
    entries = {}
    for bridge, mac, vlan in sorted(keys, key=lambda k: (k[0], k[1], k[2] or 0)):
        if bridge not in links:
            continue
        try:
            entries[(bridge, mac, vlan)] = kernel.fdb_get(bridge, mac, vlan)
        except DeviceGone:
            continue
    owners: dict[str, str] = {}
    if owner_of is not None:
        ports = {i.tap for i in intents} | {e.port for e in entries.values() if e is not None}
        for port in sorted(ports):
            link = links.get(port)
            index = link.index if link is not None else None
            if index is None:
                try:
                    index = kernel.link(port).index
                except (DeviceGone, NetplugError):
                    continue
            owner = owner_of(port, index)
            if owner is not None:
                owners[port] = owner
    return Observed(links, {}, entries, vlans, owners)


def observe(kernel: Kernel, bridges: Iterable[str], taps: Iterable[str] = (),
            owners: Callable[[str, int], str | None] | None = None) -> Observed:
    """Each bridge's ports, FDB and port VLANs in bulk, plus any stray taps (the agent's
    per-domain runs; reconcile reads everything with ``observe_all``). ``owners``: as
    ``observe_ports``'s ``owner_of``, asked for every port with a static entry or in ``taps``."""
    links: dict[str, Link] = {}
    fdb = {}
    names = sorted(set(b for b in bridges if b))
    for br in names:
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
    owner_map: dict[str, str] = {}
    if owners is not None:
        ports = {t for t in taps if t} | {e.port for entries in fdb.values() for e in entries
                                           if e.state == "static"}
        for port in sorted(ports):
            link = links.get(port)
            if link is not None and (who := owners(port, link.index)) is not None:
                owner_map[port] = who
    return Observed(links, fdb, {}, _vlans_of(kernel, links), owner_map)


def observe_all(kernel: Kernel, bridges: Iterable[str],
                records: Mapping[str, Mapping[str, Any]] | None = None) -> Observed:
    """Bulk observation for reconcile: one link dump for everything, one FDB dump per bridge,
    one VLAN dump; ``records`` (domain -> record) name the owners of recorded taps."""
    links = kernel.links()
    fdb = {}
    for br in sorted(set(bridges)):
        if br in links:
            try:
                fdb[br] = tuple(kernel.fdb(br))
            except DeviceGone:
                pass
    owners = {}
    for name, rec in (records or {}).items():
        for tap, port in rec.get("ports", {}).items():
            link = links.get(tap)
            if link is not None and link.index == port.get("ifindex"):
                owners[tap] = name
    return Observed(links, fdb, {}, _vlans_of(kernel, links), owners)


def _vlans_of(kernel: Kernel, links: Mapping[str, Link]) -> dict[str, PortVlans]:
    if not any(link.kind == "bridge" and link.vlan_filtering is not None
               for link in links.values()):
        return {}
    try:
        return kernel.all_port_vlans()
    except NotSupported:
        return {}


# -- applying ----------------------------------------------------------------------------------


@mutable
class ApplyResult:
    applied: list[Operation] = field(default_factory=list)  # ops of ports that fully succeeded
    errors: list[tuple[Operation, NetplugError]] = field(default_factory=list)
    rolled_back: list[Operation] = field(default_factory=list)  # the inverse ops that ran
    done: list[Operation] = field(default_factory=list)  # every op that ran successfully
    undone: list[Operation] = field(default_factory=list)  # ops of ``done`` rolled back

    @property
    def failed_devices(self) -> set[str]:
        return {op.device for op, _ in self.errors}

    @property
    def effective(self) -> list[Operation]:
        """The operations whose effect is in the kernel now."""
        undone = set(map(id, self.undone))
        return [op for op in self.done if id(op) not in undone]

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
          logger: Logger | HookLogger | None = None) -> ApplyResult:
    logger = logger or _module_logger()
    result = ApplyResult()
    for group in _groups(ops):
        done: list[Operation] = []
        for op in group:
            try:
                op.run(kernel)
            except NetplugError as e:
                logger.error("failed to %s: %s", op.describe(), e, extra=_fields(op))
                result.errors.append((op, e))
                if not isinstance(e, DeviceGone):
                    _rollback(done, kernel, logger, result)
                break
            logger.info("%s", op.describe(), extra=_fields(op))
            done.append(op)
            result.done.append(op)
        else:
            result.applied.extend(done)
    return result


def _fields(op: Operation) -> dict[str, Any]:
    """Structured fields of a change for the journal (NETPLUG_DOMAIN=… and friends)."""
    c = op.ctx
    return {"netplug": {"domain": c.domain, "interface": c.interface, "mac": c.mac,
                        "bridge": c.bridge, "network": c.network, "lower": c.lower,
                        "device": op.device, "operation": op.kind}}


def _rollback(done: list[Operation], kernel: Kernel, logger: Logger | HookLogger,
              result: ApplyResult) -> None:
    for op in reversed(done):
        inv = op.inverse()
        if inv is None:
            continue
        try:
            inv.run(kernel)
            logger.warning("rolled back: %s", inv.describe(), extra=_fields(inv))
            result.rolled_back.append(inv)
            result.undone.append(op)
        except NetplugError as e:
            logger.error("rollback failed to %s: %s", inv.describe(), e, extra=_fields(inv))


# -- records -----------------------------------------------------------------------------------


def _port_record(it: PortIntent, link: Link, prev: Mapping[str, Any] | None) -> dict[str, Any]:
    prev = prev if prev and prev.get("ifindex") == link.index else {}
    rec = {
        "domain": it.domain, "interface": it.ctx.interface, "mac": it.mac,
        "bridge": it.bridge, "network": it.network, "ifindex": link.index,
        "fdb": [list(e) for e in prev.get("fdb", [])],
        "flags": bool(prev.get("flags")), "saved": prev.get("saved"),
        "policy": it.policy.to_json(),
    }
    if it.extra_macs:
        rec["extra"] = sorted(it.extra_macs)
    return rec


def _add_keys(rec: MutableMapping[str, Any], keys: Iterable[tuple[str, int | None]]) -> None:
    entries = {tuple(e) for e in rec.get("fdb", [])} | set(keys)
    rec["fdb"] = [list(e) for e in sorted(entries, key=lambda e: (e[0], e[1] or 0))]


def _remove_keys(rec: MutableMapping[str, Any], op: DeleteFdb) -> None:
    # A delete with no VLAN takes the MAC off every VLAN of the port.
    rec["fdb"] = [e for e in rec.get("fdb", [])
                  if not (e[0] == op.mac and (op.vlan is None or e[1] == op.vlan))]


def _note_flags(rec: MutableMapping[str, Any], op: SetPortFlags) -> None:
    if op.learning is False and op.flood is False:
        if not rec.get("flags"):
            rec["flags"] = True
            rec["saved"] = [op.prev_learning if op.prev_learning is not None else True,
                            op.prev_flood if op.prev_flood is not None else True]
    else:  # flags restored (cleanup)
        rec["flags"], rec["saved"] = False, None


def _managed_ports(plan: Plan, observed: Observed) -> dict[str, tuple[PortIntent, Link]]:
    out = {}
    for it in plan.intents:
        if not it.managed or it.hold or it.tap in plan.skipped:
            continue
        link = observed.links.get(it.tap)
        if link is None or link.master != it.bridge:
            continue
        out[it.tap] = (it, link)
    return out


def records_ahead(record: Mapping[str, Any], plan: Plan, observed: Observed
                  ) -> dict[str, Any] | None:
    """The record to write BEFORE applying ``plan``: everything the plan may add, on top of
    what is recorded (None: the plan adds nothing, so nothing needs writing first)."""
    adds = [op for op in plan.ops if isinstance(op, ReplaceFdb) or
            (isinstance(op, SetPortFlags) and op.learning is False and op.flood is False)]
    if not adds:
        return None
    ahead = copy_record(dict(record))
    ports = ahead.setdefault("ports", {})
    managed = _managed_ports(plan, observed)
    for op in adds:
        if op.device not in managed:
            continue
        it, link = managed[op.device]
        rec = ports.get(op.device)
        if rec is None or rec.get("ifindex") != link.index:
            rec = ports[op.device] = _port_record(it, link, None)
        if isinstance(op, ReplaceFdb):
            _add_keys(rec, op.keys)
        else:
            _note_flags(rec, op)
    return ahead


def record_ports(record: MutableMapping[str, Any], plan: Plan, observed: Observed,
                 result: ApplyResult) -> None:
    """Update a domain's state record after applying ``plan``: what is in the kernel now.

    Only what netplug itself did is recorded, so cleanup never removes an entry or turns on
    flags that someone else set: entries this run added (and did not roll back), plus the
    earlier record; flags as they were before netplug first changed them. Ports the plan
    cleaned up are dropped.
    """
    ports = record.setdefault("ports", {})
    effective = result.effective
    for tap in plan.cleaned:
        if tap not in result.failed_devices:
            ports.pop(tap, None)
    managed = _managed_ports(plan, observed)
    for tap, (it, link) in managed.items():
        if tap in result.failed_devices and tap not in ports and not any(
                op.device == tap for op in effective):
            continue
        ports[tap] = _port_record(it, link, ports.get(tap))
    for it in plan.intents:  # unmanaged but this domain's: the record proves ownership
        if it.tap in plan.claimed and (link := observed.links.get(it.tap)) is not None:
            managed[it.tap] = (it, link)
            ports[it.tap] = _port_record(it, link, ports.get(it.tap))
    for op, err in result.errors:
        if isinstance(err, DeviceGone) and op.device in managed:
            ports.pop(op.device, None)  # the tap is gone, and everything on it
    for op in effective:
        rec = ports.get(op.device)
        if rec is None:
            continue
        if isinstance(op, ReplaceFdb):
            _add_keys(rec, op.keys)
        elif isinstance(op, DeleteFdb):
            _remove_keys(rec, op)
        elif isinstance(op, SetPortFlags):
            _note_flags(rec, op)


def apply_recorded(kernel: Kernel, state: StateDir, name: str, record: dict[str, Any],
                   plan: Plan, observed: Observed, logger: Logger | HookLogger,
                   extra: Mapping[str, Any] | None = None) -> ApplyResult:
    """Write ahead, apply, record (call under the state lock). ``record`` is updated in
    place to what the kernel now holds and written; ``extra`` fields go into the record."""
    previous = copy_record(record)
    ahead = records_ahead(record, plan, observed)
    if ahead is not None:
        ahead.update(extra or {})
        # Raises StateError (a full or read-only state dir): then nothing is applied.
        state.put_domain(name, ahead, previous)
        previous = ahead
    result = apply(plan.ops, kernel, logger)
    record_ports(record, plan, observed, result)
    record.update(extra or {})
    if record != previous:
        state.put_domain(name, record, previous)
    return result
