#!/usr/bin/env python3
"""Benchmark: `netplug reconcile` at scale (500, 2,000 and 10,000 managed tap ports).

Setup (per size N, not timed): a throwaway network namespace with ceil(N / PER_BRIDGE)
bridges (a Linux bridge holds at most 1,024 ports), one veth uplink each, and N taps; libvirt's
test driver (``test:///…/node.xml``) serves N / NICS running domains whose live XML names those
taps (explicit <target dev>), and the config gives every bridge promiscLinks='no'. Every
measurement runs inside the namespace with the real NetlinkKernel and the command's own code
(libvirt_io.connect + read_desired, then reconcile.reconcile = sync.sync, explained).

Measured (medians over --runs, wall clock):
  in-sync check    reading libvirt (list + every running domain's live XML + parsing) and the
                   engine (one bulk kernel read, plan, state records under the lock): nothing
                   to do. Also as --dry-run, and as the whole `netplug reconcile` process
                   (Python start-up, imports, connect).
  full repair      from scratch: no entries, learning/flood on, empty state dir; applies
                   2 operations per port and records them
  connect          opening the connection. With the test driver this parses node.xml (N
                   domain definitions), which a real libvirtd has done long before: a bench
                   artefact, reported apart and not counted in the check.
  iproute2         a baseline that checks each port with `bridge -j -d link show dev TAP` and
                   `bridge -j fdb show br BR brport TAP`, and repairs it with `bridge link set …
                   learning off flood off` + `bridge fdb replace MAC dev TAP master static`
  breakdown        the pieces of an in-sync check timed one by one: libvirt (list, one
                   virDomainGetState and one XMLDesc per domain, parsing), the kernel dumps,
                   reading records, intents, planning, and rewriting every record (what
                   sync.sync does at the end of every non-dry run today)

Targets (exit status 1 if one is missed): at 2,000 ports an in-sync check <= 0.5 s and a
repair <= 2 s, time(2,000)/time(500) <= 4.5; at 10,000 ports an in-sync check <= 2 s and
time(10,000)/time(2,000) <= 5.5 (both ratios for the in-sync check and for the repair). The
iproute2 baseline runs only up to --baseline-max-ports (default 2,000: at 10,000 ports it
would take most of an hour).

By default the test driver runs in-process (every libvirt call is a function call). With
--via-libvirtd a private libvirtd (the project's lab, tests/lab) serves the same file, so each
call is a round trip over libvirtd's socket, as over qemu:///system.

Run as root: python3 bench/reconcile_scale.py [--ports 500,2000,10000] [--runs 5]
             [--baseline-runs 1] [--baseline-max-ports 2000] [--via-libvirtd] [--json FILE|-]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.append(REPO)  # PYTHONPATH (e.g. a patched copy) and the venv come first

# Absolute targets (seconds) by size, and ratio targets by (smaller, larger) size.
ABS_TARGETS = {2000: {"in_sync": 0.5, "repair": 2.0}, 10000: {"in_sync": 2.0}}
RATIO_TARGETS = {(500, 2000): 4.5, (2000, 10000): 5.5}


def mac(i: int) -> str:
    return f"52:54:00:{i >> 16 & 0xff:02x}:{i >> 8 & 0xff:02x}:{i & 0xff:02x}"


def tap_mac(i: int) -> str:
    return "fe" + mac(i)[2:]


# --------------------------------------------------------------------------- setup (host)


def layout(n: int, per_bridge: int) -> list[tuple[str, str, str]]:
    """[(tap, bridge, guest MAC)] for n ports."""
    return [(f"tap{i}", f"br{i // per_bridge}", mac(i + 1)) for i in range(n)]


def build(ns: str, ports, tmp: str, nics: int) -> None:
    bridges = sorted({b for _t, b, _m in ports}, key=lambda b: int(b[2:]))
    cmds = []
    for b in bridges:
        cmds += [f"link add {b} type bridge forward_delay 0", f"link set {b} up",
                 f"link add up{b[2:]} type veth peer name up{b[2:]}p",
                 f"link set up{b[2:]} master {b}", f"link set up{b[2:]} up",
                 f"link set up{b[2:]}p up"]
    for i, (tap, b, m) in enumerate(ports):
        cmds += [f"tuntap add dev {tap} mode tap", f"link set {tap} address {tap_mac(i + 1)}",
                 f"link set {tap} master {b}", f"link set {tap} up"]
    subprocess.run(["ip", "-n", ns, "-batch", "-"], input="\n".join(cmds) + "\n", text=True,
                   check=True)
    # Domains: `nics` interfaces each. Tap names avoid libvirt's reserved prefixes (vnet…).
    doms = []
    for d in range(0, len(ports), nics):
        ifaces = "".join(
            f"<interface type='bridge'><mac address='{m}'/><source bridge='{b}'/>"
            f"<target dev='{t}'/><model type='virtio'/><alias name='ua-net{k}'/></interface>"
            for k, (t, b, m) in enumerate(ports[d:d + nics]))
        doms.append(f"<domain type='qemu'><name>guest{d // nics}</name><memory unit='KiB'>"
                    f"131072</memory><os><type arch='x86_64'>hvm</type></os>"
                    f"<devices>{ifaces}</devices></domain>")
    with open(os.path.join(tmp, "node.xml"), "w") as f:
        f.write("<node>\n" + "\n".join(doms) + "\n</node>\n")
    with open(os.path.join(tmp, "config.toml"), "w") as f:
        for b in bridges:
            f.write(f'[bridge.{b}]\npromiscLinks = "no"\n\n')


# --------------------------------------------------------------------------- worker (in ns)


def median(xs):
    return statistics.median(xs) if xs else None


def reset(ports, state: str) -> None:
    """Undo netplug's work by hand (not timed): entries gone, learning/flood on, no records."""
    cmds = []
    for tap, _b, m in ports:
        cmds += [f"fdb del {m} dev {tap} master", f"link set dev {tap} learning on flood on"]
    subprocess.run(["bridge", "-force", "-batch", "-"], input="\n".join(cmds) + "\n",
                   text=True, capture_output=True)
    shutil.rmtree(state, ignore_errors=True)


def netplug_run(uri, config, state, dry_run=False):
    """What `netplug reconcile` does, in-process, timed in three parts: connecting to libvirt
    (with the test driver this parses node.xml, N domain definitions: a bench artefact, see
    the docstring), reading the live XML of every running domain, and the engine."""
    from libvirt_netplug import libvirt_io
    from libvirt_netplug.kernel import NetlinkKernel
    from libvirt_netplug.policy import load_config
    from libvirt_netplug.reconcile import reconcile
    from libvirt_netplug.state import StateDir

    t0 = time.perf_counter()
    conn = libvirt_io.connect(uri)
    t1 = time.perf_counter()
    desired = libvirt_io.read_desired(conn, load_config(config))
    t2 = time.perf_counter()
    with NetlinkKernel() as k:
        out = reconcile(k, StateDir(state), desired, dry_run=dry_run)
    t3 = time.perf_counter()
    conn.close()
    return out, {"connect": t1 - t0, "libvirt": t2 - t1, "engine": t3 - t2,
                 "check": t3 - t1}


def breakdown(uri, config, state) -> dict:
    """Time the pieces of an in-sync check separately (same calls the engine makes).

    With the collector paused, as the engine runs: otherwise its passes over the 10,000
    parsed domains held here land on whichever piece happens to allocate (a third of the
    state read and of the kernel read at 10,000 ports), and the pieces no longer add up
    to what a run costs.
    """
    from libvirt_netplug.sync import gc_paused

    with gc_paused():
        return _breakdown(uri, config, state)


def _breakdown(uri, config, state) -> dict:
    import libvirt

    from libvirt_netplug import libvirt_io
    from libvirt_netplug.apply import observe_all
    from libvirt_netplug.kernel import NetlinkKernel
    from libvirt_netplug.model import parse_domain
    from libvirt_netplug.plan import bridge_intents, plan_ports
    from libvirt_netplug.policy import load_config
    from libvirt_netplug.state import StateDir

    out = {}
    t = time.perf_counter()
    cfg = load_config(config)
    conn = libvirt_io.connect(uri)
    out["libvirt_connect"] = time.perf_counter() - t
    t = time.perf_counter()
    nets, _ = libvirt_io.read_networks(conn)
    objs = conn.listAllDomains(0)
    out["libvirt_list"] = time.perf_counter() - t
    t = time.perf_counter()
    states = [d.state() for d in objs]
    out["libvirt_state_calls"] = time.perf_counter() - t
    t = time.perf_counter()
    xmls = [d.XMLDesc(0) for d in objs]
    out["libvirt_xmldesc_calls"] = time.perf_counter() - t
    t = time.perf_counter()
    doms = [parse_domain(x) for x in xmls]
    out["parse_xml_to_model"] = time.perf_counter() - t
    assert all(s[0] == libvirt.VIR_DOMAIN_RUNNING for s in states)
    t = time.perf_counter()
    intents = {d.name: bridge_intents(d, nets, cfg) for d in doms}
    out["intents"] = time.perf_counter() - t
    st = StateDir(state)
    t = time.perf_counter()
    records = st.domains()
    out["state_read_records"] = time.perf_counter() - t
    bridges = {i.bridge for its in intents.values() for i in its}
    with NetlinkKernel() as k:
        t = time.perf_counter()
        observed = observe_all(k, bridges)
        out["kernel_read"] = time.perf_counter() - t
        t = time.perf_counter()
        links = k.links()
        out["kernel_link_dump"] = time.perf_counter() - t
        t = time.perf_counter()
        for b in sorted(bridges):
            k.fdb(b)
        out["kernel_fdb_dumps"] = time.perf_counter() - t
    out["kernel_links"] = len(links)
    out["fdb_entries"] = sum(len(v) for v in observed.fdb.values())
    t = time.perf_counter()
    nops = 0
    for name, its in intents.items():
        nops += len(plan_ports(its, observed, records.get(name, {}).get("ports")).ops)
    out["plan"] = time.perf_counter() - t
    assert nops == 0, nops
    t = time.perf_counter()
    for name, rec in records.items():
        st.put_domain(name, rec)
    out["state_write_records"] = time.perf_counter() - t
    conn.close()
    return out


def baseline_check_port(tap, br, m) -> tuple[bool, bool]:
    """(flags ok, entry ok) for one port, with two iproute2 commands."""
    link = json.loads(subprocess.run(["bridge", "-j", "-d", "link", "show", "dev", tap],
                                     capture_output=True, text=True, check=True).stdout)
    flags_ok = bool(link) and not link[0].get("learning") and not link[0].get("flood")
    fdb = json.loads(subprocess.run(["bridge", "-j", "fdb", "show", "br", br, "brport", tap],
                                    capture_output=True, text=True, check=True).stdout)
    entry_ok = any(e["mac"] == m and e.get("state") == "static" for e in fdb)
    return flags_ok, entry_ok


def baseline(ports) -> int:
    """Check every port; repair what is wrong (entry first, then flags). Returns repairs."""
    repairs = 0
    for tap, br, m in ports:
        flags_ok, entry_ok = baseline_check_port(tap, br, m)
        if not entry_ok:
            subprocess.run(["bridge", "fdb", "replace", m, "dev", tap, "master", "static"],
                           check=True)
            repairs += 1
        if not flags_ok:
            subprocess.run(["bridge", "link", "set", "dev", tap, "learning", "off", "flood",
                            "off"], check=True)
            repairs += 1
    return repairs


def worker(args) -> None:
    ports = layout(args.ports, args.per_bridge)
    # In-process test driver, or the same file served by a libvirtd (--via-libvirtd): then
    # every list and XMLDesc is a round trip over libvirtd's socket, as with qemu:///system.
    uri = (f"test+unix://{args.dir}/node.xml?socket={args.socket}" if args.socket
           else f"test://{args.dir}/node.xml")
    config = f"{args.dir}/config.toml"
    # The state dir lives in /run on a host, which is tmpfs there (not on this VM: /run is on
    # the root ext4 here), so the bench keeps it on tmpfs too (--state-base).
    state = os.path.join(args.state_base, f"npbench-state-{os.getpid()}")
    res: dict = {"ports": args.ports, "bridges": len({b for _t, b, _m in ports}),
                 "domains": math.ceil(args.ports / args.nics), "nics_per_domain": args.nics}
    import libvirt_netplug.reconcile  # noqa: F401 - import cost is not part of a run

    # Full repair from scratch.
    runs = []
    for _ in range(args.runs):
        reset(ports, state)
        out, t = netplug_run(uri, config, state)
        assert out.exit_status == 2, out.lines()[-3:]
        assert out.counts()["applied"] == 2 * args.ports, out.counts()
        runs.append(t)
    for part in ("check", "libvirt", "engine", "connect"):
        res["repair" + ("" if part == "check" else "_" + part)] = median([t[part] for t in runs])
    # In-sync checks.
    for key, dry in (("in_sync", False), ("in_sync_dry_run", True)):
        runs = []
        for _ in range(args.runs):
            out, t = netplug_run(uri, config, state, dry_run=dry)
            assert out.exit_status == 0, out.lines()[-3:]
            runs.append(t)
        for part in ("check", "libvirt", "engine", "connect"):
            res[key + ("" if part == "check" else "_" + part)] = median([t[part] for t in runs])
    # The whole command, as a timer or an operator runs it (Python start-up and imports too).
    cli = os.path.join(os.path.dirname(sys.executable), "netplug")
    argv = [cli, "reconcile", "--connect", uri, "--config", config, "--state-dir", state,
            "--no-guest-query"]
    times = []
    for _ in range(args.runs):
        t = time.perf_counter()
        p = subprocess.run(argv, capture_output=True, text=True)
        times.append(time.perf_counter() - t)
        assert p.returncode == 0, p.stdout[-500:] + p.stderr
    res["in_sync_cli_process"] = median(times)
    # Where the in-sync check spends its time.
    parts = [breakdown(uri, config, state) for _ in range(args.runs)]
    res["breakdown"] = {k: median([p[k] for p in parts]) for k in parts[0]}
    # iproute2 baseline: check (in sync) and repair from scratch.
    if args.baseline_runs:
        check, rep = [], []
        for _ in range(args.baseline_runs):
            t = time.perf_counter()
            assert baseline(ports) == 0
            check.append(time.perf_counter() - t)
        for _ in range(args.baseline_runs):
            reset(ports, state)
            t = time.perf_counter()
            assert baseline(ports) == 2 * args.ports
            rep.append(time.perf_counter() - t)
        res["iproute2_check"] = median(check)
        res["iproute2_repair"] = median(rep)
    shutil.rmtree(state, ignore_errors=True)
    json.dump(res, sys.stdout)


# --------------------------------------------------------------------------- driver


def run_size(n: int, args, socket: str | None) -> dict:
    ns = f"npbench-{os.getpid()}-{n}"
    tmp = tempfile.mkdtemp(prefix=f"npbench-{n}-")
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        t = time.perf_counter()
        build(ns, layout(n, args.per_bridge), tmp, args.nics)
        print(f"  {n} ports: namespace {ns} built in {time.perf_counter() - t:.1f} s",
              file=sys.stderr)
        baseline_runs = args.baseline_runs if n <= args.baseline_max_ports else 0
        p = subprocess.run(["ip", "netns", "exec", ns, sys.executable, os.path.abspath(__file__),
                            "--worker", "--dir", tmp, "--ports", str(n), "--per-bridge",
                            str(args.per_bridge), "--nics", str(args.nics), "--runs",
                            str(args.runs), "--baseline-runs", str(baseline_runs),
                            "--state-base", args.state_base,
                            *(["--socket", socket] if socket else [])],
                           capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"worker for {n} ports failed:\n{p.stderr}")
        return json.loads(p.stdout)
    finally:
        subprocess.run(["ip", "netns", "del", ns])
        shutil.rmtree(tmp, ignore_errors=True)


def fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v * 1000:.0f} ms" if v < 10 else f"{v:.1f} s"


def report(results: list[dict]) -> tuple[list[str], dict[str, bool]]:
    """The table (a ratio column for each pair of consecutive sizes) and the targets."""
    rows = [("in-sync check (read libvirt + engine)", "in_sync"),
            ("  libvirt: list + live XML of every domain + parse", "in_sync_libvirt"),
            ("  engine: kernel read, plan, records (under the lock)", "in_sync_engine"),
            ("in-sync check, --dry-run", "in_sync_dry_run"),
            ("full repair from scratch (read libvirt + engine)", "repair"),
            ("  libvirt", "repair_libvirt"),
            ("  engine: kernel read, plan, 2 ops/port, records", "repair_engine"),
            ("libvirt connect (test driver: parses node.xml)", "in_sync_connect"),
            ("whole `netplug reconcile` process, in sync", "in_sync_cli_process"),
            ("iproute2 baseline: check every port", "iproute2_check"),
            ("iproute2 baseline: check + repair every port", "iproute2_repair")]
    results = sorted(results, key=lambda r: r["ports"])
    sizes = [r["ports"] for r in results]
    pairs = list(zip(range(len(results)), range(1, len(results))))
    head = f"{'median':<56}" + "".join(f"{str(s) + ' ports':>14}" for s in sizes)
    head += "".join(f"{f'{sizes[j]}/{sizes[i]}':>12}" for i, j in pairs)
    lines = [head]
    for label, key in rows:
        vals = [r.get(key) for r in results]
        line = f"{label:<56}" + "".join(f"{fmt(v):>14}" for v in vals)
        line += "".join(f"{vals[j] / vals[i]:>12.2f}" if vals[i] and vals[j] else f"{'-':>12}"
                        for i, j in pairs)
        lines.append(line)
    lines.append("")
    lines.append("breakdown of one in-sync check (medians):")
    keys = list(results[0]["breakdown"])
    for k in keys:
        vals = [r["breakdown"][k] for r in results]
        if k in ("kernel_links", "fdb_entries"):
            lines.append(f"  {k:<54}" + "".join(f"{int(v):>14}" for v in vals))
        elif k == "state_write_records":
            # An in-sync run rewrites nothing; this is what rewriting every record would cost.
            label = "(not done in sync) rewriting every record"
            lines.append(f"  {label:<54}" + "".join(f"{fmt(v):>14}" for v in vals))
        else:
            lines.append(f"  {k:<54}" + "".join(f"{fmt(v):>14}" for v in vals))
    lines.append("")
    checks: dict[str, bool] = {}
    by_size = {r["ports"]: r for r in results}
    for n, targets in ABS_TARGETS.items():
        if n not in by_size:
            continue
        for key, limit in targets.items():
            what = "in sync checked" if key == "in_sync" else "repaired from scratch"
            name = f"{n} ports {what} in <= {limit:g} s: {fmt(by_size[n][key])}"
            checks[name] = by_size[n][key] <= limit
    for (small, big), limit in RATIO_TARGETS.items():
        if small not in by_size or big not in by_size:
            continue
        for key in ("in_sync", "repair"):
            ratio = by_size[big][key] / by_size[small][key]
            checks[f"time({big})/time({small}) <= {limit:g} for {key}: {ratio:.2f}"] = \
                ratio <= limit
    for name, ok in checks.items():
        lines.append(f"target: {name} {'OK' if ok else 'MISSED'}")
    return lines, checks


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ports", default="500,2000,10000", help="comma-separated sizes")
    p.add_argument("--per-bridge", type=int, default=500,
                   help="taps per bridge (max 1,023 with the uplink)")
    p.add_argument("--nics", type=int, default=1, help="interfaces per domain")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--baseline-runs", type=int, default=1,
                   help="iproute2 baseline runs (each takes minutes at 2,000 ports; 0: skip)")
    p.add_argument("--baseline-max-ports", type=int, default=2000,
                   help="run the iproute2 baseline only up to this size (default 2,000)")
    p.add_argument("--json", metavar="FILE", help="also write the raw results here ('-': stdout)")
    p.add_argument("--state-base", default="/dev/shm", metavar="DIR",
                   help="where the state dir goes (default /dev/shm: tmpfs, like /run)")
    p.add_argument("--via-libvirtd", action="store_true",
                   help="serve the domains through a private libvirtd (the project's lab, "
                        "tests/lab) instead of the in-process test driver, so reading them "
                        "costs what it costs over qemu:///system: one RPC per call")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--socket", help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.ports = int(args.ports)
        worker(args)
        return 0
    if os.geteuid() != 0:
        raise SystemExit("reconcile_scale: needs root (network namespaces, bridges, taps)")
    if not 1 <= args.per_bridge <= 1023:
        raise SystemExit("--per-bridge must be 1..1023 (BR_MAX_PORTS is 1024, one is the uplink)")
    sizes = sorted(int(s) for s in args.ports.split(","))
    with open("/proc/loadavg") as f:
        load_before = " ".join(f.read().split()[:3])
    print(f"reconcile_scale: sizes {sizes}, {args.per_bridge} taps per bridge, {args.nics} "
          f"NIC(s) per domain, {args.runs} runs (iproute2: {args.baseline_runs}, up to "
          f"{args.baseline_max_ports} ports); load average {load_before}", file=sys.stderr)
    lab = None
    socket = None
    if args.via_libvirtd:
        from tests.lab import Lab  # the repo's lab: a libvirtd in its own namespaces

        lab = Lab(f"bench-{os.getpid()}")
        lab.start()
        socket = f"{lab.dir}/run/libvirt/libvirt-sock"
        print(f"  libvirtd of lab {lab.name} serves the test driver: {socket}",
              file=sys.stderr)
    try:
        results = [run_size(n, args, socket) for n in sizes]
    finally:
        if lab is not None:
            lab.stop()
    with open("/proc/loadavg") as f:
        load_after = " ".join(f.read().split()[:3])
    print(f"reconcile_scale: load average before {load_before}, after {load_after}; "
          f"{len(os.sched_getaffinity(0))} cores")
    if socket:
        print("libvirt: the test driver served by libvirtd (every call is an RPC)")
    lines, checks = report(results)
    for line in lines:
        print(line)
    doc = {"load_before": load_before, "load_after": load_after, "sizes": results,
           "targets": checks}
    if args.json == "-":
        print(json.dumps(doc, indent=1))
    elif args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
