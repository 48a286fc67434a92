"""The kernel seam: every netlink and ioctl call netplug makes goes through ``Kernel``.

``NetlinkKernel`` is the one real implementation. Unit tests use an in-memory fake of the same
interface (tests/fakes.py). Errors are translated here, once, into ``KernelError`` subclasses
that name the device and the operation; EEXIST on an add and ENOENT on a delete are treated as
"already so" (idempotency by errno).
"""

from __future__ import annotations

import _socket  # socket's C module: importing socket costs every hook ~2 ms
import errno
import fcntl
import struct

from . import netlink as nl
from .errors import DeviceGone, KernelError, NotSupported, kernel_error
from .values import frozen


@frozen
class Link:
    name: str
    index: int
    kind: str | None  # "bridge", "tun", "veth", "macvtap", ... (None for plain devices)
    address: str | None
    master: str | None  # name of the bridge (or other master) this device is enslaved to
    lower: int | None  # IFLA_LINK: ifindex of a macvtap's lower device
    up: bool
    promisc: bool  # the user-requested IFF_PROMISC flag
    allmulti: bool  # the user-requested IFF_ALLMULTI flag
    promiscuity: int | None  # the kernel's counter (>0: the device is in promiscuous mode)
    allmulti_count: int | None
    bridge_port: bool = False
    learning: bool | None = None
    flood: bool | None = None
    vlan_filtering: bool | None = None  # bridges only; None: the kernel cannot do it
    macvlan_mode: str | None = None


@frozen
class FdbEntry:
    """One entry of a bridge's forwarding table (NTF_MASTER), or of a device's own lists."""

    port: str
    mac: str
    vlan: int | None
    state: str  # "permanent" (host-local), "static" (NUD_NOARP) or "dynamic" (learned)
    sticky: bool = False
    extern_learn: bool = False

    def sort_key(self) -> tuple:
        # Entries with and without a VLAN coexist on a VLAN-filtering bridge.
        return (self.port, self.mac, -1 if self.vlan is None else self.vlan, self.state)

    def __lt__(self, other: "FdbEntry") -> bool:
        return self.sort_key() < other.sort_key()


@frozen
class PortVlans:
    """The VLANs a bridge port is a member of (bridge VLAN filtering's per-port table)."""

    vids: frozenset[int]
    pvid: int | None = None
    untagged: frozenset[int] = frozenset()


TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~2 ms a hook)
if TYPE_CHECKING:  # the interface, for type checkers; a Protocol class costs every hook
    # ~1 ms to create and nothing checks it at run time (tests/kernel/test_fake_contract.py
    # checks the fake against the real thing instead)
    from typing import Protocol

    class Kernel(Protocol):
        def links(self) -> dict[str, Link]: ...
        def link(self, name: str) -> Link: ...
        def bridge_ports(self, bridge: str) -> dict[str, Link]: ...
        def fdb(self, bridge: str, port: str | None = None) -> list[FdbEntry]: ...
        def fdb_get(self, bridge: str, mac: str, vlan: int | None = None) -> FdbEntry | None: ...
        def port_vlans(self, port: str) -> PortVlans: ...
        def all_port_vlans(self) -> dict[str, PortVlans]: ...
        def device_addresses(self, dev: str) -> tuple[list[str], list[str]]: ...
        def replace_fdb(self, port: str, mac: str, vlan: int | None = None,
                        sticky: bool = False) -> None: ...
        def delete_fdb(self, port: str, mac: str, vlan: int | None = None) -> bool: ...
        def set_port_flags(self, port: str, learning: bool | None = None,
                           flood: bool | None = None) -> None: ...
        def set_vlan_filtering(self, bridge: str, on: bool) -> bool: ...
        def add_multicast(self, dev: str, mac: str) -> None: ...
        def del_multicast(self, dev: str, mac: str) -> bool: ...
        def add_unicast(self, dev: str, mac: str) -> None: ...
        def del_unicast(self, dev: str, mac: str) -> bool: ...
        def set_promisc(self, dev: str, on: bool) -> None: ...
        def set_allmulti(self, dev: str, on: bool) -> None: ...
        def set_address(self, dev: str, mac: str) -> None: ...


SIOCADDMULTI = 0x8931
SIOCDELMULTI = 0x8932
_IFREQ_HWADDR = struct.Struct("=16sH14s")


def _fdb_state(state: int, flags: int) -> str:
    if state & nl.NUD_PERMANENT:
        return "permanent"
    if state & nl.NUD_NOARP:
        return "static"
    return "dynamic"


class NetlinkKernel:
    """Kernel access over rtnetlink (and SIOC[ADD|DEL]MULTI for multicast, like `ip maddr`)."""

    def __init__(self, timeout: float = 2.0):
        self._nl = nl.Netlink(timeout)
        self._ioctl_sock: _socket.socket | None = None
        self._names: dict[int, str] = {}  # ifindex -> name, from links() and bridge_ports()

    def close(self) -> None:
        self._nl.close()
        if self._ioctl_sock is not None:
            self._ioctl_sock.close()

    def __enter__(self) -> "NetlinkKernel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- helpers -----------------------------------------------------------------------

    @staticmethod
    def _index(op: str, name: str) -> int:
        try:
            return _socket.if_nametoindex(name)
        except OSError as e:
            raise kernel_error(op, name, e.errno or errno.ENODEV) from e

    def _request(self, op: str, device: str, msgtype: int, body: bytes, flags: int = 0,
                 ok: tuple[int, ...] = ()) -> bool:
        """Send a request; True if applied, False if it failed with an errno listed in ok."""
        try:
            self._nl.request(msgtype, body, flags)
            return True
        except nl.NetlinkError as e:
            if e.errno in ok:
                return False
            raise kernel_error(op, device, e.errno) from e

    def _link_dump(self, master: int | None = None) -> list[nl.LinkMsg]:
        attrs = nl.nla_u32(nl.IFLA_EXT_MASK, nl.RTEXT_FILTER_SKIP_STATS)
        if master is not None:
            attrs += nl.nla_u32(nl.IFLA_MASTER, master)
        try:
            msgs = self._nl.dump(nl.RTM_GETLINK, nl.ifinfomsg() + attrs)
        except nl.NetlinkError as e:
            raise kernel_error("link dump", "all links", e.errno) from e
        return [nl.parse_link(buf, a, b) for t, buf, a, b in msgs if t == nl.RTM_NEWLINK]

    @staticmethod
    def _to_link(m: nl.LinkMsg, names: dict[int, str]) -> Link:
        return Link(
            name=m.name, index=m.index, kind=m.kind, address=m.address,
            master=names.get(m.master) if m.master else None, lower=m.link,
            up=bool(m.flags & nl.IFF_UP), promisc=bool(m.flags & nl.IFF_PROMISC),
            allmulti=bool(m.flags & nl.IFF_ALLMULTI), promiscuity=m.promiscuity,
            allmulti_count=m.allmulti, bridge_port=m.slave_kind == "bridge",
            learning=m.learning, flood=m.unicast_flood, vlan_filtering=m.vlan_filtering,
            macvlan_mode=m.macvlan_mode,
        )

    # -- reads -------------------------------------------------------------------------

    def links(self) -> dict[str, Link]:
        msgs = self._link_dump()
        names = {m.index: m.name for m in msgs}
        self._names = names  # fdb() names ports from it instead of one ioctl per port
        return {m.name: self._to_link(m, names) for m in msgs}

    def link(self, name: str) -> Link:
        body = nl.ifinfomsg() + nl.nla_str(nl.IFLA_IFNAME, name) + nl.nla_u32(
            nl.IFLA_EXT_MASK, nl.RTEXT_FILTER_SKIP_STATS)
        try:
            buf, a, b = self._nl.get(nl.RTM_GETLINK, body)
        except nl.NetlinkError as e:
            raise kernel_error("read link", name, e.errno) from e
        m = nl.parse_link(buf, a, b)
        self._names[m.index] = m.name
        names = {}
        if m.master:
            try:
                names[m.master] = _socket.if_indextoname(m.master)
            except OSError:
                pass
        return self._to_link(m, names)

    def bridge_ports(self, bridge: str) -> dict[str, Link]:
        """Every port of ``bridge``, with learning/flood, from one filtered link dump."""
        br = self._index("read bridge ports", bridge)
        ports = [m for m in self._link_dump(master=br) if m.master == br]
        # fdb() of this bridge (the hook's next read) names its ports from these.
        self._names.update({m.index: m.name for m in ports})
        self._names[br] = bridge
        return {m.name: self._to_link(m, {br: bridge}) for m in ports}

    def fdb(self, bridge: str, port: str | None = None) -> list[FdbEntry]:
        """The bridge's forwarding table (NTF_MASTER entries), optionally of one port only."""
        br = self._index("read fdb", bridge)
        port_index = self._index("read fdb", port) if port else 0
        body = nl.ifinfomsg(nl.AF_BRIDGE, port_index) + nl.nla_u32(nl.IFLA_MASTER, br)
        try:
            msgs = self._nl.dump(nl.RTM_GETNEIGH, body)
        except nl.NetlinkError as e:
            raise kernel_error("read fdb", port or bridge, e.errno) from e
        names: dict[int, str] = dict(self._names)
        out = []
        for t, buf, a, b in msgs:
            if t != nl.RTM_NEWNEIGH:
                continue
            n = nl.parse_neigh(buf, a, b)
            # Bridge-table entries carry NDA_MASTER (the dump does not set NTF_MASTER);
            # entries without it are the port device's own uc/mc lists ("self"). Entries on
            # the bridge device itself are its host-local addresses: kept (port = the bridge),
            # so nobody can claim the host's own MAC for a guest.
            if n is None or n.master != br:
                continue
            if port_index and n.ifindex != port_index:
                continue
            if n.ifindex not in names:
                try:
                    names[n.ifindex] = _socket.if_indextoname(n.ifindex)
                except OSError:
                    continue  # the port vanished while we read
            out.append(FdbEntry(names[n.ifindex], n.mac, n.vlan, _fdb_state(n.state, n.flags),
                                sticky=bool(n.flags & nl.NTF_STICKY),
                                extern_learn=bool(n.flags & nl.NTF_EXT_LEARNED)))
        return sorted(out, key=FdbEntry.sort_key)

    def fdb_get(self, bridge: str, mac: str, vlan: int | None = None) -> FdbEntry | None:
        """The bridge's entry for (mac, vlan) on whatever port it is, or None: one request
        (what `bridge fdb get MAC br BR [vlan V]` does), whatever the size of the table."""
        br = self._index("read fdb entry", bridge)
        body = nl.ndmsg(nl.AF_BRIDGE, 0, 0, 0) + nl.nla(nl.NDA_LLADDR, nl.mac_bytes(mac)) + \
            nl.nla_u32(nl.NDA_MASTER, br)
        if vlan is not None:
            body += nl.nda_vlan(vlan)
        try:
            buf, a, b = self._nl.get(nl.RTM_GETNEIGH, body)
        except nl.NetlinkError as e:
            if e.errno == errno.ENOENT:
                return None
            raise kernel_error(f"read fdb entry {mac}", bridge, e.errno) from e
        n = nl.parse_neigh(buf, a, b)
        if n is None:
            return None
        if n.ifindex == br:
            port = bridge
        else:
            port = self._names.get(n.ifindex)
            if port is None:
                try:
                    port = _socket.if_indextoname(n.ifindex)
                except OSError:
                    return None  # the port vanished while we asked
                self._names[n.ifindex] = port
        return FdbEntry(port, n.mac, n.vlan, _fdb_state(n.state, n.flags),
                        sticky=bool(n.flags & nl.NTF_STICKY),
                        extern_learn=bool(n.flags & nl.NTF_EXT_LEARNED))

    def _vlan_dump(self, op: str, device: str, ifindex: int) -> list[nl.VlanMsg]:
        try:
            msgs = self._nl.dump(nl.RTM_GETVLAN, nl.br_vlan_msg(ifindex))
        except nl.NetlinkError as e:
            raise kernel_error(op, device, e.errno) from e
        return [nl.parse_vlan(buf, a, b) for t, buf, a, b in msgs if t == nl.RTM_NEWVLAN]

    def port_vlans(self, port: str) -> PortVlans:
        """The VLANs ``port`` is in (empty without any): one filtered RTM_GETVLAN dump.
        NotSupported on kernels without bridge VLAN filtering."""
        idx = self._index("read port vlans", port)
        for m in self._vlan_dump("read port vlans", port, idx):
            if m.ifindex == idx:
                return PortVlans(m.vids, m.pvid, m.untagged)
        return PortVlans(frozenset())

    def all_port_vlans(self) -> dict[str, PortVlans]:
        """Every device's VLANs in one dump (reconcile), by name (``links()`` names them)."""
        out = {}
        for m in self._vlan_dump("read port vlans", "all links", 0):
            name = self._names.get(m.ifindex)
            if name is None:
                try:
                    name = _socket.if_indextoname(m.ifindex)
                except OSError:
                    continue
            out[name] = PortVlans(m.vids, m.pvid, m.untagged)
        return out

    def device_addresses(self, dev: str) -> tuple[list[str], list[str]]:
        """A device's own unicast and multicast address lists (as in /proc/net/dev_mcast)."""
        idx = self._index("read addresses", dev)
        try:
            msgs = self._nl.dump(nl.RTM_GETNEIGH, nl.ifinfomsg(nl.AF_BRIDGE, idx))
        except nl.NetlinkError as e:
            raise kernel_error("read addresses", dev, e.errno) from e
        uc, mc = set(), set()
        for t, buf, a, b in msgs:
            n = nl.parse_neigh(buf, a, b) if t == nl.RTM_NEWNEIGH else None
            if n is None or n.ifindex != idx or not n.flags & nl.NTF_SELF:
                continue
            (mc if int(n.mac[:2], 16) & 1 else uc).add(n.mac)
        return sorted(uc), sorted(mc)

    # -- bridge writes -----------------------------------------------------------------

    def replace_fdb(self, port: str, mac: str, vlan: int | None = None,
                    sticky: bool = False) -> None:
        idx = self._index("add fdb entry", port)
        flags = nl.NTF_MASTER | (nl.NTF_STICKY if sticky else 0)
        body = nl.ndmsg(nl.AF_BRIDGE, idx, nl.NUD_NOARP, flags) + nl.nla(
            nl.NDA_LLADDR, nl.mac_bytes(mac))
        if vlan is not None:
            body += nl.nda_vlan(vlan)
        self._request(f"add fdb entry {mac}", port, nl.RTM_NEWNEIGH, body,
                      nl.NLM_F_CREATE | nl.NLM_F_REPLACE)

    def delete_fdb(self, port: str, mac: str, vlan: int | None = None) -> bool:
        idx = self._index("delete fdb entry", port)
        body = nl.ndmsg(nl.AF_BRIDGE, idx, 0, nl.NTF_MASTER) + nl.nla(
            nl.NDA_LLADDR, nl.mac_bytes(mac))
        if vlan is not None:
            body += nl.nda_vlan(vlan)
        return self._request(f"delete fdb entry {mac}", port, nl.RTM_DELNEIGH, body,
                             ok=(errno.ENOENT,))

    def set_port_flags(self, port: str, learning: bool | None = None,
                       flood: bool | None = None) -> None:
        idx = self._index("set port flags", port)
        attrs = b""
        if learning is not None:
            attrs += nl.nla_u8(nl.IFLA_BRPORT_LEARNING, int(learning))
        if flood is not None:
            attrs += nl.nla_u8(nl.IFLA_BRPORT_UNICAST_FLOOD, int(flood))
        if not attrs:
            return
        body = nl.ifinfomsg(nl.AF_BRIDGE, idx) + nl.nla_nested(nl.IFLA_PROTINFO, attrs)
        self._request("set port flags", port, nl.RTM_SETLINK, body)

    def set_vlan_filtering(self, bridge: str, on: bool) -> bool:
        """Switch vlan_filtering; return whether the bridge now reports the wanted value.

        A kernel built without CONFIG_BRIDGE_VLAN_FILTERING accepts or rejects the attribute
        depending on version but never turns it on, so we read it back instead of trusting
        the ACK. (Link.vlan_filtering is None on such kernels: check that first.)
        """
        idx = self._index("set vlan_filtering", bridge)
        body = nl.ifinfomsg(nl.AF_UNSPEC, idx) + nl.nla_nested(
            nl.IFLA_LINKINFO, nl.nla_str(nl.IFLA_INFO_KIND, "bridge"),
            nl.nla_nested(nl.IFLA_INFO_DATA, nl.nla_u8(nl.IFLA_BR_VLAN_FILTERING, int(on))))
        try:
            self._request("set vlan_filtering", bridge, nl.RTM_NEWLINK, body)
        except NotSupported:
            return False
        except KernelError as e:
            if e.errno == errno.EINVAL:
                return False
            raise
        return self.link(bridge).vlan_filtering is on

    # -- device writes (macvtap RX filters) ----------------------------------------------

    def _ioctl(self, op: str, request: int, dev: str, mac: str, ok: tuple[int, ...]) -> bool:
        if self._ioctl_sock is None:
            self._ioctl_sock = _socket.socket(_socket.AF_INET,
                                              _socket.SOCK_DGRAM | _socket.SOCK_CLOEXEC)
        ifr = _IFREQ_HWADDR.pack(dev.encode(), 0, nl.mac_bytes(mac).ljust(14, b"\0"))
        try:
            fcntl.ioctl(self._ioctl_sock.fileno(), request, ifr)
            return True
        except OSError as e:
            if e.errno in ok:
                return False
            raise kernel_error(op, dev, e.errno or errno.EIO) from e

    def add_multicast(self, dev: str, mac: str) -> None:
        # SIOCADDMULTI marks the address as a "global" (user) membership, the same as
        # `ip maddr add` and libvirt: adding twice is a no-op and the kernel's own
        # memberships of that address (e.g. IPv6 all-nodes) are counted separately.
        self._ioctl(f"add multicast {mac}", SIOCADDMULTI, dev, mac, ok=(errno.EEXIST,))

    def del_multicast(self, dev: str, mac: str) -> bool:
        return self._ioctl(f"delete multicast {mac}", SIOCDELMULTI, dev, mac,
                           ok=(errno.ENOENT, errno.EADDRNOTAVAIL))

    def add_unicast(self, dev: str, mac: str) -> None:
        # Only passthru macvtaps accept unicast addresses (EOPNOTSUPP otherwise); they land
        # in the lower device's unicast filter. NLM_F_REPLACE is refused by macvlan.
        idx = self._index("add unicast address", dev)
        body = nl.ndmsg(nl.AF_BRIDGE, idx, nl.NUD_PERMANENT, nl.NTF_SELF) + nl.nla(
            nl.NDA_LLADDR, nl.mac_bytes(mac))
        self._request(f"add unicast address {mac}", dev, nl.RTM_NEWNEIGH, body,
                      nl.NLM_F_CREATE | nl.NLM_F_EXCL, ok=(errno.EEXIST,))

    def del_unicast(self, dev: str, mac: str) -> bool:
        idx = self._index("delete unicast address", dev)
        body = nl.ndmsg(nl.AF_BRIDGE, idx, 0, nl.NTF_SELF) + nl.nla(
            nl.NDA_LLADDR, nl.mac_bytes(mac))
        return self._request(f"delete unicast address {mac}", dev, nl.RTM_DELNEIGH, body,
                             ok=(errno.ENOENT,))

    def _set_flag(self, op: str, dev: str, flag: int, on: bool) -> None:
        idx = self._index(op, dev)
        body = nl.ifinfomsg(nl.AF_UNSPEC, idx, flag if on else 0, flag)
        self._request(op, dev, nl.RTM_NEWLINK, body)

    def set_promisc(self, dev: str, on: bool) -> None:
        self._set_flag(f"set promisc {'on' if on else 'off'}", dev, nl.IFF_PROMISC, on)

    def set_allmulti(self, dev: str, on: bool) -> None:
        self._set_flag(f"set allmulticast {'on' if on else 'off'}", dev, nl.IFF_ALLMULTI, on)

    def set_address(self, dev: str, mac: str) -> None:
        idx = self._index("set address", dev)
        body = nl.ifinfomsg(nl.AF_UNSPEC, idx) + nl.nla(nl.IFLA_ADDRESS, nl.mac_bytes(mac))
        self._request(f"set address {mac}", dev, nl.RTM_NEWLINK, body)


__all__ = ["NetlinkKernel", "Link", "FdbEntry", "PortVlans", "DeviceGone", "KernelError",
           "NotSupported"]
