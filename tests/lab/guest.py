"""Build (and cache) the lab's Linux guest, and drive it over its serial console.

The guest is a Debian kernel plus a tiny initramfs: busybox-static, the real iproute2 ``ip``
(busybox's lacks ``maddr`` and ``allmulticast``) with its libraries, the virtio-net and macvlan
modules, and ``guest-init`` as /init. Everything is built from Debian packages on this host:

- kernel + modules: the package ``linux-image-amd64`` depends on (``apt-get download``,
  ``dpkg -x``); only vmlinuz and the needed modules are kept.
- /bin/busybox from busybox-static, /usr/sbin/ip + ``ldd`` libraries from the host.

The cache lives in ``$NETPLUG_LAB_CACHE`` or ``<repo>/.lab-cache``; the initramfs name carries
a hash of its inputs, so editing guest-init rebuilds it.

:class:`GuestConsole` speaks the console protocol documented at the top of guest-init.
"""

from __future__ import annotations

import base64
import dataclasses
import fcntl
import gzip
import hashlib
import io
import itertools
import logging
import os
import re
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
GUEST_INIT = Path(__file__).with_name("guest-init")

# Modules the guest needs; their dependencies (modinfo "depends=") are added automatically.
REQUIRED_MODULES = (
    "virtio", "virtio_ring", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci",
    "failover", "net_failover", "virtio_net", "macvlan",
)
# Nice to have: ACPI power button -> busybox acpid -> poweroff (makes `virsh shutdown` work).
OPTIONAL_MODULES = ("button", "evdev")

BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")
IP_BINARY = "/usr/sbin/ip"
BUILD_FORMAT = "1"  # bump to force a rebuild of every cached initramfs

READY_MARKER = "NETPLUG-GUEST-READY"
READY_END_MARKER = "NETPLUG-GUEST-READY-END"


class GuestBuildError(RuntimeError):
    """The guest image could not be built; the message says what is missing."""


class GuestError(RuntimeError):
    """The guest did not answer as expected (timeout, console gone)."""


@dataclasses.dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initrd: Path
    kernel_package: str
    build_seconds: float  # 0.0 when everything came from the cache


def cache_dir() -> Path:
    return Path(os.environ.get("NETPLUG_LAB_CACHE") or REPO_ROOT / ".lab-cache")


# --------------------------------------------------------------------------- kernel


def resolve_kernel_package() -> str | None:
    """Name of the package linux-image-amd64 depends on, e.g. linux-image-6.1.0-56-amd64."""
    override = os.environ.get("NETPLUG_LAB_KERNEL_PKG")
    if override:
        return override
    try:
        out = subprocess.run(
            ["apt-cache", "depends", "linux-image-amd64"],
            capture_output=True, text=True, timeout=60, check=False,
        ).stdout
    except FileNotFoundError:
        return None
    m = re.search(r"Depends:\s*(linux-image-\S+)", out)
    return m.group(1) if m else None


def _modinfo(data: bytes) -> dict[str, str]:
    """Key/value pairs of an ELF64 kernel module's .modinfo section (no kmod needed)."""
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise GuestBuildError("not an ELF64 kernel module")
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    sections = []
    for i in range(shnum):
        name, _type, _flags, _addr, off, size = struct.unpack_from(
            "<IIQQQQ", data, shoff + i * shentsize)
        sections.append((name, off, size))
    strtab = sections[shstrndx][1]
    for name, off, size in sections:
        end = data.index(b"\0", strtab + name)
        if data[strtab + name:end] == b".modinfo":
            info = {}
            for item in data[off:off + size].split(b"\0"):
                key, sep, value = item.decode(errors="replace").partition("=")
                if sep:
                    info.setdefault(key, value)
            return info
    return {}


def _read_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix == ".xz":
        import lzma
        data = lzma.decompress(data)
    return data


def _extract_kernel(pkg: str, dest: Path) -> None:
    """apt-get download PKG, unpack it, keep vmlinuz + the modules the guest needs in DEST."""
    with tempfile.TemporaryDirectory(prefix="kernel-", dir=dest.parent) as tmp:
        tmpdir = Path(tmp)
        log.info("downloading %s", pkg)
        r = subprocess.run(["apt-get", "download", pkg], cwd=tmpdir, capture_output=True,
                           text=True, timeout=600, check=False)
        debs = list(tmpdir.glob("*.deb"))
        if r.returncode != 0 or not debs:
            raise GuestBuildError(
                f"`apt-get download {pkg}` failed (exit {r.returncode}): {r.stderr.strip()}")
        log.info("unpacking %s", debs[0].name)
        subprocess.run(["dpkg", "-x", str(debs[0]), str(tmpdir / "root")], check=True,
                       timeout=600)
        root = tmpdir / "root"
        vmlinuz = sorted(root.glob("boot/vmlinuz-*"))
        moddirs = sorted(p for p in root.glob("lib/modules/*") if p.is_dir()) or sorted(
            p for p in root.glob("usr/lib/modules/*") if p.is_dir())
        if not vmlinuz or not moddirs:
            raise GuestBuildError(f"{pkg} has no boot/vmlinuz-* or lib/modules/*")
        by_name: dict[str, Path] = {}
        for ko in moddirs[0].rglob("*.ko*"):
            by_name[ko.name.split(".ko")[0].replace("-", "_")] = ko
        builtin = set()
        builtin_file = moddirs[0] / "modules.builtin"
        if builtin_file.exists():
            for line in builtin_file.read_text().split():
                builtin.add(Path(line).name.split(".ko")[0].replace("-", "_"))

        order: list[str] = []
        seen: set[str] = set()

        def add(name: str, required: bool) -> None:
            if name in seen or name in builtin:
                return
            if name not in by_name:
                if required:
                    raise GuestBuildError(f"{pkg} has no module {name}")
                return
            seen.add(name)
            deps = _modinfo(_read_module(by_name[name])).get("depends", "")
            for dep in filter(None, deps.split(",")):
                add(dep.replace("-", "_"), True)
            order.append(name)  # after its dependencies

        for name in REQUIRED_MODULES:
            add(name, True)
        for name in OPTIONAL_MODULES:
            add(name, False)

        staging = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        (staging / "modules").mkdir(parents=True)
        shutil.copyfile(vmlinuz[0], staging / "vmlinuz")
        for name in order:
            (staging / "modules" / f"{name}.ko").write_bytes(_read_module(by_name[name]))
        (staging / "modules.list").write_text("\n".join(order) + "\n")
        (staging / "kernel-version").write_text(moddirs[0].name + "\n")
        shutil.rmtree(dest, ignore_errors=True)
        staging.rename(dest)


def _kernel_dir(cache: Path) -> Path:
    pkg = resolve_kernel_package()
    if pkg is None:
        cached = sorted(cache.glob("kernel/linux-image-*/vmlinuz"))
        if cached:
            return cached[-1].parent
        log.info("apt-cache knows no linux-image-amd64; running apt-get update")
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=600,
                       check=False)
        pkg = resolve_kernel_package()
        if pkg is None:
            raise GuestBuildError(
                "cannot resolve the kernel package: `apt-cache depends linux-image-amd64` names "
                "no linux-image-*; run `apt-get update` or set NETPLUG_LAB_KERNEL_PKG")
    dest = cache / "kernel" / pkg
    if not (dest / "vmlinuz").exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        _extract_kernel(pkg, dest)
    return dest


# --------------------------------------------------------------------------- initramfs


class _Cpio:
    """Minimal cpio "newc" writer (deterministic: uid/gid 0, mtime 0)."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = itertools.count(1)
        self.dirs: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
               ) -> None:
        namez = name.encode() + b"\0"
        hdr = "070701" + "".join(f"{v:08X}" for v in (
            next(self.ino), mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1],
            len(namez), 0))
        self.buf.write(hdr.encode() + namez)
        self.buf.write(b"\0" * (-(110 + len(namez)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def mkdir(self, path: str) -> None:
        parts = path.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d and d not in self.dirs:
                self.dirs.add(d)
                self._entry(d, 0o040755)

    def file(self, path: str, data: bytes, mode: int = 0o755) -> None:
        path = path.strip("/")
        self.mkdir(os.path.dirname(path))
        self._entry(path, 0o100000 | mode, data)

    def symlink(self, path: str, target: str) -> None:
        path = path.strip("/")
        self.mkdir(os.path.dirname(path))
        self._entry(path, 0o120777, target.encode())

    def chardev(self, path: str, major: int, minor: int) -> None:
        path = path.strip("/")
        self.mkdir(os.path.dirname(path))
        self._entry(path, 0o020600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue()


def _ldd(binary: str) -> list[str]:
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True,
                         timeout=30).stdout
    libs = []
    for line in out.splitlines():
        m = re.search(r"=>\s*(/\S+)", line) or re.match(r"\s*(/\S+)\s+\(", line)
        if m:
            libs.append(m.group(1))
    return libs


def _busybox() -> str:
    for path in BUSYBOX_CANDIDATES:
        if os.path.exists(path):
            out = subprocess.run(["file", "-L", path], capture_output=True, text=True,
                                 check=False).stdout if shutil.which("file") else "static"
            if "dynamically linked" not in out:
                return path
    raise GuestBuildError("no static busybox found: apt-get install busybox-static")


def _initrd_inputs(kdir: Path) -> list[tuple[str, Path]]:
    """(path inside the initramfs, host file) for every file to pack."""
    files = [("init", GUEST_INIT), ("bin/busybox", Path(_busybox()))]
    if not os.path.exists(IP_BINARY):
        raise GuestBuildError(f"{IP_BINARY} missing: apt-get install iproute2")
    files.append(("usr/sbin/ip", Path(IP_BINARY)))
    for lib in _ldd(IP_BINARY):
        if lib.startswith("/lib64/"):
            files.append((lib.lstrip("/"), Path(lib)))
        else:
            files.append(("lib/x86_64-linux-gnu/" + os.path.basename(lib), Path(lib)))
    files.append(("lib/modules/netplug.list", kdir / "modules.list"))
    for name in (kdir / "modules.list").read_text().split():
        files.append((f"lib/modules/{name}.ko", kdir / "modules" / f"{name}.ko"))
    return files


def _build_initrd(files: list[tuple[str, Path]], dest: Path) -> None:
    cpio = _Cpio()
    for d in ("dev", "proc", "sys", "tmp", "run", "etc", "bin", "sbin", "usr/bin", "usr/sbin"):
        cpio.mkdir(d)
    cpio.chardev("dev/console", 5, 1)
    cpio.chardev("dev/null", 1, 3)
    for inside, host in files:
        mode = 0o755 if os.access(host, os.X_OK) or inside == "init" else 0o644
        cpio.file(inside, host.read_bytes(), mode)
    tmp = dest.with_name(dest.name + f".{os.getpid()}.tmp")
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0,
                                               compresslevel=6) as gz:
        gz.write(cpio.finish())
    os.replace(tmp, dest)


def build_guest(cache: Path | None = None) -> GuestImage:
    """Return kernel + initramfs paths, building whatever the cache lacks (takes a lock)."""
    cache = cache or cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    built = False
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        had_kernel = bool(list(cache.glob("kernel/linux-image-*/vmlinuz")))
        kdir = _kernel_dir(cache)
        built = not had_kernel
        files = _initrd_inputs(kdir)
        h = hashlib.sha256(BUILD_FORMAT.encode())
        for inside, host in files:
            h.update(inside.encode() + b"\0" + hashlib.sha256(host.read_bytes()).digest())
        initrd = cache / f"initrd-{h.hexdigest()[:16]}.img"
        if not initrd.exists():
            log.info("building %s", initrd.name)
            _build_initrd(files, initrd)
            built = True
            for old in cache.glob("initrd-*.img"):
                if old != initrd and time.time() - old.stat().st_mtime > 3600:
                    old.unlink(missing_ok=True)
    return GuestImage(kernel=kdir / "vmlinuz", initrd=initrd, kernel_package=kdir.name,
                      build_seconds=time.monotonic() - t0 if built else 0.0)


# --------------------------------------------------------------------------- console


class GuestConsole:
    """A guest's serial console over QEMU's unix socket.

    A reader thread keeps everything the guest printed (``text()``), so nothing is lost between
    calls. ``sh(cmd)`` sends one NETPLUG-CMD line and waits for its NETPLUG-END marker. If the
    socket goes away (save/restore, migration) the next call reconnects.
    """

    def __init__(self, socket_path: Path, log_path: Path | None = None) -> None:
        self.socket_path = Path(socket_path)
        self.log_path = log_path
        self._sock: socket.socket | None = None
        self._buf = ""
        self._cond = threading.Condition()
        self._reader: threading.Thread | None = None
        self._ids = itertools.count(1)
        self._closed = False

    # -- connection
    def connect(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        last: OSError | None = None
        while time.monotonic() < deadline:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(self.socket_path))
            except OSError as e:
                s.close()
                last = e
                time.sleep(0.1)
                continue
            with self._cond:
                self._sock = s
                self._closed = False
            self._reader = threading.Thread(target=self._read_loop, args=(s,), daemon=True,
                                            name=f"console-{self.socket_path.name}")
            self._reader.start()
            return
        raise GuestError(f"cannot connect to guest console {self.socket_path} within "
                         f"{timeout:.0f} s: {last}")

    def close(self) -> None:
        with self._cond:
            s, self._sock = self._sock, None
            self._closed = True
            self._cond.notify_all()
        if s is not None:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def _read_loop(self, s: socket.socket) -> None:
        logf = open(self.log_path, "a", encoding="utf-8", errors="replace") \
            if self.log_path else None
        try:
            while True:
                try:
                    data = s.recv(65536)
                except OSError:
                    data = b""
                text = data.decode("utf-8", errors="replace").replace("\r", "")
                if logf and text:
                    logf.write(text)
                    logf.flush()
                with self._cond:
                    if not data:
                        if self._sock is s:
                            self._sock = None
                        self._cond.notify_all()
                        return
                    self._buf += text
                    self._cond.notify_all()
        finally:
            if logf:
                logf.close()

    def _ensure(self, timeout: float) -> socket.socket:
        with self._cond:
            s = self._sock
        if s is None:
            self.connect(timeout)
            with self._cond:
                s = self._sock
        assert s is not None
        return s

    def reset(self) -> None:
        """Forget what was received so far (the guest is about to boot again)."""
        with self._cond:
            self._buf = ""

    # -- reading
    def text(self) -> str:
        """Everything received on this console so far (\\r stripped)."""
        with self._cond:
            return self._buf

    def wait_for(self, pattern: str, timeout: float, start: int = 0) -> re.Match[str]:
        """Wait until regex PATTERN matches the console text after offset START."""
        rx = re.compile(pattern, re.S | re.M)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                m = rx.search(self._buf, start)
                if m:
                    return m
                left = deadline - time.monotonic()
                if left <= 0:
                    tail = self._buf[-2000:]
                    raise GuestError(f"guest console {self.socket_path}: no match for "
                                     f"{pattern!r} within {timeout:.0f} s; last output:\n{tail}")
                self._cond.wait(min(left, 0.5))

    # -- commands
    def sh(self, cmd: str, timeout: float = 30.0) -> tuple[int, str]:
        """Run CMD with /bin/sh in the guest; return (exit status, stdout+stderr)."""
        s = self._ensure(timeout)
        cid = f"{os.getpid()}-{next(self._ids)}-{time.monotonic_ns() % 1000000}"
        with self._cond:
            start = len(self._buf)
        line = f"NETPLUG-CMD {cid} {base64.b64encode(cmd.encode()).decode()}\n"
        if len(line) > 4000:
            raise ValueError("guest command too long for the console line discipline")
        try:
            s.sendall(line.encode())
        except OSError:
            self.close()
            s = self._ensure(timeout)
            s.sendall(line.encode())
        m = self.wait_for(rf"^NETPLUG-BEGIN {re.escape(cid)}\n(.*?)^NETPLUG-END "
                          rf"{re.escape(cid)} (\d+)\n", timeout, start)
        return int(m.group(2)), m.group(1)


def parse_ip_link(text: str) -> dict[str, str]:
    """{ifname: mac} from `ip -o link` output (loopback and non-ether links skipped)."""
    macs = {}
    for line in text.splitlines():
        m = re.match(r"\d+:\s+([^:@\s]+)[@:].*?link/ether\s+([0-9a-f:]{17})", line)
        if m:
            macs[m.group(1)] = m.group(2)
    return macs


if __name__ == "__main__":  # pragma: no cover - manual use: python -m tests.lab.guest
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    img = build_guest()
    print(img)
