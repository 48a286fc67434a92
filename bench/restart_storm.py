#!/usr/bin/env python3
"""Benchmark: the `reconnect` storm of a libvirtd restart, and whether a hook's cost grows with
the bridge.

When libvirtd restarts it runs the qemu hook with `reconnect` for every running domain. Here,
for N running domains (--domains, default 200 and 1,000; 2 NICs each):

Setup (per size, not timed): a throwaway network namespace with the domains' taps made as
libvirt makes them (vnetN, address = the guest MAC with first byte 0xfe, up, in the bridge),
one bridge as far as it holds them (a Linux bridge takes at most 1,024 ports: --per-bridge
taps, default 1,022, then the next bridge; 200 domains fit on one, 1,000 take two), a veth
uplink per bridge, and netplug's hooks installed by `netplug install-hooks` of the interpreter
under test (--python; default Debian's /usr/bin/python3 as a host has it, see
bench/hookenv.py) with a config managing those bridges and a state dir on tmpfs. Each domain's
ports are then managed by running its `start begin` hook once (8 in parallel), checked with
`bridge -j`.

Measured, in one run:
  storm      `reconnect` for every domain exactly as libvirtd runs it: the installed shim,
             argv `SHIM NAME reconnect begin -`, the live domain XML on stdin, libvirtd's
             environment (HOME, LC_ALL=C, PATH, PWD), cwd /; --parallel (8) at a time. Total
             wall time, and each hook's own wall time (median, p90, max). Afterwards every
             port must still be managed (`bridge -j`), every hook exited 0 with nothing on
             stdout, and the state dir is compared file by file (an in-sync replay should
             write nothing).
  no-op sh   the same storm with `#!/bin/sh` + `exit 0` as the hook.
  per hook   the `reconnect` of one 2-NIC domain ("probe", its taps on br0), alone, on a bridge
             with 2 other ports (a separate namespace: the probe and one other domain) vs in
             the largest storm's namespace (the probe plus all N domains: 2N other ports, as
             many on its own bridge as fits), alternating A B B A, --ab-runs pairs.
Targets (issue 11): per-hook ratio (2N=2,000 vs 2 other ports) <= 1.2; the 1,000-domain storm
<= 1.2 x (1,000 x one hook / min(8, cores)), one hook = the median per-hook `reconnect` alone
in that namespace. Exit status 1 if a target is missed.

--shim IS measures the -IS form of the shim (`#!PY -IS` + sys.path), built by the bench from
the installed one when install-hooks does not write it yet (said in the output).

Run as root:  .venv/bin/python bench/restart_storm.py [--domains 200,1000] [--parallel 8]
                  [--ab-runs 30] [--python debian|venv] [--shim installed|IS] [--json FILE|-]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import hookenv
from hookenv import run

sys.path.insert(0, os.path.join(hookenv.REPO, "tests"))
from netns import setns  # noqa: E402  (the tests' helper)

NICS = 2
TARGET_PER_HOOK_RATIO = 1.2
TARGET_STORM_FACTOR = 1.2
PROBE = "probe"


class Domain:
    def __init__(self, name: str, number: int, taps: list[tuple[str, str, str]]):
        self.name, self.number = name, number
        self.taps = taps  # [(tap, bridge, guest MAC)]

    def xml(self) -> str:
        """The live XML libvirtd hands a `reconnect` hook (the shape of
        xml-samples/captured/016-qemu-reconnect-begin.xml, with these NICs)."""
        nics = "".join(f"""
    <interface type='bridge'>
      <mac address='{mac}'/>
      <source bridge='{br}'/>
      <target dev='{tap}'/>
      <model type='virtio'/>
      <alias name='net{k}'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x{k + 2:02x}' function='0x0'/>
    </interface>""" for k, (tap, br, mac) in enumerate(self.taps))
        return f"""<domain type='qemu' id='{self.number + 1}'>
  <name>{self.name}</name>
  <uuid>{uuid.UUID(int=(0x6c1f3e52 << 96) + self.number)}</uuid>
  <memory unit='KiB'>131072</memory>
  <currentMemory unit='KiB'>131072</currentMemory>
  <vcpu placement='static'>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type>
    <kernel>/var/lib/libvirt/boot/vmlinuz</kernel>
    <initrd>/var/lib/libvirt/boot/initrd.img</initrd>
    <cmdline>console=ttyS0 quiet loglevel=1 panic=-1</cmdline>
    <boot dev='hd'/>
  </os>
  <features>
    <acpi/>
  </features>
  <cpu mode='custom' match='exact' check='full'>
    <model fallback='forbid'>qemu64</model>
    <feature policy='require' name='hypervisor'/>
    <feature policy='require' name='lahf_lm'/>
  </cpu>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <controller type='usb' index='0' model='none'/>
    <controller type='pci' index='0' model='pci-root'>
      <alias name='pci.0'/>
    </controller>{nics}
    <serial type='pty'>
      <source path='/dev/pts/{self.number % 64}'/>
      <target type='isa-serial' port='0'>
        <model name='isa-serial'/>
      </target>
      <alias name='serial0'/>
    </serial>
    <console type='pty' tty='/dev/pts/{self.number % 64}'>
      <source path='/dev/pts/{self.number % 64}'/>
      <target type='serial' port='0'/>
      <alias name='serial0'/>
    </console>
    <input type='mouse' bus='ps2'>
      <alias name='input0'/>
    </input>
    <input type='keyboard' bus='ps2'>
      <alias name='input1'/>
    </input>
    <audio id='1' type='none'/>
    <memballoon model='none'/>
  </devices>
  <seclabel type='dynamic' model='dac' relabel='yes'>
    <label>+0:+0</label>
    <imagelabel>+0:+0</imagelabel>
  </seclabel>
</domain>
"""


def guest_mac(j: int) -> str:
    return f"52:54:00:{j >> 16 & 0xff:02x}:{j >> 8 & 0xff:02x}:{j & 0xff:02x}"


def layout(n: int, per_bridge: int, probe: bool) -> list[Domain]:
    """The probe (if any) first, on br0, then n domains; taps fill a bridge, then the next."""
    names = ([PROBE] if probe else []) + [f"guest{i}" for i in range(n)]
    out = []
    for d, name in enumerate(names):
        taps = []
        for k in range(NICS):
            j = d * NICS + k
            taps.append((f"vnet{j}", f"br{j // per_bridge}", guest_mac(j + 1)))
        out.append(Domain(name, d, taps))
    return out


def bridges_of(domains: list[Domain]) -> list[str]:
    return sorted({b for d in domains for _t, b, _m in d.taps}, key=lambda b: int(b[2:]))


# -- namespaces --------------------------------------------------------------------------------


def build(ns: str, domains: list[Domain]) -> None:
    run(["ip", "netns", "add", ns])
    cmds = []
    for b in bridges_of(domains):
        n = b[2:]
        cmds += [f"link add {b} type bridge forward_delay 0", f"link set {b} up",
                 f"link add up{n} type veth peer name up{n}p", f"link set up{n} master {b}",
                 f"link set up{n} up", f"link set up{n}p up"]
    for d in domains:
        for tap, b, mac in d.taps:
            cmds += [f"tuntap add dev {tap} mode tap", f"link set {tap} address fe{mac[2:]}",
                     f"link set {tap} master {b}", f"link set {tap} up"]
    for key in ("all", "default"):
        run(["ip", "netns", "exec", ns, "sysctl", "-qw", f"net.ipv6.conf.{key}.disable_ipv6=1"])
    p = subprocess.run(["ip", "-n", ns, "-batch", "-"], input="\n".join(cmds) + "\n",
                       text=True, capture_output=True)
    if p.returncode != 0:
        raise SystemExit(f"bench: building {ns} failed: {p.stderr.strip()[-1000:]}")


def verify_managed(ns: str, domains: list[Domain]) -> None:
    """Oracle (iproute2 JSON): each tap has a static entry for its guest MAC, learning and
    flood off."""
    fdb = json.loads(run(["bridge", "-n", ns, "-j", "fdb", "show"]).stdout)
    static = {(e.get("ifname"), e["mac"]) for e in fdb if e.get("state") == "static"}
    ports = {p["ifname"]: p for p in json.loads(run(["bridge", "-n", ns, "-j", "-d", "link",
                                                      "show"]).stdout)}
    bad = []
    for d in domains:
        for tap, _b, mac in d.taps:
            p = ports.get(tap, {})
            if (tap, mac) not in static or p.get("learning", True) or p.get("flood", True):
                bad.append(tap)
    if bad:
        raise SystemExit(f"bench: {len(bad)} ports not managed in {ns} (first: {bad[:5]})")


def snapshot(state: str) -> dict[str, tuple]:
    out = {}
    for root, _dirs, files in os.walk(state):
        for f in files:
            path = os.path.join(root, f)
            st = os.lstat(path)
            out[os.path.relpath(path, state)] = (st.st_ino, st.st_mtime_ns, st.st_size)
    return out


def changed(before: dict, after: dict) -> list[str]:
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


def where(paths: list[str]) -> str:
    """'20 (hooks/qemu: 20)': how many files changed, by directory."""
    dirs: dict[str, int] = {}
    for p in paths:
        d = os.path.dirname(p) or "."
        dirs[d] = dirs.get(d, 0) + 1
    return f"{len(paths)}" + (" (" + ", ".join(f"{d}: {n}" for d, n in sorted(dirs.items()))
                              + ")" if paths else "")


class Place:
    """One namespace with its domains, hooks and state dir."""

    def __init__(self, ns: str, domains: list[Domain], tmp: str, python: str, config: str,
                 shim_form: str):
        self.ns, self.domains = ns, domains
        self.state = f"/dev/shm/netplug-bench-{ns}"
        hooks = os.path.join(tmp, f"hooks-{ns}")
        installed = hookenv.install_hooks(python, hooks, config, self.state)
        self.shim, self.shim_label = installed, hookenv.shim_label("installed", installed)
        if shim_form == "IS" and hookenv.form(installed) != "-IS":
            self.shim = hookenv.other_form(installed, os.path.join(tmp, f"shim-IS-{ns}"))
            self.shim_label = hookenv.shim_label("built", self.shim)
        self.xml = {d.name: d.xml().encode() for d in domains}

    def domain(self, name: str) -> Domain:
        return next(d for d in self.domains if d.name == name)

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)
        shutil.rmtree(self.state, ignore_errors=True)


def children_cpu() -> float:
    """CPU seconds (user + system) of every child this process has reaped so far."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def one_hook(argv: list[str], xml: bytes) -> tuple[float, int, bytes, bytes]:
    t0 = time.perf_counter()
    p = subprocess.run(argv, input=xml, capture_output=True, env=hookenv.HOOK_ENV, cwd="/")
    return time.perf_counter() - t0, p.returncode, p.stdout, p.stderr


def storm(place: Place, hook: str, op: str, names: list[str], parallel: int) -> dict:
    """Run HOOK for each domain, `parallel` at a time (threads in the namespace, each running
    one process at a time); total wall clock and each hook's own."""
    def job(name):
        return one_hook([hook, name, op, "begin", "-"], place.xml[name])

    with ThreadPoolExecutor(parallel, initializer=setns, initargs=(place.ns,)) as ex:
        list(ex.map(lambda _x: None, range(parallel)))  # threads up before the clock starts
        cpu0, t0 = children_cpu(), time.perf_counter()
        results = list(ex.map(job, names))
        wall, cpu = time.perf_counter() - t0, children_cpu() - cpu0
    failed = [(n, rc, out[:200], err[-300:]) for n, (_dt, rc, out, err) in zip(names, results)
              if rc != 0 or out]
    if failed:
        raise SystemExit(f"bench: {len(failed)} `{op}` hooks failed or wrote to stdout, e.g. "
                         f"{failed[0]}")
    per = [dt * 1000 for dt, *_ in results]
    return {"wall_s": round(wall, 3), "hooks": len(names), "cpu_s": round(cpu, 3),
            "cpu_per_hook_ms": round(cpu / len(names) * 1000, 2), **hookenv.summary(per),
            "with_stderr": sum(1 for *_x, err in results if err),
            "stderr_example": next((err.decode(errors="replace")[-300:]
                                    for *_x, err in results if err), "")}


def manage(place: Place, parallel: int) -> float:
    """Untimed setup: every domain's `start begin` hook once, then the oracle agrees."""
    t0 = time.perf_counter()
    storm(place, place.shim, "start", [d.name for d in place.domains], parallel)
    verify_managed(place.ns, place.domains)
    return time.perf_counter() - t0


def per_hook_ab(a: Place, b: Place, runs: int) -> tuple[dict, dict]:
    """The probe's `reconnect`, alone, in A and in B, alternating A B B A (2 warm-up pairs):
    {"A": [wall ms], "B": …}, {"A": [CPU ms of the hook process], "B": …}."""
    out: dict[str, list[float]] = {"A": [], "B": []}
    cpu: dict[str, list[float]] = {"A": [], "B": []}
    places = {"A": a, "B": b}
    for n in range(runs + 2):
        for key in ("AB" if n % 2 == 0 else "BA"):
            place = places[key]
            setns(place.ns)
            argv = [place.shim, PROBE, "reconnect", "begin", "-"]
            c0 = children_cpu()
            dt, rc, stdout, stderr = one_hook(argv, place.xml[PROBE])
            c1 = children_cpu()
            if rc != 0 or stdout:
                raise SystemExit(f"bench: {' '.join(argv)} in {place.ns} failed (rc {rc}): "
                                 f"{stderr[-300:]!r}")
            if n >= 2:
                out[key].append(dt * 1000)
                cpu[key].append((c1 - c0) * 1000)
    return out, cpu


# -- main -------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--domains", default="200,1000", help="storm sizes (default 200,1000)")
    ap.add_argument("--parallel", type=int, default=8, help="hooks at a time (default 8)")
    ap.add_argument("--ab-runs", type=int, default=30,
                    help="per-hook pairs, 2 vs 2N other ports (default 30)")
    ap.add_argument("--per-bridge", type=int, default=1022,
                    help="taps per bridge (even, at most 1,022: a bridge holds 1,024 ports "
                         "with the uplink)")
    ap.add_argument("--python", choices=("debian", "venv"), default="debian",
                    help="interpreter the hooks are installed for (default debian)")
    ap.add_argument("--shim", choices=("installed", "IS"), default="installed",
                    help="the shim as installed (default), or its -IS form")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON ('-': stdout)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench/restart_storm.py: needs root (network namespaces, bridges, taps)",
              file=sys.stderr)
        return 2
    if args.per_bridge % NICS or not 2 <= args.per_bridge <= 1022:
        raise SystemExit("bench: --per-bridge must be even, 2..1022")
    sizes = sorted(int(s) for s in args.domains.split(","))
    load_before = hookenv.load()
    cores = hookenv.cores()
    tmp = tempfile.mkdtemp(prefix="netplug-storm-")
    places: list[Place] = []
    noop = os.path.join(tmp, "noop.sh")
    with open(noop, "w") as f:
        f.write("#!/bin/sh\nexit 0\n")
    os.chmod(noop, 0o755)
    results: dict = {"sizes": {}}
    try:
        python = hookenv.interpreters([args.python], tmp)[args.python]
        biggest = layout(sizes[-1], args.per_bridge, probe=True)
        config = os.path.join(tmp, "config.toml")
        with open(config, "w") as f:
            for b in bridges_of(biggest):
                f.write(f'[bridge.{b}]\npromiscLinks = "no"\n\n')
        tag = f"npt-storm-{os.getpid()}"
        # A: the probe and one other domain, alone on br0.
        a = Place(f"{tag}-a", layout(1, args.per_bridge, probe=True), tmp, python, config,
                  args.shim)
        places.append(a)
        build(a.ns, a.domains)
        manage(a, args.parallel)
        print(f"restart storm: hooks of {hookenv.describe(args.python, python)}, "
              f"{a.shim_label}; {args.parallel} in parallel; {cores} cores; load average "
              f"{load_before}", file=sys.stderr)
        b = None
        for n in sizes:
            place = Place(f"{tag}-{n}", layout(n, args.per_bridge, probe=(n == sizes[-1])),
                          tmp, python, config, args.shim)
            places.append(place)
            t = time.perf_counter()
            build(place.ns, place.domains)
            built = time.perf_counter() - t
            setup = manage(place, args.parallel)
            print(f"  {n} domains: namespace built in {built:.1f} s, ports managed by the "
                  f"start hooks in {setup:.1f} s", file=sys.stderr)
            names = [d.name for d in place.domains if d.name != PROBE]
            before = snapshot(place.state)
            res = {"domains": n, "ports": n * NICS,
                   "bridges": len(bridges_of([d for d in place.domains if d.name != PROBE])),
                   "load_before": hookenv.load(),
                   "netplug": storm(place, place.shim, "reconnect", names, args.parallel)}
            verify_managed(place.ns, place.domains)
            res["state_files_changed"] = changed(before, snapshot(place.state))
            res["noop_sh"] = storm(place, noop, "reconnect", names, args.parallel)
            res["load_after"] = hookenv.load()
            results["sizes"][n] = res
            print(f"  {n} domains: storm {res['netplug']['wall_s']:.2f} s, no-op sh "
                  f"{res['noop_sh']['wall_s']:.2f} s", file=sys.stderr)
            if n == sizes[-1]:
                b = place
            else:
                place.delete()
                places.remove(place)
        setns(a.ns)
        before_a, before_b = snapshot(a.state), snapshot(b.state)
        wall, cpu = per_hook_ab(a, b, args.ab_runs)
        results["per_hook"] = {
            "A": {"other_ports": len(a.domains) * NICS - NICS, **hookenv.summary(wall["A"]),
                  "cpu_median_ms": round(statistics.median(cpu["A"]), 2)},
            "B": {"other_ports": len(b.domains) * NICS - NICS,
                  "other_ports_on_its_bridge": sum(1 for d in b.domains if d.name != PROBE
                                                   for _t, br, _m in d.taps if br == "br0"),
                  **hookenv.summary(wall["B"]),
                  "cpu_median_ms": round(statistics.median(cpu["B"]), 2)},
            "state_files_changed": changed(before_a, snapshot(a.state)) +
            changed(before_b, snapshot(b.state))}
        verify_managed(b.ns, b.domains)
        verify_managed(a.ns, a.domains)
        shim_label = a.shim_label
    finally:
        for place in places:
            place.delete()
        shutil.rmtree(tmp, ignore_errors=True)

    results["load_after"] = hookenv.load()
    ph = results["per_hook"]
    ratio = ph["B"]["median_ms"] / ph["A"]["median_ms"]
    one = ph["B"]["median_ms"] / 1000
    width = min(args.parallel, cores)
    checks = {f"per-hook ratio ({ph['B']['other_ports']} vs {ph['A']['other_ports']} other "
              f"ports) <= {TARGET_PER_HOOK_RATIO:g}": ratio <= TARGET_PER_HOOK_RATIO}
    print(f"restart storm: `reconnect` of every running domain, {args.parallel} at a time "
          f"({cores} cores; load average before {load_before}, after {results['load_after']})")
    print(f"  hooks: {hookenv.describe(args.python, python)}; {shim_label}")
    print(f"  {'domains':>7} {'ports':>6} {'bridges':>7} {'':>2}{'storm wall':>11} "
          f"{'hook median':>12} {'p90':>8} {'max':>8} {'CPU/hook':>9} {'cores':>6}   {'no-op sh wall':>13} "
          f"{'median':>8} {'max':>8}  {'vs ideal':>8}  state files written")
    for n, r in results["sizes"].items():
        nn, sh = r["netplug"], r["noop_sh"]
        ideal = n * one / width
        r["ideal_s"] = round(ideal, 3)
        r["storm_over_ideal"] = round(nn["wall_s"] / ideal, 3)
        print(f"  {n:>7} {r['ports']:>6} {r['bridges']:>7}   {nn['wall_s']:>9.2f} s "
              f"{nn['median_ms']:>9.1f} ms {nn['p90_ms']:>8.1f} {nn['max_ms']:>8.1f} "
              f"{nn['cpu_per_hook_ms']:>9.1f} {nn['cpu_s'] / nn['wall_s']:>6.2f}   "
              f"{sh['wall_s']:>11.2f} s {sh['median_ms']:>8.1f} {sh['max_ms']:>8.1f}  "
              f"{nn['wall_s'] / ideal:>7.2f}x  {where(r['state_files_changed'])}")
        if nn["with_stderr"]:
            print(f"    {nn['with_stderr']} hooks wrote to stderr, e.g. "
                  f"{nn['stderr_example'].strip()!r}")
        if n == 1000:
            checks[f"1,000-domain storm <= {TARGET_STORM_FACTOR:g} x (1,000 x {one * 1000:.1f} "
                   f"ms / {width}) = {TARGET_STORM_FACTOR * ideal:.2f} s"] = \
                nn["wall_s"] <= TARGET_STORM_FACTOR * ideal
    print(f"  (CPU/hook: user + system time of the hook processes / hooks; cores: their CPU time "
          f"/ wall time, what they got of the machine; ideal = domains x one hook alone "
          f"({one * 1000:.1f} ms, below) / min({args.parallel}, {cores} cores))")
    print(f"  per-hook `reconnect` of a 2-NIC domain, alone, {args.ab_runs} interleaved pairs "
          f"(ms):")
    print(f"    {'':<44} {'median':>8} {'p90':>8} {'min':>8} {'max':>8} {'CPU median':>11}")
    for key, label in (("A", f"{ph['A']['other_ports']} other ports"),
                       ("B", f"{ph['B']['other_ports']} other ports "
                             f"({ph['B']['other_ports_on_its_bridge']} on its bridge)")):
        s = ph[key]
        print(f"    {label:<44} {s['median_ms']:>8.1f} {s['p90_ms']:>8.1f} {s['min_ms']:>8.1f} "
              f"{s['max_ms']:>8.1f} {s['cpu_median_ms']:>11.1f}")
    cpu_ratio = ph["B"]["cpu_median_ms"] / ph["A"]["cpu_median_ms"]
    print(f"    ratio {ratio:.3f} wall clock, {cpu_ratio:.3f} CPU time; state files written by "
          f"these hooks: {where(ph['state_files_changed'])}")
    for name, ok in checks.items():
        print(f"  target {name:<64} {'PASS' if ok else 'FAIL'}")
    results.update({"python": args.python, "shim": shim_label, "parallel": args.parallel,
                    "cores": cores, "load_before": load_before, "per_hook_ratio": round(ratio, 3),
                    "per_hook_cpu_ratio": round(cpu_ratio, 3),
                    "targets": checks})
    hookenv.write_json(results, args.json)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
