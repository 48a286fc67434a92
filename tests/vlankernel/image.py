"""The VLAN-kernel VM's boot files: Debian's own kernel and a tiny initramfs, built and cached.

Kernel: the package ``linux-image-amd64`` depends on (6.1 on Debian 12, 6.12 on Debian 13), the
same one the lab's guest uses (tests.lab.guest.resolve_kernel_package). It is fetched with
``apt-get download`` and unpacked here, NOT installed: installing it would run
update-initramfs and take the dpkg lock for minutes (measured ~2.5 min) to produce files this
tier does not use, while download + unpack takes seconds. Only vmlinuz and the modules a
network test can want (net/, the top level of drivers/net, virtio, 9p and what they need) are
kept, and ``depmod -b`` indexes them, so ``modprobe -d DIR`` works on the host (to list the
initramfs modules) and inside the guest (which sees this directory through the host's root).

Initramfs: static busybox, the 9p/virtio modules needed to mount the host's root (listed by
``modprobe --show-depends``, decompressed), and ``init`` (this directory) as /init.

``NETPLUG_VLANKERNEL_DEB=/path/to/linux-image-….deb`` uses that package instead (e.g. Debian 13's
6.12 on a Debian 12 host).

Cache: ``<lab cache>/vlankernel/<package>/`` (``$NETPLUG_LAB_CACHE`` or ``<repo>/.lab-cache``),
the initramfs named by a hash of its inputs. Host side only.
"""

from __future__ import annotations

import dataclasses
import fcntl
import gzip
import hashlib
import lzma
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from tests.lab.guest import _busybox, _Cpio, cache_dir, resolve_kernel_package

INIT = Path(__file__).with_name("init")
BUILD_FORMAT = "2"  # bump to rebuild every cached kernel tree and initramfs

# What the initramfs needs to mount the host's root over virtio-9p (dependencies follow).
BOOT_MODULES = ("virtio_pci", "9pnet_virtio", "9p")
# Parts of the kernel package kept in the cache (paths below lib/modules/VER/).
KEPT = re.compile(r"kernel/(net|lib|crypto|arch/x86/crypto|drivers/virtio|fs/9p|fs/netfs"
                  r"|fs/fscache)/|kernel/drivers/net/[^/]+$|modules\.(order|builtin(\.modinfo)?)$")


class ImageError(RuntimeError):
    """The VM's boot files could not be built; the message says what is missing."""


@dataclasses.dataclass(frozen=True)
class KernelTree:
    package: str       # linux-image-6.1.0-57-amd64
    version: str       # 6.1.0-57-amd64 (the directory under lib/modules)
    vmlinuz: Path
    modroot: Path      # modprobe -d MODROOT -S VERSION …


@dataclasses.dataclass(frozen=True)
class Image:
    kernel: KernelTree
    initrd: Path


def _run(argv: list[str], timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              check=False, **kw)
    except FileNotFoundError as e:
        raise ImageError(f"`{argv[0]}` not found: run scripts/setup-host.sh") from e


def kernel_package() -> str:
    pkg = resolve_kernel_package()
    if pkg is None:
        _run(["apt-get", "update", "-qq"])
        pkg = resolve_kernel_package()
    if pkg is None:
        raise ImageError("cannot resolve the kernel package: `apt-cache depends "
                         "linux-image-amd64` names no linux-image-*; run `apt-get update` or "
                         "set NETPLUG_LAB_KERNEL_PKG")
    return pkg


def _unpack(deb: Path, dest: Path) -> str:
    """Keep vmlinuz and the KEPT modules of ``deb`` under ``dest``; return the version."""
    p = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    version = None
    assert p.stdout is not None
    with tarfile.open(fileobj=p.stdout, mode="r|") as tar:
        for m in tar:
            if not m.isfile():
                continue
            name = m.name.removeprefix("./")
            if re.fullmatch(r"boot/vmlinuz-.+", name):
                target = dest / "vmlinuz"
            else:
                mm = re.fullmatch(r"(?:usr/)?lib/modules/([^/]+)/(.+)", name)
                if not mm or not KEPT.match(mm.group(2)):
                    continue
                version = mm.group(1)
                target = dest / "lib" / "modules" / version / mm.group(2)
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(m)
            assert src is not None
            with open(target, "wb") as out:
                shutil.copyfileobj(src, out)
    if p.wait() != 0 or version is None or not (dest / "vmlinuz").exists():
        raise ImageError(f"{deb.name}: no boot/vmlinuz-* or lib/modules/* in it")
    return version


def _download(tmp: Path) -> Path:
    """``apt-get download`` the kernel package; once more after ``apt-get update`` if the
    package lists are stale (that version left the mirror, or the ABI name moved on)."""
    for attempt in (1, 2):
        pkg = kernel_package()
        r = _run(["apt-get", "download", pkg], cwd=tmp)
        debs = list(tmp.glob("*.deb"))
        if r.returncode == 0 and debs:
            return debs[0]
        if attempt == 1:
            _run(["apt-get", "update", "-qq"])
    raise ImageError(f"`apt-get download {pkg}` failed (exit {r.returncode}): "
                     f"{r.stderr.strip()}")


def kernel_tree(cache: Path) -> KernelTree:
    deb = os.environ.get("NETPLUG_VLANKERNEL_DEB")
    pkg = Path(deb).name.split("_")[0] if deb else kernel_package()
    dest = cache / "vlankernel" / pkg
    if not (dest / f".built-{BUILD_FORMAT}").exists():
        with tempfile.TemporaryDirectory(prefix="deb-", dir=cache) as tmp:
            path = Path(deb) if deb else _download(Path(tmp))
            dest = cache / "vlankernel" / path.name.split("_")[0]
            _build_tree(path, dest)
    version = (dest / "version").read_text().strip()
    return KernelTree(dest.name, version, dest / "vmlinuz", dest)


def _build_tree(deb: Path, dest: Path) -> None:
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    version = _unpack(deb, dest)
    # kmod looks under lib/modules or, built for a merged /usr (newer Debian), usr/lib/modules.
    (dest / "usr" / "lib").mkdir(parents=True)
    (dest / "usr" / "lib" / "modules").symlink_to("../../lib/modules")
    r = _run(["depmod", "-b", str(dest), version])
    if r.returncode != 0:
        raise ImageError(f"depmod -b {dest} {version} failed: {r.stderr.strip()}")
    (dest / "version").write_text(version + "\n")
    (dest / f".built-{BUILD_FORMAT}").touch()


def show_depends(tree: KernelTree, modules: tuple[str, ...]) -> list[Path]:
    """Module files to insmod, dependencies first (``modprobe --show-depends``)."""
    files: list[Path] = []
    for mod in modules:
        r = _run(["modprobe", "-d", str(tree.modroot), "-S", tree.version, "--show-depends",
                  mod], timeout=60)
        if r.returncode != 0:
            raise ImageError(f"{tree.package} has no module {mod}: {r.stderr.strip()}")
        for line in r.stdout.splitlines():
            words = line.split()
            if words and words[0] == "insmod" and Path(words[1]) not in files:
                files.append(Path(words[1]))
    return files


def _module_bytes(path: Path) -> bytes:
    """The module, uncompressed (busybox's insmod hands the file to the kernel as it is)."""
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):  # Debian 13
        return lzma.decompress(data)
    if not path.name.endswith(".ko"):
        raise ImageError(f"{path.name}: unknown module compression")
    return data


def build(cache: Path | None = None) -> Image:
    """Kernel tree + initramfs, building what the cache lacks (under the cache's lock)."""
    cache = cache or cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".vlankernel.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        tree = kernel_tree(cache)
        busybox = Path(_busybox())
        modules = show_depends(tree, BOOT_MODULES)
        inputs = [("init", INIT), ("bin/busybox", busybox)] + [
            (f"modules/{re.sub(r'[.]ko.*$', '', m.name)}.ko", m) for m in modules]
        h = hashlib.sha256(BUILD_FORMAT.encode())
        for inside, host in inputs:
            h.update(inside.encode() + b"\0" + hashlib.sha256(host.read_bytes()).digest())
        initrd = tree.modroot / f"initrd-{h.hexdigest()[:16]}.img"
        if not initrd.exists():
            cpio = _Cpio()
            for d in ("dev", "proc", "sys", "newroot"):
                cpio.mkdir(d)
            cpio.chardev("dev/console", 5, 1)
            cpio.chardev("dev/null", 1, 3)
            cpio.file("init", INIT.read_bytes(), 0o755)
            cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
            order = []
            for inside, host in inputs[2:]:
                cpio.file(inside, _module_bytes(host), 0o644)
                order.append(Path(inside).stem)
            cpio.file("modules/order", ("\n".join(order) + "\n").encode(), 0o644)
            tmp = initrd.with_name(initrd.name + f".{os.getpid()}.tmp")
            with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
                gz.write(cpio.finish())
            os.replace(tmp, initrd)
            for old in tree.modroot.glob("initrd-*.img"):
                if old != initrd:
                    old.unlink(missing_ok=True)
    return Image(tree, initrd)
