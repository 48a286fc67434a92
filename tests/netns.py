"""Throwaway network namespaces for kernel tests (stdlib + iproute2 only).

Each test gets a fresh namespace ``npt-<pid>-<n>``, with IPv6 off (so nothing in it sends
router solicitations, DAD or MLD and the bridge learns nothing by itself: snapshots stay still)
and is deleted afterwards, together with every device in it.

Running code inside it:
- ``ns.run(argv)``: a subprocess via ``ip netns exec`` (how the hook shim is run, exactly as
  libvirtd would, but in the namespace);
- ``ns.call(fn, *args)``: fork, ``setns(2)`` the child into the namespace, run ``fn`` there and
  return its (pickled) result or re-raise its exception. netplug's code works in the calling
  thread's namespace, so this is how in-process kernel tests run the real ``NetlinkKernel``.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import os
import pickle
import select
import shutil
import signal
import subprocess
import sys
import time
import traceback
from functools import lru_cache
from typing import Any, Callable

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/run/netns"
PREFIX = "npt-"
HOOK_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

_counter = itertools.count()


def setns(name: str) -> None:
    """Move the calling thread into network namespace ``name`` (Python 3.11 has no os.setns)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(os.path.join(NETNS_RUN_DIR, name), os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({name}): {os.strerror(err)}")
    finally:
        os.close(fd)


@lru_cache(maxsize=1)
def unavailable() -> str | None:
    """Why kernel tests cannot run here (a skip reason), or None."""
    if os.geteuid() != 0:
        return "kernel tests need root (they create network namespaces, bridges and taps)"
    for tool in ("ip", "bridge"):
        if shutil.which(tool) is None:
            return f"kernel tests need iproute2's `{tool}` in PATH"
    if not os.path.exists("/dev/net/tun"):
        return "kernel tests need /dev/net/tun (tap devices)"
    probe = f"{PREFIX}probe-{os.getpid()}"
    p = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if p.returncode != 0:
        return f"`ip netns add` does not work here: {p.stderr.strip() or p.returncode}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def cleanup_stale() -> None:
    """Delete namespaces left by earlier runs whose process is gone."""
    try:
        names = os.listdir(NETNS_RUN_DIR)
    except FileNotFoundError:
        return
    for name in names:
        if not name.startswith(PREFIX):
            continue
        pid = name[len(PREFIX):].split("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not os.path.exists(f"/proc/{pid}"):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


class ChildError(AssertionError):
    """An exception raised by ``fn`` inside ``NetNS.call`` (with the child's traceback)."""


class NetNS:
    def __init__(self, name: str):
        self.name = name

    @classmethod
    def create(cls) -> "NetNS":
        ns = cls(f"{PREFIX}{os.getpid()}-{next(_counter)}")
        subprocess.run(["ip", "netns", "add", ns.name], check=True, capture_output=True)
        for key in ("net.ipv6.conf.all.disable_ipv6", "net.ipv6.conf.default.disable_ipv6"):
            ns.run(["sysctl", "-qw", f"{key}=1"], check=False)
        ns.ip("link", "set", "lo", "up")
        return ns

    def delete(self) -> None:
        # Only processes this test started can live in its namespace; stop them by pid.
        p = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True)
        for pid in p.stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)

    # -- commands ----------------------------------------------------------------------------

    def run(self, argv: list[str], *, input: bytes | None = None, env: dict | None = None,
            timeout: float = 30, check: bool = False, cwd: str | None = None
            ) -> subprocess.CompletedProcess:
        p = subprocess.run(["ip", "netns", "exec", self.name, *argv], input=input, env=env,
                           capture_output=True, timeout=timeout, cwd=cwd)
        if check and p.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} in {self.name} failed ({p.returncode}): "
                                 f"{p.stderr.decode(errors='replace').strip()}")
        return p

    def popen(self, argv: list[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.name, *argv], **kw)

    def ip(self, *args: str) -> str:
        p = subprocess.run(["ip", "-n", self.name, *args], capture_output=True, text=True)
        if p.returncode != 0:
            raise AssertionError(f"ip {' '.join(args)}: {p.stderr.strip()}")
        return p.stdout

    def bridge(self, *args: str) -> str:
        p = subprocess.run(["bridge", "-n", self.name, *args], capture_output=True, text=True)
        if p.returncode != 0:
            raise AssertionError(f"bridge {' '.join(args)}: {p.stderr.strip()}")
        return p.stdout

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float = 30, **kw: Any) -> Any:
        """Run ``fn(*args, **kw)`` in a forked child inside the namespace; return its result."""
        status, value = self.fork_call(fn, *args, timeout=timeout, **kw)
        if status != 0 and value is None:
            raise ChildError(f"{fn.__name__} in {self.name}: the child exited with status "
                             f"{status} and no result")
        return value

    def fork_call(self, fn: Callable[..., Any], *args: Any, timeout: float = 30, **kw: Any
                  ) -> tuple[int, Any]:
        """Run ``fn(*args, **kw)`` in a forked child inside the namespace; return (its exit
        status, its result). A child that dies on purpose (os._exit) before returning gives
        (status, None); an exception in it is raised here as ChildError with its traceback."""
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            status = 0
            try:
                os.close(r)
                setns(self.name)
                payload = ("ok", fn(*args, **kw))
            except BaseException as e:  # noqa: BLE001 - everything goes back to the parent
                status = 1
                payload = ("err", (type(e).__name__, str(e), traceback.format_exc()))
            try:
                data = pickle.dumps(payload)
            except Exception as e:  # noqa: BLE001
                status, data = 1, pickle.dumps(("err", ("PicklingError", str(e), "")))
            with os.fdopen(w, "wb") as f:
                f.write(data)
            os._exit(status)
        os.close(w)
        data = bytearray()
        deadline = time.monotonic() + timeout
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    os.kill(pid, signal.SIGKILL)
                    raise AssertionError(f"{fn.__name__} in {self.name} timed out after "
                                         f"{timeout} s")
                ready, _, _ = select.select([r], [], [], left)
                if ready:
                    chunk = os.read(r, 1 << 16)
                    if not chunk:
                        break
                    data += chunk
        finally:
            os.close(r)
            _, wstatus = os.waitpid(pid, 0)
        status = os.waitstatus_to_exitcode(wstatus)
        if not data:
            return status, None
        kind, value = pickle.loads(bytes(data))
        if kind == "err":
            name, msg, tb = value
            raise ChildError(f"{name}: {msg}\n--- in namespace {self.name} ---\n{tb}")
        return status, value

    # -- building topologies -----------------------------------------------------------------

    def add_bridge(self, name: str, up: bool = True) -> None:
        # STP off (the default) and no forward delay: ports forward as soon as they have carrier.
        self.ip("link", "add", name, "type", "bridge", "forward_delay", "0")
        if up:
            self.ip("link", "set", name, "up")

    def add_tap(self, name: str, master: str | None = None, address: str | None = None,
                up: bool = True) -> None:
        self.ip("tuntap", "add", "dev", name, "mode", "tap")
        if address:
            self.ip("link", "set", name, "address", address)
        if master:
            self.ip("link", "set", name, "master", master)
        if up:
            self.ip("link", "set", name, "up")

    def add_veth(self, name: str, peer: str, master: str | None = None,
                 up: bool = True) -> None:
        self.ip("link", "add", name, "type", "veth", "peer", "name", peer)
        if master:
            self.ip("link", "set", name, "master", master)
        if up:
            self.ip("link", "set", name, "up")
            self.ip("link", "set", peer, "up")

    def del_link(self, name: str) -> None:
        self.ip("link", "del", name)

    def fdb_add(self, mac: str, dev: str, *flags: str) -> None:
        """A foreign entry (an admin's): `bridge fdb add MAC dev DEV master static …`."""
        self.bridge("fdb", "add", mac, "dev", dev, "master", *(flags or ("static",)))

    def links(self) -> list[dict]:
        return json.loads(self.ip("-j", "link", "show"))


# -- the installed hook shims, run as libvirtd runs them ---------------------------------------

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def venv_python() -> str:
    cand = os.path.join(REPO, ".venv", "bin", "python")
    return cand if os.path.exists(cand) else sys.executable


def netplug_cli() -> list[str]:
    """How to run the `netplug` command of the interpreter under test."""
    script = os.path.join(os.path.dirname(venv_python()), "netplug")
    return [script] if os.path.exists(script) else [venv_python(), "-m", "libvirt_netplug.cli"]


def _hook_main(kind: str, argv: list[str], data: bytes, config: str, state_dir: str):
    """Runs in a forked child inside a namespace (NetNS.call): hook.main as the shim calls it."""
    import io
    import tempfile

    from libvirt_netplug import hook

    out = tempfile.TemporaryFile()
    os.dup2(out.fileno(), 1)
    err = io.StringIO()
    t0 = time.monotonic()
    rc = hook.main(argv, io.BytesIO(data), err, kind=kind, config=config, state_dir=state_dir)
    elapsed = time.monotonic() - t0
    sys.stdout.flush()
    out.seek(0)
    return rc, out.read(), err.getvalue().encode(), elapsed


class StderrLines:
    """What a hook said on stderr, by level ("netplug qemu-hook: ERROR: …")."""

    stderr: str

    @property
    def lines(self) -> list[str]:
        return self.stderr.splitlines()

    def level(self, level: str) -> list[str]:
        return [ln for ln in self.lines if f": {level}: " in ln]

    @property
    def errors(self) -> list[str]:
        return self.level("ERROR")

    @property
    def warnings(self) -> list[str]:
        return self.level("WARNING")


class HookRun(StderrLines):
    def __init__(self, argv: list[str], rc: int, stdout: bytes, stderr: bytes, elapsed: float):
        self.argv, self.rc, self.stdout, self.elapsed = argv, rc, stdout, elapsed
        self.stderr = stderr.decode(errors="replace")

    def __repr__(self) -> str:
        return (f"HookRun({' '.join(self.argv[1:])}: rc={self.rc} {self.elapsed * 1000:.0f} ms, "
                f"stdout={self.stdout[:200]!r}, stderr=\n{self.stderr})")


class HookRig:
    """Shims installed with `netplug install-hooks` into a temporary hooks dir, bound to the
    project's interpreter and to a config and state dir of their own; run inside ``ns`` with
    libvirtd's environment (HOME, LC_ALL=C, PATH, PWD only)."""

    def __init__(self, ns: NetNS, root: str):
        self.ns = ns
        self.root = root
        self.hooks_dir = os.path.join(root, "hooks")
        self.config = os.path.join(root, "config.toml")
        self.state_dir = os.path.join(root, "state")
        self.shims = {k: os.path.join(self.hooks_dir, f"{k}.d", "libvirt-netplug")
                      for k in ("qemu", "network")}
        self.install()

    def install(self) -> None:
        p = subprocess.run([*netplug_cli(), "install-hooks", "--hooks-dir", self.hooks_dir,
                            "--python", venv_python(), "--config", self.config,
                            "--state-dir", self.state_dir], capture_output=True, text=True)
        if p.returncode != 0:
            raise AssertionError(f"install-hooks failed: {p.stderr}")

    def write_config(self, text: str) -> None:
        with open(self.config, "w") as f:
            f.write(text)

    def argv(self, kind: str, obj: str, op: str, subop: str = "begin") -> list[str]:
        return [self.shims[kind], obj, op, subop, "-"]

    def env_argv(self, argv: list[str]) -> list[str]:
        return ["env", "-i", "HOME=/root", "LC_ALL=C", f"PATH={HOOK_PATH}", "PWD=/", *argv]

    def run(self, kind: str, obj: str, op: str, xml: str | bytes, subop: str = "begin",
            timeout: float = 20) -> HookRun:
        argv = self.argv(kind, obj, op, subop)
        data = xml.encode() if isinstance(xml, str) else xml
        t0 = time.monotonic()
        p = self.ns.run(self.env_argv(argv), input=data, timeout=timeout, cwd="/")
        return HookRun(argv, p.returncode, p.stdout, p.stderr, time.monotonic() - t0)

    def run_ok(self, kind: str, obj: str, op: str, xml: str | bytes, subop: str = "begin",
               allow_errors: bool = False) -> HookRun:
        r = self.run(kind, obj, op, xml, subop)
        assert r.rc == 0, r
        assert r.stdout == b"", r
        assert "Traceback" not in r.stderr, r
        if not allow_errors:
            assert not r.errors, r
        return r

    def run_inprocess(self, kind: str, obj: str, op: str, xml: str | bytes,
                      subop: str = "begin") -> HookRun:
        """The same entry point the shim calls (hook.main, with the shim's config and state
        dir), in a forked child inside the namespace: no interpreter start-up, so long event
        sequences stay fast. stdout (fd 1) is captured too. The shims themselves are exercised
        by ``run``."""
        import importlib

        for mod in ("hook", "model", "plan", "apply", "kernel", "policy", "state", "hooklog"):
            importlib.import_module(f"libvirt_netplug.{mod}")  # once, here: children inherit
        argv = self.argv(kind, obj, op, subop)
        data = xml.encode() if isinstance(xml, str) else xml
        rc, out, err, elapsed = self.ns.call(_hook_main, kind, argv, data, self.config,
                                             self.state_dir)
        return HookRun(argv, rc, out, err, elapsed)

    def spawn(self, kind: str, obj: str, op: str, xml: str | bytes,
              subop: str = "begin") -> subprocess.Popen:
        p = self.ns.popen(self.env_argv(self.argv(kind, obj, op, subop)), cwd="/",
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        return p

    # -- the state dir, read as files (the format is the package's, the reading is ours) -----

    def domain_record(self, name: str) -> dict | None:
        path = os.path.join(self.state_dir, "domains", f"{name}.json")
        try:
            with open(path) as f:
                return json.load(f)
        except FileNotFoundError:
            return None

    def state_files(self) -> list[str]:
        out = []
        for dirpath, _dirs, files in os.walk(self.state_dir):
            for f in files:
                out.append(os.path.relpath(os.path.join(dirpath, f), self.state_dir))
        return sorted(out)
