#!/usr/bin/env python3
"""Benchmark: the floor under any Python hook that parses with lxml (issue 11's "start <= 3x the
bare interpreter" target).

Times, side by side in one run, processes of the interpreter a host's hook uses (Debian's
/usr/bin/python3 with -I -S, as netplug's installed shim starts it; --python to change), each
exiting through os._exit as the hook does:

  bare       PYTHON -I -S -c pass                     the target's yardstick
  exit       sys.path + os._exit, nothing imported    what -S and _exit alone cost
  lxml       + `from lxml import etree`, as it is     the hook's parser, zero netplug code
  lxml-min   + the same with every optional import of lxml.etree stood in (inspect, gzip,
             lxml._elementpath, hence no re/enum/functools) and _json instead of json: the
             least a hook that parses with lxml and keeps JSON records can import
  netplug    the installed hook's real work: `start` of a 4-NIC domain is bench/hook_latency.py

No root needed; nothing is written. Prints medians (p10, p90) and each case's ratio to bare.

Run:  python3 bench/hook_floor.py [--runs 60] [--python /usr/bin/python3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

EXIT = "import posix; posix._exit(0)\n"
PATH = "import sys; sys.path.append({dir!r})\n"
LXML_MIN = """\
import sys
class StandIn(type(sys)):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return lambda *a, **k: None
for name in ("inspect", "gzip", "lxml._elementpath"):
    sys.modules[name] = StandIn(name)
import lxml
lxml._elementpath = sys.modules["lxml._elementpath"]
from lxml import etree
import _json
"""


def lxml_dir(python: str) -> str:
    """Where the interpreter finds lxml with its site module (the shim adds it by hand)."""
    p = subprocess.run([python, "-c", "import lxml, os; print(os.path.dirname(os.path.dirname("
                                      "lxml.__file__)))"], capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"hook_floor: {python} cannot import lxml: {p.stderr.strip().splitlines()[-1]}")
    return p.stdout.strip()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=60)
    ap.add_argument("--python", default="/usr/bin/python3")
    args = ap.parse_args()
    path = PATH.format(dir=lxml_dir(args.python))
    cases = {
        "bare: -I -S -c pass": "pass\n",
        "exit: sys.path + os._exit": path + EXIT,
        "lxml: + from lxml import etree": path + "from lxml import etree\n" + EXIT,
        "lxml-min: optional imports stood in, _json": path + LXML_MIN + EXIT,
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    for i in range(args.runs + 2):
        for name, code in cases.items():
            t = time.perf_counter()
            p = subprocess.run([args.python, "-I", "-S", "-c", code], capture_output=True)
            dt = time.perf_counter() - t
            if p.returncode != 0:
                sys.exit(f"hook_floor: case {name!r} failed: {p.stderr.decode().strip()}")
            if i >= 2:  # warm-ups
                times[name].append(dt)
    bare = statistics.median(times["bare: -I -S -c pass"])
    print(f"hook floor, {args.runs} rounds, {args.python} -I -S (ms; wall clock per process)")
    print(f"  {'case':50s} {'median':>7s} {'p10':>6s} {'p90':>6s}  vs bare")
    for name, v in times.items():
        v = sorted(v)
        med = statistics.median(v)
        print(f"  {name:50s} {med * 1000:7.1f} {v[len(v) // 10] * 1000:6.1f} "
              f"{v[len(v) * 9 // 10] * 1000:6.1f}  {med / bare:5.2f}x")
    print(f"  3x bare = {3 * bare * 1000:.1f} ms: what a hook may spend in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
