"""Which libvirt + QEMU a lab runs: the host's own, or the other Debian release's from a root.

The lab runs against two releases whatever the host is:

- the host's own libvirtd, virtlogd and QEMU (``/usr/sbin/libvirtd`` …), and
- the *other* release: Debian 13 (trixie: libvirt 11.3, QEMU 10.0) on a Debian 12 host, Debian
  12 (bookworm: libvirt 9.0, QEMU 7.2) on a Debian 13 host. Its daemons and QEMU come from a
  root filesystem built once with ``mmdebstrap --variant=apt`` (no recommends) and cached in
  ``<lab cache>/rootfs/<suite>-<hash>/``; each lab runs them chrooted into its own overlay of
  that root (see lab.py), so several labs share one cached root and none ever writes to it.

A release is named by libvirt's major version (``libvirt9``, ``libvirt11``): that name is the
pytest id of every e2e test, and ``NETPLUG_LAB_RELEASES`` (comma-separated names, default both)
chooses which releases `make test` covers.
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from .guest import cache_dir

log = logging.getLogger(__name__)

DAEMON_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Debian suite -> (libvirt major it ships, packages a lab's root needs). Without recommends the
# network driver is a package of its own from libvirt 9.x on (bookworm's libvirt-daemon
# still carries it); iproute2 for QEMU's helpers, dnsmasq-base + iptables for libvirt networks.
SUITES = {
    "bookworm": (9, ("libvirt-daemon", "libvirt-daemon-driver-qemu", "libvirt-clients",
                     "qemu-system-x86", "dnsmasq-base", "iptables", "iproute2")),
    "trixie": (11, ("libvirt-daemon", "libvirt-daemon-driver-qemu",
                    "libvirt-daemon-driver-network", "libvirt-clients", "qemu-system-x86",
                    "dnsmasq-base", "iptables", "iproute2")),
}
# Docs, man pages and translations are not needed to run daemons (a third of the root).
MMDEBSTRAP_EXCLUDES = ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/locale/*",
                       "/usr/share/info/*")
ROOT_FORMAT = "1"  # bump to rebuild every cached root


class ReleaseUnavailable(RuntimeError):
    """This release cannot run here; the message says why and what to install."""


@dataclasses.dataclass(frozen=True)
class Release:
    """One libvirt + QEMU release a lab can run."""

    name: str                 # "libvirt9" / "libvirt11": test ids, NETPLUG_LAB_RELEASES
    suite: str | None         # Debian suite of the cached root; None = the host's own libvirt

    @property
    def is_host(self) -> bool:
        return self.suite is None

    @property
    def packages(self) -> tuple[str, ...]:
        return SUITES[self.suite][1] if self.suite else ()

    @property
    def root_dir(self) -> Path | None:
        """Where the cached root of this release lives (None for the host's release)."""
        if self.suite is None:
            return None
        key = hashlib.sha256("\n".join((ROOT_FORMAT, self.suite, *self.packages,
                                         *MMDEBSTRAP_EXCLUDES)).encode()).hexdigest()[:12]
        return cache_dir() / "rootfs" / f"{self.suite}-{key}"

    def unavailable(self) -> str | None:
        """Why this release cannot run a lab here, or None."""
        if self.is_host:
            missing = [t for t in ("libvirtd", "virtlogd", "qemu-system-x86_64")
                       if shutil.which(t, path=DAEMON_PATH) is None]
            return (f"host libvirt missing: {', '.join(missing)} (run scripts/setup-host.sh)"
                    if missing else None)
        if _stamp(self.root_dir) is not None:
            return None
        if shutil.which("mmdebstrap", path=DAEMON_PATH) is None:
            return (f"{self.name} needs a Debian {self.suite} root built with mmdebstrap, which "
                    f"is missing (apt-get install mmdebstrap, or run scripts/setup-host.sh)")
        return None

    def versions(self) -> dict[str, str]:
        """{'libvirt': '11.3.0', 'qemu': '10.0.13'} of this release (the root must exist)."""
        if self.is_host:
            return _versions(None)
        stamp = _stamp(self.root_dir)
        if stamp is None:
            raise ReleaseUnavailable(f"{self.name}: root {self.root_dir} not built yet")
        return {"libvirt": stamp["libvirt"], "qemu": stamp["qemu"]}

    def describe(self) -> str:
        v = self.versions()
        where = "the host's" if self.is_host else f"Debian {self.suite} root {self.root_dir}"
        return f"{self.name}: libvirt {v['libvirt']}, QEMU {v['qemu']} ({where})"


def _version_of(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                             check=False).stdout
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return "?"
    m = re.search(r"(\d+\.\d+\.\d+)", out)
    return m.group(1) if m else "?"


def _versions(root: Path | None) -> dict[str, str]:
    pre = ["chroot", str(root)] if root else []
    return {"libvirt": _version_of(pre + ["libvirtd", "--version"]),
            "qemu": _version_of(pre + ["qemu-system-x86_64", "--version"])}


@functools.lru_cache(maxsize=1)
def host_libvirt_major() -> int | None:
    v = _version_of(["libvirtd", "--version"])
    return int(v.split(".")[0]) if v != "?" else None


def host_release() -> Release:
    major = host_libvirt_major()
    return Release(f"libvirt{major}" if major else "libvirt-host", None)


def other_release() -> Release:
    """The release the host does not have: libvirt 11 on a libvirt-9 host and vice versa."""
    major = host_libvirt_major()
    suite = "bookworm" if major is not None and major >= 10 else "trixie"
    return Release(f"libvirt{SUITES[suite][0]}", suite)


def releases() -> list[Release]:
    """The releases to test, host's first; NETPLUG_LAB_RELEASES=libvirt9,… narrows them."""
    both = [host_release(), other_release()]
    wanted = os.environ.get("NETPLUG_LAB_RELEASES", "").replace(" ", "")
    if not wanted:
        return both
    names = wanted.split(",")
    unknown = [n for n in names if n not in {r.name for r in both}]
    if unknown:
        raise ValueError(f"NETPLUG_LAB_RELEASES names {', '.join(unknown)}; this host has "
                         f"{', '.join(r.name for r in both)}")
    return [r for r in both if r.name in names]


def release(name: str | None) -> Release:
    """The release called NAME ('host' or None: the host's; 'other': the other one)."""
    if name in (None, "", "host"):
        return host_release()
    if name == "other":
        return other_release()
    for r in (host_release(), other_release()):
        if r.name == name:
            return r
    raise ValueError(f"unknown lab release {name!r}: use host, other, {host_release().name} "
                     f"or {other_release().name}")


# --------------------------------------------------------------------------- the cached root


def _stamp(root: Path | None) -> dict | None:
    if root is None:
        return None
    try:
        return json.loads((root / "netplug-root.json").read_text())
    except (OSError, ValueError):
        return None


def ensure_root(rel: Release) -> Path:
    """The cached root of REL, built now if missing (takes a lock; ~1 min, ~200 MB)."""
    root = rel.root_dir
    assert root is not None, "the host's release has no root"
    if _stamp(root) is not None:
        return root
    reason = rel.unavailable()
    if reason:
        raise ReleaseUnavailable(reason)
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _stamp(root) is not None:  # built by another process while we waited
            return root
        t0 = time.monotonic()
        log.info("building the %s root (Debian %s: %s) in %s", rel.name, rel.suite,
                 " ".join(rel.packages), root)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
        try:
            argv = ["mmdebstrap", "--variant=apt", "--mode=root", "--quiet",
                    "--include=" + ",".join(rel.packages),
                    *(f"--dpkgopt=path-exclude={p}" for p in MMDEBSTRAP_EXCLUDES),
                    rel.suite, str(tmp / "root")]
            r = subprocess.run(argv, capture_output=True, text=True, timeout=1800,
                               check=False, env={"PATH": DAEMON_PATH, "LC_ALL": "C.UTF-8",
                                                 "HOME": "/root"})
            if r.returncode != 0:
                raise ReleaseUnavailable(
                    f"mmdebstrap {rel.suite} failed (exit {r.returncode}): "
                    f"{(r.stderr or r.stdout).strip()[-2000:]}")
            versions = _versions(tmp / "root")
            major = versions["libvirt"].split(".")[0]
            if f"libvirt{major}" != rel.name:
                raise ReleaseUnavailable(f"Debian {rel.suite} root has libvirt "
                                         f"{versions['libvirt']}, expected {rel.name}")
            stamp = {"suite": rel.suite, "packages": list(rel.packages), **versions,
                     "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                     "build_seconds": round(time.monotonic() - t0, 1)}
            (tmp / "root" / "netplug-root.json").write_text(json.dumps(stamp, indent=1) + "\n")
            shutil.rmtree(root, ignore_errors=True)
            (tmp / "root").rename(root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("%s root built in %.0f s: libvirt %s, QEMU %s", rel.name,
                 time.monotonic() - t0, stamp["libvirt"], stamp["qemu"])
    return root
