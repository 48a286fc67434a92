#!/usr/bin/env python3
"""Benchmark: what the libvirt hook costs a guest start, and what an ignored event costs.

Setup (not timed): a throwaway network namespace this process enters (setns) so that every
measured command runs directly in it (no `ip netns exec` in the timings); a bridge br0 with a
veth uplink and 4 taps (vnet0..3, addresses fe:54:…). For each interpreter (--python):
  debian  Debian's /usr/bin/python3 as a host would use it: a venv made by /usr/bin/python3
          with --system-site-packages (lxml = apt's python3-lxml) and a regular install of
          this working tree (bench/hookenv.py; packages: scripts/setup-host.sh)
  venv    the project's .venv (editable install, the interpreter `make deps` used)
the shims are installed with that interpreter's `netplug install-hooks` (own hooks dir, config
managing br0, state dir) and measured as installed. With --shims both (default) the bench
also builds the installed shim's other form — `#!PY -IS` + netplug's and lxml's directories in
sys.path if install-hooks wrote `-I`, or `#!PY -I` (site module) if it wrote `-IS` — and
labels it "built by the bench". Every command runs with libvirtd's environment (HOME,
LC_ALL=C, PATH, PWD only), cwd /, XML on stdin, as libvirtd runs hooks.

Measured, in one run, N rounds (default 30, after 2 warm-up rounds); each round runs every
case once, in an order rotated round by round, so a busy machine weighs on all cases alike.
Wall clock per process:
  bare -IS  PYTHON -I -S -c pass  (the very binary the shim's #! names)
  bare -I   PYTHON -I -c pass
  no-op     the qemu shim for an event it ignores:  vm1 prepare begin -
  start     the qemu shim for `vm1 start begin -` of a 4-NIC managed domain (4 static FDB
            entries + 4x learning/flood off, recorded in the state dir); before each run
            (untimed) the taps go back to learning/flood on without entries and the state dir
            is emptied but for cache/ (the parsed config, kept as on a host), so every run
            does the whole job, and after it the result is checked
            with `bridge -j` (a run that did nothing fails the bench, not flatters it)
  sh        the same job as a plain sh script: per port `bridge fdb replace MAC dev TAP master
            static` + `bridge link set dev TAP learning off flood off` (iproute2), reset alike
Targets (issue 11), on Debian's python3 with the shim as installed (on the venv when Debian's
is not measured): no-op <= 1.2x bare -IS; 4-NIC start <= 3x bare -IS and <= 4x sh.
Exit status 1 if a target is missed.

--breakdown (instead of the timing): where a hook's milliseconds go, with the -IS form of the
shim, for each interpreter. (1) Phases, per process, N runs of `start` and of `prepare`: a
copy of the shim stamps CLOCK_MONOTONIC when its first line runs (interpreter start = that
minus the parent's stamp before spawning), after importing every module the hook path imports
(imports; the list is found by a first run), and when the hook calls _exit (work); exit =
parent's stamp after wait() minus that. The plain shim runs alternately, for comparison.
(2) `python -IS -X importtime SHIM vm1 start begin -`, N runs: the median self and cumulative
time of each module, ranked: what each import the hook path makes directly drags in, and
where the self time is. Modules the interpreter imports before the script runs (`-X
importtime -c pass`) are counted as interpreter start.

--python debian@REV (e.g. debian,debian@main): the same Debian interpreter with git revision
REV of this tree installed instead of the working tree, measured in the same rounds: an A/B
of two versions in one run.

Run as root:  .venv/bin/python bench/hook_latency.py [--runs 30] [--python debian,venv]
                  [--shims both|installed] [--breakdown] [--json FILE|-]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import hookenv
from hookenv import run

sys.path.insert(0, os.path.join(hookenv.REPO, "tests"))
from netns import setns  # noqa: E402  (the tests' helper)

NICS = 4
TARGET_NOOP_OVER_BARE = 1.2
TARGET_START_OVER_BARE = 3.0
TARGET_START_OVER_SH = 4.0
CONFIG_SETTLE = 3.0  # seconds; more than policy.CACHE_SETTLE_NS (not imported: any revision)


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


def build() -> None:
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


def settle(config: str, seconds: float = CONFIG_SETTLE) -> None:
    """Wait until the config file is as old as a host's: netplug caches the parsed config in
    its state dir only once the file has not changed for a while (policy.CACHE_SETTLE_NS),
    so the timed hooks read it the way they do on a host, from the cache."""
    age = time.time() - os.stat(config).st_ctime
    if age < seconds:
        time.sleep(seconds - age)


def reset(state_dir: str | None) -> None:
    """Untimed: put every tap back to what libvirt leaves (flood/learning on, no entry), and
    forget what netplug recorded. The state dir's cache/ (the parsed config) stays, as it
    does on a host between two hooks."""
    cmds = []
    for i in range(NICS):
        cmds += [f"fdb del {guest_mac(i)} dev {tap(i)} master",
                 f"link set dev {tap(i)} learning on flood on"]
    subprocess.run(["bridge", "-force", "-batch", "-"], input="\n".join(cmds) + "\n",
                   text=True, capture_output=True)
    if state_dir and os.path.isdir(state_dir):
        for entry in os.listdir(state_dir):
            path = os.path.join(state_dir, entry)
            if entry == "cache":
                continue
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.unlink(path)


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


class Setup:
    """Per interpreter: its hooks dir, state dir and shims (installed + built)."""

    def __init__(self, name: str, python: str, tmp: str, config: str, which: str):
        self.name, self.python = name, python
        tag = hookenv.rev_tag(name)
        self.state = os.path.join("/dev/shm", f"netplug-bench-{os.getpid()}-{tag}")
        hooks = os.path.join(tmp, f"hooks-{tag}")
        installed = hookenv.install_hooks(python, hooks, config, self.state)
        self.interp = hookenv.shim_command(installed)[0]
        self.shims = {"installed": installed}
        if which == "both" or (which == "IS" and hookenv.form(installed) != "-IS"):
            self.shims["built"] = hookenv.other_form(installed,
                                                     os.path.join(tmp, f"shim-{tag}-built"))
        if which == "IS" and hookenv.form(installed) != "-IS":
            del self.shims["installed"]
        self.forms = {k: hookenv.form(v) for k, v in self.shims.items()}
        self.labels = {k: hookenv.shim_label(k, v) for k, v in self.shims.items()}

    def is_shim(self) -> tuple[str, str]:
        """(key, path) of the -IS form."""
        for key, path in self.shims.items():
            if hookenv.form(path) == "-IS":
                return key, path
        raise SystemExit(f"bench: no -IS shim for {self.name}")


# -- timing -----------------------------------------------------------------------------------


class Case:
    def __init__(self, key, label, argv, stdin=b"", before=None, after=None):
        self.key, self.label, self.argv, self.stdin = key, label, argv, stdin
        self.before, self.after = before, after
        self.samples: list[float] = []

    def once(self, keep: bool) -> None:
        if self.before:
            self.before()
        dt, p = hookenv.run_hook(self.argv, self.stdin)
        hookenv.check_hook(self.argv, p)
        if self.after:
            self.after()
        if keep:
            self.samples.append(dt * 1000)


def rounds(cases: list[Case], runs: int, warmup: int = 2) -> None:
    """Every case once per round, the order rotated each round."""
    for n in range(warmup + runs):
        k = n % len(cases)
        for case in cases[k:] + cases[:k]:
            case.once(n >= warmup)


def timing(args, setups: list[Setup], tmp: str) -> tuple[dict, int]:
    xml = domain_xml().encode()
    script = os.path.join(tmp, "baseline.sh")
    with open(script, "w") as f:
        f.write(sh_script())
    cases = []
    for s in setups:
        cases += [Case(f"{s.name}/bare -IS", f"{s.name}: bare: PYTHON -I -S -c pass",
                       [s.interp, "-I", "-S", "-c", "pass"]),
                  Case(f"{s.name}/bare -I", f"{s.name}: bare: PYTHON -I -c pass",
                       [s.interp, "-I", "-c", "pass"])]
        for key, shim in s.shims.items():
            label = hookenv.shim_label(key, shim)
            cases.append(Case(f"{s.name}/no-op/{key}", f"{s.name}: no-op ({label})",
                              [shim, "vm1", "prepare", "begin", "-"], xml))
            cases.append(Case(f"{s.name}/start/{key}", f"{s.name}: start, {NICS} NICs "
                              f"({label})", [shim, "vm1", "start", "begin", "-"], xml,
                              before=lambda st=s.state: reset(st), after=verify_applied))
    cases.append(Case("sh", f"sh: iproute2 script ({NICS}x fdb replace + link set)",
                      ["/bin/sh", script], before=lambda: reset(None), after=verify_applied))
    rounds(cases, args.runs)
    stats = {c.key: hookenv.summary(c.samples) for c in cases}
    labels = {c.key: c.label for c in cases}
    return stats, labels


def report_timing(args, setups, stats, labels, load_before) -> int:
    med = {k: v["median_ms"] for k, v in stats.items()}
    print(f"hook latency, {args.runs} rounds (ms; wall clock per process, in a netns; "
          f"load average before: {load_before}, after: {hookenv.load()}; "
          f"{hookenv.cores()} cores)")
    for s in setups:
        print(f"  {s.name}: {hookenv.describe(s.name, s.python)}; #! names {s.interp}")
    print(f"  {'case':<70} {'median':>8} {'p90':>8} {'min':>8} {'max':>8}")
    for k, v in stats.items():
        print(f"  {labels[k]:<70} {v['median_ms']:>8.1f} {v['p90_ms']:>8.1f} "
              f"{v['min_ms']:>8.1f} {v['max_ms']:>8.1f}")
    ratios, checks = {}, {}
    judged = next((s for s in setups if s.name == "debian"), setups[0])
    for s in setups:
        bare = med[f"{s.name}/bare -IS"]
        for key in s.shims:
            r = {"noop_over_bare_IS": med[f"{s.name}/no-op/{key}"] / bare,
                 "start_over_bare_IS": med[f"{s.name}/start/{key}"] / bare,
                 "start_over_sh": med[f"{s.name}/start/{key}"] / med["sh"]}
            ratios[f"{s.name}/{key}"] = {k: round(v, 3) for k, v in r.items()}
            print(f"  ratios, {s.name}, {s.labels[key]}: no-op/bare -IS "
                  f"{r['noop_over_bare_IS']:.2f}x, start/bare -IS {r['start_over_bare_IS']:.2f}x,"
                  f" start/sh {r['start_over_sh']:.2f}x")
            if s is judged and key == "installed":
                checks = {
                    f"no-op <= {TARGET_NOOP_OVER_BARE:g}x bare -IS":
                        r["noop_over_bare_IS"] <= TARGET_NOOP_OVER_BARE,
                    f"{NICS}-NIC start <= {TARGET_START_OVER_BARE:g}x bare -IS":
                        r["start_over_bare_IS"] <= TARGET_START_OVER_BARE,
                    f"{NICS}-NIC start <= {TARGET_START_OVER_SH:g}x sh":
                        r["start_over_sh"] <= TARGET_START_OVER_SH,
                }
    print(f"  targets ({judged.name}, shim as installed: {judged.forms['installed']}):")
    for name, ok in checks.items():
        print(f"    {name:<36} {'PASS' if ok else 'FAIL'}")
    doc = {"runs": args.runs, "nics": NICS, "load_before": load_before,
           "load_after": hookenv.load(), "cores": hookenv.cores(),
           "interpreters": {s.name: {"python": s.python, "interp": s.interp,
                                     "shims": s.forms}
                            for s in setups},
           "cases": stats, "labels": labels, "ratios": ratios,
           "targets_for": f"{judged.name}/installed", "targets": checks}
    hookenv.write_json(doc, args.json)
    return 0 if all(checks.values()) else 1


# -- breakdown --------------------------------------------------------------------------------

STAMP_HEAD = ("import time as _bench_time; _bench_t1 = _bench_time.monotonic()\n"
              "import sys as _bench_sys; _bench_before = set(_bench_sys.modules)\n")
STAMP_BEFORE_RUN = '''\
for _bench_m in {preload!r}:
    try:
        __import__(_bench_m)
    except ImportError:
        pass
import posix as _bench_posix  # loaded with the interpreter (os wraps it; the hook exits
_bench_t2 = _bench_time.monotonic()  # through posix._exit)
_bench_exit = _bench_posix._exit
def _bench_stamp(rc):
    t3 = _bench_time.monotonic()
    mods = ",".join(m for m in _bench_sys.modules if m not in _bench_before)
    fd = _bench_posix.open({marks!r}, _bench_posix.O_WRONLY | _bench_posix.O_APPEND |
                           _bench_posix.O_CREAT)
    _bench_posix.write(fd, f"{{_bench_t1!r}} {{_bench_t2!r}} {{t3!r}} {{mods}}\\n".encode())
    _bench_exit(rc)
_bench_posix._exit = _bench_stamp
if "os" in _bench_sys.modules:  # preloaded: it copied posix's _exit before
    _bench_sys.modules["os"]._exit = _bench_stamp
'''


def stamped_shim(shim: str, dest: str, marks: str, preload: list[str]) -> str:
    """A copy of the shim that stamps the phases (see the module docstring)."""
    with open(shim) as f:
        lines = f.read().splitlines(keepends=True)
    out = [lines[0], STAMP_HEAD]
    done = False
    for ln in lines[1:]:
        if ln.startswith("from libvirt_netplug.hook import run"):
            out.append(STAMP_BEFORE_RUN.format(preload=preload, marks=marks))
            done = True
        out.append(ln)
    if not done:
        raise SystemExit(f"bench: {shim}: no 'from libvirt_netplug.hook import run' line")
    with open(dest, "w") as f:
        f.write("".join(out))
    os.chmod(dest, 0o755)
    return dest


def phases(shim: str, op: str, xml: bytes, state: str, runs: int, tmp: str) -> dict:
    marks = os.path.join(tmp, f"marks-{op}")
    before = (lambda: reset(state)) if op == "start" else None
    after = verify_applied if op == "start" else None
    argv_tail = ["vm1", op, "begin", "-"]
    # Which modules the hook path imports (first run, nothing preloaded).
    probe = stamped_shim(shim, os.path.join(tmp, f"probe-{op}"), marks, [])
    if before:
        before()
    dt, p = hookenv.run_hook([probe, *argv_tail], xml)
    hookenv.check_hook([probe, *argv_tail], p)
    with open(marks) as f:
        # sys.modules lists modules as they finish loading (children first); importing them
        # in the reverse order starts from the outer imports, as the hook does.
        preload = f.readline().split()[3].split(",")[::-1]
    os.unlink(marks)
    stamped = stamped_shim(shim, os.path.join(tmp, f"stamped-{op}"), marks, preload)
    parts: dict[str, list[float]] = {k: [] for k in ("start", "imports", "work", "exit",
                                                     "total", "plain")}
    for n in range(runs + 2):
        for which in ((stamped, shim) if n % 2 else (shim, stamped)):
            if before:
                before()
            t0 = time.monotonic()
            p = subprocess.run([which, *argv_tail], input=xml, capture_output=True,
                               env=hookenv.HOOK_ENV, cwd="/")
            t4 = time.monotonic()
            hookenv.check_hook([which, *argv_tail], p)
            if after:
                after()
            if n < 2:
                continue
            if which == shim:
                parts["plain"].append((t4 - t0) * 1000)
                continue
            with open(marks) as f:
                t1, t2, t3 = map(float, f.read().splitlines()[-1].split()[:3])
            parts["start"].append((t1 - t0) * 1000)
            parts["imports"].append((t2 - t1) * 1000)
            parts["work"].append((t3 - t2) * 1000)
            parts["exit"].append((t4 - t3) * 1000)
            parts["total"].append((t4 - t0) * 1000)
    out = {k: hookenv.summary(v) for k, v in parts.items()}
    out["modules_imported"] = len(preload)
    return out


IMPORT_LINE = re.compile(r"^import time:\s+(\d+)\s+\|\s+(\d+)\s+\|( *)(\S+)\s*$")


def importtime(python: str, argv: list[str], stdin: bytes, before=None) -> list[tuple]:
    """[(level, module, self µs, cumulative µs)] of one run under -X importtime."""
    if before:
        before()
    p = subprocess.run([python, "-I", "-S", "-X", "importtime", *argv], input=stdin,
                       capture_output=True, env=hookenv.HOOK_ENV, cwd="/")
    if p.returncode != 0:
        raise SystemExit(f"bench: -X importtime {' '.join(argv)} failed: {p.stderr[-500:]!r}")
    out = []
    for line in p.stderr.decode(errors="replace").splitlines():
        m = IMPORT_LINE.match(line)
        if m:
            out.append((len(m.group(3)) // 2, m.group(4), int(m.group(1)), int(m.group(2))))
    return out


def import_tree(lines: list[tuple]) -> list[dict]:
    """importtime prints each module after its children, one level deeper: rebuild the tree.
    Returns the top-level nodes {module, self, cum, children}."""
    pending: dict[int, list[dict]] = {}
    for level, mod, s, c in lines:
        node = {"module": mod, "self": s, "cum": c, "children": pending.pop(level + 1, [])}
        pending.setdefault(level, []).append(node)
    return pending.get(0, [])


def import_ranking(python: str, shim: str, op: str, xml: bytes, state: str, runs: int) -> dict:
    startup = {m for _l, m, _s, _c in importtime(python, ["-c", "pass"], b"")}
    argv = [shim, "vm1", op, "begin", "-"]
    samples = []
    for n in range(runs + 1):
        one = importtime(python, argv, xml, before=lambda: reset(state))
        if op == "start":
            verify_applied()
        if n:
            samples.append(one)
    # Medians by module, and by place in the tree (the import order is the same every run).
    by_path: dict[tuple, list[tuple[int, int]]] = {}
    selfs: dict[str, list[int]] = {}

    def walk(nodes, path):
        for node in nodes:
            p = (*path, node["module"])
            by_path.setdefault(p, []).append((node["self"], node["cum"]))
            walk(node["children"], p)

    for one in samples:
        walk([r for r in import_tree(one) if r["module"] not in startup], ())
        for _l, mod, s, _c in one:
            if mod not in startup:
                selfs.setdefault(mod, []).append(s)

    def node(path) -> dict:
        vals = by_path[path]
        kids = [p for p in by_path if len(p) == len(path) + 1 and p[:-1] == path]
        return {"module": path[-1],
                "self_ms": round(statistics.median(v[0] for v in vals) / 1000, 2),
                "cumulative_ms": round(statistics.median(v[1] for v in vals) / 1000, 2),
                "children": sorted((node(k) for k in kids), key=lambda n: -n["cumulative_ms"])}

    tree = sorted((node(p) for p in by_path if len(p) == 1), key=lambda n: -n["cumulative_ms"])
    med_self = {m: statistics.median(v) / 1000 for m, v in selfs.items()}
    startup_ms = statistics.median(sum(s for _l, m, s, _c in one if m in startup)
                                   for one in samples) / 1000
    return {
        "runs": runs,
        "startup_ms": round(startup_ms, 2),
        "hook_imports_ms": round(sum(n["cumulative_ms"] for n in tree), 2),
        "modules": len(med_self),
        "tree": tree,
        "self": [(m, round(t, 2)) for m, t in sorted(med_self.items(), key=lambda kv: -kv[1])],
    }


def print_tree(nodes: list[dict], min_ms: float, depth: int, level: int = 0) -> None:
    for n in nodes:
        if n["cumulative_ms"] < min_ms:
            continue
        print(f"    {n['cumulative_ms']:7.2f} {n['self_ms']:6.2f}  {'  ' * level}{n['module']}")
        if level + 1 < depth:
            print_tree(n["children"], min_ms, depth, level + 1)


def breakdown(args, setups: list[Setup], tmp: str, load_before: str) -> int:
    xml = domain_xml().encode()
    doc = {"runs": args.runs, "load_before": load_before, "cores": hookenv.cores(),
           "interpreters": {}}
    for s in setups:
        key, shim = s.is_shim()
        res = {"shim": hookenv.shim_label(key, shim),
               "phases": {op: phases(shim, op, xml, s.state, args.runs, tmp)
                          for op in ("start", "prepare")},
               "imports": {op: import_ranking(s.interp, shim, op, xml, s.state, args.runs)
                           for op in ("start", "prepare")}}
        doc["interpreters"][s.name] = res
    doc["load_after"] = hookenv.load()
    print(f"hook breakdown, {args.runs} runs (ms; load average before: {load_before}, after: "
          f"{doc['load_after']}; {hookenv.cores()} cores)")
    for s in setups:
        res = doc["interpreters"][s.name]
        print(f"\n{s.name}: {hookenv.describe(s.name, s.python)}; {res['shim']}")
        print(f"  {'phase (median, p90)':<34}" + "".join(
            f"{op + ' begin':>20}" for op in res["phases"]))
        for part, label in (("start", "interpreter start (spawn→line 1)"),
                            ("imports", "imports of the hook path"),
                            ("work", "work (hook.run → _exit)"),
                            ("exit", "exit (_exit → reaped)"),
                            ("total", "total, stamped copy"),
                            ("plain", "total, the shim itself")):
            print(f"  {label:<34}" + "".join(
                f"{v[part]['median_ms']:>12.1f} ({v[part]['p90_ms']:5.1f})"
                for v in res["phases"].values()))
        print("  modules imported by the hook path: " + ", ".join(
            f"{op} {v['modules_imported']}" for op, v in res["phases"].items()))
        for op, imp in res["imports"].items():
            print(f"  -X importtime, {op} begin ({imp['runs']} runs, medians): interpreter "
                  f"start imports {imp['startup_ms']:.1f} ms; hook path {imp['modules']} "
                  f"modules, {imp['hook_imports_ms']:.1f} ms in all")
            print(f"  what the hook path imports (cumulative, self; ms), what each import "
                  f"brings, down to {args.tree_min:g} ms:")
            print_tree(imp["tree"], args.tree_min, depth=5)
            if op == "start":
                print("  self time by module (top 25):")
                for m, t in imp["self"][:25]:
                    print(f"    {t:7.2f}  {m}")
    hookenv.write_json(doc, args.json)
    return 0


# -- main -------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=30, help="timed rounds (default 30)")
    ap.add_argument("--python", default="debian,venv",
                    help="interpreters: debian (Debian's /usr/bin/python3, regular install), "
                         "debian@REV (the same with git revision REV of this tree instead of "
                         "the working tree: an A/B in one run), "
                         "venv (the project's .venv); default both")
    ap.add_argument("--shims", choices=("both", "installed"), default="both",
                    help="also time the installed shim's other form (-IS / -I), built by the "
                         "bench (default both)")
    ap.add_argument("--breakdown", action="store_true",
                    help="instead of the timing: phases and -X importtime of the -IS shim")
    ap.add_argument("--tree-min", type=float, default=0.5, metavar="MS",
                    help="--breakdown: show imports down to this cumulative time (default 0.5)")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON ('-': stdout)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench/hook_latency.py: needs root (network namespace, bridge, taps)",
              file=sys.stderr)
        return 2

    load_before = hookenv.load()
    ns = f"npt-bench-{os.getpid()}"
    tmp = tempfile.mkdtemp(prefix="netplug-bench-")
    setups: list[Setup] = []
    run(["ip", "netns", "add", ns])
    try:
        config = os.path.join(tmp, "config.toml")
        with open(config, "w") as f:
            f.write('[bridge.br0]\npromiscLinks = "no"\n')
        pythons = hookenv.interpreters(args.python.split(","), tmp)
        setups = [Setup(name, py, tmp, config, "IS" if args.breakdown else args.shims)
                  for name, py in pythons.items()]
        setns(ns)
        build()
        settle(config)
        if args.breakdown:
            return breakdown(args, setups, tmp, load_before)
        stats, labels = timing(args, setups, tmp)
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
        for s in setups:
            shutil.rmtree(s.state, ignore_errors=True)
    return report_timing(args, setups, stats, labels, load_before)


if __name__ == "__main__":
    sys.exit(main())
