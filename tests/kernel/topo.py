"""Topologies for kernel tests: what a libvirt host looks like at `start begin`.

``HostWorld`` (the default):
    br0   managed host bridge (config [bridge.br0] promiscLinks = "no")
          up0   veth uplink (peer up0p outside the bridge): an unmanaged port, with a foreign
                static FDB entry FOREIGN_UP on it (an admin's)
          vnet0..vnetN-1  taps of vm1's managed interfaces (address fe:54:… of the guest MAC)
          vnetX tap of an interface whose per-interface policy says promiscLinks='yes'
    brU   unmanaged bridge (no policy anywhere)
          upU   veth uplink (peer upUp), vnetU a tap of vm1 on it, with a foreign sticky
                static entry FOREIGN_U
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fakes import bridge_iface, domain_xml, guest_mac, policy_xml, tap_mac
from netns import NetNS

CONFIG = '[bridge.br0]\npromiscLinks = "no"\n'
FOREIGN_UP = "02:00:00:00:0f:01"
FOREIGN_U = "02:00:00:00:0f:02"
X_MAC = "52:54:00:00:0a:0a"
U_MAC = "52:54:00:00:0b:0b"


@dataclass
class HostWorld:
    ns: NetNS
    ntaps: int = 2
    domain: str = "vm1"
    managed: list[str] = field(default_factory=list)
    macs: dict[str, str] = field(default_factory=dict)  # tap -> guest MAC

    UNMANAGED = ["up0", "up0p", "vnetX", "brU", "upU", "upUp", "vnetU"]

    def build(self) -> "HostWorld":
        ns = self.ns
        ns.add_bridge("br0")
        ns.add_veth("up0", "up0p", master="br0")
        for i in range(self.ntaps):
            tap, mac = f"vnet{i}", guest_mac(i + 1)
            ns.add_tap(tap, "br0", address=tap_mac(mac))
            self.managed.append(tap)
            self.macs[tap] = mac
        ns.add_tap("vnetX", "br0", address=tap_mac(X_MAC))
        ns.add_bridge("brU")
        ns.add_veth("upU", "upUp", master="brU")
        ns.add_tap("vnetU", "brU", address=tap_mac(U_MAC))
        ns.fdb_add(FOREIGN_UP, "up0", "static")
        ns.fdb_add(FOREIGN_U, "vnetU", "static", "sticky")
        return self

    def xml(self, name: str | None = None) -> str:
        ifaces = [bridge_iface("br0", tap, mac, f"net{i}")
                  for i, (tap, mac) in enumerate(self.macs.items())]
        ifaces.append(bridge_iface("br0", "vnetX", X_MAC, "netX"))
        ifaces.append(bridge_iface("brU", "vnetU", U_MAC, "netU"))
        meta = policy_xml(interfaces={X_MAC: {"promiscLinks": "yes"}})
        return domain_xml(name or self.domain, ifaces, metadata=meta)
