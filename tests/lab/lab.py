"""An isolated libvirt lab: libvirtd + virtlogd + QEMU guests in their own namespaces.

Isolation
    Every lab has a network namespace ``netplug-lab-<id>`` (all bridges, taps, macvtaps, veths
    live there) and a private mount namespace held open by a *holder* process (``sleep``) that
    was started with ``ip netns exec NS unshare --mount --propagation private``. The holder
    bind-mounts the lab directory ``$NETPLUG_LAB_ROOT/netplug-lab-<id>/`` (default /tmp) over

        /etc/libvirt  /run/libvirt  /var/lib/libvirt  /var/log/libvirt  /var/cache/libvirt
        /etc/passwd  /etc/group      (copies that add libvirt-qemu, libvirt-dnsmasq, kvm)

    (/var/lib and /var/cache get an overlay first when the host lacks the libvirt
    directories, so nothing is created on the host). Every lab command runs as
    ``nsenter -t HOLDER -m -n ...``. The host's libvirt, files and network are never touched,
    and several labs can run at once.

Teardown
    ``stop()`` kills every process in the lab's network namespace (libvirtd, virtlogd, qemu,
    dnsmasq, hooks, the holder), deletes the namespace (and with it every device) and the lab
    directory. It also runs from atexit and on SIGTERM/SIGHUP. Labs whose owner process died
    (a crashed or killed run) are removed by the next ``start()`` (or ``cleanup_stale()``).

    The lab's mount namespace also binds lab-private directories over netplug's default paths
    ``/etc/libvirt-netplug`` and ``/run/libvirt-netplug``, so a netplug command typed in
    ``python -m tests.lab shell`` never reads the host's config or writes the host's state.

Releases (release.py)
    A lab runs the host's own libvirtd/virtlogd/QEMU, or those of the other Debian release
    (``Lab(release="libvirt11")`` on a Debian 12 host, ``"libvirt9"`` on a Debian 13 host). For
    the other release the holder also mounts an overlay of the cached release root at
    ``<lab dir>/root`` (a mount point of its own, as QEMU's namespace code requires), binds the
    same lab directories into it at the same paths, plus /dev, /sys (the lab netns's), a new
    /proc, the lab root dir (so migration URIs and the lab's files have the same paths inside)
    and the lab cache (the guest image), and starts virtlogd and libvirtd chrooted into it.
    Everything else (``lab.run``, virsh, the tests' oracle, netplug's CLI and agent) runs with
    the host's view of the lab, as for the host's release: the host's virsh and libvirt-python
    drive either daemon over the same socket path.

    libvirtd runs hooks inside its chroot, where the host's venv does not exist.
    ``lab.expose_host_program(path)`` (called by ``install_netplug`` for the interpreter the
    shims name) puts a stand-in at PATH inside the root that runs the host's PATH with the
    host's view of the lab (``chroot /proc/<holder>/root``): same namespaces, argv, stdin and
    environment as libvirtd gave it. So the hook code under test is the host's; what differs is
    only the libvirtd calling it.

Paths seen by libvirt (inside) and by the test (host side) differ: ``lab.host_path("/run/
libvirt/x")`` translates; ``lab.hooks_dir`` is already a host path.
"""

from __future__ import annotations

import atexit
import base64
import dataclasses
import hashlib
import json
import logging
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
import weakref
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from lxml import etree

from .guest import (READY_END_MARKER, READY_MARKER, GuestConsole, GuestError, GuestImage,
                    build_guest, cache_dir, parse_ip_link)
from .release import Release, ReleaseUnavailable, ensure_root, release as find_release

log = logging.getLogger(__name__)

PREFIX = "netplug-lab-"
NETNS_DIR = Path("/run/netns")
CONSOLE_DIR = "/run/libvirt/netplug-console"   # inside the lab
CONSOLE_LOG_DIR = "/var/log/libvirt/qemu"      # inside the lab
KEEP_LOGS = 20
# The newest machine type both QEMU 7.2 (Debian 12) and QEMU 10.0 (Debian 13) have: a guest
# started with it migrates live between the two releases ('pc' names each QEMU's own newest).
MIGRATION_MACHINE = "pc-i440fx-7.2"
REQUIRED_TOOLS = ("ip", "unshare", "nsenter", "virsh", "chroot", "findmnt")
DAEMON_TOOLS = ("libvirtd", "virtlogd", "qemu-system-x86_64")  # the host's, for its release
DAEMON_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
              "HOME": "/root", "LC_ALL": "C"}

# Lab directory -> path inside the lab's mount namespace.
BIND_MOUNTS = (
    ("etc/libvirt", "/etc/libvirt"),
    ("run/libvirt", "/run/libvirt"),
    ("lib/libvirt", "/var/lib/libvirt"),
    ("log/libvirt", "/var/log/libvirt"),
    ("cache/libvirt", "/var/cache/libvirt"),
)

# Lab-private directories over netplug's default config and state paths (see `shell`).
NETPLUG_BIND_MOUNTS = (
    ("netplug/etc", "/etc/libvirt-netplug"),
    ("netplug/run", "/run/libvirt-netplug"),
)

HOLDER_SCRIPT = r"""
set -e
L=$1 BASE=$2 TOP=$3 CACHE=$4
ovl=""
ov() {  # give DIR a writable overlay (upper/work in the lab dir) so we can add mount points
    case " $ovl " in *" $1 "*) return 0;; esac
    ovl="$ovl $1"
    mkdir -p "$L/ov/$2.u" "$L/ov/$2.w"
    mount -t overlay overlay -o "lowerdir=$1,upperdir=$L/ov/$2.u,workdir=$L/ov/$2.w" "$1"
}
[ -d /var/lib/libvirt ] || ov /var/lib varlib
[ -d /var/cache/libvirt ] || ov /var/cache varcache
[ -d /var/log/libvirt ] || ov /var/log varlog
[ -d /etc/libvirt ] || ov /etc etc
[ -d /etc/libvirt-netplug ] || ov /etc etc
[ -d /run/libvirt ] || ov /run run
[ -d /run/libvirt-netplug ] || ov /run run
PAIRS="etc/libvirt:/etc/libvirt run/libvirt:/run/libvirt lib/libvirt:/var/lib/libvirt
       log/libvirt:/var/log/libvirt cache/libvirt:/var/cache/libvirt"
for pair in $PAIRS netplug/etc:/etc/libvirt-netplug netplug/run:/run/libvirt-netplug; do
    mkdir -p "${pair#*:}"
    mount --bind "$L/${pair%%:*}" "${pair#*:}"
done
mount --bind "$L/passwd" /etc/passwd
mount --bind "$L/group" /etc/group
if [ -n "$BASE" ]; then  # the other release: its cached root, overlaid per lab
    R=$L/root
    mkdir -p "$L/ov/root.u" "$L/ov/root.w" "$R"
    mount -t overlay overlay -o "lowerdir=$BASE,upperdir=$L/ov/root.u,workdir=$L/ov/root.w" "$R"
    for pair in $PAIRS; do
        mkdir -p "$R${pair#*:}"
        mount --bind "$L/${pair%%:*}" "$R${pair#*:}"
    done
    mount --bind "$L/root-passwd" "$R/etc/passwd"
    mount --bind "$L/root-group" "$R/etc/group"
    mount --rbind /dev "$R/dev"
    mount --rbind /sys "$R/sys"     # `ip netns exec` mounted the lab netns's sysfs here
    mount -t proc proc "$R/proc"
    mkdir -p "$R$TOP" "$R$CACHE"
    mount --bind "$TOP" "$R$TOP"
    mount --bind "$CACHE" "$R$CACHE"
    mount -o remount,bind,ro "$R$CACHE"
fi
ip link set lo up
echo holder-ready
exec sleep infinity
"""

# Inside a release root: stands in for a host program (see Lab.expose_host_program).
HOST_PROGRAM_STANDIN = """\
#!/bin/sh
# netplug lab (tests/lab/lab.py): this lab's libvirtd runs chrooted in a Debian root and runs
# hooks there. This stands in for the host's {path} and runs it with the host's view of the
# lab (its namespaces, the host's files): the root of the lab's holder process.
exec /usr/sbin/chroot /proc/{holder}/root {path} "$@"
"""

# Run inside the holder's mount namespace: put the stand-in $2 at $1 inside root $3.
EXPOSE_SCRIPT = r"""
set -e
P=$(chroot "$3" realpath -m "$1")   # symlinks resolved inside the root, not on the host
if [ -e "$3$P" ]; then
    [ -f "$3$P" ] || { echo "$1 -> $P is not a file" >&2; exit 1; }
    mount --bind "$2" "$3$P"        # a mount in the lab's namespace: the file is not touched
else
    d=$(dirname "$3$P")
    while [ ! -e "$d" ]; do d=$(dirname "$d"); done
    # create it only inside the root's own overlay, never through a bind to host files
    [ "$(findmnt -n -o TARGET -T "$d")" = "$(readlink -f "$3")" ] || {
        echo "$1 -> $P would be created outside the lab's root ($d)" >&2; exit 1; }
    mkdir -p "$(dirname "$3$P")"
    cp "$2" "$3$P"
    chmod 755 "$3$P"
fi
"""

LIBVIRTD_CONF = """\
# netplug lab: private libvirtd (see tests/lab/lab.py)
auth_unix_ro = "none"
auth_unix_rw = "none"
unix_sock_group = "root"
host_uuid = "{host_uuid}"
# util.hook at debug level: which hook ran, with which arguments; util.command at debug
# level: the stderr of hooks that succeeded (libvirt logs it only there). Hook failures
# (with the hook's stderr) are logged at error level by every module.
log_filters = "1:util.hook 1:util.command 3:*"
log_outputs = "1:file:/var/log/libvirt/libvirtd.log"
"""

QEMU_CONF = """\
# netplug lab: no users, no confinement, no cgroups (see tests/lab/lab.py)
user = "root"
group = "root"
dynamic_ownership = 0
security_driver = "none"
cgroup_controllers = [ ]
"""


class LabError(RuntimeError):
    """The lab could not do what was asked; the message names the log to read."""


# --------------------------------------------------------------------------- helpers


def _proc_starttime(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _alive(pid: int, starttime: int | None = None) -> bool:
    st = _proc_starttime(pid)
    if st is None:
        return False
    try:  # zombies count as dead
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    except OSError:
        return False
    return starttime is None or st == starttime


def _netns_inode(name: str) -> int | None:
    try:
        return os.stat(NETNS_DIR / name).st_ino
    except OSError:
        return None


def _pids_in_netns(inode: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}/ns/net").st_ino == inode:
                pids.append(int(entry))
        except OSError:
            continue
    return pids


def _wait(pred, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def _run_host(argv: list[str], timeout: float = 30, check: bool = True
              ) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if check and r.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed (exit {r.returncode}): {r.stderr.strip()}")
    return r


def lab_root() -> Path:
    return Path(os.environ.get("NETPLUG_LAB_ROOT") or "/tmp")


def list_labs() -> list[dict]:
    """Every lab directory and lab netns on this host, with its owner and whether it is stale."""
    names = {p.name for p in lab_root().glob(PREFIX + "*") if p.is_dir()}
    if NETNS_DIR.is_dir():
        names |= {p.name for p in NETNS_DIR.glob(PREFIX + "*")}
    labs = []
    for name in sorted(names):
        d = lab_root() / name
        try:
            owner = json.loads((d / "owner.json").read_text())
        except (OSError, ValueError):
            owner = {}
        if owner:
            stale = not _alive(owner.get("pid", 0), owner.get("starttime"))
        elif d.is_dir():
            stale = True  # a lab dir without owner.json: a start() killed half-way
        else:
            # A netns with no directory under *this* root may belong to a lab started with
            # another NETPLUG_LAB_ROOT (netns names are host-wide, roots are not): it is only
            # stale once nothing lives in it any more.
            inode = _netns_inode(name)
            stale = inode is None or not any(_alive(p) for p in _pids_in_netns(inode))
        labs.append({"name": name, "dir": str(d), "owner": owner, "stale": stale})
    return labs


def destroy_lab(name: str, timeout: float = 15.0) -> None:
    """Remove everything of lab NAME: processes, netns, directory. Safe to call twice."""
    if not name.startswith(PREFIX) or "/" in name:
        raise ValueError(f"not a lab name: {name!r}")
    d = lab_root() / name
    inode = _netns_inode(name)
    pids: set[int] = set()
    if inode is not None:
        pids |= set(_pids_in_netns(inode))
    try:
        state = json.loads((d / "state.json").read_text())
        holder = state.get("holder_pid")
        if holder and _alive(holder, state.get("holder_starttime")):
            pids.add(holder)
    except (OSError, ValueError):
        pass
    pids.discard(os.getpid())
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if not _wait(lambda: not any(_alive(p) for p in pids), timeout):
        left = [p for p in pids if _alive(p)]
        raise LabError(f"lab {name}: processes {left} did not die within {timeout:.0f} s")
    if inode is not None:
        _run_host(["ip", "netns", "del", name], check=False)
        if (NETNS_DIR / name).exists():
            raise LabError(f"lab {name}: `ip netns del {name}` left {NETNS_DIR / name}")
    # Rename first: a lab dir is either complete (with its owner.json) or gone, so a
    # concurrent cleanup_stale() never sees a half-deleted lab.
    tomb = lab_root() / f".netplug-lab-dead-{name[len(PREFIX):]}-{os.getpid()}"
    try:
        os.rename(d, tomb)
    except FileNotFoundError:
        return
    except OSError as e:
        raise LabError(f"lab {name}: could not remove {d}: {e}") from e
    shutil.rmtree(tomb, ignore_errors=True)
    if tomb.exists():
        raise LabError(f"lab {name}: could not remove {tomb}")


def cleanup_stale(all_labs: bool = False) -> list[str]:
    """Destroy labs whose owner process is gone (or every lab with ALL_LABS). Returns names."""
    removed = []
    # Directories of a start() or destroy_lab() that was killed half-way.
    for tmp in list(lab_root().glob(".netplug-lab-new-*")) + list(
            lab_root().glob(".netplug-lab-dead-*")):
        try:
            if time.time() - tmp.stat().st_mtime > 60:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass
    for lab in list_labs():
        if lab["stale"] or all_labs:
            log.info("removing %s lab %s", "stale" if lab["stale"] else "live", lab["name"])
            try:
                destroy_lab(lab["name"])
            except LabError as e:  # e.g. another process is removing it right now
                log.warning("%s", e)
                continue
            removed.append(lab["name"])
    return removed


_LIVE: "weakref.WeakSet[Lab]" = weakref.WeakSet()
_handlers_installed = False


def _stop_live_labs() -> None:
    for lab in list(_LIVE):
        try:
            lab.stop()
        except Exception as e:  # noqa: BLE001 - last resort at exit, report and go on
            log.error("lab %s: teardown failed: %s", lab.name, e)


def _install_exit_handlers() -> None:
    """atexit + SIGTERM/SIGHUP -> SystemExit, so with-blocks and atexit tear labs down."""
    global _handlers_installed
    if _handlers_installed:
        return
    _handlers_installed = True
    atexit.register(_stop_live_labs)
    if threading.current_thread() is not threading.main_thread():
        return

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) in (signal.SIG_DFL, None):
            signal.signal(sig, on_signal)


# --------------------------------------------------------------------------- NICs


@dataclasses.dataclass(frozen=True)
class Nic:
    """One guest interface.

    ``type`` is 'network' (source = network name), 'bridge' (source = bridge name) or
    'direct' (source = lower device; ``mode`` = bridge|vepa|private|passthrough).
    ``attrs`` goes into the <interface> start tag (e.g. "trustGuestRxFilters='yes'"),
    ``extra`` is raw XML inside <interface>.
    """
    type: str
    source: str
    mode: str = "bridge"
    mac: str | None = None
    model: str = "virtio"
    attrs: str = ""
    extra: str = ""

    @classmethod
    def parse(cls, spec: "str | Nic") -> "Nic":
        """'network:NAME', 'bridge:BR', 'direct:LOWER[:MODE]' (optional ',mac=…')."""
        if isinstance(spec, Nic):
            return spec
        head, _, opts = spec.partition(",")
        parts = head.split(":")
        kw = dict(o.split("=", 1) for o in opts.split(",") if o)
        if parts[0] == "direct" and len(parts) == 3:
            return cls("direct", parts[1], mode=parts[2], **kw)
        if len(parts) != 2 or parts[0] not in ("network", "bridge", "direct"):
            raise ValueError(f"bad interface spec {spec!r}: use network:NAME, bridge:BR "
                             "or direct:LOWER[:MODE]")
        return cls(parts[0], parts[1], **kw)

    def xml(self) -> str:
        attrs = f" {self.attrs}" if self.attrs else ""
        if self.type == "network":
            src = f"<source network={quoteattr(self.source)}/>"
        elif self.type == "bridge":
            src = f"<source bridge={quoteattr(self.source)}/>"
        elif self.type == "direct":
            src = f"<source dev={quoteattr(self.source)} mode={quoteattr(self.mode)}/>"
        else:
            raise ValueError(f"unsupported interface type {self.type!r}")
        mac = f"<mac address={quoteattr(self.mac)}/>" if self.mac else ""
        return (f"<interface type={quoteattr(self.type)}{attrs}>{mac}{src}"
                f"<model type={quoteattr(self.model)}/>{self.extra}</interface>")


# --------------------------------------------------------------------------- guest driver


class Guest:
    """A lab guest: readiness, shell commands over the serial console, MACs."""

    def __init__(self, lab: "Lab", name: str) -> None:
        self.lab = lab
        self.name = name
        self.console = GuestConsole(lab.host_path(f"{CONSOLE_DIR}/{name}.sock"),
                                    lab.dir / f"console-{name}.log")
        self.macs: dict[str, str] = {}
        self._log_offset = 0

    @property
    def console_log(self) -> Path:
        """libvirt's (virtlogd's) log of everything the guest printed, host path."""
        return self.lab.host_path(f"{CONSOLE_LOG_DIR}/{self.name}-console.log")

    def _mark_boot(self) -> None:
        """Called before (re)starting the domain: readiness must come from the new boot."""
        self.console.close()
        self.console.reset()
        try:
            self._log_offset = self.console_log.stat().st_size
        except OSError:
            self._log_offset = 0
        self.macs = {}

    def wait_ready(self, timeout: float = 120.0) -> dict[str, str]:
        """Wait for NETPLUG-GUEST-READY and a working command loop; returns {ifname: mac}."""
        deadline = time.monotonic() + timeout
        rx = re.compile(rf"^{READY_MARKER}\n(.*?)^{READY_END_MARKER}\n", re.S | re.M)
        block = None
        while block is None:
            m = rx.search(self.console.text())
            if m is None:
                try:
                    with open(self.console_log, encoding="utf-8", errors="replace") as f:
                        f.seek(self._log_offset)
                        m = rx.search(f.read().replace("\r", ""))
                except OSError:
                    pass
            if m:
                block = m.group(1)
                break
            if not self.lab.domain_active(self.name):
                raise GuestError(f"guest {self.name} is not running; console log "
                                 f"{self.console_log}:\n{self._log_tail()}")
            if time.monotonic() >= deadline:
                raise GuestError(f"guest {self.name} not ready within {timeout:.0f} s; console "
                                 f"log {self.console_log}:\n{self._log_tail()}")
            time.sleep(0.2)
        self.macs = parse_ip_link(block)
        # The command loop starts right after the marker (and after a netplug.run command);
        # a line sent while the console was not being read can be lost, so ping repeatedly.
        while True:
            left = deadline - time.monotonic()
            try:
                rc, out = self.sh("echo ping", timeout=min(5.0, max(left, 1.0)))
                break
            except GuestError:
                if left <= 5.0:
                    raise
        if rc != 0 or out.strip() != "ping":
            raise GuestError(f"guest {self.name}: console command loop answered {rc} {out!r}")
        return self.macs

    def _log_tail(self, n: int = 3000) -> str:
        try:
            return self.console_log.read_text(errors="replace")[-n:]
        except OSError:
            return self.console.text()[-n:]

    def sh(self, cmd: str, timeout: float = 30.0) -> tuple[int, str]:
        """Run CMD (sh syntax) in the guest; returns (exit status, stdout+stderr)."""
        return self.console.sh(cmd, timeout)

    def check(self, cmd: str, timeout: float = 30.0) -> str:
        """Like sh() but raises GuestError on a non-zero exit status; returns the output."""
        rc, out = self.sh(cmd, timeout)
        if rc != 0:
            raise GuestError(f"guest {self.name}: `{cmd}` exited {rc}: {out.strip()}")
        return out

    def dumpxml(self) -> str:
        return self.lab.virsh("dumpxml", self.name).stdout

    def targets(self) -> dict[str, str]:
        """{guest MAC: host device (vnetN / macvtapN)} from the live domain XML."""
        root = etree.fromstring(self.dumpxml().encode())
        out = {}
        for iface in root.iterfind("devices/interface"):
            mac, target = iface.find("mac"), iface.find("target")
            if mac is not None and target is not None:
                out[mac.get("address")] = target.get("dev")
        return out


# --------------------------------------------------------------------------- the lab


class Lab:
    """A private libvirtd with the QEMU driver in its own network + mount namespace.

    Use as a context manager (``with Lab() as lab:``) or call start()/stop().
    """

    def __init__(self, name: str | None = None, release: "Release | str | None" = None) -> None:
        """NAME: up to 21 of [a-z0-9-] (default random). RELEASE: a release.Release, or its
        name ('libvirt9', 'libvirt11', 'host', 'other'); default the host's libvirt."""
        self.release = release if isinstance(release, Release) else find_release(release)
        short = name or secrets.token_hex(3)
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,20}", short):
            raise ValueError(f"lab name {short!r}: use up to 21 of [a-z0-9-]")
        self.name = PREFIX + short          # netns name and directory name
        self.dir = lab_root() / self.name
        self.holder_pid: int | None = None
        self.image: GuestImage | None = None
        self.timings: dict[str, float] = {}
        self._guests: dict[str, Guest] = {}
        self._counter = 0
        self._started = False

    # -- paths and URIs
    uri = "qemu:///system"

    @property
    def host_uri(self) -> str:
        """URI usable from the host (outside the namespaces), e.g. for libvirt-python."""
        return f"qemu+unix:///system?socket={self.dir}/run/libvirt/libvirt-sock"

    @property
    def hooks_dir(self) -> Path:
        """Host path of the lab's /etc/libvirt/hooks."""
        return self.dir / "etc/libvirt/hooks"

    @property
    def libvirtd_log_path(self) -> Path:
        return self.dir / "log/libvirt/libvirtd.log"

    @property
    def root(self) -> Path | None:
        """Where the release root is mounted (holder's view), None for the host's release."""
        return None if self.release.is_host else self.dir / "root"

    def host_path(self, inside: str) -> Path:
        """Translate a path inside the lab (/run/libvirt/…, /etc/libvirt/…) to a host path."""
        for rel, target in BIND_MOUNTS + NETPLUG_BIND_MOUNTS:
            if inside == target or inside.startswith(target + "/"):
                return self.dir / rel / inside[len(target):].lstrip("/")
        return Path(inside)

    def libvirtd_log(self) -> str:
        try:
            return self.libvirtd_log_path.read_text(errors="replace")
        except OSError:
            return ""

    # -- lifecycle
    def __enter__(self) -> "Lab":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "Lab":
        t0 = time.monotonic()
        self._preflight()
        cleanup_stale()
        if self.dir.exists() or (NETNS_DIR / self.name).exists():
            raise LabError(f"lab {self.name} already exists (its owner is alive); "
                           f"pick another name or run `python -m tests.lab down {self.name}`")
        _install_exit_handlers()
        self._make_dir()
        _LIVE.add(self)
        self._started = True
        try:
            self.image = build_guest()
            self.timings["guest_build"] = self.image.build_seconds
            if not self.release.is_host:
                t_root = time.monotonic()
                try:
                    base = ensure_root(self.release)
                except ReleaseUnavailable as e:
                    raise LabError(str(e)) from None
                self.timings["root_build"] = time.monotonic() - t_root
                _write_passwd_group(self.dir, base / "etc", prefix="root-")
            _run_host(["ip", "netns", "add", self.name])
            self._start_holder()
            self._start_daemons()
        except BaseException:
            self.stop()
            raise
        self.timings["start"] = time.monotonic() - t0
        log.info("lab %s up in %.1f s (%s)", self.name, self.timings["start"], self.dir)
        return self

    def stop(self) -> None:
        """Tear everything down (idempotent)."""
        if not self._started:
            return
        t0 = time.monotonic()
        for g in self._guests.values():
            g.console.close()
        self._save_caps_cache()
        self._archive_logs()
        destroy_lab(self.name)
        self._started = False
        _LIVE.discard(self)
        self.timings["stop"] = time.monotonic() - t0
        log.info("lab %s removed in %.1f s", self.name, self.timings["stop"])

    @classmethod
    def attach(cls, name: str) -> "Lab":
        """A handle on a running lab started elsewhere (e.g. by `python -m tests.lab up`)."""
        lab = cls(name.removeprefix(PREFIX))
        try:
            state = json.loads((lab.dir / "state.json").read_text())
        except (OSError, ValueError) as e:
            raise LabError(f"no running lab {lab.name} ({lab.dir}/state.json: {e})") from e
        lab.holder_pid = state["holder_pid"]
        lab.release = find_release(state.get("release"))
        if not _alive(lab.holder_pid, state.get("holder_starttime")):
            raise LabError(f"lab {lab.name} is stale (holder gone); run "
                           "`python -m tests.lab cleanup`")
        lab.image = GuestImage(Path(state["kernel"]), Path(state["initrd"]), "", 0.0)
        lab._started = True
        return lab

    def detach(self) -> None:
        """Let the lab outlive this process: its owner becomes the holder process."""
        assert self.holder_pid
        self._write_json("owner.json", {"pid": self.holder_pid,
                                        "starttime": _proc_starttime(self.holder_pid),
                                        "detached": True})
        _LIVE.discard(self)
        self._started = False

    def _preflight(self) -> None:
        if os.geteuid() != 0:
            raise LabError("the lab needs root (network/mount namespaces, libvirtd)")
        tools = REQUIRED_TOOLS + (DAEMON_TOOLS if self.release.is_host else ())
        missing = [t for t in tools if shutil.which(t, path=DAEMON_ENV["PATH"]) is None]
        if missing:
            raise LabError(f"missing tools: {', '.join(missing)} (apt-get install "
                           "libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86 iproute2 "
                           "util-linux coreutils)")
        reason = self.release.unavailable()
        if reason:
            raise LabError(reason)

    def _write_json(self, name: str, data: dict) -> None:
        tmp = self.dir / f".{name}.tmp"
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(self.dir / name)

    def _make_dir(self) -> None:
        root = lab_root()
        root.mkdir(parents=True, exist_ok=True)
        # Build under a temporary name and rename, so no lab dir ever exists without an owner.
        tmp = Path(tempfile.mkdtemp(prefix=".netplug-lab-new-", dir=root))
        (tmp / "owner.json").write_text(json.dumps(
            {"pid": os.getpid(), "starttime": _proc_starttime(os.getpid())}))
        for rel, _ in BIND_MOUNTS + NETPLUG_BIND_MOUNTS:
            (tmp / rel).mkdir(parents=True)
        (tmp / "etc/libvirt/hooks").mkdir()
        (tmp / "run/libvirt/netplug-console").mkdir()
        (tmp / "log/libvirt/qemu").mkdir()
        (tmp / "xml").mkdir()
        (tmp / "etc/libvirt/libvirtd.conf").write_text(
            LIBVIRTD_CONF.format(host_uuid=uuid.uuid4()))
        (tmp / "etc/libvirt/qemu.conf").write_text(QEMU_CONF)
        (tmp / "etc/libvirt/virtlogd.conf").write_text("")
        (tmp / "etc/libvirt/libvirt.conf").write_text("")
        _write_passwd_group(tmp, Path("/etc"))
        caps = self._caps_cache
        if caps.is_dir():
            shutil.copytree(caps, tmp / "cache/libvirt/qemu/capabilities")
        os.rename(tmp, self.dir)

    @property
    def logs_archive(self) -> Path:
        """Where stop() keeps this lab's logs (the last KEEP_LOGS labs are kept)."""
        return Path(os.environ.get("NETPLUG_LAB_LOGS") or cache_dir() / "logs") / self.name

    def _archive_logs(self) -> None:
        """Copy libvirtd, virtlogd, QEMU and console logs out of the lab before it goes."""
        dest = self.logs_archive
        try:
            shutil.rmtree(dest, ignore_errors=True)
            dest.mkdir(parents=True)
            for pattern in ("*.log", "*.stderr", "log/libvirt/*.log", "log/libvirt/qemu/*.log",
                            "xml/*.xml"):
                for f in self.dir.glob(pattern):
                    shutil.copyfile(f, dest / f.name)
            kept = sorted(dest.parent.glob(PREFIX + "*"), key=lambda p: p.stat().st_mtime)
            for old in kept[:-KEEP_LOGS]:
                shutil.rmtree(old, ignore_errors=True)
            log.info("lab %s: logs kept in %s", self.name, dest)
        except OSError as e:
            log.warning("lab %s: could not keep logs in %s: %s", self.name, dest, e)

    @property
    def _caps_cache(self) -> Path:
        """libvirt's QEMU-capabilities cache, kept per release: both releases name the file
        after the same emulator path, and a foreign one only makes libvirtd probe again."""
        if self.release.is_host:
            return cache_dir() / "qemu-capabilities"
        return cache_dir() / f"qemu-capabilities-{self.release.suite}"

    def _save_caps_cache(self) -> None:
        src = self.dir / "cache/libvirt/qemu/capabilities"
        dst = self._caps_cache
        try:
            for f in src.glob("*.xml"):
                if not (dst / f.name).exists():
                    dst.mkdir(parents=True, exist_ok=True)
                    tmp = dst / f".{f.name}.{os.getpid()}"
                    shutil.copyfile(f, tmp)
                    tmp.replace(dst / f.name)
        except OSError as e:
            log.debug("could not save the QEMU capabilities cache: %s", e)

    def _start_holder(self) -> None:
        holder_log = self.dir / "holder.log"
        with open(holder_log, "wb") as out:
            p = subprocess.Popen(
                ["ip", "netns", "exec", self.name, "unshare", "--mount",
                 "--propagation", "private", "sh", "-c", HOLDER_SCRIPT, "holder", str(self.dir),
                 str(self.release.root_dir or ""), str(lab_root().resolve()),
                 str(cache_dir().resolve())],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, env=DAEMON_ENV)
        self.holder_pid = p.pid
        if not _wait(lambda: b"holder-ready" in holder_log.read_bytes() or p.poll() is not None,
                     20):
            raise LabError(f"lab holder not ready within 20 s; see {holder_log}")
        if p.poll() is not None:
            raise LabError(f"lab holder failed (exit {p.returncode}): "
                           f"{holder_log.read_text(errors='replace').strip()}")
        # Reap it from a thread so it never lingers as a zombie of this process.
        threading.Thread(target=p.wait, daemon=True).start()
        self._write_json("state.json", {
            "holder_pid": p.pid, "holder_starttime": _proc_starttime(p.pid),
            "kernel": str(self.image.kernel), "initrd": str(self.image.initrd),
            "release": self.release.name})

    def _nsenter(self) -> list[str]:
        if not self.holder_pid:
            raise LabError("lab not started")
        # -r: the holder's root too. Entering a mount namespace resets the root to the
        # namespace's own; where the lab runs inside a chroot (tests/lab/fresh_host.py), that
        # would escape it.
        return ["nsenter", "-t", str(self.holder_pid), "-m", "-n", "-r", "--"]

    def _daemon(self, name: str, argv: list[str]) -> None:
        chroot = ["chroot", str(self.root)] if self.root else []
        with open(self.dir / f"{name}.stderr", "ab") as err:
            r = subprocess.run(self._nsenter() + chroot + argv, stdin=subprocess.DEVNULL, stdout=err,
                               stderr=err, env=DAEMON_ENV, timeout=60, check=False)
        if r.returncode != 0:
            raise LabError(f"{name} failed to start (exit {r.returncode}); see "
                           f"{self.dir}/{name}.stderr and {self.libvirtd_log_path}")

    def _start_daemons(self) -> None:
        self._daemon("virtlogd", ["virtlogd", "--daemon", "--pid-file",
                                  str(self.dir / "virtlogd.pid")])
        sock = self.dir / "run/libvirt/virtlogd-sock"
        if not _wait(sock.exists, 20):
            raise LabError(f"virtlogd did not create {sock} within 20 s; see "
                           f"{self.dir}/virtlogd.stderr")
        self._start_libvirtd()

    def _start_libvirtd(self, timeout: float = 90.0) -> None:
        t0 = time.monotonic()
        pidfile = self.dir / "libvirtd.pid"
        pidfile.unlink(missing_ok=True)
        self._daemon("libvirtd", ["libvirtd", "--daemon", "--pid-file", str(pidfile)])
        sock = self.dir / "run/libvirt/libvirt-sock"
        if not _wait(sock.exists, 20):
            raise LabError(f"libvirtd did not create its socket {sock} within 20 s; see "
                           f"{self.libvirtd_log_path} and {self.dir}/libvirtd.stderr")
        # The first start probes QEMU's capabilities (several seconds without a cache).
        r = self.run("virsh", "-c", self.uri, "version", timeout=timeout, check=False)
        if r.returncode != 0:
            raise LabError(f"libvirtd does not answer: {r.stderr.strip()}; see "
                           f"{self.libvirtd_log_path}")
        self.timings["libvirtd_start"] = time.monotonic() - t0

    def libvirtd_pid(self) -> int | None:
        try:
            pid = int((self.dir / "libvirtd.pid").read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _alive(pid) else None

    def restart_libvirtd(self, timeout: float = 30.0) -> None:
        """Stop libvirtd (SIGTERM) and start it again; running domains survive, and libvirt
        calls the qemu hook with `reconnect` for each of them."""
        pid = self.libvirtd_pid()
        if pid:
            os.kill(pid, signal.SIGTERM)
            if not _wait(lambda: not _alive(pid), timeout):
                raise LabError(f"libvirtd {pid} did not exit within {timeout:.0f} s; see "
                               f"{self.libvirtd_log_path}")
        self._start_libvirtd()

    def reload_libvirtd(self) -> None:
        """SIGHUP: libvirtd re-reads its config and the set of hook scripts."""
        pid = self.libvirtd_pid()
        if not pid:
            raise LabError(f"libvirtd is not running; see {self.libvirtd_log_path}")
        os.kill(pid, signal.SIGHUP)
        time.sleep(0.5)
        self.virsh("version")

    def expose_host_program(self, path: str) -> None:
        """Make the host program PATH (e.g. the interpreter netplug's hook shims name) runnable
        by this lab's libvirtd. Nothing to do for the host's release; in a release root,
        libvirtd runs hooks inside its chroot, so a stand-in at PATH there runs the host's PATH
        with the host's view of the lab (see the module docstring). Idempotent."""
        if self.root is None:
            return
        if not os.path.isabs(path):
            raise LabError(f"expose_host_program: {path!r} is not an absolute path")
        standin = self.dir / "standins" / hashlib.sha256(path.encode()).hexdigest()[:16]
        if standin.exists():
            return
        standin.parent.mkdir(exist_ok=True)
        tmp = standin.with_suffix(".tmp")
        tmp.write_text(HOST_PROGRAM_STANDIN.format(path=shlex.quote(path),
                                                   holder=self.holder_pid))
        tmp.chmod(0o755)
        self.run("sh", "-c", EXPOSE_SCRIPT, "expose", path, str(tmp), str(self.root))
        tmp.rename(standin)

    def daemon_version(self) -> str:
        """`virsh version --daemon` of this lab's libvirtd (lines joined with '; ')."""
        out = self.virsh("version", "--daemon").stdout
        return "; ".join(line.strip() for line in out.splitlines() if line.strip())

    # -- running things inside
    def run(self, *argv: str, input: str | None = None, timeout: float = 120.0,
            check: bool = True, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
        """Run ARGV inside the lab (its net + mount namespace); stdout/stderr captured."""
        cmd = self._nsenter() + list(argv)
        try:
            r = subprocess.run(cmd, input=input, capture_output=True, text=True,
                               timeout=timeout, check=False, env=env,
                               stdin=None if input is not None else subprocess.DEVNULL)
        except subprocess.TimeoutExpired as e:
            raise LabError(f"lab {self.name}: {' '.join(argv)} timed out after "
                           f"{timeout:.0f} s") from e
        if check and r.returncode != 0:
            raise LabError(f"lab {self.name}: {' '.join(argv)} failed (exit {r.returncode}): "
                           f"{(r.stderr or r.stdout).strip()}")
        return r

    def virsh(self, *args: str, check: bool = True, timeout: float = 120.0,
              input: str | None = None) -> subprocess.CompletedProcess[str]:
        return self.run("virsh", "-c", self.uri, *args, check=check, timeout=timeout,
                        input=input)

    def _xml_file(self, kind: str, name: str, xml: str) -> str:
        path = self.dir / "xml" / f"{kind}-{name}.xml"
        path.write_text(xml)
        return str(path)  # the lab dir is visible at the same path inside

    # -- networks and devices
    def define_network(self, xml: str, start: bool = True) -> str:
        """net-define XML (and net-start it); returns the network name."""
        name = etree.fromstring(xml.encode()).findtext("name")
        self.virsh("net-define", self._xml_file("net", name, xml))
        if start:
            self.virsh("net-start", name)
        return name

    def _ifname(self, prefix: str) -> str:
        self._counter += 1
        return f"{prefix}{self._counter}"

    def add_host_bridge(self, name: str) -> str:
        """A Linux bridge in the lab netns (for <interface type='bridge'>), up."""
        self.run("ip", "link", "add", name, "type", "bridge")
        self.run("ip", "link", "set", name, "up")
        return name

    def add_uplink(self, bridge: str, port: str | None = None, peer: str | None = None
                   ) -> tuple[str, str]:
        """A veth pair: PORT is enslaved to BRIDGE, PEER is the "test host" end for injecting
        and capturing frames. Returns (port, peer)."""
        port = port or self._ifname("upl")
        peer = peer or port + "h"
        self.run("ip", "link", "add", port, "type", "veth", "peer", "name", peer)
        self.run("ip", "link", "set", port, "master", bridge)
        self.run("ip", "link", "set", port, "up")
        self.run("ip", "link", "set", peer, "up")
        return port, peer

    def add_lower_veth(self, name: str | None = None, peer: str | None = None
                       ) -> tuple[str, str]:
        """A veth pair whose NAME end serves as a macvtap lower device; PEER is the test end.
        Returns (name, peer)."""
        name = name or self._ifname("low")
        peer = peer or name + "p"
        self.run("ip", "link", "add", name, "type", "veth", "peer", "name", peer)
        self.run("ip", "link", "set", name, "up")
        self.run("ip", "link", "set", peer, "up")
        return name, peer

    def install_hook(self, kind: str, script: str, name: str = "50-lab") -> Path:
        """Write an executable hook hooks/<kind>.d/<name>; call reload_libvirtd() (or restart)
        afterwards, libvirtd reads the set of hook scripts only then."""
        if kind not in ("qemu", "network", "daemon", "lxc"):
            raise ValueError(f"unknown hook kind {kind!r}")
        path = self.hooks_dir / f"{kind}.d" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(script)
        path.chmod(0o755)
        return path

    # -- domains
    def domain_xml(self, name: str, interfaces: list["Nic | str"] = (), *, memory_mib: int = 128,
                   vcpus: int = 1, run: str | None = None, metadata: str = "",
                   extra_devices: str = "", kvm: bool | None = None,
                   machine: str = "pc") -> str:
        """Domain XML booting the lab guest (kernel + initramfs, no disk) with INTERFACES.
        MACHINE: QEMU's machine type; 'pc' is each QEMU's newest i440FX, a versioned one
        (MIGRATION_MACHINE) lets a guest migrate between QEMU releases."""
        if self.image is None:
            raise LabError("lab not started")
        if kvm is None:
            kvm = os.environ.get("NETPLUG_LAB_KVM") == "1"
        cmdline = "console=ttyS0 quiet loglevel=1 panic=-1"
        if run:
            cmdline += " netplug.run64=" + base64.b64encode(run.encode()).decode()
        nics = "".join(Nic.parse(n).xml() for n in interfaces)
        meta = f"<metadata>{metadata}</metadata>" if metadata else ""
        return f"""<domain type='{"kvm" if kvm else "qemu"}'>
  <name>{escape(name)}</name>{meta}
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>{vcpus}</vcpu>
  <os>
    <type arch='x86_64' machine={quoteattr(machine)}>hvm</type>
    <kernel>{escape(str(self.image.kernel))}</kernel>
    <initrd>{escape(str(self.image.initrd))}</initrd>
    <cmdline>{escape(cmdline)}</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <controller type='usb' model='none'/>
    {nics}
    <serial type='unix'>
      <source mode='bind' path='{CONSOLE_DIR}/{escape(name)}.sock'/>
      <log file='{CONSOLE_LOG_DIR}/{escape(name)}-console.log' append='on'/>
      <target port='0'/>
    </serial>
    <memballoon model='none'/>{extra_devices}
  </devices>
</domain>
"""

    def define_domain(self, name: str, interfaces: list["Nic | str"] = (), **kw) -> str:
        """virsh define a lab guest (see domain_xml for keyword arguments); returns NAME."""
        self.virsh("define", self._xml_file("dom", name, self.domain_xml(name, interfaces,
                                                                          **kw)))
        return name

    def guest(self, name: str) -> Guest:
        """The driver for guest NAME (one per name and lab)."""
        if name not in self._guests:
            self._guests[name] = Guest(self, name)
        return self._guests[name]

    def start_domain(self, name: str) -> Guest:
        """virsh start NAME, connecting its console right away (nothing printed is missed)."""
        g = self.guest(name)
        g._mark_boot()
        self.virsh("start", name)
        g.console.connect()
        return g

    def start_guest(self, name: str, interfaces: list["Nic | str"] = (), *, wait: bool = True,
                    timeout: float = 120.0, **kw) -> Guest:
        """define + start + (by default) wait_ready. Keyword arguments go to domain_xml."""
        t0 = time.monotonic()
        self.define_domain(name, interfaces, **kw)
        g = self.start_domain(name)
        if wait:
            g.wait_ready(timeout)
            self.timings[f"boot_{name}"] = time.monotonic() - t0
        return g

    def domain_active(self, name: str) -> bool:
        r = self.virsh("domstate", name, check=False, timeout=30)
        return r.returncode == 0 and r.stdout.strip() in ("running", "paused", "in shutdown")

    # -- debugging
    def shell_argv(self) -> list[str]:
        """argv that opens an interactive shell inside the lab."""
        return self._nsenter() + [os.environ.get("SHELL", "/bin/bash")]


def _write_passwd_group(d: Path, etc: Path, prefix: str = "") -> None:
    """Copies of ETC/passwd and ETC/group (as D/PREFIXpasswd, D/PREFIXgroup) that add what
    libvirtd/dnsmasq expect."""
    passwd = (etc / "passwd").read_text()
    group = (etc / "group").read_text()
    passwd += "" if passwd.endswith("\n") or not passwd else "\n"
    group += "" if group.endswith("\n") or not group else "\n"
    used_gids = {int(x.split(":")[2]) for x in group.splitlines() if x.count(":") >= 3}
    used_uids = {int(x.split(":")[2]) for x in passwd.splitlines() if x.count(":") >= 6}
    gids: dict[str, int] = {x.split(":")[0]: int(x.split(":")[2])
                            for x in group.splitlines() if x.count(":") >= 3}

    def free(used: set[int]) -> int:
        n = 64000
        while n in used:
            n += 1
        used.add(n)
        return n

    for g in ("kvm", "libvirt", "libvirt-qemu", "libvirt-dnsmasq"):
        if g not in gids:
            gids[g] = free(used_gids)
            group += f"{g}:x:{gids[g]}:\n"
    names = {x.split(":")[0] for x in passwd.splitlines()}
    for user, home in (("libvirt-qemu", "/var/lib/libvirt"),
                       ("libvirt-dnsmasq", "/var/lib/libvirt/dnsmasq")):
        if user not in names:
            passwd += f"{user}:x:{free(used_uids)}:{gids[user]}::{home}:/usr/sbin/nologin\n"
    (d / f"{prefix}passwd").write_text(passwd)
    (d / f"{prefix}group").write_text(group)
