"""Boot Debian's kernel under QEMU (TCG) on the host's own root filesystem and run a job in it.

The guest sees the host's / read-only over virtio-9p (so the project, its .venv and the host's
Python are all there, at the same paths) and one writable 9p share, the run directory, mounted
at /run/netplug-vm: the job script comes in through it, and results (junit xml, the exit
status) go back through it. QEMU's serial console is the job's stdout; it is kept as
``console.log`` in the run directory. A hard host-side timeout kills QEMU.

Why TCG: KVM hangs on the development VMs (FIELD-NOTES). Why the host's root and not an image:
nothing to build or keep in sync, and the code under test is exactly the worktree's.

The guest also has a virtio-net NIC (on a QEMU hub with nothing else on it): a NIC driver
that filters unicast in the device, as a host's real uplink does. QEMU's own view of that NIC's
RX filter (`query-rx-filter`) is an oracle outside the guest kernel; a test inside asks for it
through the run directory (:class:`QmpRelay`, and ``inner/qmp.py`` on the guest side).

Host side only. Entry points: :func:`run_job` (any sh script), :func:`run_pytest`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

from .image import Image, ImageError, build

REPO = Path(__file__).resolve().parents[2]
QEMU = os.environ.get("NETPLUG_VLANKERNEL_QEMU", "qemu-system-x86_64")
GUEST_DIR = "/run/netplug-vm"  # where the run directory appears inside the guest
INNER_TESTS = "tests/vlankernel/inner"
# Loaded before the job runs: module autoloading inside the guest would look for modprobe in
# the initramfs, which has none that knows the cached kernel tree.
TEST_MODULES = ("bridge", "veth", "tun", "macvlan", "macvtap", "dummy", "8021q", "virtio_net")
# The guest's virtio-net NIC: its QEMU id (for query-rx-filter) and MAC.
UPLINK_NIC_ID = "uplinknic"
UPLINK_NIC_MAC = "52:54:00:12:34:56"
KEEP_RUNS = 10
# What the guest prints on its console (tests/vlankernel/init).
MARK = re.compile(r"^NETPLUG-VM (init|job|pytest|done rc=\d+) ([\d.]+)", re.M)


def unavailable() -> str | None:
    """Why the VM cannot run here (a skip reason), or None. Cheap: no building."""
    if os.geteuid() != 0:
        return "the VLAN-kernel VM needs root (9p export of /, network namespaces inside)"
    for tool in (QEMU, "apt-get", "dpkg-deb", "depmod", "modprobe"):
        if shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin:/bin") is None:
            return f"`{tool}` is missing: run scripts/setup-host.sh"
    return None


@dataclasses.dataclass
class Result:
    rc: int | None         # the job's exit status; None: the job never finished
    run_dir: Path          # job, console.log, rc, and whatever the job wrote
    seconds: float         # wall time from QEMU's start to its exit
    timed_out: bool
    marks: dict[str, float]  # guest uptime at init/job/pytest/done (seconds)

    @property
    def console(self) -> str:
        try:
            return (self.run_dir / "console.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def console_tail(self, lines: int = 40) -> str:
        return "\n".join(self.console.splitlines()[-lines:])

    @property
    def boot_seconds(self) -> float | None:
        """Guest uptime when the job started (kernel + initramfs + mounts)."""
        return self.marks.get("job")


def _run_dir(image: Image) -> Path:
    runs = image.kernel.modroot.parent / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    for old in sorted(runs.iterdir())[:-(KEEP_RUNS - 1)]:
        shutil.rmtree(old, ignore_errors=True)
    d = runs / time.strftime(f"%Y%m%d-%H%M%S-{os.getpid()}")
    d.mkdir()
    return d


def qemu_argv(image: Image, run_dir: Path, memory_mib: int, cpus: int,
              qmp_socket: str | None = None) -> list[str]:
    # mitigations=off: speculative-execution defences cost emulated cycles and protect nothing
    # in a throwaway VM; tsc=reliable: no clocksource watchdog fighting TCG's uneven clock.
    append = "console=ttyS0 panic=-1 quiet loglevel=3 mitigations=off tsc=reliable"
    return [
        QEMU, "-accel", "tcg", "-cpu", "max", "-m", str(memory_mib), "-smp", str(cpus),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-serial", "stdio", "-monitor", "none",
        "-kernel", str(image.kernel.vmlinuz), "-initrd", str(image.initrd), "-append", append,
        "-fsdev", "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
        "-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
        "-fsdev", f"local,id=out,path={run_dir},security_model=none",
        "-device", "virtio-9p-pci,fsdev=out,mount_tag=netplugout",
        # romfile=: no iPXE option ROM (nothing boots from this NIC).
        "-netdev", "hubport,id=uplink,hubid=0",
        "-device", f"virtio-net-pci,netdev=uplink,id={UPLINK_NIC_ID},mac={UPLINK_NIC_MAC},"
                   "romfile=",
    ] + (["-qmp", f"unix:{qmp_socket},server=on,wait=off"] if qmp_socket else [])


def run_job(script: str, *, timeout: float = 600, memory_mib: int = 1024, cpus: int = 1,
            image: Image | None = None, on_line: Callable[[str], None] | None = None) -> Result:
    """Boot the VM, run ``script`` with /bin/sh in the host's root (chrooted), power off.
    ``on_line`` sees each console line as it arrives (the console is kept either way)."""
    image = image or build()
    run_dir = _run_dir(image)
    (run_dir / "job").write_text(script)
    # The QMP socket's path must fit sockaddr_un (108 bytes): a short temp dir, not run_dir.
    qmp_dir = tempfile.mkdtemp(prefix="npvm-qmp-")
    argv = qemu_argv(image, run_dir, memory_mib, cpus, qmp_socket=f"{qmp_dir}/qmp.sock")
    (run_dir / "qemu.argv").write_text(shlex.join(argv) + "\n")
    t0 = time.monotonic()
    timed_out = False
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    copier = threading.Thread(target=_keep_console, daemon=True,
                              args=(proc, run_dir / "console.log", on_line))
    copier.start()
    relay = QmpRelay(f"{qmp_dir}/qmp.sock", run_dir, proc)
    relay.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        proc.kill()  # our own QEMU, by its pid
        proc.wait()
    copier.join(10)
    relay.join(10)
    shutil.rmtree(qmp_dir, ignore_errors=True)
    seconds = time.monotonic() - t0
    rc = None
    try:
        rc = int((run_dir / "rc").read_text().strip())
    except (FileNotFoundError, ValueError):
        pass
    text = (run_dir / "console.log").read_text(errors="replace")
    marks = {m.group(1).split()[0]: float(m.group(2)) for m in MARK.finditer(text)}
    return Result(rc, run_dir, seconds, timed_out, marks)


class QmpRelay(threading.Thread):
    """Runs the QMP commands a job asks for: the guest writes ``qmp-request-N.json`` (one
    command) into the run directory, this thread sends it to QEMU and writes the answer to
    ``qmp-reply-N.json`` (renamed into place whole). Only what the guest's tests may read
    about their own VM is allowed (``ALLOWED``). Ends when QEMU does."""

    ALLOWED = frozenset({"query-rx-filter"})
    POLL = 0.05

    def __init__(self, path: str, run_dir: Path, proc: subprocess.Popen):
        super().__init__(daemon=True)
        self.path, self.run_dir, self.proc = path, run_dir, proc

    def run(self) -> None:
        try:
            self._serve()
        except OSError:
            pass  # QEMU went away (the job's end): a waiting test times out and says so

    def _serve(self) -> None:
        sock = self._connect()
        if sock is None:
            return
        with sock, sock.makefile("rwb") as f:
            f.readline()  # the greeting
            self._call(f, {"execute": "qmp_capabilities"})
            while self.proc.poll() is None:
                for req in sorted(self.run_dir.glob("qmp-request-*.json")):
                    self._answer(f, req)
                time.sleep(self.POLL)

    def _connect(self) -> socket.socket | None:
        while self.proc.poll() is None:
            try:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(self.path)
                return s
            except OSError:
                s.close()
                time.sleep(self.POLL)
        return None

    @staticmethod
    def _call(f, command: dict) -> dict:
        f.write(json.dumps(command).encode() + b"\n")
        f.flush()
        while True:
            line = f.readline()
            if not line:
                raise OSError("QMP closed")
            msg = json.loads(line)
            if "return" in msg or "error" in msg:
                return msg  # events in between are skipped

    def _answer(self, f, req: Path) -> None:
        reply = req.with_name(req.name.replace("request", "reply"))
        try:
            command = json.loads(req.read_text())
            if command.get("execute") not in self.ALLOWED:
                answer = {"error": {"desc": f"not allowed here: {command.get('execute')}"}}
            else:
                answer = self._call(f, command)
        except (ValueError, AttributeError) as e:
            answer = {"error": {"desc": f"bad request: {e}"}}
        tmp = reply.with_suffix(".tmp")
        tmp.write_text(json.dumps(answer))
        tmp.rename(reply)
        req.unlink()


def _keep_console(proc: subprocess.Popen, path: Path,
                  on_line: Callable[[str], None] | None) -> None:
    assert proc.stdout is not None
    with open(path, "wb") as log:
        for raw in proc.stdout:
            log.write(raw)
            log.flush()
            if on_line:
                on_line(raw.decode(errors="replace").rstrip("\r\n"))


def venv_python() -> str:
    """The interpreter under test (the worktree's .venv, which the guest sees at this path)."""
    cand = REPO / ".venv" / "bin" / "python"
    return str(cand) if cand.exists() else sys.executable


def pytest_script(image: Image, args: list[str], env: dict[str, str] | None = None) -> str:
    """The job that runs pytest on the inner tests inside the guest."""
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/root", "LC_ALL": "C.UTF-8",
        # The root is read-only: nothing may try to write bytecode or pytest's cache there.
        "PYTHONDONTWRITEBYTECODE": "1",
        "NETPLUG_IN_VLANKERNEL_VM": "1",
        "NETPLUG_VLANKERNEL_MODROOT": str(image.kernel.modroot),
        **(env or {}),
    }
    exports = "\n".join(f"export {k}={shlex.quote(v)}" for k, v in env.items())
    modprobe = shlex.join(["modprobe", "-d", str(image.kernel.modroot), "-a", *TEST_MODULES])
    pytest = shlex.join([venv_python(), "-m", "pytest",
                         "-p", "no:cacheprovider", f"--junitxml={GUEST_DIR}/junit.xml",
                         *args])
    return f"""\
{exports}
cd {shlex.quote(str(REPO))}
{modprobe} || echo "NETPLUG-VM modprobe failed"
echo "NETPLUG-VM pytest $(cut -d' ' -f1 /proc/uptime)"
{pytest}
"""


def precompile() -> None:
    """Write the bytecode the guest would otherwise compile at every boot (its root is
    read-only): the package, the test helpers and the inner tests."""
    import compileall

    for d in ("libvirt_netplug", "tests"):
        compileall.compile_dir(REPO / d, quiet=1, workers=1)


def run_pytest(args: list[str] | None = None, *, timeout: float = 900,
               env: dict[str, str] | None = None, **kw) -> Result:
    image = kw.pop("image", None) or build()
    precompile()
    script = pytest_script(image, args if args is not None else ["-q", INNER_TESTS], env)
    return run_job(script, timeout=timeout, image=image, **kw)


__all__ = ["ImageError", "Result", "run_job", "run_pytest", "unavailable"]
