#!/usr/bin/env python3
"""Benchmark (lab): a libvirtd restart with 50 running guests, with netplug's hooks and without.

Setup (not timed): the project's lab (tests/lab: a private libvirtd + QEMU in their own
network and mount namespaces), a host bridge br0 with a veth uplink, netplug's hooks installed
with `netplug install-hooks` of the interpreter under test (--python; default Debian's
/usr/bin/python3 as a host has it, see bench/hookenv.py) and a config managing br0, then
--guests small lab guests (the lab's guest image, TCG, 2 NICs each on br0) booted in batches
of --batch, each batch waited for (the guests are idle when the clock runs; their start
hooks managed their ports). Two tiny sh hooks bracket netplug's in qemu.d (libvirtd runs the
scripts of qemu.d one after the other, sorted): `00-bench-mark` and `zz-bench-mark` append
"NAME TIME" (`date +%s.%N`) to a file for every `reconnect`, so the last `zz` line is when the
last domain's hooks were all done, and zz - 00 is one domain's hooks. Neither touches netplug.

Measured: --restarts restarts with netplug's qemu shim installed and as many without (the
shim moved out of qemu.d; the bracket hooks stay, so both sides run them),
alternating with / without after one warm-up restart of each. For each: libvirtd is stopped
(SIGTERM, as Lab.restart_libvirtd does) and started; the clock starts when the new libvirtd
is spawned and gives
  answers     until `virsh version` gets an answer (Lab.timings["libvirtd_start"])
  hooks done  until the last domain's `zz-bench-mark` line (all `reconnect` hooks finished)
  ready       the later of the two
and, per domain, zz - 00 (its hooks' wall time). After each restart every guest must still be
running (a failed `reconnect` kills its guest) and every port still managed (`bridge -j`).
Reported: medians and spreads of each side, and the difference with - without.

Run as root:  .venv/bin/python bench/libvirtd_restart.py [--guests 50] [--batch 5]
                  [--restarts 5] [--python debian|venv] [--shim installed|IS] [--json FILE|-]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import shutil
import tempfile
import time

import hookenv

sys.path.insert(0, hookenv.REPO)
from tests.lab import Lab  # noqa: E402  (the lab's API only)
from tests.lab.netplug import CONFIG, STATE, port_table  # noqa: E402

MARKS = "/run/libvirt/bench-reconnect-marks"  # inside the lab
MARK_HOOK = """#!/bin/sh
# bench/libvirtd_restart.py: when this domain's qemu.d hooks got here ({where}).
cat >/dev/null
if [ "$2" = reconnect ]; then
    echo "{tag} $1 $(date +%s.%N)" >> {marks}
fi
exit 0
"""
NICS = 2


def log(msg: str) -> None:
    print(f"libvirtd_restart: {msg}", file=sys.stderr, flush=True)


def boot(lab: Lab, n: int, batch: int, memory: int, timeout: float) -> list[str]:
    names = [f"g{i:02d}" for i in range(n)]
    for i in range(0, n, batch):
        t = time.monotonic()
        guests = [lab.start_guest(name, ["bridge:br0"] * NICS, wait=False, memory_mib=memory)
                  for name in names[i:i + batch]]
        for g in guests:
            g.wait_ready(timeout)
        log(f"guests {i + 1}-{i + len(guests)} up in {time.monotonic() - t:.0f} s "
            f"(load {hookenv.load()})")
    return names


def taps(lab: Lab, names: list[str]) -> list[str]:
    out = []
    for name in names:
        out += list(lab.guest(name).targets().values())
    return out


def check(lab: Lab, names: list[str], ports: list[str]) -> None:
    running = set(lab.virsh("list", "--name", "--state-running").stdout.split())
    gone = [n for n in names if n not in running]
    if gone:
        raise SystemExit(f"bench: guests not running after the restart: {gone}; see "
                         f"{lab.libvirtd_log_path}")
    bad = [r["port"] for r in port_table(lab, ports)
           if r["learning"] or r["flood"] or not r["static_fdb"]]
    if bad:
        raise SystemExit(f"bench: ports not managed after the restart: {bad[:5]}")


def marks(path: str) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {"00": {}, "zz": {}}
    try:
        with open(path) as f:
            for line in f:
                tag, name, when = line.split()
                out[tag][name] = float(when)
    except FileNotFoundError:
        pass
    return out


def restart(lab: Lab, names: list[str], marks_path: str, timeout: float) -> dict:
    open(marks_path, "w").close()
    t0 = time.time()
    lab.restart_libvirtd(timeout=timeout)
    t1 = time.time()
    answer = lab.timings["libvirtd_start"]
    spawned = t1 - answer  # when the new libvirtd was spawned (wall clock, as `date` writes)
    deadline = time.monotonic() + timeout
    while True:
        m = marks(marks_path)
        if len(m["zz"]) >= len(names):
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: only {len(m['zz'])} of {len(names)} domains' reconnect "
                             f"hooks finished within {timeout:.0f} s; see "
                             f"{lab.libvirtd_log_path}")
        time.sleep(0.05)
    hooks_done = max(m["zz"].values()) - spawned
    per_domain = [m["zz"][n] - m["00"][n] for n in names if n in m["00"]]
    return {"stop_s": round(t1 - t0 - answer, 3), "answer_s": round(answer, 3),
            "hooks_done_s": round(hooks_done, 3), "ready_s": round(max(answer, hooks_done), 3),
            "first_hook_s": round(min(m["00"].values()) - spawned, 3),
            "per_domain_hooks_ms": round(statistics.median(per_domain) * 1000, 1),
            "per_domain_hooks_max_ms": round(max(per_domain) * 1000, 1)}


def stats(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--guests", type=int, default=50)
    ap.add_argument("--batch", type=int, default=5, help="guests booted at a time (default 5)")
    ap.add_argument("--memory", type=int, default=128, help="MiB per guest (default 128)")
    ap.add_argument("--restarts", type=int, default=5,
                    help="timed restarts on each side, after one warm-up each (default 5)")
    ap.add_argument("--python", choices=("debian", "venv"), default="debian")
    ap.add_argument("--shim", choices=("installed", "IS"), default="installed",
                    help="the shim as installed (default), or its -IS form")
    ap.add_argument("--boot-timeout", type=float, default=600.0)
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON ('-': stdout)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench/libvirtd_restart.py: needs root (the lab)", file=sys.stderr)
        return 2
    load_before = hookenv.load()
    tmp = tempfile.mkdtemp(prefix="netplug-restart-")
    lab = Lab(f"rst-{os.getpid()}")
    try:
        python = hookenv.interpreters([args.python], tmp)[args.python]
        lab.start()
        lab.add_host_bridge("br0")
        lab.add_uplink("br0")
        config = lab.host_path(CONFIG)
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text('[bridge.br0]\npromiscLinks = "no"\n')
        hooks = str(lab.hooks_dir)
        shim = hookenv.install_hooks(python, hooks, CONFIG, STATE)
        label = hookenv.shim_label("installed", shim)
        if args.shim == "IS" and hookenv.form(shim) != "-IS":
            # Replace the installed shim's text by its -IS form, built by the bench.
            built = hookenv.other_form(shim, os.path.join(tmp, "shim-IS"))
            shutil.copyfile(built, shim)
            label = hookenv.shim_label("built", shim)
        parked = os.path.join(tmp, "shim-parked")
        marks_path = str(lab.host_path(MARKS))
        for tag, where in (("00", "before netplug's hook"), ("zz", "after netplug's hook")):
            lab.install_hook("qemu", MARK_HOOK.format(tag=tag, where=where, marks=MARKS),
                             name=f"{tag}-bench-mark")
        lab.reload_libvirtd()
        log(f"lab {lab.name} up; hooks: {hookenv.describe(args.python, python)}, {label}; "
            f"booting {args.guests} guests, {args.batch} at a time")
        names = boot(lab, args.guests, args.batch, args.memory, args.boot_timeout)
        ports = taps(lab, names)
        check(lab, names, ports)  # the start hooks managed every port

        def set_side(with_netplug: bool) -> None:
            """libvirtd reads the set of hooks when it starts: park the shim or put it back."""
            if with_netplug and os.path.exists(parked):
                shutil.move(parked, shim)
            elif not with_netplug and os.path.exists(shim):
                shutil.move(shim, parked)

        results: dict[str, list[dict]] = {"with": [], "without": []}
        order = ["with", "without"] * (args.restarts + 1)
        for k, side in enumerate(order):
            set_side(side == "with")
            r = restart(lab, names, marks_path, timeout=args.boot_timeout)
            check(lab, names, ports)
            r["load"] = hookenv.load()
            warm = k < 2
            log(f"{'warm-up ' if warm else ''}restart {side} netplug: answers {r['answer_s']:.2f}"
                f" s, hooks done {r['hooks_done_s']:.2f} s, per domain {r['per_domain_hooks_ms']}"
                f" ms (load {r['load']})")
            if not warm:
                results[side].append(r)
        load_after = hookenv.load()
    finally:
        lab.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    keys = ("answer_s", "hooks_done_s", "ready_s", "first_hook_s", "per_domain_hooks_ms",
            "per_domain_hooks_max_ms", "stop_s")
    summary = {side: {k: stats([r[k] for r in rs]) for k in keys}
               for side, rs in results.items()}
    diff = {k: round(summary["with"][k]["median"] - summary["without"][k]["median"], 3)
            for k in keys}
    print(f"libvirtd restart with {args.guests} running guests ({NICS} NICs each on br0, TCG), "
          f"{args.restarts} restarts per side (medians, [min-max]); {hookenv.cores()} cores, "
          f"load average before {load_before}, after {load_after}")
    print(f"  hooks: {hookenv.describe(args.python, python)}; {label}")
    print(f"  {'from the new libvirtd spawned to':<44} {'with netplug':>22} {'without':>22} "
          f"{'difference':>11}")
    for k, lab_ in (("answer_s", "libvirtd answers (virsh version)"),
                    ("first_hook_s", "first reconnect hook starts"),
                    ("hooks_done_s", "all reconnect hooks done"),
                    ("ready_s", "answers and all hooks done"),
                    ("per_domain_hooks_ms", "one domain's qemu.d hooks, median (ms)"),
                    ("per_domain_hooks_max_ms", "one domain's qemu.d hooks, max (ms)")):
        w, wo = (f"{v['median']:.2f} [{v['min']:.2f}-{v['max']:.2f}]"
                 for v in (summary["with"][k], summary["without"][k]))
        print(f"  {lab_:<44} {w:>22} {wo:>22} {diff[k]:>+11.2f}")
    hookenv.write_json({"guests": args.guests, "nics": NICS, "restarts": args.restarts,
                        "python": args.python, "shim": label, "load_before": load_before,
                        "load_after": load_after, "cores": hookenv.cores(), "runs": results,
                        "summary": summary, "difference_of_medians": diff}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
