"""Per managed bridge: the ports, whose they are, and why the uplink can (not) leave
promiscuous mode. ``explain_bridge`` is pure: any combination of ports, flags, kinds and
promiscuity can be tested without a kernel."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import DeviceGone, KernelError
from ..kernel import Link
from ..reconcile import Inputs, onoff
from ..sync import SyncReport
from .findings import Finding, plural
from .host import sysfs_vlan_filtering


# Drivers without IFF_UNICAST_FLT (by rtnetlink kind): the kernel keeps such a port
# promiscuous whatever the bridge does (FIELD-NOTES, measured on a VLAN-filtering kernel).
NO_UNICAST_FILTER = {"veth": "veth", "tun": "tap", "dummy": "dummy"}


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
    seen = sysfs_vlan_filtering(sysfs, first=link.name)
    return None if seen is None else seen[0]



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
    # Ports netplug applied something to (a record with neither entries nor flags only says
    # whose tap it is: an interface that opted out with promiscLinks='yes').
    recorded = {tap for rec in report.records.values()
                for tap, r in rec.get("ports", {}).items()
                if r.get("bridge") == name and (r.get("fdb") or r.get("flags"))}
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
                         f"none of the {plural(len(guests), 'guest port')} on {v.name} is "
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
