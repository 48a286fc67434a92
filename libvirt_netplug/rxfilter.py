"""macvtap RX-filter sync: the guest's filter (QEMU query-rx-filter) → macvtap operations.

Pure like plan.py: the guest's filter, the kernel's view of the macvtap and netplug's record
of what it added go in; sorted operations and notes come out. Trust is split by policy tokens
(``rxFilters="multicast allmulti mac promisc unicast"``), where libvirt's
trustGuestRxFilters is all-or-nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, TYPE_CHECKING

from .errors import InputError
from .model import Domain, Interface, Network
from .ops import (AddMulticast, AddUnicast, Context, DelMulticast, DelUnicast, Operation,
                  SetAddress, SetAllmulti, SetPromisc)
from .plan import Note, iface_policy
from .policy import Config, Policy

if TYPE_CHECKING:  # annotations only: the hook loads netlink only when it has work
    from .kernel import Link


@dataclass(frozen=True)
class RxFilter:
    """One NIC's entry of QEMU's query-rx-filter reply.

    Everything in it is chosen by the guest. Entries that cannot be what their table says
    (a unicast address in the multicast table, a multicast main MAC) are dropped at parse
    time and listed in ``rejected``, so one bad entry never stops the rest from syncing.
    """

    name: str
    main_mac: str | None  # None: the guest's main MAC was not a valid unicast address
    promiscuous: bool = False
    multicast: str = "normal"  # normal | none | all
    unicast: str = "normal"
    multicast_overflow: bool = False
    unicast_overflow: bool = False
    broadcast_allowed: bool = True
    multicast_table: tuple[str, ...] = ()
    unicast_table: tuple[str, ...] = ()
    rejected: tuple[str, ...] = ()  # "what: value" for every dropped entry

    def summary(self) -> dict[str, Any]:
        return {"main-mac": self.main_mac, "promiscuous": self.promiscuous,
                "multicast": self.multicast, "unicast": self.unicast,
                "multicast-table": len(self.multicast_table),
                "unicast-table": len(self.unicast_table),
                "multicast-overflow": self.multicast_overflow,
                "unicast-overflow": self.unicast_overflow}


def _mode(value: Any, where: str) -> str:
    if value not in ("normal", "none", "all"):
        raise InputError(f"{where}: unexpected rx-filter mode {value!r}")
    return value


_MAC_CHARS = frozenset("0123456789abcdef")


def _mac_or_none(value: Any) -> str | None:
    """A normalized MAC, or None when ``value`` is not six hex octets."""
    if not isinstance(value, str) or len(value) != 17:
        return None
    mac = value.lower()
    octets = mac.split(":")
    if len(octets) != 6 or any(len(o) != 2 or not set(o) <= _MAC_CHARS for o in octets):
        return None
    return mac


def _is_multicast(mac: str) -> bool:
    return bool(int(mac[:2], 16) & 1)


def _table(values: Any, multicast: bool, what: str, rejected: list[str]) -> tuple[str, ...]:
    out = set()
    for value in values if isinstance(values, list) else ():
        mac = _mac_or_none(value)
        if mac is None or _is_multicast(mac) != multicast or mac == "00:00:00:00:00:00":
            rejected.append(f"{what}: {value!r}")
            continue
        out.add(mac)
    return tuple(sorted(out))


class PartialFilters(dict):
    """Filters of only the NICs that were asked (``asked``, by alias), e.g. the ones whose
    NIC_RX_FILTER_CHANGED event is being handled. A NIC not asked is not "absent from QEMU's
    reply": the planner keeps its last recorded filter instead."""

    def __init__(self, filters: Mapping[str, RxFilter], asked: Iterable[str]):
        super().__init__(filters)
        self.asked = frozenset(asked)


def parse_rx_filter_reply(reply: str | bytes | Mapping[str, Any]) -> dict[str, RxFilter]:
    """Parse a query-rx-filter reply ({"return": [...]}) into filters by NIC name (alias)."""
    if isinstance(reply, (str, bytes)):
        try:
            reply = json.loads(reply)
        except ValueError as e:
            raise InputError(f"query-rx-filter reply: not JSON: {e}") from None
    if not isinstance(reply, Mapping) or not isinstance(reply.get("return"), list):
        err = reply.get("error") if isinstance(reply, Mapping) else None
        raise InputError("query-rx-filter reply: no 'return' list"
                         + (f" (error: {err.get('desc', err)})" if err else ""))
    out = {}
    for entry in reply["return"]:
        if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str):
            raise InputError(f"query-rx-filter reply: entry without a NIC name: {entry!r:.80}")
        name = entry["name"]
        where = f"query-rx-filter NIC {name}"
        rejected: list[str] = []
        main = _mac_or_none(entry.get("main-mac"))
        if main is None or _is_multicast(main) or main == "00:00:00:00:00:00":
            rejected.append(f"main-mac: {entry.get('main-mac')!r}")
            main = None
        out[name] = RxFilter(
            name=name,
            main_mac=main,
            promiscuous=bool(entry.get("promiscuous")),
            multicast=_mode(entry.get("multicast", "normal"), where),
            unicast=_mode(entry.get("unicast", "normal"), where),
            multicast_overflow=bool(entry.get("multicast-overflow")),
            unicast_overflow=bool(entry.get("unicast-overflow")),
            broadcast_allowed=bool(entry.get("broadcast-allowed", True)),
            multicast_table=_table(entry.get("multicast-table", []), True, "multicast-table",
                                   rejected),
            unicast_table=_table(entry.get("unicast-table", []), False, "unicast-table",
                                 rejected),
            rejected=tuple(rejected),
        )
    return out


@dataclass(frozen=True)
class MacvtapIntent:
    """A guest interface on a macvtap whose RX filter policy may ask netplug to sync."""

    domain: str
    interface: Interface
    lower: str | None
    mode: str | None  # bridge | vepa | private | passthrough
    network: str | None
    policy: Policy
    managed: bool
    reason: str

    @property
    def dev(self) -> str | None:
        return self.interface.target

    @property
    def ctx(self) -> Context:
        return Context(self.domain, self.interface.display_name,
                       self.interface.mac, network=self.network, lower=self.lower)

    def to_json(self) -> dict[str, Any]:
        return {"interface": self.ctx.interface, "type": self.interface.type,
                "mac": self.interface.mac, "macvtap": self.dev, "lower": self.lower,
                "mode": self.mode, "network": self.network, "managed": self.managed,
                "reason": self.reason, "policy": self.policy.to_json()}


def macvtap_intents(domain: Domain, networks: Mapping[str, Network],
                    config: Config) -> list[MacvtapIntent]:
    out = []
    for iface in domain.interfaces:
        # libvirt's live XML shows a guest on a macvtap network (forward mode bridge, private,
        # vepa, passthrough) as <interface type='direct'> with <source network=… dev=… mode=…>
        # (captured: xml-samples/captured/*-qemu-started-*.xml, net4): the network's policy
        # applies whatever the type says. The inactive XML (and `netplug plan` input) still
        # says type='network'.
        net = networks.get(iface.source_network) if iface.source_network else None
        on_macvtap = iface.type == "direct" or iface.type == "network" and (
            net is not None and net.uses_macvtap or
            iface.source_bridge is None and iface.source_dev)
        if not on_macvtap:
            continue
        lower = iface.source_dev
        if lower is None and net is not None and len(net.forward_devs) == 1:
            lower = net.forward_devs[0]  # inactive XML: the network's one forward device
        policy = config.direct_policy(lower)
        reason = ""
        if net is not None:
            if net.policy_error:
                reason = f"invalid policy: {net.policy_error}"
            policy = net.policy.over(policy)
        elif iface.source_network and not policy.rx:
            reason = (f"network {iface.source_network} is not active (or not known to "
                      f"netplug): its policy is unknown")
        policy = iface_policy(domain, iface, policy)
        if not reason:
            if not policy.rx:
                reason = "policy has no rxFilters"
            elif iface.trust_guest_rx_filters:
                reason = ("trustGuestRxFilters='yes': libvirt syncs this interface itself; "
                          "netplug stands aside")
            elif iface.target is None:
                reason = "interface has no <target dev> yet (the macvtap does not exist)"
            elif iface.alias is None:
                reason = "interface has no <alias> (needed to query QEMU's RX filter)"
        out.append(MacvtapIntent(domain.name, iface, lower, iface.source_mode,
                                 iface.source_network, policy, managed=not reason,
                                 reason=reason or "managed"))
    return out


@dataclass(frozen=True)
class RxDesired:
    address: str | None
    multicast: frozenset[str] = frozenset()
    unicast: frozenset[str] = frozenset()
    allmulti: bool = False
    promisc: bool = False


@dataclass(frozen=True)
class RxPlan:
    ops: tuple[Operation, ...] = ()
    notes: tuple[Note, ...] = ()
    desired: RxDesired | None = None
    record: Mapping[str, Any] = field(default_factory=dict)  # the record after a full success


def desired_rx(intent: MacvtapIntent, f: RxFilter | None) -> tuple[RxDesired, list[Note]]:
    """What the macvtap should carry for this guest filter, under this intent's policy.

    Tokens: ``multicast`` mirrors the table (beyond maxMulticast: allmulticast instead);
    ``allmulti`` follows the guest's all-multicast, and QEMU's table overflow (which makes
    QEMU accept every multicast frame) also means allmulticast under either token; ``mac``
    follows the guest's main MAC, otherwise the configured MAC stays pinned; ``promisc``
    follows the guest's promiscuous mode; ``unicast`` puts the guest's unicast table in the
    lower device's filter (passthrough only; beyond maxUnicast promiscuous mode if
    ``promisc`` is allowed, else the first maxUnicast addresses).
    """
    tokens = intent.policy.rx
    ctx = intent.ctx.describe()
    configured = intent.interface.mac
    notes: list[Note] = []
    if f is None:
        return RxDesired(address=configured), notes
    key = f"{intent.domain}:{intent.dev}"
    if f.rejected:
        notes.append(Note("warning", f"{ctx}: ignored invalid entries in the guest's RX "
                                     f"filter: {', '.join(f.rejected[:4])}"
                                     f"{' …' if len(f.rejected) > 4 else ''}",
                          once_key=f"rxrejected:{key}:{'|'.join(f.rejected[:4])}"))
    mc: frozenset[str] = frozenset()
    uc: frozenset[str] = frozenset()
    allmulti = promisc = False
    address = configured
    if "multicast" in tokens and f.multicast != "none":
        cap = intent.policy.multicast_cap
        if len(f.multicast_table) > cap:
            allmulti = True
            notes.append(Note("warning", f"{ctx}: guest multicast table has "
                                         f"{len(f.multicast_table)} entries (maxMulticast "
                                         f"{cap}); using allmulticast instead",
                              once_key=f"mccap:{key}"))
        else:
            mc = frozenset(f.multicast_table)
    if tokens & {"multicast", "allmulti"} and f.multicast_overflow and f.multicast != "none":
        allmulti = True
        notes.append(Note("info", f"{ctx}: guest multicast table overflowed QEMU's filter; "
                                  f"using allmulticast", once_key=f"mcoverflow:{key}"))
    if "allmulti" in tokens and f.multicast == "all":
        allmulti = True
    if "promisc" in tokens and f.promiscuous:
        promisc = True
    if "mac" in tokens:
        address = f.main_mac or configured
    elif configured and f.main_mac and f.main_mac != configured:
        notes.append(Note("warning", f"{ctx}: guest changed its MAC to {f.main_mac}; refused "
                                     f"(policy has no 'mac'), {intent.dev} keeps {configured}",
                          once_key=f"macrefused:{key}:{f.main_mac}"))
    if "unicast" in tokens:
        cap = intent.policy.unicast_cap
        if intent.mode not in ("passthrough", "passthru"):
            if f.unicast_table:
                notes.append(Note("warning", f"{ctx}: guest unicast addresses not synced: "
                                             f"macvtap mode {intent.mode or 'vepa'} cannot "
                                             f"filter unicast (only passthrough can)",
                                  once_key=f"ucmode:{key}"))
        elif f.unicast_overflow or len(f.unicast_table) > cap or f.unicast == "all":
            if "promisc" in tokens:
                promisc = True
            else:
                uc = frozenset(sorted(f.unicast_table)[:cap])
            why = ("asks for every unicast address" if f.unicast == "all" else
                   "overflowed QEMU's filter" if f.unicast_overflow else
                   f"has {len(f.unicast_table)} entries (maxUnicast {cap})")
            notes.append(Note("warning", f"{ctx}: guest unicast table {why}; "
                                         + ("using promiscuous mode" if "promisc" in tokens else
                                            f"programming at most {cap} addresses (allow "
                                            f"'promisc' to fall back to promiscuous mode)"),
                              once_key=f"uccap:{key}:{why}"))
        else:
            uc = frozenset(f.unicast_table)
    return RxDesired(address, mc, uc, allmulti, promisc), notes


def rx_intent_notes(intents: Iterable[MacvtapIntent]) -> list[Note]:
    """Notes for macvtaps a policy asks netplug to sync but that it leaves alone."""
    notes = []
    for it in intents:
        if it.managed:
            continue
        if it.reason.startswith("trustGuestRxFilters") and it.policy.rx:
            notes.append(Note("info", f"{it.ctx.describe()}: {it.reason}",
                              once_key=f"rxtrust:{it.domain}:{it.interface.mac}"))
        elif it.reason.startswith("invalid policy"):
            notes.append(Note("error", f"{it.ctx.describe()}: {it.reason}",
                              once_key=f"rxpolicy:{it.network}:{it.reason[:60]}"))
    return notes


def desired_from_record(intent: MacvtapIntent, record: Mapping[str, Any]) -> RxDesired:
    """What netplug last programmed: the reference for drift when QEMU cannot be asked."""
    return RxDesired(address=record.get("address") or intent.interface.mac,
                     multicast=frozenset(record.get("mc", [])),
                     unicast=frozenset(record.get("uc", [])),
                     allmulti=bool(record.get("allmulti")), promisc=bool(record.get("promisc")))


def plan_rx(intent: MacvtapIntent, f: RxFilter | None, link: Link | None,
            addresses: tuple[Iterable[str], Iterable[str]] | None,
            record: Mapping[str, Any] | None, want: RxDesired | None = None) -> RxPlan:
    """Operations that make the macvtap match the guest's filter; only touches what is ours.

    Addresses netplug did not add (the kernel's own IPv6 all-nodes membership, an admin's
    entries) are never removed; flags netplug did not set are never cleared. ``want``
    overrides the desired state derived from ``f`` (reconcile without a live query).
    """
    assert intent.dev
    ctx = intent.ctx
    dev = intent.dev
    notes: list[Note] = []
    if want is None:
        want, notes = desired_rx(intent, f)
    rec = dict(record or {})
    if link is None:
        return RxPlan((), tuple(notes) + (Note("error", f"{ctx.describe()}: macvtap {dev} does "
                                                       f"not exist"),), want, {})
    if rec.get("ifindex") != link.index:
        rec = {}
    uc_now, mc_now = (set(a) for a in addresses) if addresses else (set(), set())
    ours_mc = set(rec.get("mc", []))
    ours_uc = set(rec.get("uc", []))
    ops: list[Operation] = []
    if want.address and link.address != want.address:
        ops.append(SetAddress(ctx, dev, want.address, link.address))
    for mac in sorted(want.multicast - (mc_now & ours_mc)):
        ops.append(AddMulticast(ctx, dev, mac))
    for mac in sorted((ours_mc & mc_now) - want.multicast):
        ops.append(DelMulticast(ctx, dev, mac))
    for mac in sorted(want.unicast - (uc_now & ours_uc)):
        ops.append(AddUnicast(ctx, dev, mac))
    for mac in sorted((ours_uc & uc_now) - want.unicast):
        ops.append(DelUnicast(ctx, dev, mac))
    allmulti_ours = bool(rec.get("allmulti"))
    if want.allmulti and not link.allmulti:
        ops.append(SetAllmulti(ctx, dev, True))
    elif not want.allmulti and allmulti_ours and link.allmulti:
        ops.append(SetAllmulti(ctx, dev, False))
    promisc_ours = bool(rec.get("promisc"))
    if want.promisc and not link.promisc:
        ops.append(SetPromisc(ctx, dev, True))
    elif not want.promisc and promisc_ours and link.promisc:
        ops.append(SetPromisc(ctx, dev, False))
    new_record = {
        "domain": intent.domain, "interface": ctx.interface, "mac": intent.interface.mac,
        "lower": intent.lower, "network": intent.network, "ifindex": link.index,
        "mc": sorted(want.multicast), "uc": sorted(want.unicast),
        "allmulti": want.allmulti and (allmulti_ours or not link.allmulti),
        "promisc": want.promisc and (promisc_ours or not link.promisc),
        "address": want.address,
        "original_address": rec.get("original_address") or intent.interface.mac,
        "guest": f.summary() if f else rec.get("guest"),
    }
    return RxPlan(tuple(ops), tuple(notes), want, new_record)


def plan_rx_cleanup(dev: str, record: Mapping[str, Any], link: Link | None,
                    addresses: tuple[Iterable[str], Iterable[str]] | None) -> tuple[Operation, ...]:
    """Undo what netplug programmed on a macvtap (suspend, detach, policy removed)."""
    if link is None or link.index != record.get("ifindex"):
        return ()
    ctx = Context(record.get("domain"), record.get("interface"), record.get("mac"),
                  network=record.get("network"), lower=record.get("lower"))
    uc_now, mc_now = (set(a) for a in addresses) if addresses else (set(), set())
    ops: list[Operation] = []
    ops += [DelMulticast(ctx, dev, m) for m in sorted(set(record.get("mc", [])) & mc_now)]
    ops += [DelUnicast(ctx, dev, m) for m in sorted(set(record.get("uc", [])) & uc_now)]
    if record.get("allmulti") and link.allmulti:
        ops.append(SetAllmulti(ctx, dev, False))
    if record.get("promisc") and link.promisc:
        ops.append(SetPromisc(ctx, dev, False))
    original = record.get("original_address")
    if original and link.address != original:
        ops.append(SetAddress(ctx, dev, original, link.address))
    return tuple(ops)
