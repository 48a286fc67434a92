#!/usr/bin/env python3
"""Benchmark: what the libvirt hook costs a guest start, and what an ignored event costs.

Setup (not timed): a throwaway network namespace this process enters (setns) so that every
measured command runs directly in it (no `ip netns exec` in the timings); a bridge br0 with a
veth uplink and 4 taps (vnet0..3, addresses fe:54:…); the shims installed with
`netplug install-hooks`, bound to the project's interpreter, with a config that manages br0 and
a state dir of their own. Every command runs with libvirtd's environment (HOME, LC_ALL=C,
PATH, PWD only), XML on stdin, as libvirtd runs hooks.

Measured, in one run, N times each (default 30, after 2 warm-ups), wall clock per process:
  bare      the shim's interpreter doing nothing:  PYTHON -I -c pass  (the same binary the
            shim's #! names)
  no-op     the installed qemu shim for an event it ignores:  vm1 prepare begin -
  apply     the installed qemu shim for `vm1 start begin -` of a 4-NIC managed domain
            (4 static FDB entries + 4× learning/flood off, recorded in the state dir); between
            runs (untimed) the taps are reset to learning/flood on, the entries deleted and
            the record removed, so every run does the full job
  sh        the same job as a plain sh script: per port `bridge fdb replace MAC dev TAP master
            static` + `bridge link set dev TAP learning off flood off` (iproute2), reset alike
  *-site   (--compare-site) no-op and apply again with the shim as install-hooks wrote it
            before: `#!PYTHON -I` with the site module (the venv's site-packages, .pth files
            and the editable install's finder) instead of `-IS` + explicit sys.path; each
            pair alternates run by run, so a busy machine weighs on both alike
Targets: no-op ≤ 2× bare; apply ≤ 250 ms (median). Exit status 1 if a target is missed.

Run as root:  .venv/bin/python bench/hook_latency.py [--runs 30] [--json FILE|-]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
from netns import netplug_cli, setns, venv_python  # noqa: E402  (the tests' helpers)
NICS = 4
TARGET_NOOP_RATIO = 2.0
TARGET_APPLY_MS = 250.0
HOOK_ENV = {"HOME": "/root", "LC_ALL": "C",
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "PWD": "/"}


def guest_mac(i: int) -> str:
    return f"52:54:00:00:00:{i + 1:02x}"


def tap(i: int) -> str:
    return f"vnet{i}"


def domain_xml() -> str:
    nics = "".join(
        f"<interface type='bridge'><mac address='{guest_mac(i)}'/><source bridge='br0'/>"
        f"<target dev='{tap(i)}'/><model type='virtio'/><alias name='net{i}'/></interface>"
        for i in range(NICS))
    return (f"<domain type='kvm'><name>vm1</name>"
            f"<uuid>6c1f3e52-6a43-4c3e-9b1e-3d2f1a0b9c01</uuid><devices>{nics}</devices>"
            f"</domain>")


def sh_script() -> str:
    lines = ["#!/bin/sh", "set -e"]
    for i in range(NICS):
        lines.append(f"bridge fdb replace {guest_mac(i)} dev {tap(i)} master static")
        lines.append(f"bridge link set dev {tap(i)} learning off flood off")
    return "\n".join(lines) + "\n"


# -- environment ------------------------------------------------------------------------------


def run(argv, **kw):
    return subprocess.run(argv, check=True, capture_output=True, text=True, **kw)


def build(ns: str) -> None:
    """In the (already entered) namespace: br0, a veth uplink, NICS taps."""
    run(["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"])
    run(["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"])
    run(["ip", "link", "add", "br0", "type", "bridge"])
    run(["ip", "link", "add", "up0", "type", "veth", "peer", "name", "up0p"])
    run(["ip", "link", "set", "up0", "master", "br0"])
    for i in range(NICS):
        run(["ip", "tuntap", "add", "dev", tap(i), "mode", "tap"])
        run(["ip", "link", "set", tap(i), "address", "fe" + guest_mac(i)[2:]])
        run(["ip", "link", "set", tap(i), "master", "br0"])
    for dev in ("br0", "up0", "up0p", *map(tap, range(NICS))):
        run(["ip", "link", "set", dev, "up"])


def reset(state_dir: str) -> None:
    """Untimed: put every tap back to what libvirt leaves (flood/learning on, no entry)."""
    for i in range(NICS):
        subprocess.run(["bridge", "fdb", "del", guest_mac(i), "dev", tap(i), "master"],
                       capture_output=True)
        run(["bridge", "link", "set", "dev", tap(i), "learning", "on", "flood", "on"])
    shutil.rmtree(os.path.join(state_dir, "domains"), ignore_errors=True)


def verify_applied() -> None:
    """The timed job really happened: the oracle (iproute2 JSON) agrees."""
    fdb = json.loads(run(["bridge", "-j", "fdb", "show", "br", "br0"]).stdout)
    ports = {p["ifname"]: p for p in json.loads(run(["bridge", "-j", "-d", "link",
                                                      "show"]).stdout)}
    for i in range(NICS):
        static = [e for e in fdb if e.get("ifname") == tap(i) and e["mac"] == guest_mac(i)
                  and e.get("state") == "static"]
        p = ports[tap(i)]
        if not static or p["learning"] or p["flood"]:
            raise SystemExit(f"bench: {tap(i)} was not managed after the run "
                             f"(entry {static}, learning {p['learning']}, flood {p['flood']})")


def interpreter_of(shim: str) -> str:
    with open(shim) as f:
        first = f.readline()
    if not first.startswith("#!"):
        raise SystemExit(f"bench: {shim} has no #! line")
    return first[2:].split()[0]


# -- timing -----------------------------------------------------------------------------------


def timed(argv, stdin: bytes, before=None, after=None, runs: int = 30, warmup: int = 2):
    samples = []
    for n in range(warmup + runs):
        if before:
            before()
        t0 = time.perf_counter()
        p = subprocess.run(argv, input=stdin, capture_output=True, env=HOOK_ENV, cwd="/")
        dt = time.perf_counter() - t0
        if p.returncode != 0 or p.stdout:
            raise SystemExit(f"bench: {' '.join(argv)} failed (rc {p.returncode}): "
                             f"stdout={p.stdout[:200]!r} stderr={p.stderr[-500:]!r}")
        if after:
            after()
        if n >= warmup:
            samples.append(dt * 1000)
    return samples


def timed_pair(a, b, stdin: bytes, before=None, after=None, runs: int = 30, warmup: int = 2):
    """Two commands, alternating run by run (a, b, a, b, ...): same load on both."""
    out_a, out_b = [], []
    for n in range(warmup + runs):
        for argv, out in ((a, out_a), (b, out_b)):
            got = timed(argv, stdin, before, after, runs=1, warmup=0)
            if n >= warmup:
                out += got
    return out_a, out_b


def site_shim(shim: str, path: str) -> str:
    """The shim as install-hooks wrote it before -IS: `-I` only, the site module finds netplug."""
    with open(shim) as f:
        lines = f.read().splitlines(keepends=True)
    lines[0] = lines[0].replace(" -IS", " -I")
    text = "".join(ln for ln in lines if not ln.startswith(("sys.path +=", "# -IS:")))
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o755)
    return path


def summary(samples):
    s = sorted(samples)
    p90 = s[min(len(s) - 1, int(round(0.9 * (len(s) - 1))))]
    return {"median_ms": round(statistics.median(s), 2), "p90_ms": round(p90, 2),
            "min_ms": round(s[0], 2), "max_ms": round(s[-1], 2), "runs": len(s)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=30, help="timed runs per case (default 30)")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON ('-': stdout)")
    ap.add_argument("--compare-site", action="store_true",
                    help="also time the previous shim (site module instead of -IS), "
                         "interleaved with the current one")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench/hook_latency.py: needs root (network namespace, bridge, taps)",
              file=sys.stderr)
        return 2

    ns = f"npt-bench-{os.getpid()}"
    tmp = tempfile.mkdtemp(prefix="netplug-bench-")
    run(["ip", "netns", "add", ns])
    try:
        setns(ns)
        build(ns)
        hooks, config, state = (os.path.join(tmp, x) for x in ("hooks", "config.toml", "state"))
        with open(config, "w") as f:
            f.write('[bridge.br0]\npromiscLinks = "no"\n')
        run([*netplug_cli(), "install-hooks", "--hooks-dir", hooks, "--python", venv_python(),
             "--config", config, "--state-dir", state])
        shim = os.path.join(hooks, "qemu.d", "libvirt-netplug")
        python = interpreter_of(shim)
        script = os.path.join(tmp, "baseline.sh")
        with open(script, "w") as f:
            f.write(sh_script())
        xml = domain_xml().encode()

        results = {"bare": timed([python, "-I", "-c", "pass"], b"", runs=args.runs)}
        noop = [shim, "vm1", "prepare", "begin", "-"]
        apply = [shim, "vm1", "start", "begin", "-"]
        if args.compare_site:
            old = site_shim(shim, os.path.join(tmp, "shim-site"))
            results["no-op"], results["no-op-site"] = timed_pair(
                noop, [old, *noop[1:]], xml, runs=args.runs)
            results["apply"], results["apply-site"] = timed_pair(
                apply, [old, *apply[1:]], xml, before=lambda: reset(state),
                after=verify_applied, runs=args.runs)
        else:
            results["no-op"] = timed(noop, xml, runs=args.runs)
            results["apply"] = timed(apply, xml, before=lambda: reset(state),
                                     after=verify_applied, runs=args.runs)
        results["sh"] = timed(["/bin/sh", script], b"", before=lambda: reset(state),
                              after=verify_applied, runs=args.runs)
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)

    stats = {k: summary(v) for k, v in results.items()}
    noop_ratio = stats["no-op"]["median_ms"] / stats["bare"]["median_ms"]
    apply_ratio = stats["apply"]["median_ms"] / stats["sh"]["median_ms"]
    checks = {
        f"no-op <= {TARGET_NOOP_RATIO:g}x bare": noop_ratio <= TARGET_NOOP_RATIO,
        f"{NICS}-NIC apply <= {TARGET_APPLY_MS:g} ms": stats["apply"]["median_ms"]
        <= TARGET_APPLY_MS,
    }
    labels = {"bare": f"bare: {os.path.relpath(python, REPO)} -I -c pass",
              "no-op": "no-op: shim vm1 prepare begin -",
              "apply": f"apply: shim vm1 start begin - ({NICS} NICs)",
              "sh": f"sh: iproute2 script ({NICS}x fdb replace + link set)",
              "no-op-site": "no-op, previous shim (-I, site module)",
              "apply-site": "apply, previous shim (-I, site module)"}
    print(f"hook latency, {args.runs} runs each (ms; wall clock per process, in a netns)")
    print(f"  {'case':<46} {'median':>8} {'p90':>8} {'min':>8} {'max':>8}")
    for k, s in stats.items():
        print(f"  {labels[k]:<46} {s['median_ms']:>8.1f} {s['p90_ms']:>8.1f} "
              f"{s['min_ms']:>8.1f} {s['max_ms']:>8.1f}")
    print(f"  ratio no-op / bare      {noop_ratio:5.2f}x")
    print(f"  ratio apply / sh        {apply_ratio:5.2f}x")
    for name, ok in checks.items():
        print(f"  target {name:<32} {'PASS' if ok else 'FAIL'}")
    doc = {"runs": args.runs, "nics": NICS, "python": python, "cases": stats,
           "ratios": {"noop_over_bare": round(noop_ratio, 3),
                      "apply_over_sh": round(apply_ratio, 3)},
           "targets": {k: ok for k, ok in checks.items()}}
    if args.json == "-":
        print(json.dumps(doc, indent=2))
    elif args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
