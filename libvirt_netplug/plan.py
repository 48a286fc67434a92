"""The pure planner: libvirt model + policy → intents → (observed state) → sorted operations.

Nothing here touches a socket or a file. ``Observed`` is passed in; ``None`` means "unknown"
(``netplug plan`` without root), in which case every operation an apply would need is
planned unconditionally.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Iterable, Mapping, Sequence, TYPE_CHECKING

from .model import Domain, Interface, Network
from .ops import Context, DeleteFdb, Operation, ReplaceFdb, SetPortFlags, SetVlanFiltering
from .policy import Config, Policy

if TYPE_CHECKING:  # annotations only: the hook loads netlink only when it has work
    from .kernel import FdbEntry, Link

DEFAULT_PVID = 1


@dataclass(frozen=True)
class Note:
    level: str  # "info" | "warning" | "error"
    message: str
    once_key: str | None = None  # log only the first time this key is seen

    def to_json(self) -> dict[str, Any]:
        return {"level": self.level, "message": self.message}


@dataclass(frozen=True)
class PortIntent:
    """What should hold for one guest interface on a bridge."""

    domain: str
    interface: Interface
    bridge: str | None
    network: str | None
    policy: Policy
    managed: bool
    reason: str

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
        return {"interface": self.ctx.interface, "type": self.interface.type,
                "mac": self.mac, "tap": self.tap, "bridge": self.bridge,
                "network": self.network, "managed": self.managed, "reason": self.reason,
                "policy": self.policy.to_json()}


@dataclass(frozen=True)
class Observed:
    """Kernel state the planner compares against: links by name, FDB entries by bridge."""

    links: Mapping[str, Link]
    fdb: Mapping[str, Sequence[FdbEntry]]

    def _index(self, key: str) -> dict[tuple[str, str], list[FdbEntry]]:
        index: dict[tuple[str, str], list[FdbEntry]] = {}
        for bridge, entries in self.fdb.items():
            for e in entries:
                index.setdefault((bridge, getattr(e, key)), []).append(e)
        return index

    @cached_property
    def _by_mac(self) -> dict[tuple[str, str], list[FdbEntry]]:
        return self._index("mac")

    @cached_property
    def _by_port(self) -> dict[tuple[str, str], list[FdbEntry]]:
        return self._index("port")

    def entries_for_mac(self, bridge: str, mac: str) -> list[FdbEntry]:
        """Indexed: reconcile looks up thousands of ports against thousands of entries."""
        return self._by_mac.get((bridge, mac), [])

    def entries_on_port(self, bridge: str, port: str) -> list[FdbEntry]:
        return self._by_port.get((bridge, port), [])


@dataclass(frozen=True)
class Plan:
    ops: tuple[Operation, ...] = ()
    notes: tuple[Note, ...] = ()
    intents: tuple[PortIntent, ...] = ()
    cleaned: tuple[str, ...] = field(default=())  # taps whose records the plan retires
    skipped: tuple[str, ...] = field(default=())  # managed taps left alone (see notes)

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


def bridge_intents(domain: Domain, networks: Mapping[str, Network],
                   config: Config) -> list[PortIntent]:
    """One intent per bridged interface (type='bridge', or type='network' on a bridge)."""
    out = []
    for iface in domain.interfaces:
        if iface.type not in ("bridge", "network"):
            continue
        bridge = interface_bridge(iface, networks)
        if bridge is None:
            continue  # a macvtap/hostdev network, or an unknown network without a bridge
        policy = config.bridge_policy(bridge)
        reason = ""
        net = None
        # libvirt's live XML shows a port of a forward-mode='bridge' network as type='bridge'
        # with <source network=…>: its policy is the network's, whatever the type says.
        if iface.source_network:
            net = networks.get(iface.source_network)
            if net is None and policy.is_empty():
                reason = (f"network {iface.source_network} has no recorded policy (netplug's "
                          f"network hook has not seen it start; run 'netplug reconcile')")
            elif net is not None and net.policy_error:
                reason = f"invalid policy: {net.policy_error}"
            elif net is not None:
                policy = net.policy.over(policy)
                if net.mac_table_manager == "libvirt":
                    reason = (f"libvirt manages the MAC table of network {net.name} "
                              f"(macTableManager='libvirt'); netplug stays hands-off")
        policy = iface_policy(domain, iface, policy)
        if not reason:
            if not policy.manages_bridge_port:
                reason = ("policy does not say promiscLinks='no'" if policy.promisc_links is None
                          else "policy says promiscLinks='yes'")
            elif iface.mac is None:
                reason = "interface has no <mac address>"
            elif iface.target is None:
                reason = "interface has no <target dev> yet (the tap does not exist)"
        out.append(PortIntent(domain.name, iface, bridge, iface.source_network,
                              policy, managed=not reason, reason=reason or "managed"))
    return out


def iface_policy(domain: Domain, iface: Interface, base: Policy) -> Policy:
    return domain.interface_policy(iface.mac).over(domain.policy.over(base))


def _fdb_vlan(bridge: Link | None, iface: Interface) -> int | None:
    if bridge is not None and bridge.vlan_filtering:
        return iface.vlan_tag or DEFAULT_PVID
    return None


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


def plan_ports(intents: Iterable[PortIntent], observed: Observed | None,
               records: Mapping[str, Mapping[str, Any]] | None = None) -> Plan:
    """Operations that make every managed port right, and retire records no intent wants.

    Per port: the FDB entry first, then learning/flood off, so the guest never loses
    traffic. Ports are ordered by (bridge, tap); bridge-level operations come first.
    """
    intents = list(intents)
    records = records or {}
    ops: list[Operation] = []
    bridge_ops: list[Operation] = []
    notes: list[Note] = []
    wanted: set[tuple[str, str]] = set()
    skipped: list[str] = []
    vlan_checked: set[str] = set()
    for it in sorted(intents, key=lambda i: (i.bridge or "", i.tap or "", i.interface.index)):
        if not it.managed:
            if it.reason.startswith("interface has no <target dev>") and \
                    it.policy.manages_bridge_port:
                notes.append(Note("warning", f"{it.ctx.describe()}: {it.reason}; not managed"))
            elif it.reason.startswith(("libvirt manages", "invalid policy")):
                notes.append(Note("info" if it.reason.startswith("libvirt") else "error",
                                  f"{it.ctx.describe()}: {it.reason}",
                                  once_key=f"unmanaged:{it.network}:{it.reason[:40]}"))
            continue
        assert it.tap and it.mac and it.bridge
        wanted.add((it.tap, it.mac))
        ctx = it.ctx
        bridge_link = observed.links.get(it.bridge) if observed else None
        if it.policy.vlan_filtering and it.bridge not in vlan_checked:
            vlan_checked.add(it.bridge)
            vops, vnotes = plan_vlan_filtering(it.bridge, bridge_link, observed is not None)
            bridge_ops += vops
            notes += vnotes
        if observed is None:
            ops.append(ReplaceFdb(ctx, it.tap, it.mac, None, bool(it.policy.sticky)))
            ops.append(SetPortFlags(ctx, it.tap, False, False))
            continue
        link = observed.links.get(it.tap)
        if link is None:
            notes.append(Note("error", f"{ctx.describe()}: tap {it.tap} does not exist"))
            skipped.append(it.tap)
            continue
        if link.master != it.bridge:
            notes.append(Note("error", f"{ctx.describe()}: tap {it.tap} is not a port of bridge "
                                       f"{it.bridge} (master: {link.master or 'none'}); "
                                       f"leaving it alone"))
            skipped.append(it.tap)
            continue
        vlan = _fdb_vlan(bridge_link, it.interface)
        sticky = bool(it.policy.sticky)
        same = [e for e in observed.entries_for_mac(it.bridge, it.mac) if e.vlan == vlan]
        foreign = [e for e in same if e.port != it.tap and e.state != "dynamic"]
        if foreign:
            notes.append(Note("error", f"{ctx.describe()}: {it.mac} is already a "
                                       f"{foreign[0].state} entry on port {foreign[0].port}; "
                                       f"leaving {it.tap} unmanaged (remove that entry or fix "
                                       f"the guest's MAC)"))
            skipped.append(it.tap)
            continue
        mine = [e for e in same if e.port == it.tap]
        if not (mine and mine[0].state == "static" and mine[0].sticky == sticky):
            ops.append(ReplaceFdb(ctx, it.tap, it.mac, vlan, sticky))
        if link.learning is not False or link.flood is not False:
            ops.append(SetPortFlags(ctx, it.tap, False, False, link.learning, link.flood))
    cleanup = plan_cleanup({tap: rec for tap, rec in records.items()
                            if (tap, rec.get("mac")) not in wanted}, observed)
    return Plan(tuple(bridge_ops + ops + list(cleanup.ops)), tuple(notes + list(cleanup.notes)),
                tuple(intents), cleanup.cleaned, tuple(skipped))


def plan_cleanup(records: Mapping[str, Mapping[str, Any]], observed: Observed | None) -> Plan:
    """Undo what netplug recorded for these taps, where it still exists.

    A tap whose ifindex changed is not ours any more (libvirt deleted it and the name was
    reused): it is left alone. Flags are restored before entries are deleted, so flooding is
    back before the static entry goes.
    """
    ops: list[Operation] = []
    for tap, rec in sorted(records.items()):
        ctx = Context(rec.get("domain"), rec.get("interface"), rec.get("mac"), rec.get("bridge"),
                      rec.get("network"))
        entries = [(m, v) for m, v in rec.get("fdb", [])]
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
        present = {(e.mac, e.vlan) for e in observed.entries_on_port(rec.get("bridge"), tap)
                   if e.state == "static"}
        ops.extend(DeleteFdb(ctx, tap, m, v) for m, v in entries if (m, v) in present)
    return Plan(tuple(ops), (), (), tuple(sorted(records)))
