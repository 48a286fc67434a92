"""A minimal rtnetlink transport and codec: exactly the messages netplug needs.

Why not pyroute2 here (measured on this project's machines, see README "Design notes"):
importing pyroute2 costs ~175 ms (its package __init__ pulls in asyncio, NDB, conntrack...),
which alone is 70% of the 250 ms budget for a 4-NIC hook, and its generic decoder costs
~0.2 ms per link message, i.e. ~0.4 s just to decode a 2,000-port link dump against a 0.5 s
budget for a whole in-sync check. This module imports in ~1 ms and decodes only the
attributes we read.

Only ``kernel.py`` uses this module. Errors surface as ``NetlinkError(errno)``; the seam
turns them into our own exceptions that name the device.
"""

from __future__ import annotations

import _socket
import errno
import os
import struct
from collections import namedtuple

# _socket, the C module the socket module wraps (with enums and helpers netplug does not
# use): importing socket costs every hook ~2 ms.

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~2 ms a hook)
if TYPE_CHECKING:
    from typing import Iterator

# Message types (linux/rtnetlink.h)
NLMSG_ERROR = 2
NLMSG_DONE = 3
RTM_NEWLINK = 16
RTM_GETLINK = 18
RTM_SETLINK = 19
RTM_NEWNEIGH = 28
RTM_DELNEIGH = 29
RTM_GETNEIGH = 30
RTM_NEWVLAN = 112
RTM_GETVLAN = 114

# Header flags (linux/netlink.h)
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_DUMP_INTR = 0x10
NLM_F_DUMP = 0x300
NLM_F_REPLACE = 0x100
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400

NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF

AF_UNSPEC = 0
AF_BRIDGE = 7

# Link attributes (linux/if_link.h)
IFLA_ADDRESS = 1
IFLA_IFNAME = 3
IFLA_LINK = 5
IFLA_MASTER = 10
IFLA_PROTINFO = 12
IFLA_LINKINFO = 18
IFLA_EXT_MASK = 29
IFLA_PROMISCUITY = 30
IFLA_ALLMULTI = 61
IFLA_INFO_KIND = 1
IFLA_INFO_DATA = 2
IFLA_INFO_SLAVE_KIND = 4
IFLA_INFO_SLAVE_DATA = 5
IFLA_BRPORT_LEARNING = 8
IFLA_BRPORT_UNICAST_FLOOD = 9
IFLA_BR_VLAN_FILTERING = 7
IFLA_BR_VLAN_DEFAULT_PVID = 39
IFLA_MACVLAN_MODE = 1
RTEXT_FILTER_SKIP_STATS = 1 << 3

# Neighbour / FDB (linux/neighbour.h)
NDA_LLADDR = 2
NDA_VLAN = 5
NDA_MASTER = 9
NUD_NOARP = 0x40
NUD_PERMANENT = 0x80
NTF_SELF = 0x02
NTF_MASTER = 0x04
NTF_EXT_LEARNED = 0x10
NTF_STICKY = 0x40

# Bridge VLAN database (linux/if_bridge.h; RTM_GETVLAN since 5.13)
BRIDGE_VLANDB_ENTRY = 1
BRIDGE_VLANDB_ENTRY_INFO = 1
BRIDGE_VLANDB_ENTRY_RANGE = 2
BRIDGE_VLAN_INFO_PVID = 0x2
BRIDGE_VLAN_INFO_UNTAGGED = 0x4
VLAN_VID_MAX = 4094  # 0 and 4095 are reserved (802.1Q)

IFF_UP = 0x1
IFF_PROMISC = 0x100
IFF_ALLMULTI = 0x200

MACVLAN_MODES = {1: "private", 2: "vepa", 4: "bridge", 8: "passthru", 16: "source"}

_NLMSGHDR = struct.Struct("=IHHII")
_IFINFOMSG = struct.Struct("=BxHiII")
_NDMSG = struct.Struct("=BxxxiHBB")
_BR_VLAN_MSG = struct.Struct("=BxxxI")
_VLAN_INFO = struct.Struct("=HH")
_NLA = struct.Struct("=HH")
_U32 = struct.Struct("=I")
_U16 = struct.Struct("=H")


class NetlinkError(OSError):
    """A netlink request failed with an errno (or timed out: ETIMEDOUT)."""


def _align(n: int) -> int:
    return (n + 3) & ~3


def nla(kind: int, payload: bytes) -> bytes:
    length = _NLA.size + len(payload)
    return _NLA.pack(length, kind) + payload + b"\0" * (_align(length) - length)


def nla_nested(kind: int, *children: bytes) -> bytes:
    return nla(kind | NLA_F_NESTED, b"".join(children))


def nla_u8(kind: int, value: int) -> bytes:
    return nla(kind, bytes((value,)))


def nla_u16(kind: int, value: int) -> bytes:
    return nla(kind, _U16.pack(value))


def nda_vlan(vlan: int) -> bytes:
    """NDA_VLAN, range-checked here so no caller can send (or half-apply) a bad id: the
    kernel refuses 0 and 4095, and struct would raise on anything past 65535."""
    if not isinstance(vlan, int) or isinstance(vlan, bool) or not 1 <= vlan <= VLAN_VID_MAX:
        raise ValueError(f"VLAN id {vlan!r} is out of range 1-{VLAN_VID_MAX}")
    return nla_u16(NDA_VLAN, vlan)


def nla_u32(kind: int, value: int) -> bytes:
    return nla(kind, _U32.pack(value))


def nla_str(kind: int, value: str) -> bytes:
    return nla(kind, value.encode() + b"\0")


def iter_nla(buf: bytes, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """Yield (type, payload_start, payload_end) for each attribute in buf[start:end]."""
    while start + 4 <= end:
        length, kind = _NLA.unpack_from(buf, start)
        if length < 4:
            return
        yield kind & NLA_TYPE_MASK, start + 4, start + length
        start += _align(length)


def mac_str(raw: bytes) -> str:
    return raw.hex(":")


def mac_bytes(mac: str) -> bytes:
    return bytes(int(part, 16) for part in mac.split(":"))


def ifinfomsg(family: int = AF_UNSPEC, index: int = 0, flags: int = 0, change: int = 0) -> bytes:
    return _IFINFOMSG.pack(family, 0, index, flags, change)


def ndmsg(family: int, ifindex: int, state: int, flags: int) -> bytes:
    return _NDMSG.pack(family, ifindex, state, flags, 0)


def br_vlan_msg(ifindex: int = 0) -> bytes:
    return _BR_VLAN_MSG.pack(AF_BRIDGE, ifindex)


# The decoded messages are named tuples (collections.namedtuple, not typing.NamedTuple: the
# same class without importing typing): one is built per link per reconcile run, and a
# value class's __init__ costs ~1.5 µs (16 fields) to a tuple's ~0.5 µs.

VlanMsg = namedtuple("VlanMsg", ("ifindex", "vids", "pvid", "untagged"))
VlanMsg.__doc__ = """An RTM_NEWVLAN: the VLANs one bridge port (or the bridge itself) is a member
of. ifindex: int; vids: frozenset[int]; pvid: int | None; untagged: frozenset[int]."""


def parse_vlan(buf: bytes, start: int, end: int) -> VlanMsg:
    _family, ifindex = _BR_VLAN_MSG.unpack_from(buf, start)
    vids: set[int] = set()
    untagged: set[int] = set()
    pvid = None
    for t, a, b in iter_nla(buf, start + _BR_VLAN_MSG.size, end):
        if t != BRIDGE_VLANDB_ENTRY:
            continue
        flags = first = None
        last = None
        for t2, a2, _b2 in iter_nla(buf, a, b):
            if t2 == BRIDGE_VLANDB_ENTRY_INFO:
                flags, first = _VLAN_INFO.unpack_from(buf, a2)
            elif t2 == BRIDGE_VLANDB_ENTRY_RANGE:
                last = _U16.unpack_from(buf, a2)[0]
        if first is None:
            continue
        # Consecutive VLANs with the same flags arrive as one entry with a range end.
        span = range(first, max(first, last or first) + 1)
        vids.update(span)
        if flags & BRIDGE_VLAN_INFO_UNTAGGED:
            untagged.update(span)
        if flags & BRIDGE_VLAN_INFO_PVID:
            pvid = first
    return VlanMsg(ifindex, frozenset(vids), pvid, frozenset(untagged))


LinkMsg = namedtuple("LinkMsg", (
    "index",  # int
    "name",  # str
    "flags",  # int
    "address",  # str | None
    "master",  # int | None
    "link",  # int | None
    "promiscuity",  # int | None
    "allmulti",  # int | None
    "kind",  # str | None
    "slave_kind",  # str | None
    "learning",  # bool | None
    "unicast_flood",  # bool | None
    "vlan_filtering",  # bool | None
    "macvlan_mode",  # str | None
))
LinkMsg.__doc__ = "The fields of an RTM_NEWLINK we use. Absent attributes are None."

NeighMsg = namedtuple("NeighMsg", (
    "ifindex",  # int
    "state",  # int
    "flags",  # int
    "mac",  # str
    "vlan",  # int | None
    "master",  # int | None
))
NeighMsg.__doc__ = "An AF_BRIDGE RTM_NEWNEIGH (an FDB entry)."


_LINK_WANTED = frozenset((IFLA_IFNAME, IFLA_ADDRESS, IFLA_MASTER, IFLA_LINK, IFLA_PROMISCUITY,
                          IFLA_ALLMULTI, IFLA_LINKINFO))


def parse_link(buf: bytes, start: int, end: int) -> LinkMsg:
    # Hot path: reconcile decodes every link of the host (2,000+ taps) on each run, so the
    # top-level attribute walk is inlined and the bridge-port walk stops early.
    _family, _type, index, flags, _change = _IFINFOMSG.unpack_from(buf, start)
    unpack = _NLA.unpack_from
    name = ""
    address = master = link = promisc = allmulti = None
    kind = slave_kind = None
    learning = flood = vlan_filtering = None
    mv_mode = None
    pos = start + _IFINFOMSG.size
    wanted = _LINK_WANTED
    while pos + 4 <= end:
        length, t = unpack(buf, pos)
        if length < 4:
            break
        t &= NLA_TYPE_MASK
        a, b = pos + 4, pos + length
        pos += (length + 3) & ~3
        if t not in wanted:  # ~50 attributes per link, 7 of them ours: one test, not seven
            continue
        if t == IFLA_IFNAME:
            name = buf[a:b].rstrip(b"\0").decode()
        elif t == IFLA_ADDRESS:
            address = mac_str(buf[a:b]) if b - a == 6 else None
        elif t == IFLA_MASTER:
            master = _U32.unpack_from(buf, a)[0]
        elif t == IFLA_LINK:
            link = _U32.unpack_from(buf, a)[0]
        elif t == IFLA_PROMISCUITY:
            promisc = _U32.unpack_from(buf, a)[0]
        elif t == IFLA_ALLMULTI:
            allmulti = _U32.unpack_from(buf, a)[0]
        elif t == IFLA_LINKINFO:
            info_data = slave_data = None
            for t2, a2, b2 in iter_nla(buf, a, b):  # at most four children
                if t2 == IFLA_INFO_KIND:
                    kind = buf[a2:b2].rstrip(b"\0").decode()
                elif t2 == IFLA_INFO_SLAVE_KIND:
                    slave_kind = buf[a2:b2].rstrip(b"\0").decode()
                elif t2 == IFLA_INFO_DATA:
                    info_data = (a2, b2)
                elif t2 == IFLA_INFO_SLAVE_DATA:
                    slave_data = (a2, b2)
            if info_data and kind == "bridge":
                # A kernel without CONFIG_BRIDGE_VLAN_FILTERING still reports vlan_filtering (0)
                # but never the VLAN attributes built under that option, such as the default
                # PVID: their absence is how we know, without trying to switch it on.
                has_pvid = False
                for t3, a3, _b3 in iter_nla(buf, *info_data):
                    if t3 == IFLA_BR_VLAN_FILTERING:
                        vlan_filtering = bool(buf[a3])
                    elif t3 == IFLA_BR_VLAN_DEFAULT_PVID:
                        has_pvid = True
                if not has_pvid:
                    vlan_filtering = None
            elif info_data and kind in ("macvtap", "macvlan"):
                for t3, a3, _b3 in iter_nla(buf, *info_data):
                    if t3 == IFLA_MACVLAN_MODE:
                        mv_mode = MACVLAN_MODES.get(_U32.unpack_from(buf, a3)[0], "unknown")
            if slave_data and slave_kind == "bridge":
                # Every guest tap is a bridge port: this loop runs once per tap per run.
                p3, b3 = slave_data
                while p3 + 4 <= b3:
                    l3, t3 = unpack(buf, p3)
                    if l3 < 4:
                        break
                    t3 &= NLA_TYPE_MASK
                    if t3 == IFLA_BRPORT_LEARNING:
                        learning = buf[p3 + 4] != 0
                    elif t3 == IFLA_BRPORT_UNICAST_FLOOD:
                        flood = buf[p3 + 4] != 0
                    if learning is not None and flood is not None:
                        break  # the other ~40 port attributes are not ours to read
                    p3 += (l3 + 3) & ~3
    return LinkMsg(index, name, flags, address, master, link, promisc, allmulti, kind,
                   slave_kind, learning, flood, vlan_filtering, mv_mode)


def parse_neigh(buf: bytes, start: int, end: int) -> NeighMsg | None:
    family, ifindex, state, flags, _type = _NDMSG.unpack_from(buf, start)
    if family != AF_BRIDGE:
        return None
    mac = None
    vlan = master = None
    unpack = _NLA.unpack_from
    pos = start + _NDMSG.size
    while pos + 4 <= end:  # inlined: FDB dumps carry thousands of entries
        length, t = unpack(buf, pos)
        if length < 4:
            break
        t &= NLA_TYPE_MASK
        if t == NDA_LLADDR and length == 10:
            mac = buf[pos + 4:pos + 10].hex(":")
        elif t == NDA_VLAN:
            vlan = _U16.unpack_from(buf, pos + 4)[0]
        elif t == NDA_MASTER:
            master = _U32.unpack_from(buf, pos + 4)[0]
        pos += (length + 3) & ~3
    if mac is None:
        return None
    return NeighMsg(ifindex, state, flags, mac, vlan, master)


class Netlink:
    """One NETLINK_ROUTE socket. Every receive is bounded by ``timeout`` seconds."""

    RECV_SIZE = 1 << 17

    def __init__(self, timeout: float = 2.0):
        self._sock = _socket.socket(_socket.AF_NETLINK, _socket.SOCK_RAW | _socket.SOCK_CLOEXEC,
                                    0)  # NETLINK_ROUTE
        self._sock.settimeout(timeout)
        # Large dumps (2,000 ports) arrive faster than we parse; a bigger buffer avoids ENOBUFS.
        self._sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_RCVBUF, 1 << 21)
        self._sock.bind((0, 0))
        self._seq = 0

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "Netlink":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _send(self, msgtype: int, flags: int, body: bytes) -> int:
        self._seq += 1
        hdr = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), msgtype, flags | NLM_F_REQUEST,
                             self._seq, 0)
        self._sock.send(hdr + body)
        return self._seq

    def _recv(self) -> bytes:
        try:
            return self._sock.recv(self.RECV_SIZE)
        except TimeoutError:  # socket.timeout
            raise NetlinkError(errno.ETIMEDOUT, os.strerror(errno.ETIMEDOUT)) from None

    def _messages(self, seq: int) -> Iterator[tuple[int, int, bytes, int, int]]:
        """Yield (type, flags, buffer, body_start, body_end) of replies to ``seq``."""
        while True:
            data = self._recv()
            off = 0
            while off + _NLMSGHDR.size <= len(data):
                length, mtype, mflags, mseq, _pid = _NLMSGHDR.unpack_from(data, off)
                if length < _NLMSGHDR.size:
                    break
                if mseq == seq:
                    yield mtype, mflags, data, off + _NLMSGHDR.size, off + length
                off += _align(length)

    def request(self, msgtype: int, body: bytes, flags: int = 0) -> None:
        """Send a request and wait for its ACK; raise NetlinkError on a negative errno."""
        seq = self._send(msgtype, flags | NLM_F_ACK, body)
        for mtype, _f, buf, a, _b in self._messages(seq):
            if mtype == NLMSG_ERROR:
                err = -struct.unpack_from("=i", buf, a)[0]
                if err:
                    raise NetlinkError(err, os.strerror(err))
                return

    def get(self, msgtype: int, body: bytes) -> tuple[bytes, int, int]:
        """A single-object GET: return (buffer, start, end) of the reply body."""
        seq = self._send(msgtype, 0, body)
        for mtype, _f, buf, a, b in self._messages(seq):
            if mtype == NLMSG_ERROR:
                err = -struct.unpack_from("=i", buf, a)[0]
                raise NetlinkError(err or errno.EIO, os.strerror(err or errno.EIO))
            return buf, a, b
        raise AssertionError("unreachable")

    def dump(self, msgtype: int, body: bytes) -> list[tuple[int, bytes, int, int]]:
        """A dump: return [(type, buffer, start, end)] of every message; retry if interrupted."""
        for _attempt in range(5):
            seq = self._send(msgtype, NLM_F_DUMP, body)
            out: list[tuple[int, bytes, int, int]] = []
            interrupted = False
            for mtype, mflags, buf, a, b in self._messages(seq):
                if mflags & NLM_F_DUMP_INTR:
                    interrupted = True
                if mtype == NLMSG_DONE:
                    break
                if mtype == NLMSG_ERROR:
                    err = -struct.unpack_from("=i", buf, a)[0]
                    raise NetlinkError(err or errno.EIO, os.strerror(err or errno.EIO))
                out.append((mtype, buf, a, b))
            if not interrupted:
                return out
        raise NetlinkError(errno.EAGAIN, "netlink dump kept being interrupted by changes")
