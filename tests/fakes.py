"""Fakes of netplug's two outside worlds, for unit tests.

``FakeKernel``  an in-memory kernel with the same interface (and the same errors) as
                ``libvirt_netplug.kernel.NetlinkKernel``. Its semantics were measured on this
                project's kernel and are checked against the real one by
                tests/kernel/test_fake_contract.py, so the fake cannot drift silently.
XML builders    the documents libvirtd hands to hooks (domain XML at start, network XML,
                network-hook <hookData>), small enough to write a test in three lines.

Stdlib and the package's public value types only (Link, FdbEntry, the exceptions).
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import os
from dataclasses import dataclass, field, replace
from xml.sax.saxutils import quoteattr

from libvirt_netplug.errors import DeviceGone, KernelError, NotSupported, kernel_error
from libvirt_netplug.kernel import FdbEntry, Link, PortVlans

NS = "urn:x-libvirt-netplug:1"

# --------------------------------------------------------------------------------------------
# FakeKernel
# --------------------------------------------------------------------------------------------


@dataclass
class FakeDev:
    name: str
    index: int
    kind: str | None
    address: str
    master: str | None = None
    up: bool = False
    promisc: bool = False
    allmulti: bool = False
    learning: bool = True  # bridge-port flags, meaningful while enslaved
    flood: bool = True
    vlan_filtering: bool = False  # bridges only (this kernel reports 0 and cannot set it)
    lower: str | None = None
    macvlan_mode: str | None = None
    vlans: set[int] = field(default_factory=set)  # bridge-port VLANs (VLAN-capable kernel)
    pvid: int | None = None
    uc: set[str] = field(default_factory=set)
    mc: set[str] = field(default_factory=lambda: {"33:33:00:00:00:01"})


@dataclass(frozen=True)
class _Fault:
    method: str
    device: str
    action: str  # "raise" or "vanish"
    exc: BaseException | None
    remaining: int


WRITES = ("replace_fdb", "delete_fdb", "set_port_flags", "set_vlan_filtering",
          "add_multicast", "del_multicast", "add_unicast", "del_unicast", "set_promisc",
          "set_allmulti", "set_address")


class FakeKernel:
    """In-memory kernel: bridges, ports, taps, a bridge FDB, device address lists.

    Behaviour copied from the real kernel (see tests/kernel/test_fake_contract.py):
    - a port's own address is a "permanent" FDB entry on its bridge while enslaved;
    - ``replace_fdb`` replaces whatever entry the bridge has for (mac, vlan), on any port and
      of any state (even another port's permanent one), and refuses a VLAN while the bridge
      does not filter VLANs (EINVAL); on a device that is not a bridge port: EOPNOTSUPP;
    - ``delete_fdb`` of an absent entry returns False (ENOENT is "already so");
    - ``set_port_flags`` on a non-port (or the bridge itself): EOPNOTSUPP;
    - ``set_vlan_filtering``: the bridge keeps reporting False and the call returns False
      (this kernel), unless ``vlan_filtering_supported`` is set;
    - a missing device: DeviceGone (ENODEV) naming the operation and the device.

    Test controls: ``fail(method, device, ...)`` injects an error (or makes the device vanish
    just before the call); ``journal`` lists every write as (method, device, args).
    Usable as a context manager, like NetlinkKernel, so ``install_into(monkeypatch)`` can put it
    behind the hook's ``NetlinkKernel()``.
    """

    def __init__(self, *, vlan_filtering_supported: bool = False):
        self.devs: dict[str, FakeDev] = {}
        # key: (bridge, mac, vlan) -> (port, state, sticky)
        self.table: dict[tuple[str, str, int | None], tuple[str, str, bool]] = {}
        self.vlan_filtering_supported = vlan_filtering_supported
        self.journal: list[tuple[str, str, tuple]] = []
        self._faults: list[_Fault] = []
        self._ifindex = itertools.count(2)  # 1 is lo
        self._macs = itertools.count(1)
        self.add("lo", None, address="00:00:00:00:00:00", up=True)

    # -- building the world ----------------------------------------------------------------

    def add(self, name: str, kind: str | None, *, master: str | None = None,
            address: str | None = None, up: bool = False, **kw) -> FakeDev:
        assert name not in self.devs, name
        if address is None:
            address = "02:fa:ce:%02x:%02x:%02x" % (0, 0, next(self._macs))
        dev = FakeDev(name, next(self._ifindex) if name != "lo" else 1, kind, address, up=up,
                      **kw)
        self.devs[name] = dev
        if master:
            self.enslave(name, master)
        return dev

    def add_bridge(self, name: str, **kw) -> FakeDev:
        br = self.add(name, "bridge", up=True, **kw)
        # The bridge's own address is a host-local entry of its table, as in the kernel.
        self.table[(name, br.address, None)] = (name, "permanent", False)
        return br

    def add_tap(self, name: str, master: str | None = None, *, guest: str | None = None,
                **kw) -> FakeDev:
        """A tap; ``guest``: the guest MAC it serves (the tap gets libvirt's address for it,
        the guest's MAC with first byte 0xfe)."""
        if guest is not None:
            kw["address"] = ("fa" if guest[:2] == "fe" else "fe") + guest[2:]
        return self.add(name, "tun", master=master, **kw)

    def add_veth(self, name: str, master: str | None = None, **kw) -> FakeDev:
        return self.add(name, "veth", master=master, **kw)

    def enslave(self, port: str, bridge: str) -> None:
        dev = self.devs[port]
        assert self.devs[bridge].kind == "bridge"
        dev.master, dev.learning, dev.flood = bridge, True, True
        self.table[(bridge, dev.address, None)] = (port, "permanent", False)
        if self.vlan_filtering_supported:  # a new port joins the default PVID, 1
            dev.vlans, dev.pvid = {1}, 1

    def set_port_vlans(self, port: str, vids: set[int], pvid: int | None = None) -> None:
        """What `bridge vlan add/del … dev PORT` does (libvirt 11 for <vlan>, or an admin)."""
        dev = self.devs[port]
        dev.vlans, dev.pvid = set(vids), pvid

    def delete(self, name: str) -> None:
        """Delete a device, as `ip link del` does: its FDB entries and ports go with it."""
        dev = self.devs.pop(name)
        for key, (port, _s, _st) in list(self.table.items()):
            if port == name or key[0] == name:
                del self.table[key]
        if dev.kind == "bridge":
            for other in self.devs.values():
                if other.master == name:
                    other.master = None

    def add_static(self, port: str, mac: str, *, sticky: bool = False,
                   state: str = "static", vlan: int | None = None) -> None:
        """An entry somebody else made (an admin, libvirt): ``bridge fdb add … master``."""
        bridge = self.devs[port].master
        assert bridge, f"{port} is not a bridge port"
        self.table[(bridge, mac, vlan)] = (port, state, sticky)

    def fail(self, method: str, device: str, exc: BaseException | int | None = None, *,
             vanish: bool = False, times: int = 1) -> None:
        """Make the next ``times`` calls of ``method`` on ``device`` fail.

        ``vanish``: delete the device first, then fail as the kernel would (ENODEV) —
        a tap deleted between observation and apply. ``exc``: an errno (translated as the real
        seam does) or any exception (e.g. RuntimeError, to stand for a programmer error).
        """
        self._faults.append(_Fault(method, device, "vanish" if vanish else "raise",
                                   exc if not isinstance(exc, int) else
                                   kernel_error(method, device, exc), times))

    # -- faults and helpers ----------------------------------------------------------------

    def _fault(self, method: str, device: str, op: str) -> None:
        for i, f in enumerate(self._faults):
            if f.method == method and f.device == device and f.remaining > 0:
                self._faults[i] = replace(f, remaining=f.remaining - 1)
                if f.action == "vanish":
                    if device in self.devs:
                        self.delete(device)
                    raise DeviceGone(op, device, errno.ENODEV)
                raise f.exc if f.exc is not None else KernelError(op, device, errno.EIO)

    def _dev(self, op: str, name: str) -> FakeDev:
        dev = self.devs.get(name)
        if dev is None:
            raise DeviceGone(op, name, errno.ENODEV)
        return dev

    def _port(self, op: str, name: str) -> FakeDev:
        dev = self._dev(op, name)
        if dev.master is None:
            raise NotSupported(op, name, errno.EOPNOTSUPP)
        return dev

    def _write(self, method: str, device: str, op: str, *args) -> None:
        self._fault(method, device, op)
        self.journal.append((method, device, args))

    def _link(self, d: FakeDev) -> Link:
        lower = self.devs[d.lower].index if d.lower in self.devs else None
        promiscuity = (1 if d.master else 0) + (1 if d.promisc else 0)
        return Link(name=d.name, index=d.index, kind=d.kind, address=d.address,
                    master=d.master, lower=lower, up=d.up, promisc=d.promisc,
                    allmulti=d.allmulti, promiscuity=promiscuity,
                    allmulti_count=(1 if d.master else 0) + (1 if d.allmulti else 0),
                    bridge_port=d.master is not None,
                    learning=d.learning if d.master else None,
                    flood=d.flood if d.master else None,
                    vlan_filtering=(d.vlan_filtering if self.vlan_filtering_supported else None)
                    if d.kind == "bridge" else None,
                    macvlan_mode=d.macvlan_mode)

    def written_devices(self) -> set[str]:
        return {dev for _m, dev, _a in self.journal}

    # -- context manager (stands in for NetlinkKernel()) -----------------------------------

    def __call__(self, *args, **kwargs) -> "FakeKernel":
        return self

    def __enter__(self) -> "FakeKernel":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def close(self) -> None:
        pass

    def install_into(self, monkeypatch) -> "FakeKernel":
        """Put this fake behind ``libvirt_netplug.kernel.NetlinkKernel`` (the one seam)."""
        import libvirt_netplug.kernel

        monkeypatch.setattr(libvirt_netplug.kernel, "NetlinkKernel", self)
        return self

    # -- reads -----------------------------------------------------------------------------

    def links(self) -> dict[str, Link]:
        return {name: self._link(d) for name, d in self.devs.items()}

    def link(self, name: str) -> Link:
        self._fault("link", name, "read link")
        return self._link(self._dev("read link", name))

    def bridge_ports(self, bridge: str) -> dict[str, Link]:
        self._dev("read bridge ports", bridge)
        return {n: self._link(d) for n, d in self.devs.items() if d.master == bridge}

    def fdb(self, bridge: str, port: str | None = None) -> list[FdbEntry]:
        self._fault("fdb", bridge, "read fdb")
        br = self._dev("read fdb", bridge)
        if port:
            self._dev("read fdb", port)
        if br.kind != "bridge":
            return []
        # Same order as NetlinkKernel.fdb() (port, mac, vlan, ...), with "no VLAN" first:
        # FdbEntry's own ordering cannot compare None with a VLAN id (see test_kernel_seam.py).
        return sorted((FdbEntry(p, mac, vlan, state, sticky=sticky)
                       for (b, mac, vlan), (p, state, sticky) in self.table.items()
                       if b == bridge and (port is None or p == port)),
                      key=lambda e: (e.port, e.mac, -1 if e.vlan is None else e.vlan, e.state,
                                     e.sticky))

    def fdb_get(self, bridge: str, mac: str, vlan: int | None = None) -> FdbEntry | None:
        self._fault("fdb_get", bridge, "read fdb entry")
        self._dev("read fdb entry", bridge)
        hit = self.table.get((bridge, mac, vlan))
        if hit is None:
            return None
        port, state, sticky = hit
        return FdbEntry(port, mac, vlan, state, sticky=sticky)

    def port_vlans(self, port: str) -> PortVlans:
        d = self._dev("read port vlans", port)
        if not self.vlan_filtering_supported:
            raise NotSupported("read port vlans", port, errno.EOPNOTSUPP)
        return PortVlans(frozenset(d.vlans), d.pvid,
                         frozenset({d.pvid}) if d.pvid is not None else frozenset())

    def all_port_vlans(self) -> dict[str, PortVlans]:
        if not self.vlan_filtering_supported:
            raise NotSupported("read port vlans", "all links", errno.EOPNOTSUPP)
        return {n: self.port_vlans(n) for n, d in self.devs.items() if d.master}

    def device_addresses(self, dev: str) -> tuple[list[str], list[str]]:
        d = self._dev("read addresses", dev)
        return sorted(d.uc), sorted(d.mc)

    # -- bridge writes ---------------------------------------------------------------------

    def replace_fdb(self, port: str, mac: str, vlan: int | None = None,
                    sticky: bool = False) -> None:
        self._dev("add fdb entry", port)
        self._write("replace_fdb", port, f"add fdb entry {mac}", mac, vlan, sticky)
        dev = self._port(f"add fdb entry {mac}", port)
        # A VLAN the port is not in: EINVAL (also on a kernel without VLAN filtering).
        if vlan is not None and vlan not in dev.vlans:
            raise KernelError(f"add fdb entry {mac}", port, errno.EINVAL)
        # With no VLAN, the kernel adds VID 0 and every VLAN the port is in now.
        for v in ([vlan] if vlan is not None else [None, *sorted(dev.vlans)]):
            self.table[(dev.master, mac, v)] = (port, "static", sticky)

    def delete_fdb(self, port: str, mac: str, vlan: int | None = None) -> bool:
        self._dev("delete fdb entry", port)
        self._write("delete_fdb", port, f"delete fdb entry {mac}", mac, vlan)
        dev = self._port(f"delete fdb entry {mac}", port)
        hit = False
        # With no VLAN, the kernel deletes VID 0 and every VLAN the port is in now.
        for v in ([vlan] if vlan is not None else [None, *sorted(dev.vlans)]):
            key = (dev.master, mac, v)
            if key in self.table and self.table[key][0] == port:
                del self.table[key]
                hit = True
        return hit

    def set_port_flags(self, port: str, learning: bool | None = None,
                       flood: bool | None = None) -> None:
        self._dev("set port flags", port)
        self._write("set_port_flags", port, "set port flags", learning, flood)
        if learning is None and flood is None:
            return
        dev = self._port("set port flags", port)
        if learning is not None:
            dev.learning = learning
        if flood is not None:
            dev.flood = flood

    def set_vlan_filtering(self, bridge: str, on: bool) -> bool:
        br = self._dev("set vlan_filtering", bridge)
        self._write("set_vlan_filtering", bridge, "set vlan_filtering", on)
        if br.kind != "bridge" or not self.vlan_filtering_supported:
            return False
        br.vlan_filtering = on
        return True

    # -- device writes ---------------------------------------------------------------------

    def add_multicast(self, dev: str, mac: str) -> None:
        d = self._dev(f"add multicast {mac}", dev)
        self._write("add_multicast", dev, f"add multicast {mac}", mac)
        d.mc.add(mac)

    def del_multicast(self, dev: str, mac: str) -> bool:
        d = self._dev(f"delete multicast {mac}", dev)
        self._write("del_multicast", dev, f"delete multicast {mac}", mac)
        if mac in d.mc:
            d.mc.discard(mac)
            return True
        return False

    def add_unicast(self, dev: str, mac: str) -> None:
        d = self._dev("add unicast address", dev)
        self._write("add_unicast", dev, f"add unicast address {mac}", mac)
        if d.kind == "macvtap" and d.macvlan_mode != "passthru":
            raise NotSupported(f"add unicast address {mac}", dev, errno.EOPNOTSUPP)
        d.uc.add(mac)

    def del_unicast(self, dev: str, mac: str) -> bool:
        d = self._dev("delete unicast address", dev)
        self._write("del_unicast", dev, f"delete unicast address {mac}", mac)
        if mac in d.uc:
            d.uc.discard(mac)
            return True
        return False

    def set_promisc(self, dev: str, on: bool) -> None:
        op = f"set promisc {'on' if on else 'off'}"
        d = self._dev(op, dev)
        self._write("set_promisc", dev, op, on)
        d.promisc = on

    def set_allmulti(self, dev: str, on: bool) -> None:
        op = f"set allmulticast {'on' if on else 'off'}"
        d = self._dev(op, dev)
        self._write("set_allmulti", dev, op, on)
        d.allmulti = on

    def set_address(self, dev: str, mac: str) -> None:
        d = self._dev("set address", dev)
        self._write("set_address", dev, f"set address {mac}", mac)
        if int(mac[:2], 16) & 1:
            raise KernelError(f"set address {mac}", dev, errno.EADDRNOTAVAIL)
        d.address = mac

    # -- a snapshot for "nothing changed" assertions ---------------------------------------

    def snapshot(self) -> tuple:
        devs = tuple(sorted((d.name, d.index, d.kind, d.address, d.master, d.up, d.promisc,
                             d.allmulti, d.learning, d.flood, d.vlan_filtering,
                             tuple(sorted(d.uc)), tuple(sorted(d.mc)))
                            for d in self.devs.values()))
        return devs, tuple(sorted((k, v) for k, v in self.table.items()))


# --------------------------------------------------------------------------------------------
# libvirt's side: the XML documents hooks receive
# --------------------------------------------------------------------------------------------


def _attrs(**kw) -> str:
    return "".join(f" {k}={quoteattr(str(v))}" for k, v in kw.items() if v is not None)


def iface(type: str = "bridge", *, mac: str | None = "52:54:00:00:00:01",
          source: dict | None = None, target: str | None = "vnet0", alias: str | None = None,
          model: str | None = "virtio", extra: str = "", trust: str | None = None) -> str:
    """One <interface> element as libvirt shows it at `start begin`."""
    parts = [f"<interface{_attrs(type=type, trustGuestRxFilters=trust)}>"]
    if mac is not None:
        parts.append(f"<mac address={quoteattr(mac)}/>")
    if source is not None:
        parts.append(f"<source{_attrs(**source)}/>")
    if target is not None:
        parts.append(f"<target dev={quoteattr(target)}/>")
    if model:
        parts.append(f"<model type={quoteattr(model)}/>")
    if alias:
        parts.append(f"<alias name={quoteattr(alias)}/>")
    parts.append(extra)
    parts.append("</interface>")
    return "".join(parts)


def bridge_iface(bridge: str, tap: str | None, mac: str, alias: str | None = None,
                 **kw) -> str:
    return iface("bridge", mac=mac, source={"bridge": bridge}, target=tap, alias=alias, **kw)


def network_iface(network: str, bridge: str | None, tap: str | None, mac: str,
                  alias: str | None = None, portid: str | None = None, **kw) -> str:
    src = {"network": network, "portid": portid, "bridge": bridge}
    return iface("network", mac=mac, source=src, target=tap, alias=alias, **kw)


def policy_xml(*, interfaces: dict[str, dict] | None = None, **attrs) -> str:
    """A <netplug:policy> element; ``interfaces`` maps MAC -> per-interface attributes."""
    children = "".join(f"<netplug:interface{_attrs(mac=mac, **a)}/>"
                       for mac, a in (interfaces or {}).items())
    return (f'<netplug:policy xmlns:netplug="{NS}"{_attrs(**attrs)}>{children}'
            f'</netplug:policy>')


def domain_xml(name: str = "vm1", interfaces: list[str] | tuple[str, ...] = (), *,
               uuid: str | None = None, metadata: str = "") -> str:
    uuid = uuid or f"00000000-0000-4000-8000-{abs(hash(name)) % 10**12:012d}"
    meta = f"<metadata>{metadata}</metadata>" if metadata else ""
    return (f"<domain type='qemu'><name>{name}</name><uuid>{uuid}</uuid>{meta}"
            f"<memory unit='KiB'>131072</memory><os><type arch='x86_64'>hvm</type></os>"
            f"<devices>{''.join(interfaces)}</devices></domain>")


def network_xml(name: str = "mgd", bridge: str | None = "nbr0", *, forward: str | None = "nat",
                metadata: str = "", bridge_attrs: dict | None = None,
                forward_devs: tuple[str, ...] = ()) -> str:
    fwd = ""
    if forward:
        devs = "".join(f"<interface dev={quoteattr(d)}/>" for d in forward_devs)
        fwd = f"<forward mode={quoteattr(forward)}>{devs}</forward>"
    br = f"<bridge{_attrs(name=bridge, **(bridge_attrs or {}))}/>" if bridge or bridge_attrs \
        else ""
    meta = f"<metadata>{metadata}</metadata>" if metadata else ""
    return (f"<network><name>{name}</name><uuid>00000000-0000-4000-9000-000000000001</uuid>"
            f"{meta}{fwd}{br}</network>")


def hookdata(network: str, port: str = "") -> str:
    """The network hook's stdin: <hookData><network/>[<networkport/>]</hookData>."""
    return f"<hookData>{network}{port}</hookData>"


def networkport_xml(owner: str, mac: str, network: str = "mgd", bridge: str = "nbr0",
                    uuid: str = "9e1c9f3c-0000-4000-8000-000000000001") -> str:
    return (f"<networkport><uuid>{uuid}</uuid><owner><name>{owner}</name>"
            f"<uuid>00000000-0000-4000-8000-000000000000</uuid></owner>"
            f"<mac address={quoteattr(mac)}/><plug type='network' bridge={quoteattr(bridge)}/>"
            f"</networkport>")


def guest_mac(n: int) -> str:
    return f"52:54:00:00:{n >> 8 & 0xff:02x}:{n & 0xff:02x}"


def tap_mac(guest: str) -> str:
    """libvirt's tap address for a guest MAC: same tail, first byte 0xfe (0xfa when the
    guest's own first byte is 0xfe: virNetDevTapCreateInBridgePort)."""
    return ("fa" if guest[:2] == "fe" else "fe") + guest[2:]



def state_lock_held(state_dir: str) -> bool:
    """Whether someone holds netplug's state lock right now (a non-blocking flock probe)."""
    os.makedirs(state_dir, exist_ok=True)
    fd = os.open(os.path.join(state_dir, "lock"), os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
