"""An independent oracle: what the kernel says, read without netplug's code.

Only the standard library, iproute2's JSON output (`ip -j -d link show`, `bridge -j -d link
show`, `bridge -j fdb show`), /proc/net/dev_mcast and frames actually received on taps. Nothing
here imports libvirt_netplug: a bug in netplug's netlink codec cannot hide itself from tests
that assert through this module.

Reads take a namespace name (``ns``) and run ``ip -n NS`` / ``bridge -n NS``. The frame helpers
(``TapReader``, ``inject``, ``frame_probe``) work in the calling process's network namespace:
run them through ``NetNS.call`` (tests/netns.py).
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import socket
import struct
import subprocess
import time
from typing import Any, Iterable

VOLATILE_SUFFIXES = ("_timer",)  # bridge/port STP and GC countdowns: they tick by themselves


def _run(argv: list[str]) -> str:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    if p.returncode != 0:
        raise AssertionError(f"oracle: {' '.join(argv)} failed ({p.returncode}): "
                             f"{p.stderr.strip()}")
    return p.stdout


def _json(argv: list[str]) -> Any:
    out = _run(argv)
    return json.loads(out) if out.strip() else []


def _strip(obj: Any) -> Any:
    """Drop the fields that change with time alone (timers), recursively."""
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if not k.endswith(VOLATILE_SUFFIXES)}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


# -- links -------------------------------------------------------------------------------------


def links(ns: str) -> dict[str, dict]:
    """`ip -j -d link show`, by name (timers stripped)."""
    return {d["ifname"]: _strip(d) for d in _json(["ip", "-n", ns, "-j", "-d", "link", "show"])}


def link(ns: str, dev: str) -> dict:
    return _strip(_json(["ip", "-n", ns, "-j", "-d", "link", "show", "dev", dev])[0])


def exists(ns: str, dev: str) -> bool:
    return dev in links(ns)


def bridge_links(ns: str) -> dict[str, dict]:
    """`bridge -j -d link show`: every bridge port with its flags, by name."""
    return {d["ifname"]: _strip(d) for d in _json(["bridge", "-n", ns, "-j", "-d", "link",
                                                    "show"])}


def port_flags(ns: str, dev: str) -> tuple[bool, bool]:
    """(learning, flood) of a bridge port, as `bridge -d link show` reports them."""
    port = bridge_links(ns)[dev]
    return port["learning"], port["flood"]


# -- forwarding database --------------------------------------------------------------------


def fdb(ns: str) -> list[dict]:
    """`bridge -j fdb show`: every entry (bridge table and devices' own lists), sorted."""
    entries = _json(["bridge", "-n", ns, "-j", "fdb", "show"])
    return sorted(entries, key=lambda e: json.dumps(e, sort_keys=True))


def master_entries(ns: str, dev: str | None = None) -> list[dict]:
    """Bridge-table entries (those with a "master"), optionally on one port."""
    return [e for e in fdb(ns) if e.get("master") and (dev is None or e.get("ifname") == dev)]


def static_macs(ns: str, dev: str) -> dict[str, list[str]]:
    """{mac: flags} of the static bridge-table entries on port ``dev``."""
    return {e["mac"]: sorted(e.get("flags", [])) for e in master_entries(ns, dev)
            if e.get("state") == "static"}


def where_is(ns: str, mac: str) -> list[tuple[str, str]]:
    """[(port, state)] of every bridge-table entry for ``mac``."""
    return [(e["ifname"], e.get("state", "dynamic")) for e in master_entries(ns)
            if e["mac"] == mac]


def dev_mcast(ns: str) -> list[tuple[str, int, int, str]]:
    """/proc/net/dev_mcast of the namespace: (device, refcount, global use, address)."""
    return _parse_dev_mcast(_run(["ip", "netns", "exec", ns, "cat", "/proc/net/dev_mcast"]))


def hexmac(mac: str) -> str:
    """A MAC as /proc/net/dev_mcast writes it: 01005e010203."""
    return mac.replace(":", "")


def _parse_dev_mcast(out: str) -> list[tuple[str, int, int, str]]:
    rows = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 5:
            rows.append((parts[1], int(parts[2]), int(parts[3]), parts[4]))
    return sorted(rows)


# -- snapshots ------------------------------------------------------------------------------


def snapshot(ns: str) -> dict[str, Any]:
    """Everything the oracle can see, for "changed nothing" comparisons: the same reads as
    links(), bridge_links(), fdb() and dev_mcast(), run side by side."""
    argvs = {"links": ["ip", "-n", ns, "-j", "-d", "link", "show"],
             "ports": ["bridge", "-n", ns, "-j", "-d", "link", "show"],
             "fdb": ["bridge", "-n", ns, "-j", "fdb", "show"],
             "dev_mcast": ["ip", "netns", "exec", ns, "cat", "/proc/net/dev_mcast"]}
    procs = {k: subprocess.Popen(a, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k, a in argvs.items()}
    out = {}
    for k, p in procs.items():
        stdout, stderr = p.communicate(timeout=20)
        if p.returncode != 0:
            raise AssertionError(f"oracle: {' '.join(argvs[k])} failed ({p.returncode}): "
                                 f"{stderr.strip()}")
        out[k] = stdout
    return {"links": {d["ifname"]: _strip(d) for d in json.loads(out["links"] or "[]")},
            "ports": {d["ifname"]: _strip(d) for d in json.loads(out["ports"] or "[]")},
            "fdb": sorted(json.loads(out["fdb"] or "[]"),
                          key=lambda e: json.dumps(e, sort_keys=True)),
            "dev_mcast": _parse_dev_mcast(out["dev_mcast"])}


def settle(ns: str, timeout: float = 3.0, interval: float = 0.25) -> dict[str, Any]:
    """Wait until the kernel stops changing by itself (carrier and operstate follow a link
    change up to a second later: linkwatch) and return that still snapshot."""
    deadline = time.monotonic() + timeout
    last = snapshot(ns)
    while True:
        time.sleep(interval)
        now = snapshot(ns)
        if now == last or time.monotonic() > deadline:
            return now
        last = now


def view(snap: dict[str, Any], devices: Iterable[str]) -> dict[str, Any]:
    """The part of a snapshot that concerns ``devices``: their links, port records, and every
    FDB entry on them (or, for a bridge, in its table)."""
    devices = set(devices)
    return {
        "links": {n: v for n, v in snap["links"].items() if n in devices},
        "ports": {n: v for n, v in snap["ports"].items() if n in devices},
        "fdb": [e for e in snap["fdb"] if e.get("ifname") in devices or
                e.get("master") in devices],
        "dev_mcast": [r for r in snap["dev_mcast"] if r[0] in devices],
    }


def diff(before: Any, after: Any, path: str = "") -> list[str]:
    """Readable differences between two JSON-like values (for assertion messages)."""
    if isinstance(before, dict) and isinstance(after, dict):
        out = []
        for k in sorted(set(before) | set(after), key=str):
            if k not in after:
                out.append(f"{path}/{k}: removed ({json.dumps(before[k])[:200]})")
            elif k not in before:
                out.append(f"{path}/{k}: added ({json.dumps(after[k])[:200]})")
            else:
                out.extend(diff(before[k], after[k], f"{path}/{k}"))
        return out
    if isinstance(before, list) and isinstance(after, list) and path.endswith("fdb"):
        b = {json.dumps(e, sort_keys=True) for e in before}
        a = {json.dumps(e, sort_keys=True) for e in after}
        return [f"{path}: removed {e}" for e in sorted(b - a)] + \
               [f"{path}: added {e}" for e in sorted(a - b)]
    if before != after:
        return [f"{path}: {json.dumps(before)[:200]} -> {json.dumps(after)[:200]}"]
    return []


# -- frames ---------------------------------------------------------------------------------
# These run inside the namespace (NetNS.call).

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
ETH_P_TEST = 0x88B5  # IEEE "local experimental": nothing else in the namespace sends it
ETH_P_ALL = 0x0003


class TapReader:
    """Attach to a persistent tap as its "guest" (gives it carrier) and read frames from it."""

    def __init__(self, name: str):
        self.name = name
        self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        ifr = struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI).ljust(40, b"\0")
        fcntl.ioctl(self.fd, TUNSETIFF, ifr)

    def read_all(self, wait: float) -> list[bytes]:
        frames = []
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0:
            r, _, _ = select.select([self.fd], [], [], left)
            if not r:
                break
            try:
                frames.append(os.read(self.fd, 65536))
            except BlockingIOError:
                continue
        return frames

    def close(self) -> None:
        os.close(self.fd)


def mac_bytes(mac: str) -> bytes:
    return bytes(int(x, 16) for x in mac.split(":"))


def frame(dst: str, src: str, tag: str) -> bytes:
    payload = tag.encode().ljust(46, b"\0")
    return mac_bytes(dst) + mac_bytes(src) + struct.pack("!H", ETH_P_TEST) + payload


def tag_of(raw: bytes) -> str | None:
    if len(raw) < 14 or struct.unpack("!H", raw[12:14])[0] != ETH_P_TEST:
        return None
    return raw[14:].rstrip(b"\0").decode(errors="replace")


def inject(dev: str, frames: Iterable[bytes]) -> None:
    """Send raw frames out of ``dev`` (an AF_PACKET socket bound to it)."""
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL)) as s:
        s.bind((dev, 0))
        for f in frames:
            s.send(f)


PACKET_OUTGOING = 4  # sockaddr_ll.sll_pkttype of a frame this host sends out of the device


def frames_out_of(dev: str, inject_dev: str, dst: str, count: int, tag: str,
                  wait: float = 0.3) -> int:
    """Inject ``count`` test frames to ``dst`` out of ``inject_dev`` and count how many of
    them this host then sends out of ``dev`` (e.g. a guest's tap, towards QEMU). Only those
    frames count (the test ethertype, ``tag``, ``dst``): other traffic on ``dev`` — a guest's
    own multicast, say — does not."""
    want = mac_bytes(dst)
    seen = 0
    # ETH_P_ALL: the kernel shows frames a device sends only to packet sockets of every type.
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL)) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        s.bind((dev, 0))
        inject(inject_dev, [frame(dst, "02:00:00:00:00:aa", tag)] * count)
        deadline = time.monotonic() + wait  # forwarding is synchronous: slack for a busy host
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([s], [], [], left)[0]:
                break
            raw, addr = s.recvfrom(65535)
            if addr[2] == PACKET_OUTGOING and raw[:6] == want and tag_of(raw) == tag:
                seen += 1
    return seen


def wait_forwarding(ports: Iterable[str], timeout: float = 3.0) -> None:
    """Wait until every port is in the bridge's forwarding state (reads sysfs-free netlink via
    `bridge -j link show` in this namespace)."""
    deadline = time.monotonic() + timeout
    ports = set(ports)
    while True:
        out = subprocess.run(["bridge", "-j", "link", "show"], capture_output=True,
                             text=True).stdout
        states = {p["ifname"]: p.get("state") for p in json.loads(out or "[]")}
        if all(states.get(p) == "forwarding" for p in ports):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"ports not forwarding after {timeout} s: {states}")
        time.sleep(0.02)


def frame_probe(taps: list[str], inject_dev: str, uplink: str,
                frames: dict[str, tuple[str, str]], wait: float = 0.3) -> dict[str, list[str]]:
    """Inject each frame {tag: (dst, src)} from ``inject_dev`` and report, per tag, the taps
    that received it. The taps are attached (carrier on) for the duration of the probe."""
    readers = [TapReader(t) for t in taps]
    try:
        wait_forwarding([*taps, uplink])
        for r in readers:
            r.read_all(0.05)  # drain anything that arrived while the ports came up
        inject(inject_dev, [frame(dst, src, tag) for tag, (dst, src) in frames.items()])
        got: dict[str, list[str]] = {tag: [] for tag in frames}
        time.sleep(wait)  # forwarding is synchronous; this is slack for a loaded machine
        for r in readers:
            for raw in r.read_all(0.02):
                tag = tag_of(raw)
                if tag in got:
                    got[tag].append(r.name)
        return {tag: sorted(v) for tag, v in got.items()}
    finally:
        for r in readers:
            r.close()
