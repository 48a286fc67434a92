"""The Debian package, on this machine: `make deb` builds it with Debian's Python tooling,
lintian passes it, apt installs it, the hooks are in place and work, remove and purge take
exactly them away. Root; installs and removes the package `libvirt-netplug` on the host (it
refuses to run where that package is installed already, so an operator's install is never
touched).

Proves (issue 12, item 8): the .deb carries the package, the systemd units (naming
/usr/bin/netplug), a man page and bash completion; lintian reports no error or warning; on
install the postinst writes both shims, bound to /usr/bin/python3 -IS with the package's
dist-packages, and they import the hook; netplug --version and doctor run; a reinstall (an
upgrade) keeps the paths the operator gave the hooks; on remove the hooks directory is exactly
as before (including another package's hook beside ours); purge leaves no trace.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HOOKS = Path("/etc/libvirt/hooks")
STATE = Path("/run/libvirt-netplug")  # purge removes it
PKG = "libvirt-netplug"
SYSTEM = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8",
          "DEBIAN_FRONTEND": "noninteractive", "HOME": "/root"}

pytestmark = pytest.mark.e2e


def need(reason: str | None) -> None:
    if reason:
        if os.environ.get("NETPLUG_REQUIRE_ALL") == "1":
            pytest.fail(reason)
        pytest.skip(reason)


def run(*argv: str, check: bool = True, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                       env={**SYSTEM, **kw.pop("env", {})}, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def installed() -> bool:
    p = run("dpkg-query", "-W", "-f=${Status}", PKG, check=False)
    return p.returncode == 0 and "installed" in p.stdout.split()[-1:]


def snapshot(d: Path) -> dict[str, str] | None:
    """Every file and directory under d with its mode and content hash (None: no d)."""
    if not d.exists():
        return None
    out = {}
    for root, dirs, files in os.walk(d):
        for name in dirs + files:
            p = Path(root) / name
            st = p.lstat()
            digest = hashlib.sha256(p.read_bytes()).hexdigest()[:16] if p.is_file() else "dir"
            out[str(p.relative_to(d))] = f"{oct(st.st_mode)} {digest}"
    return out


@pytest.fixture
def state_dir_kept(tmp_path):
    """A state dir on this machine is moved aside for the test and put back after."""
    aside = tmp_path / "state-aside"
    if STATE.exists():
        shutil.move(str(STATE), aside)
    yield
    if aside.exists():
        shutil.rmtree(STATE, ignore_errors=True)
        shutil.move(str(aside), STATE)


@pytest.fixture(scope="module")
def deb():
    need(None if os.geteuid() == 0 else "installing a Debian package needs root")
    need(None if shutil.which("dpkg", path=SYSTEM["PATH"]) else "not a Debian system (no dpkg)")
    need(f"{PKG} is installed on this machine; this test installs and removes it, so it "
         f"leaves an operator's install alone" if installed() else None)
    p = run("make", "--no-print-directory", "-C", str(REPO), "deb", timeout=1200)
    path = Path([ln for ln in p.stdout.splitlines() if ln.endswith(".deb")][-1])
    assert path.name == f"{PKG}_0.1.0_all.deb" and path.exists(), p.stdout
    return path


def test_contents_and_lintian(deb):
    files = run("dpkg-deb", "-c", str(deb)).stdout
    for want in ("./usr/bin/netplug", "./usr/lib/python3/dist-packages/libvirt_netplug/hook.py",
                 "./lib/systemd/system/netplug-agent.service",
                 "./lib/systemd/system/netplug-reconcile.service",
                 "./lib/systemd/system/netplug-reconcile.timer",
                 "./usr/share/man/man1/netplug.1.gz",
                 "./usr/share/bash-completion/completions/netplug",
                 "./usr/share/doc/libvirt-netplug/README.md"):
        assert want in files, want
    p = run("lintian", "--fail-on", "error,warning", str(deb), check=False)
    tags = [ln for ln in p.stdout.splitlines() if ln[:2] in ("E:", "W:")]
    assert p.returncode == 0 and not tags, p.stdout + p.stderr


def test_install_remove_purge_leave_the_hooks_dir_as_before(deb, tmp_path, state_dir_kept):
    before = snapshot(HOOKS)
    try:
        run("apt-get", "install", "-y", "-q", str(deb), timeout=900)
        check_installed()
        # An operator's choice of paths survives a reinstall (what an upgrade runs).
        cfg = tmp_path / "netplug.toml"
        cfg.write_text("")
        run("netplug", "install-hooks", "--config", str(cfg))
        run("apt-get", "install", "-y", "-q", "--reinstall", str(deb), timeout=900)
        assert f"CONFIG = {str(cfg)!r}" in (HOOKS / "qemu.d" / "libvirt-netplug").read_text()
        run("apt-get", "remove", "-y", "-q", PKG, timeout=600)
        assert snapshot(HOOKS) == before
        assert not installed()
        STATE.mkdir(exist_ok=True)  # as a hook would have made it
        run("dpkg", "--purge", PKG)
        assert run("dpkg-query", "-W", PKG, check=False).returncode != 0
        assert not list(Path("/etc/systemd/system").rglob("netplug-*"))
        assert not STATE.exists()
    finally:
        if installed():
            run("dpkg", "--purge", PKG, check=False)
    assert snapshot(HOOKS) == before


def test_another_hook_beside_ours_stays(deb, state_dir_kept):
    """qemu.d exists with another package's hook in it: removing netplug leaves both."""
    before = snapshot(HOOKS)
    created = not (HOOKS / "qemu.d").exists()
    other = HOOKS / "qemu.d" / "50-netplug-test-other"
    (HOOKS / "qemu.d").mkdir(parents=True, exist_ok=True)
    other.write_text("#!/bin/sh\nexit 0\n")
    other.chmod(0o755)
    try:
        with_other = snapshot(HOOKS)
        run("apt-get", "install", "-y", "-q", str(deb), timeout=900)
        assert (HOOKS / "qemu.d" / "libvirt-netplug").exists() and other.exists()
        run("dpkg", "--purge", PKG, timeout=600)
        assert snapshot(HOOKS) == with_other
    finally:
        if installed():
            run("dpkg", "--purge", PKG, check=False)
        other.unlink()
        if created:
            for d in (HOOKS / "qemu.d", HOOKS):
                try:
                    d.rmdir()
                except OSError:
                    pass
    assert snapshot(HOOKS) == before


def check_installed() -> None:
    for kind in ("qemu", "network"):
        shim = HOOKS / f"{kind}.d" / "libvirt-netplug"
        text = shim.read_text()
        assert text.startswith("#!/usr/bin/python3 -IS\n"), text
        assert "sys.path += ['/usr/lib/python3/dist-packages']" in text
        assert os.access(shim, os.X_OK)
    # The shim as libvirtd runs it: bare environment, XML on stdin, an event it ignores.
    p = subprocess.run([str(HOOKS / "qemu.d" / "libvirt-netplug"), "vm1", "prepare", "begin",
                        "-"], input=b"<domain/>", capture_output=True, cwd="/", timeout=60,
                       env={"PATH": "/usr/bin:/bin", "LC_ALL": "C", "HOME": "/root"})
    assert (p.returncode, p.stdout, p.stderr) == (0, b"", b"")
    assert run("netplug", "--version").stdout.startswith(
        "netplug 0.1.0 (Python 3.11") and "/usr/lib/python3/dist-packages" in \
        run("netplug", "--version").stdout
    # doctor (no libvirtd needed for it): the hooks import the hook with their interpreter.
    p = run("netplug", "doctor", "--json", "--connect", "test:///default", "--state-dir",
            "/tmp/netplug-deb-test-state", check=False)
    shutil.rmtree("/tmp/netplug-deb-test-state", ignore_errors=True)
    assert p.returncode in (0, 2), p.stderr
    assert '"check": "hooks"' in p.stdout and "which imports the hook" in p.stdout
    unit = Path("/lib/systemd/system/netplug-agent.service").read_text()
    assert "ExecStart=/usr/bin/netplug agent" in unit
    assert Path("/usr/share/man/man1/netplug.1.gz").exists()
    assert Path("/usr/share/bash-completion/completions/netplug").exists()
