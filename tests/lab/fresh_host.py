"""`make test`'s set-up on a clean Debian machine, in a chroot: does it install and run there?

    python -m tests.lab.fresh_host [--suite trixie|bookworm] [--no-unit] [--guest] [--e2e] [--keep]

Builds a clean Debian root (``mmdebstrap --variant=apt``: essential packages and apt, plus
``make``, the one thing a person must install to type `make test`; ~30 s), copies the
project's files (``git ls-files``, as in a fresh clone) to /root/netplug in it, and runs, as
root in that root with a fresh environment and timing each step:

    scripts/setup-host.sh                  the Debian packages (libvirt, QEMU, python3-venv, …)
    make deps                              the venv and `pip install -e .[agent,test]`
                                           (builds libvirt-python against that libvirt)
    .venv/bin/python -m pytest tests/unit  the unit tier (skip with --no-unit)
    python -m tests.lab build              the lab's guest image from that release's kernel
                                           package (with --guest)
    pytest tests/e2e (NETPLUG_REQUIRE_ALL=1)  the e2e tier on that machine's libvirt and on the
                                           other release's root it builds (with --e2e; on
                                           trixie: the Debian 13 host direction, libvirt 11
                                           host + libvirt 9 root)

The chroot runs in a private mount namespace (its /proc, /sys, /dev, a tmpfs /run and /tmp)
and uses the host's network for apt and pip; libvirtd is not started (nothing is: the root
gets a policy-rc.d that forbids starting services). Prints a summary (versions, seconds per
step, pytest's last line) and exits 0 only when every step passed. The root is removed
unless --keep. Needs root and mmdebstrap; takes ~5-10 minutes, mostly apt and pip.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .guest import REPO_ROOT
from .lab import lab_root

log = logging.getLogger("tests.lab.fresh_host")

PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
ENV = {"PATH": PATH, "HOME": "/root", "LC_ALL": "C.UTF-8", "TERM": "dumb",
       "DEBIAN_FRONTEND": "noninteractive"}
PROJECT = "/root/netplug"  # inside the root

# Mount what a booted machine has, inside a private mount namespace, then chroot.
ENTER = r"""
set -e
R=$1; shift
mount --bind "$R" "$R"
mount -t proc proc "$R/proc"
mount -t sysfs sysfs "$R/sys"
mount --rbind /dev "$R/dev"
mount -t tmpfs tmpfs "$R/run"
mount -t tmpfs tmpfs "$R/tmp"
exec chroot "$R" "$@"
"""

STEPS = (
    ("setup-host", "scripts/setup-host.sh"),
    ("make deps", "make deps"),
    ("unit tier", ".venv/bin/python -m pytest tests/unit -q -p no:cacheprovider"),
    ("guest image", ".venv/bin/python -m tests.lab build"),
    ("e2e tier", "NETPLUG_REQUIRE_ALL=1 .venv/bin/python -m pytest tests/e2e -q "
                 "-p no:cacheprovider"),
)


def build_root(suite: str, dest: Path) -> float:
    t0 = time.monotonic()
    r = subprocess.run(["mmdebstrap", "--variant=apt", "--mode=root", "--quiet",
                        "--include=make", suite, str(dest)],
                       capture_output=True, text=True, timeout=1800, check=False,
                       env={"PATH": PATH, "LC_ALL": "C.UTF-8", "HOME": "/root"})
    if r.returncode != 0:
        raise RuntimeError(f"mmdebstrap {suite} failed: {(r.stderr or r.stdout)[-2000:]}")
    # What a booted machine of this kind has and a bare root lacks: name resolution, and the
    # machine's own trusted CAs (where TLS to the package registries is inspected, pip fails
    # without them; ca-certificates, which setup-host.sh installs, adds them to the store);
    # and no service may start (libvirt's packages try to start their daemons on install).
    shutil.copyfile("/etc/resolv.conf", dest / "etc/resolv.conf")
    local_cas = Path("/usr/local/share/ca-certificates")
    if local_cas.is_dir():
        shutil.copytree(local_cas, dest / "usr/local/share/ca-certificates", dirs_exist_ok=True)
    rc = dest / "usr/sbin/policy-rc.d"
    rc.write_text("#!/bin/sh\n# tests/lab/fresh_host.py: a chroot starts no services\nexit 101\n")
    rc.chmod(0o755)
    return time.monotonic() - t0


def copy_project(dest: Path) -> None:
    """The files a fresh clone has (tracked ones, as in the work tree), without .venv or
    .lab-cache."""
    files = subprocess.run(["git", "-C", str(REPO_ROOT), "ls-files", "-z"], check=True,
                           capture_output=True).stdout.split(b"\0")
    target = dest / PROJECT.lstrip("/")
    for f in filter(None, files):
        src = REPO_ROOT / f.decode()
        if not src.exists():  # deleted in the work tree
            continue
        out = target / f.decode()
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, out, follow_symlinks=False)


def run_in(root: Path, cmd: str, log_file: Path, timeout: float) -> tuple[int, float, str]:
    t0 = time.monotonic()
    with open(log_file, "ab") as out:
        out.write(f"\n$ {cmd}\n".encode())
        out.flush()
        p = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", ENTER,
                            "enter", str(root), "env", "-i",
                            *(f"{k}={v}" for k, v in ENV.items()),
                            "sh", "-c", f"cd {PROJECT} && {cmd}"],
                           stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                           timeout=timeout, check=False)
    tail = log_file.read_text(errors="replace").strip().splitlines()
    return p.returncode, time.monotonic() - t0, tail[-1] if tail else ""


def probe(root: Path, cmd: str) -> str:
    p = subprocess.run(["chroot", str(root), "sh", "-c", cmd], capture_output=True, text=True,
                       timeout=60, check=False, env=ENV)
    return (p.stdout or p.stderr).strip().splitlines()[0] if (p.stdout or p.stderr) else "?"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suite", default="trixie", help="Debian suite (default trixie = 13)")
    ap.add_argument("--no-unit", action="store_true", help="skip the unit tier")
    ap.add_argument("--guest", action="store_true", help="also build the lab's guest image")
    ap.add_argument("--e2e", action="store_true", help="also run the e2e tier (labs inside)")
    ap.add_argument("--keep", action="store_true", help="keep the root (path printed)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="fresh-host: %(message)s", stream=sys.stderr)
    if os.geteuid() != 0 or shutil.which("mmdebstrap", path=PATH) is None:
        log.error("needs root and mmdebstrap (apt-get install mmdebstrap)")
        return 1
    work = Path(tempfile.mkdtemp(prefix=f"netplug-fresh-{args.suite}-", dir=lab_root()))
    root, log_file = work / "root", work / "steps.log"
    summary: dict = {"suite": args.suite, "log": str(log_file), "steps": []}
    ok = True
    try:
        log.info("building a clean Debian %s root in %s", args.suite, root)
        summary["root_seconds"] = round(build_root(args.suite, root), 1)
        copy_project(root)
        summary["debian_version"] = probe(root, "cat /etc/debian_version")
        for name, cmd in STEPS:
            if ((name == "unit tier" and args.no_unit) or (name == "guest image" and not args.guest)
                    or (name == "e2e tier" and not args.e2e)):
                continue
            log.info("%s: %s", name, cmd)
            rc, secs, last = run_in(root, cmd, log_file, timeout=3600)
            summary["steps"].append({"step": name, "command": cmd, "exit": rc,
                                     "seconds": round(secs, 1), "last_line": last})
            log.info("%s: exit %d in %.0f s: %s", name, rc, secs, last)
            if rc != 0:
                ok = False
                break
        summary["python"] = probe(root, f"{PROJECT}/.venv/bin/python --version")
        summary["libvirt"] = probe(root, "libvirtd --version")
        summary["qemu"] = probe(root, "qemu-system-x86_64 --version")
        summary["libvirt_python"] = probe(root, f"{PROJECT}/.venv/bin/python -c "
                                                "'import libvirt; print(libvirt.getVersion())'")
    finally:
        shutil.copyfile(log_file, lab_root() / f"netplug-fresh-{args.suite}.log") \
            if log_file.exists() else None
        if args.keep:
            summary["root"] = str(root)
        else:
            shutil.rmtree(work, ignore_errors=True)
            summary["log"] = str(lab_root() / f"netplug-fresh-{args.suite}.log")
    print(json.dumps(summary, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
