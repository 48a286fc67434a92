"""What libvirt's networks and guests say: policies that conflict with libvirt's own, invalid
policies, the lower devices of synced macvtaps."""

from __future__ import annotations

from ..reconcile import Inputs
from ..sync import SyncReport
from .findings import Finding


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
