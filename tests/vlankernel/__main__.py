"""python -m tests.vlankernel: the VLAN-kernel VM from the command line (root).

    build              fetch the kernel package and build the initramfs (cached)
    run [PYTEST ARGS]  boot once, run the inner tests (default: all of tests/vlankernel/inner),
                       print each result with its time; exit 0 only if all passed
    job 'SH SCRIPT'    boot once, run a shell script chrooted in the host's root, print the
                       console; exit with the script's status
    demo               the promiscuity demo (tests/vlankernel/demo.py)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.vlankernel import image, tier, vm  # noqa: E402


def cmd_build(_args) -> int:
    t0 = time.monotonic()
    img = image.build()
    print(f"kernel {img.kernel.package} ({img.kernel.version}): {img.kernel.vmlinuz}\n"
          f"modules (modprobe -d): {img.kernel.modroot}\ninitramfs: {img.initrd}\n"
          f"{time.monotonic() - t0:.1f} s")
    return 0


def cmd_run(args) -> int:
    t0 = time.monotonic()
    collected = tier.collect()
    run = tier.run(args.pytest_args or None, collected=collected)
    r = run.vm
    for res in run.results.values():
        print(f"{res.outcome.upper():7} {res.seconds:6.1f} s  {res.nodeid}")
        if res.outcome != "passed" and args.verbose:
            print("        " + (res.text or res.message).replace("\n", "\n        "))
    print(f"VM: job started at {r.boot_seconds} s of guest uptime, QEMU ran {r.seconds:.1f} s; "
          f"{time.monotonic() - t0:.1f} s in all; run directory {r.run_dir}")
    problem = run.problem()
    if problem:
        print(f"PROBLEM: {problem}\n{r.console_tail(40)}")
        return 2
    return 0 if all(x.outcome == "passed" for x in run.results.values()) else 1


def cmd_job(args) -> int:
    vm.precompile()
    r = vm.run_job(args.script, timeout=args.timeout)
    sys.stdout.write(r.console)
    print(f"[job exit {r.rc}, QEMU {r.seconds:.1f} s, run directory {r.run_dir}]")
    return r.rc if r.rc is not None else 2


def cmd_demo(_args) -> int:
    from tests.vlankernel import demo
    return 0 if demo.main() else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.vlankernel",
                                 description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n", 2)[2])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build").set_defaults(fn=cmd_build)
    p = sub.add_parser("run")
    p.add_argument("-v", "--verbose", action="store_true", help="print failure reports")
    p.add_argument("pytest_args", nargs=argparse.REMAINDER)
    p.set_defaults(fn=cmd_run)
    p = sub.add_parser("job")
    p.add_argument("script")
    p.add_argument("--timeout", type=float, default=600)
    p.set_defaults(fn=cmd_job)
    sub.add_parser("demo").set_defaults(fn=cmd_demo)
    args = ap.parse_args(argv)
    reason = vm.unavailable()
    if reason:
        print(f"vlankernel: {reason}", file=sys.stderr)
        return 2
    try:
        return args.fn(args)
    except image.ImageError as e:
        print(f"vlankernel: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
