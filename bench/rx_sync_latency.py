#!/usr/bin/env python3
"""Macvtap RX-filter sync latency: netplug's agent vs libvirt's trustGuestRxFilters='yes',
same guest, same actions, same run; then the agent's resident memory with 20 domains.

    .venv/bin/python bench/rx_sync_latency.py [--rounds 15] [--domains 20] [--json FILE]
                                              [--skip-memory] [--skip-latency]

Needs root (it starts the libvirt lab: a private libvirtd + QEMU in their own namespaces).

Latency. One lab guest with two virtio NICs on macvtaps:
    netplug  low0, domain metadata rxFilters="multicast allmulti" (the agent syncs it)
    libvirt  low1, trustGuestRxFilters='yes' (libvirtd syncs it itself)
Each round, for each NIC (alternating which goes first), the guest joins a fresh multicast
group (`ip maddr add`) and later leaves it. Two figures per action, both ending when the
host's /proc/net/dev_mcast shows the macvtap programmed (polled every millisecond):
- from the guest's change: the timestamp QEMU puts on its NIC_RX_FILTER_CHANGED event (taken
  when the guest's driver changes the filter; read by a passive libvirt listener in this
  process, which never queries anything, so it re-arms nothing);
- from the moment the command is written to the guest's serial console (adds the guest's
  shell and TCG time, the same for both, and its noise).

The floor for any agent outside libvirtd, from the same run: how long libvirtd takes to
hand QEMU's event to a client (every event the passive listener saw) plus a query-rx-filter
round trip through libvirtd (50 of them on the idle guest after the rounds).

Where the lab lives. libvirtd rewrites (and fsyncs) a domain's status file under
/run/libvirt on every QEMU monitor command sent through its API, i.e. on every query the
agent makes (libvirt's own trustGuestRxFilters path does not). On a real host /run is a
tmpfs; on this project's machines /tmp and /run are on the root disk, where that fsync costs
1-50 ms depending on what else writes. So the bench puts its lab (NETPLUG_LAB_ROOT) on a
private tmpfs, as a host's /run would be; --lab-root DIR overrides it (e.g. /tmp, to see the
difference).

Memory. The agent's VmRSS (and VmHWM, its peak) with 0 domains, after the start-up resync
of N running domains (each with a managed macvtap and a managed bridge port; no guest OS
is booted: SeaBIOS idles), and after a round of suspend/resume events for all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from tests.lab import Lab  # noqa: E402
from tests.lab.lab import Nic  # noqa: E402
from polling import wait_for  # noqa: E402  (tests/ is on sys.path above)

NS = "urn:x-libvirt-netplug:1"
M_NETPLUG, M_LIBVIRT = "52:54:00:be:00:01", "52:54:00:be:00:02"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def netplug_cli() -> list[str]:
    exe = Path(sys.executable).with_name("netplug")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "libvirt_netplug.cli"]


class Agent:
    def __init__(self, lab: Lab, workdir: Path, name: str = "agent"):
        self.lab, self.workdir, self.name = lab, workdir, name
        self.logfile = workdir / f"{name}.log"
        # The state dir next to the lab: on the tmpfs, like a host's /run/libvirt-netplug.
        self.state = Path(os.environ.get("NETPLUG_LAB_ROOT") or workdir) / "netplug-state"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        (self.workdir / "none.toml").write_text("")  # an explicit --config must exist
        with open(self.logfile, "ab") as out:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.lab.name, *netplug_cli(), "agent", "--connect",
                 self.lab.host_uri, "--state-dir", str(self.state), "--config",
                 str(self.workdir / "none.toml"), "--resync-interval", "0",
                 *(["--verbose"] if os.environ.get("NETPLUG_BENCH_VERBOSE") else [])],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)

    def log(self) -> str:
        return self.logfile.read_text(errors="replace") if self.logfile.exists() else ""

    def status(self, key: str) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])  # kB
        raise KeyError(key)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(20)


class McastWatch:
    """/proc/net/dev_mcast of the lab's namespace, read through a process inside it."""

    def __init__(self, pid: int):
        self.path = f"/proc/{pid}/net/dev_mcast"

    def has(self, dev: str, mac_hex: str) -> bool:
        with open(self.path) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 5 and parts[1] == dev and parts[4] == mac_hex:
                    return True
        return False

    def wait(self, dev: str, mac_hex: str, present: bool, timeout: float = 15.0) -> float:
        deadline = time.monotonic() + timeout
        while True:
            if self.has(dev, mac_hex) == present:
                return time.monotonic()
            if time.monotonic() > deadline:
                raise RuntimeError(f"{dev}: {mac_hex} {'never appeared' if present else 'stayed'}"
                                   f" within {timeout:.0f} s")
            time.sleep(0.001)


class EventWatch:
    """A passive listener for NIC_RX_FILTER_CHANGED: it never queries while rounds run (a query
    re-arms the event); query() is for the round-trip figure, after the rounds."""

    def __init__(self, uri: str):
        import libvirt
        import libvirt_qemu

        libvirt.registerErrorHandler(lambda *_: None, None)
        libvirt.virEventRegisterDefaultImpl()
        threading.Thread(target=self._loop, args=(libvirt,), daemon=True).start()
        self.conn = libvirt.open(uri)
        self.events: list[tuple[float, str]] = []
        # How long libvirtd takes to hand QEMU's event to a client: the floor for any agent
        # outside libvirtd (libvirt's own handler does not pay it).
        self.delivery: list[float] = []
        self.lock = threading.Lock()
        libvirt_qemu.qemuMonitorEventRegister(self.conn, None, "NIC_RX_FILTER_CHANGED",
                                              self._cb, None, 0)

    @staticmethod
    def _loop(libvirt) -> None:
        while True:
            libvirt.virEventRunDefaultImpl()

    def _cb(self, _conn, _dom, _event, secs, micros, details, _opaque) -> None:
        nic = json.loads(details).get("name", "?") if details else "?"
        # QEMU stamps the event with its wall clock when the guest's driver changes the
        # filter: that is "the guest's change". Convert it to this process's monotonic clock.
        stamp = secs + micros / 1e6
        lag = time.time() - stamp
        with self.lock:
            self.events.append((time.monotonic() - lag, nic))
            self.delivery.append(lag)

    def query(self, nic: str) -> str:
        import libvirt_qemu

        return libvirt_qemu.qemuMonitorCommand(
            self.conn.lookupByName("bench"),
            json.dumps({"execute": "query-rx-filter", "arguments": {"name": nic}}), 0)

    def first_after(self, t: float, nic: str) -> float | None:
        with self.lock:
            times = [e for e, n in self.events if n == nic and e >= t]
        return min(times) if times else None


def summary(xs: list[float]) -> dict:
    xs = sorted(xs)
    return {"n": len(xs), "median_ms": round(statistics.median(xs) * 1000, 1),
            "p90_ms": round(xs[int(0.9 * (len(xs) - 1))] * 1000, 1),
            "min_ms": round(xs[0] * 1000, 1), "max_ms": round(xs[-1] * 1000, 1)}


def latency(lab: Lab, work: Path, rounds: int) -> dict:
    lab.add_lower_veth("low0")
    lab.add_lower_veth("low1")
    meta = (f'<netplug:policy xmlns:netplug="{NS}"><netplug:interface mac="{M_NETPLUG}" '
            f'rxFilters="multicast allmulti"/></netplug:policy>')
    agent = Agent(lab, work, "agent-latency")
    agent.start()
    wait_for(lambda: "full resync (connected)" in agent.log(), 30, "the agent to connect")
    events = EventWatch(lab.host_uri)
    guest = lab.start_guest("bench", [
        Nic("direct", "low0", mac=M_NETPLUG),
        Nic("direct", "low1", mac=M_LIBVIRT, attrs="trustGuestRxFilters='yes'")],
        metadata=meta, timeout=180)
    eth = {mac: name for name, mac in guest.macs.items()}
    dev = guest.targets()
    nic_alias = {M_NETPLUG: "net0", M_LIBVIRT: "net1"}
    watch = McastWatch(lab.holder_pid)
    systems = {"netplug": M_NETPLUG, "libvirt": M_LIBVIRT}
    # Both sides have programmed the guest's boot-time filter before measuring.
    time.sleep(3)
    results = {s: {"join": [], "leave": [], "join_from_change": [], "leave_from_change": []}
               for s in systems}
    paired: dict[str, dict] = {s: {} for s in systems}
    log(f"latency: {rounds} rounds x 2 systems x (join + leave)")
    for r in range(rounds):
        order = list(systems) if r % 2 == 0 else list(reversed(systems))
        for system in order:
            mac = systems[system]
            group = f"01:00:5e:7{'0' if system == 'netplug' else '1'}:{r >> 8:02x}:{r & 0xff:02x}"
            hexg = group.replace(":", "")
            for action, present in (("join", True), ("leave", False)):
                verb = "add" if present else "del"
                t0 = time.monotonic()
                th = threading.Thread(target=guest.check,
                                      args=(f"ip maddr {verb} {group} dev {eth[mac]}",))
                th.start()
                t1 = watch.wait(dev[mac], hexg, present)
                th.join()
                results[system][action].append(t1 - t0)
                te = events.first_after(t0, nic_alias[mac])
                if te is not None and te <= t1:
                    results[system][f"{action}_from_change"].append(t1 - te)
                    paired[system][(r, action)] = t1 - te
                time.sleep(0.3)
        log(f"  round {r + 1}/{rounds}: netplug join {results['netplug']['join'][-1]*1000:.0f}"
            f" ms, libvirt join {results['libvirt']['join'][-1]*1000:.0f} ms")
    agent.stop()
    # The floor for any agent outside libvirtd: the event reaches it (event_delivery...) and
    # it asks QEMU through libvirtd (this round trip, on the idle guest) before it can program
    # anything; libvirt's own handler pays neither.
    query_rtt = []
    for _ in range(50):
        t = time.monotonic()
        events.query(nic_alias[M_NETPLUG])
        query_rtt.append(time.monotonic() - t)
        time.sleep(0.01)
    out: dict = {s: {k: summary(v) for k, v in d.items() if v} for s, d in results.items()}
    out["query_rx_filter_through_libvirtd_ms"] = summary(query_rtt)
    out["samples_ms"] = {s: {k: [round(x * 1000, 1) for x in v] for k, v in d.items()}
                         for s, d in results.items()}
    med = {s: statistics.median(results[s]["join"] + results[s]["leave"]) for s in systems}
    out["median_from_command_ms"] = {s: round(v * 1000, 1) for s, v in med.items()}
    out["ratio_from_command"] = round(med["netplug"] / med["libvirt"], 3)
    with events.lock:
        if events.delivery:
            out["event_delivery_to_a_client_ms"] = summary(events.delivery)
    ch = {s: results[s]["join_from_change"] + results[s]["leave_from_change"] for s in systems}
    if all(ch.values()):
        medc = {s: statistics.median(v) for s, v in ch.items()}
        out["median_from_guest_change_ms"] = {s: round(v * 1000, 2) for s, v in medc.items()}
        out["ratio_from_guest_change"] = round(medc["netplug"] / medc["libvirt"], 3)
        # Paired: the two systems' actions of one round run back to back.
        pairs = [v - paired["libvirt"][k] for k, v in paired["netplug"].items()
                 if k in paired["libvirt"]]
        if events.delivery:
            floor = statistics.median(events.delivery) + statistics.median(query_rtt)
            out["agent_floor_ms"] = {
                "event_delivery_plus_query": round(floor * 1000, 2),
                "libvirt_median_from_guest_change": out["median_from_guest_change_ms"]["libvirt"]}
        out["paired_difference_from_guest_change_ms"] = {
            "median": round(statistics.median(pairs) * 1000, 2),
            "netplug_faster_in": f"{sum(1 for d in pairs if d < 0)}/{len(pairs)}"}
    lab.virsh("destroy", "bench")
    return out


def bare_domain_xml(lab: Lab, name: str, lower: str, bridge: str, mac_a: str, mac_b: str) -> str:
    """A domain with a managed macvtap and a managed bridge port and no OS to boot."""
    meta = (f'<netplug:policy xmlns:netplug="{NS}" promiscLinks="no" '
            f'rxFilters="multicast allmulti"/>')
    xml = lab.domain_xml(name, [Nic("direct", lower, mac=mac_a, extra="<rom enabled='no'/>"),
                                Nic("bridge", bridge, mac=mac_b, extra="<rom enabled='no'/>")],
                         memory_mib=32, metadata=meta)
    return re.sub(r"\s*<(kernel|initrd|cmdline)>.*?</\1>", "", xml)


def memory(lab: Lab, work: Path, n: int) -> dict:
    lab.add_lower_veth("lowm")
    lab.add_host_bridge("brm")
    lab.add_uplink("brm", "upm")
    agent = Agent(lab, work, "agent-memory")
    agent.start()
    wait_for(lambda: "full resync (connected)" in agent.log(), 30, "the agent to connect")
    time.sleep(1.0)
    out = {"domains_0": {"rss_kb": agent.status("VmRSS"), "hwm_kb": agent.status("VmHWM")}}
    names = []
    log(f"memory: starting {n} domains")
    for i in range(n):
        name = f"m{i:02d}"
        path = lab.dir / "xml" / f"{name}.xml"
        path.write_text(bare_domain_xml(lab, name, "lowm", "brm", f"52:54:00:cc:00:{i:02x}",
                                        f"52:54:00:cd:00:{i:02x}"))
        lab.virsh("define", str(path))
        lab.virsh("start", name)
        names.append(name)

    def fdb_count() -> int:
        r = lab.run("bridge", "-j", "fdb", "show", "br", "brm")
        return sum(1 for e in json.loads(r.stdout or "[]")
                   if e.get("state") == "static" and e["mac"].startswith("52:54:00:cd"))

    wait_for(lambda: fdb_count() == n, 120, f"{n} FDB entries (STARTED events)")
    time.sleep(1.0)
    out[f"domains_{n}_via_events"] = {"rss_kb": agent.status("VmRSS"),
                                      "hwm_kb": agent.status("VmHWM")}
    agent.stop()
    # A fresh agent: the start-up full resync of N running domains.
    agent = Agent(lab, work, "agent-memory-2")
    agent.start()
    wait_for(lambda: "full resync (connected)" in agent.log(), 30, "the agent to connect")
    time.sleep(2.0)
    out[f"domains_{n}_after_startup_resync"] = {"rss_kb": agent.status("VmRSS"),
                                                "hwm_kb": agent.status("VmHWM")}
    records = [json.loads(f.read_text()) for f in (agent.state / "domains").glob("*.json")]
    out["managed"] = {"domains_with_records": len(records),
                      "bridge_ports": sum(len(r.get("ports", {})) for r in records),
                      "macvtaps": sum(len(r.get("rx", {})) for r in records)}
    for name in names:
        lab.virsh("suspend", name)
    wait_for(lambda: fdb_count() == 0, 60, "FDB entries removed on suspend")
    for name in names:
        lab.virsh("resume", name)
    wait_for(lambda: fdb_count() == n, 60, "FDB entries restored on resume")
    time.sleep(1.0)
    out[f"domains_{n}_after_suspend_resume"] = {"rss_kb": agent.status("VmRSS"),
                                                "hwm_kb": agent.status("VmHWM")}
    agent.stop()
    for name in names:
        lab.virsh("destroy", name, check=False)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--domains", type=int, default=20)
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument("--lab-root", metavar="DIR",
                    help="where the lab's /run, /var/lib/libvirt... live (default: a private "
                         "tmpfs, like a real host's /run)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/rx_sync_latency.py needs root (the libvirt lab)", file=sys.stderr)
        return 1
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="netplug-bench-rx-"))
    tmpfs = None
    if args.lab_root:
        os.environ["NETPLUG_LAB_ROOT"] = args.lab_root
    else:
        tmpfs = work / "labroot"
        tmpfs.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2g,mode=0755", "netplug-bench",
                        str(tmpfs)], check=True)
        os.environ["NETPLUG_LAB_ROOT"] = str(tmpfs)
    load = os.getloadavg()
    results: dict = {"rounds": args.rounds, "domains": args.domains,
                     "lab_root": os.environ["NETPLUG_LAB_ROOT"] + (" (tmpfs)" if tmpfs else ""),
                     "cpus": os.cpu_count(), "loadavg_at_start": [round(x, 2) for x in load]}
    try:
        with Lab("bench-rx") as lab:
            if not args.skip_latency:
                results["latency"] = latency(lab, work, args.rounds)
            if not args.skip_memory:
                results["memory"] = memory(lab, work, args.domains)
    finally:
        if tmpfs is not None:
            subprocess.run(["umount", str(tmpfs)], check=False)
    results["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    text = json.dumps(results, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    lat = results.get("latency")
    if lat:
        if "median_from_guest_change_ms" in lat:
            c = lat["median_from_guest_change_ms"]
            print(f"RX-filter sync, guest's change (QEMU's event timestamp) -> host programmed, "
                  f"median of joins and leaves: netplug {c['netplug']} ms, libvirt "
                  f"trustGuestRxFilters {c['libvirt']} ms, ratio "
                  f"{lat['ratio_from_guest_change']}", file=sys.stderr)
        m = lat["median_from_command_ms"]
        print(f"from the guest console command: netplug {m['netplug']} ms, libvirt "
              f"{m['libvirt']} ms, ratio {lat['ratio_from_command']}", file=sys.stderr)
    print(f"the agents' logs are kept in {work} (remove it when done)", file=sys.stderr)
    mem = results.get("memory")
    if mem:
        print(f"agent memory: managing {mem['managed']}", file=sys.stderr)
        for k, v in mem.items():
            if "rss_kb" not in v:
                continue
            print(f"agent memory, {k}: RSS {v['rss_kb'] / 1024:.1f} MiB (peak "
                  f"{v['hwm_kb'] / 1024:.1f} MiB)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
