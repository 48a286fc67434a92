"""The pure planner: libvirt model + policy → intents → (observed state) → sorted operations.

Nothing here touches a socket or a file. ``Observed`` is passed in; ``None`` means "unknown"
(``netplug plan`` without root), in which case every operation an apply would need is
planned unconditionally.
"""

from __future__ import annotations

from functools import cached_property

from .model import Domain, Interface, Network
from .ops import Context, DeleteFdb, Operation, ReplaceFdb, SetPortFlags, SetVlanFiltering
from .policy import Config, Policy
from .values import field, frozen, replace

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~2 ms a hook)
if TYPE_CHECKING:  # annotations only: the hook loads netlink only when it has work
    from typing import Any, Iterable, Mapping, Sequence

    from .kernel import FdbEntry, Link, PortVlans


@frozen
class Note:
    level: str  # "info" | "warning" | "error"
    message: str
    once_key: str | None = None  # log only the first time this key is seen

    def to_json(self) -> dict[str, Any]:
        return {"level": self.level, "message": self.message}


@frozen
class PortIntent:
    """What should hold for one guest interface on a bridge."""

    domain: str
    interface: Interface
    bridge: str | None
    network: str | None
    policy: Policy
    managed: bool
    reason: str
    # The policy could not be read (invalid config, network or domain policy): whatever is
    # applied stays as recorded, nothing is added or removed (fail closed).
    hold: bool = False
    # MACs the guest uses besides its own (its RX filter's unicast table, policy 'unicast'):
    # they get static entries on its tap too.
    extra_macs: tuple[str, ...] = ()
    # Not managed, but its policy opted out explicitly (promiscLinks='yes') on a bridge
    # netplug knows: the tap is recorded as this domain's all the same (nothing applied), so
    # no other domain's XML can claim it.
    claims: bool = False

    @property
    def tap(self) -> str | None:
        return self.interface.target

    @property
    def mac(self) -> str | None:
        return self.interface.mac

    @property
    def ctx(self) -> Context:
        return Context(self.domain, self.interface.display_name,
                       self.interface.mac, self.bridge, self.network)

    def to_json(self) -> dict[str, Any]:
        out = {"interface": self.ctx.interface, "type": self.interface.type,
               "mac": self.mac, "tap": self.tap, "bridge": self.bridge,
               "network": self.network, "managed": self.managed, "reason": self.reason,
               "policy": self.policy.to_json()}
        if self.extra_macs:
            out["extra_macs"] = list(self.extra_macs)
        return out


EntryKey = tuple  # (bridge, mac, vlan): the unit the kernel keys bridge FDB entries on


@frozen
class Observed:
    """Kernel state the planner compares against.

    links     by name (the intents' taps and bridges, or every link for reconcile)
    fdb       whole FDB dumps by bridge (reconcile); a hook reads none
    entries   targeted lookups: (bridge, mac, vlan) -> the entry the bridge has for that key on
              whatever port, or None (a hook asks only for the keys it plans)
    vlans     port -> the VLANs it is in, for ports of bridges whose kernel has VLAN filtering
    owners    tap -> the domain whose state record holds it (ports that matter to the plan)
    """

    links: Mapping[str, Link]
    fdb: Mapping[str, Sequence[FdbEntry]] = field(default_factory=dict)
    entries: Mapping[EntryKey, FdbEntry | None] = field(default_factory=dict)
    vlans: Mapping[str, PortVlans] = field(default_factory=dict)
    owners: Mapping[str, str] = field(default_factory=dict)

    @cached_property
    def _by_key(self) -> dict[EntryKey, FdbEntry]:
        index: dict[EntryKey, FdbEntry] = {}
        for bridge, entries in self.fdb.items():
            for e in entries:
                index[(bridge, e.mac, e.vlan)] = e
        return index

    @cached_property
    def _by_mac(self) -> dict[tuple[str, str], list[FdbEntry]]:
        index: dict[tuple[str, str], list[FdbEntry]] = {}
        for bridge, entries in self.fdb.items():
            for e in entries:
                index.setdefault((bridge, e.mac), []).append(e)
        for (bridge, mac, _vlan), e in self.entries.items():
            if e is not None and e not in index.get((bridge, mac), ()):
                index.setdefault((bridge, mac), []).append(e)
        return index

    def entry(self, bridge: str, mac: str, vlan: int | None) -> FdbEntry | None:
        """The bridge's entry for (mac, vlan), on whatever port (indexed: reconcile looks up
        thousands of ports against thousands of entries)."""
        key = (bridge, mac, vlan)
        if key in self.entries:
            return self.entries[key]
        return self._by_key.get(key)

    def entries_for_mac(self, bridge: str, mac: str) -> list[FdbEntry]:
        """Every entry seen for ``mac`` on ``bridge`` (any port, any VLAN)."""
        return self._by_mac.get((bridge, mac), [])


def tap_mac_of(guest_mac: str) -> str:
    """The address libvirt gives a guest's tap (virNetDevTapCreateInBridgePort): the guest's
    MAC with the first byte 0xfe, or 0xfa when the guest's own starts with 0xfe. A tap whose
    address differs was not made by libvirt for this guest."""
    first = "fa" if guest_mac[:2] == "fe" else "fe"
    return first + guest_mac[2:]


@frozen
class Plan:
    ops: tuple[Operation, ...] = ()
    notes: tuple[Note, ...] = ()
    intents: tuple[PortIntent, ...] = ()
    cleaned: tuple[str, ...] = field(default=())  # taps whose records the plan retires
    skipped: tuple[str, ...] = field(default=())  # managed taps left alone (see notes)
    claimed: tuple[str, ...] = field(default=())  # taps kept as the domain's, unmanaged

    def to_json(self) -> dict[str, Any]:
        return {"interfaces": [i.to_json() for i in self.intents],
                "operations": [o.to_json() for o in self.ops],
                "notes": [n.to_json() for n in self.notes]}


def interface_bridge(iface: Interface, networks: Mapping[str, Network]) -> str | None:
    """The bridge a tap of this interface is (or will be) a port of, if it is bridged."""
    if iface.type == "bridge":
        return iface.source_bridge
    if iface.type == "network":
        if iface.source_bridge:
            return iface.source_bridge
        net = networks.get(iface.source_network or "")
        if net is not None and not net.uses_macvtap:
            return net.bridge
    return None


def bridge_intents(domain: Domain, networks: Mapping[str, Network], config: Config, *,
                   config_error: str | None = None) -> list[PortIntent]:
    """One intent per bridged interface (type='bridge', or type='network' on a bridge).

    ``config_error``: the config file is invalid. Every interface the config could decide
    for is then held (kept as applied, never undone), not unmanaged: an operator's typo must
    never turn isolation off for running guests.
    """
    out = []
    for iface in domain.interfaces:
        if iface.type not in ("bridge", "network"):
            continue
        bridge = interface_bridge(iface, networks)
        if bridge is None:
            continue  # a macvtap/hostdev network, or an unknown network without a bridge
        policy = config.bridge_policy(bridge)
        reason = ""
        hold = False
        net = None
        # libvirt's live XML shows a port of a forward-mode='bridge' network as type='bridge'
        # with <source network=…>: its policy is the network's, whatever the type says.
        if iface.source_network:
            net = networks.get(iface.source_network)
            if net is None and policy.is_empty() and config_error is None:
                reason = (f"network {iface.source_network} has no recorded policy (netplug's "
                          f"network hook has not seen it start; run 'netplug reconcile')")
            elif net is not None and net.policy_error:
                reason, hold = f"invalid policy: {net.policy_error}", True
            elif net is not None:
                policy = net.policy.over(policy)
                if net.mac_table_manager == "libvirt":
                    reason = (f"libvirt manages the MAC table of network {net.name} "
                              f"(macTableManager='libvirt'); netplug stays hands-off")
        policy = iface_policy(domain, iface, policy)
        if not reason and config_error is not None:
            reason, hold = f"invalid config: {config_error}", True
        if not reason:
            if not policy.manages_bridge_port:
                reason = ("policy does not say promiscLinks='no'" if policy.promisc_links is None
                          else "policy says promiscLinks='yes'")
            elif iface.mac is None:
                reason = "interface has no <mac address>"
            elif iface.target is None:
                reason = "interface has no <target dev> yet (the tap does not exist)"
        claims = (bool(reason) and not hold and policy.promisc_links is True and
                  iface.mac is not None and iface.target is not None)
        out.append(PortIntent(domain.name, iface, bridge, iface.source_network,
                              policy, managed=not reason, reason=reason or "managed",
                              hold=hold, claims=claims))
    return out


def held_intents(domain: str, records: Mapping[str, Mapping[str, Any]],
                 reason: str) -> list[PortIntent]:
    """Intents that keep every recorded port as it is: for a domain whose XML or policy
    cannot be read (fail closed: nothing is added, nothing is undone)."""
    out = []
    for tap, rec in sorted(records.items()):
        iface = Interface(index=0, type="bridge", mac=rec.get("mac"), target=tap,
                          alias=rec.get("interface"), source_bridge=rec.get("bridge"),
                          source_network=rec.get("network"), source_dev=None, source_mode=None,
                          portid=None, model=None, trust_guest_rx_filters=False,
                          vlan_tag=None)
        out.append(PortIntent(domain, iface, rec.get("bridge"), rec.get("network"), Policy(),
                              managed=False, reason=reason, hold=True))
    return out


def with_extra_macs(intents: Iterable[PortIntent], records: Mapping[str, Mapping[str, Any]],
                    filters: Mapping[str, Any] | None, notes: list[Note]) -> list[PortIntent]:
    """Bridge intents with the MACs their guests use besides their own (policy 'unicast':
    keepalived's VRRP MAC, a macvlan or a bridge inside the guest — with learning off they
    get no unicast otherwise). From the guest's RX filter where QEMU was asked
    (``filters``: RxFilter by NIC alias; a PartialFilters names the NICs asked), else as last
    recorded (a hook cannot ask). At most maxUnicast; the planner refuses any that is not
    the guest's to claim."""
    out = []
    asked = getattr(filters, "asked", None)
    for it in intents:
        if not it.managed or "unicast" not in it.policy.rx:
            out.append(it)
            continue
        alias = it.interface.alias
        f = None
        if filters is not None and (asked is None or alias in asked):
            f = filters.get(alias or "")
        if f is None:
            rec = records.get(it.tap or "") or {}
            macs = list(rec.get("extra") or ()) if rec.get("mac") == it.mac else []
            out.append(replace(it, extra_macs=tuple(macs)))
            continue
        macs = sorted(m for m in f.unicast_table if m != it.mac)
        cap = it.policy.unicast_cap
        incomplete = f.unicast_overflow or f.unicast == "all"
        if len(macs) > cap or incomplete:
            left = ", ".join(macs[cap:]) if len(macs) > cap else "the ones it did not report"
            notes.append(Note("warning",
                              f"{it.ctx.describe()}: the guest uses more unicast MACs than "
                              f"netplug mirrors (maxUnicast={cap}"
                              f"{', its table overflowed' if incomplete else ''}): {left} get "
                              f"no unicast while learning is off; raise maxUnicast or set "
                              f"promiscLinks='yes' for this interface",
                              once_key=f"unicast-cap:{it.domain}:{it.tap}:{len(macs)}"))
            macs = macs[:cap]
        out.append(replace(it, extra_macs=tuple(macs)))
    return out


def iface_policy(domain: Domain, iface: Interface, base: Policy) -> Policy:
    return domain.interface_policy(iface.mac).over(domain.policy.over(base))


def plan_vlan_filtering(bridge: str, link: Link | None, observed: bool = True
                        ) -> tuple[list[Operation], list[Note]]:
    """Switch vlan_filtering on where the kernel can (what lets it drop the uplink's
    promiscuity); where it cannot, say so once and carry on without it."""
    if not observed or (link is not None and link.vlan_filtering is False):
        return [SetVlanFiltering(Context(bridge=bridge), bridge, True)], []
    if link is not None and link.vlan_filtering is None:
        return [], [Note("warning",
                         f"bridge {bridge}: this kernel has no bridge VLAN filtering "
                         f"(CONFIG_BRIDGE_VLAN_FILTERING); continuing without it, so the uplink "
                         f"stays promiscuous while flooding to guests is off",
                         once_key=f"novlanfilter:{bridge}")]
    return [], []


def entry_vlans(bridge_link: Link | None, vlans: PortVlans | None) -> tuple[int | None, ...]:
    """The keys (VLANs) a guest's MAC needs entries for on its port.

    The bridge looks entries up by (MAC, VID). Without VLAN filtering in the kernel there is
    one key, no VLAN. With it, a frame is looked up on the VLAN it belongs to (an untagged
    one on the port's PVID), so the guest's MAC needs an entry on every VLAN its port is in
    — and on "no VLAN" (VID 0) too, which is the key while vlan_filtering is off: the bridge
    keeps its port VLANs either way, so switching vlan_filtering on or off never cuts the
    guest off.
    """
    if bridge_link is None or bridge_link.vlan_filtering is None:
        return (None,)
    return (None, *sorted(vlans.vids if vlans else ()))


def _port_refusal(it: PortIntent, link: Link | None, bridge_link: Link | None,
                  observed: Observed) -> str | None:
    """Why netplug must not touch this tap for this guest (None: it may).

    Only a tap libvirt made for this guest, enslaved to the bridge the XML names, and not held
    by another domain's record: a <target dev> in domain XML is whatever its author wrote
    (who need not be root), and a bridge's uplink, the bridge itself or another guest's tap
    must never get its learning and flooding turned off or an entry put on it.
    """
    if link is None:
        return f"tap {it.tap} does not exist"
    if link.master != it.bridge:
        return (f"tap {it.tap} is not a port of bridge {it.bridge} (master: "
                f"{link.master or 'none'}); leaving it alone")
    if link.kind != "tun":
        return (f"{it.tap} is not a tap (it is a {link.kind or 'plain'} device, e.g. the "
                f"bridge's uplink); netplug manages only the taps libvirt creates for guests; "
                f"leaving it alone")
    if link.address != tap_mac_of(it.mac or ""):
        return (f"tap {it.tap} has address {link.address}, not {tap_mac_of(it.mac or '')} "
                f"as libvirt gives the tap of guest MAC {it.mac}: it is not this guest's tap; "
                f"leaving it alone")
    owner = observed.owners.get(it.tap)
    if owner is not None and owner != it.domain:
        return (f"tap {it.tap} belongs to domain {owner} (netplug's record); leaving it "
                f"alone")
    return None


def _mac_refusal(mac: str, it: PortIntent, bridge_link: Link | None,
                 vlans: tuple[int | None, ...], observed: Observed,
                 recorded: frozenset = frozenset()) -> str | None:
    """Why netplug must not claim ``mac`` on this guest's tap (None: it may).

    Never move or shadow an entry netplug did not make: the bridge's own address, any
    host-local (permanent) entry — a port's own address among them —, or a static entry on
    another port (an admin's, or another guest's).
    """
    bridge = it.bridge or ""
    if bridge_link is not None and bridge_link.address == mac:
        return (f"{mac} is the address of bridge {bridge} itself (the host's); claiming it "
                f"would cut the host off {bridge}: fix the guest's MAC")
    for vlan in vlans:
        e = observed.entry(bridge, mac, vlan)
        if e is None or e.state == "dynamic":
            continue
        if e.port == it.tap and (mac, vlan) in recorded:
            continue  # netplug's own entry, changed by hand: drift to repair
        where = f" on VLAN {vlan}" if vlan is not None else ""
        if e.state == "permanent":
            owner = (f"bridge {bridge} itself" if e.port == bridge
                     else f"port {e.port} (its own address)")
            return (f"{mac} is a host-local entry of {owner}{where}; it is the host's, not "
                    f"this guest's: fix the guest's MAC")
        if e.port != it.tap:
            owner = observed.owners.get(e.port)
            whose = f" (domain {owner}'s tap)" if owner else ""
            return (f"{mac} is already a {e.state} entry on port {e.port}{whose}{where}; "
                    f"remove that entry or fix the guest's MAC")
    return None


def plan_ports(intents: Iterable[PortIntent], observed: Observed | None,
               records: Mapping[str, Mapping[str, Any]] | None = None) -> Plan:
    """Operations that make every managed port right, and retire records no intent wants.

    Per port: the FDB entries first, then learning/flood off, so the guest never loses
    traffic. Ports are ordered by (bridge, tap); bridge-level operations come first. A held
    intent (policy unreadable) keeps its record and gets no operation.
    """
    intents = list(intents)
    records = records or {}
    ops: list[Operation] = []
    bridge_ops: list[Operation] = []
    notes: list[Note] = []
    wanted: set[str] = set()  # taps whose records stay
    skipped: list[str] = []
    claimed: list[str] = []
    vlan_checked: set[str] = set()
    for it in sorted(intents, key=lambda i: (i.bridge or "", i.tap or "", i.interface.index)):
        if it.hold:
            if it.tap and it.tap in records:
                wanted.add(it.tap)
                # An invalid config is said once by whoever read it; a network's or domain's
                # invalid policy, once per port it holds.
                if it.reason.startswith("invalid policy"):
                    notes.append(Note("error", f"{it.ctx.describe()}: {it.reason}; keeping "
                                               f"tap {it.tap} as netplug left it",
                                      once_key=f"hold:{it.domain}:{it.tap}:{it.reason[:60]}"))
            continue
        if not it.managed:
            if it.claims and observed is not None and it.tap and it.bridge:
                link = observed.links.get(it.tap)
                if _port_refusal(it, link, observed.links.get(it.bridge), observed) is None:
                    # Ours, unmanaged: undo what netplug applied (if anything), keep the
                    # record as the proof of ownership.
                    claimed.append(it.tap)
                    wanted.add(it.tap)
                    if it.tap in records:
                        ops += plan_cleanup({it.tap: records[it.tap]}, observed).ops
            if it.reason.startswith("interface has no <target dev>") and \
                    it.policy.manages_bridge_port:
                notes.append(Note("warning", f"{it.ctx.describe()}: {it.reason}; not managed"))
            elif it.reason.startswith(("libvirt manages", "invalid policy")):
                notes.append(Note("info" if it.reason.startswith("libvirt") else "error",
                                  f"{it.ctx.describe()}: {it.reason}",
                                  once_key=f"unmanaged:{it.network}:{it.reason[:40]}"))
            continue
        assert it.tap and it.mac and it.bridge
        ctx = it.ctx
        bridge_link = observed.links.get(it.bridge) if observed else None
        if it.policy.vlan_filtering and it.bridge not in vlan_checked:
            vlan_checked.add(it.bridge)
            vops, vnotes = plan_vlan_filtering(it.bridge, bridge_link, observed is not None)
            bridge_ops += vops
            notes += vnotes
        sticky = bool(it.policy.sticky)
        if observed is None:
            wanted.add(it.tap)
            for mac in (it.mac, *it.extra_macs):
                ops.append(ReplaceFdb(ctx, it.tap, mac, None, sticky))
            ops.append(SetPortFlags(ctx, it.tap, False, False))
            continue
        link = observed.links.get(it.tap)
        refusal = _port_refusal(it, link, bridge_link, observed)
        if refusal is not None:
            notes.append(Note("error", f"{ctx.describe()}: {refusal}"))
            skipped.append(it.tap)
            continue
        vlans = entry_vlans(bridge_link, observed.vlans.get(it.tap))
        rec = records.get(it.tap) or {}
        recorded = frozenset(tuple(e) for e in rec.get("fdb", [])) \
            if rec.get("ifindex") == link.index else frozenset()
        refusal = _mac_refusal(it.mac, it, bridge_link, vlans, observed, recorded)
        if refusal is not None:
            notes.append(Note("error", f"{ctx.describe()}: {refusal}; leaving {it.tap} "
                                       f"unmanaged"))
            skipped.append(it.tap)
            continue
        wanted.add(it.tap)
        port_ops: list[Operation] = []
        macs = [it.mac]
        for extra in it.extra_macs:
            if extra == it.mac or extra in macs:
                continue
            why = _mac_refusal(extra, it, bridge_link, vlans, observed, recorded)
            if why is not None:
                notes.append(Note("error", f"{ctx.describe()}: not claiming the guest's extra "
                                           f"MAC: {why}",
                                  once_key=f"extra:{it.domain}:{it.tap}:{extra}:{why[:40]}"))
                continue
            macs.append(extra)
        for mac in macs:
            port_ops += _entry_ops(ctx, it.tap, mac, vlans, sticky, observed, it.bridge)
        if link.learning is not False or link.flood is not False:
            port_ops.append(SetPortFlags(ctx, it.tap, False, False, link.learning, link.flood))
        ops += port_ops
    cleanup = plan_cleanup({tap: rec for tap, rec in records.items() if tap not in wanted},
                           observed)
    # Entries a kept record holds that the port no longer wants (a dropped extra MAC, a VLAN
    # the port left): removed, since netplug made them.
    stale: list[Operation] = []
    if observed is not None:
        for it in intents:
            if it.hold or not it.managed or it.tap not in wanted or it.tap not in records:
                continue
            stale += _stale_entry_ops(it, records[it.tap], observed)
    return Plan(tuple(bridge_ops + _by_device(ops + stale) + list(cleanup.ops)),
                tuple(notes + list(cleanup.notes)), tuple(intents), cleanup.cleaned,
                tuple(skipped), tuple(claimed))


def _by_device(ops: list[Operation]) -> list[Operation]:
    """Keep each device's operations together (a port is one transaction in the applier),
    in the order they were planned; devices in order of first appearance."""
    order: dict[str, list[Operation]] = {}
    for op in ops:
        order.setdefault(op.device, []).append(op)
    # Within a port: entries first, flags after, deletes of stale entries last — so the
    # guest always has its entries before flooding stops.
    out: list[Operation] = []
    for dev_ops in order.values():
        out += [o for o in dev_ops if isinstance(o, ReplaceFdb)]
        out += [o for o in dev_ops if isinstance(o, SetPortFlags)]
        out += [o for o in dev_ops if not isinstance(o, (ReplaceFdb, SetPortFlags))]
    return out


def _entry_ops(ctx: Context, tap: str, mac: str, vlans: tuple[int | None, ...], sticky: bool,
               observed: Observed, bridge: str) -> list[Operation]:
    """The ReplaceFdb operations that give ``mac`` a static entry on ``tap`` for every key.

    An entry added with no VLAN is created by the kernel for VID 0 and for every VLAN the
    port is in at that moment, so when the VID-0 entry is missing one request covers all;
    otherwise each missing VLAN gets its own.
    """
    def right(e: FdbEntry | None) -> bool:
        return e is not None and e.port == tap and e.state == "static" and e.sticky == sticky

    missing = [v for v in vlans if not right(observed.entry(bridge, mac, v))]
    if not missing:
        return []
    if None in missing:
        return [ReplaceFdb(ctx, tap, mac, None, sticky,
                           also_vlans=tuple(v for v in vlans if v is not None))]
    return [ReplaceFdb(ctx, tap, mac, v, sticky) for v in missing]


def _stale_entry_ops(it: PortIntent, rec: Mapping[str, Any], observed: Observed
                     ) -> list[Operation]:
    """Delete the entries a kept port record holds that the port no longer wants: a MAC the
    guest dropped (an extra one, or its own after a change) or a VLAN the port left (the
    kernel keeps static entries of a VLAN removed from a port). Only entries netplug
    recorded, and only where they still are: static, on this very tap."""
    link = observed.links.get(it.tap or "")
    if link is None or rec.get("ifindex") != link.index:
        return []
    vlans = entry_vlans(observed.links.get(it.bridge or ""), observed.vlans.get(it.tap or ""))
    keep = {(mac, v) for mac in (it.mac, *it.extra_macs) for v in vlans}
    out: list[Operation] = []
    for mac, vlan in sorted((tuple(e) for e in rec.get("fdb", [])),
                            key=lambda e: (e[0], e[1] is None, e[1] or 0)):
        if (mac, vlan) in keep:
            continue
        if vlan is None and any(m == mac for m, _v in keep):
            continue  # deleting "no VLAN" would take the MAC off every VLAN of the port
        e = observed.entry(rec.get("bridge"), mac, vlan)
        if e is not None and e.port == it.tap and e.state == "static":
            out.append(DeleteFdb(it.ctx, it.tap, mac, vlan))
    return out


def plan_cleanup(records: Mapping[str, Mapping[str, Any]], observed: Observed | None) -> Plan:
    """Undo what netplug recorded for these taps, where it still exists.

    A tap whose ifindex changed is not ours any more (libvirt deleted it and the name was
    reused): it is left alone. Flags are restored before entries are deleted, so flooding is
    back before the static entry goes; per MAC, the VLAN entries go before the "no VLAN" one
    (deleting that one makes the kernel delete the MAC on every VLAN of the port).
    """
    ops: list[Operation] = []
    for tap, rec in sorted(records.items()):
        ctx = Context(rec.get("domain"), rec.get("interface"), rec.get("mac"), rec.get("bridge"),
                      rec.get("network"))
        entries = sorted(((m, v) for m, v in rec.get("fdb", [])),
                         key=lambda e: (e[0], e[1] is None, e[1] or 0))
        saved = rec.get("saved") or [True, True]  # learning/flood before netplug
        if observed is None:
            if rec.get("flags"):
                ops.append(SetPortFlags(ctx, tap, saved[0], saved[1]))
            ops.extend(DeleteFdb(ctx, tap, m, v) for m, v in entries)
            continue
        link = observed.links.get(tap)
        if link is None or link.index != rec.get("ifindex") or link.master != rec.get("bridge"):
            continue
        if rec.get("flags"):
            if (link.learning, link.flood) != (saved[0], saved[1]):
                ops.append(SetPortFlags(ctx, tap, saved[0], saved[1], link.learning, link.flood))
        for m, v in entries:
            e = observed.entry(rec.get("bridge"), m, v)
            if e is not None and e.port == tap and e.state == "static":
                ops.append(DeleteFdb(ctx, tap, m, v))
    return Plan(tuple(ops), (), (), tuple(sorted(records)))
