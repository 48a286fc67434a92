"""The hook entry point, hook.main(), through the fake kernel, and the installed shim.

Proves: nothing ever reaches stdout, for every op of both hooks (libvirt takes a migrate or
restore hook's stdout as the new domain XML), including through the real installed shim;
ignored ops touch nothing; `reconnect` never returns non-zero, even on an internal error
under strict mode; strict mode (config, or a policy's strict='yes') makes start-type ops
fail on errors and only those; the whole event sequence is idempotent against the fake.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from fakes import bridge_iface, domain_xml, hookdata, network_iface, network_xml, \
    networkport_xml, policy_xml
from libvirt_netplug import install

MAC, MAC2 = "52:54:00:00:00:01", "52:54:00:00:00:02"
MANAGED = '[bridge.br0]\npromiscLinks = "no"\n'
STRICT = "strict = true\n" + MANAGED
NET = network_xml("mgd", "nbr0", metadata=policy_xml(promiscLinks="no"))

QEMU_OPS = ["prepare", "start", "started", "reconnect", "migrate", "restore", "attach",
            "stopped", "release"]
NETWORK_OPS = ["start", "started", "port-created", "updated", "port-deleted", "stopped"]


@pytest.fixture
def host(fake):
    fake.add_bridge("br0")
    fake.add_tap("vnet0", "br0", guest=MAC)
    fake.add_tap("vnet1", "br0", guest=MAC2)
    fake.add_bridge("nbr0")
    fake.add_tap("vnet10", "nbr0", guest="52:54:00:00:02:01")
    return fake


def vm1() -> str:
    return domain_xml("vm1", [bridge_iface("br0", "vnet0", MAC, "net0"),
                              bridge_iface("br0", "vnet1", MAC2, "net1")])


def vm2() -> str:
    return domain_xml("vm2", [network_iface("mgd", "nbr0", "vnet10", "52:54:00:00:02:01",
                                            "net0")])


def port() -> str:
    return hookdata(NET, networkport_xml("vm2", "52:54:00:00:02:01"))


def state(fake, tap):
    link = fake.links()[tap]
    return ({e.mac for e in fake.fdb(link.master, tap) if e.state == "static"},
            (link.learning, link.flood))


@pytest.mark.parametrize("op", QEMU_OPS)
def test_qemu_hook_never_writes_stdout(run_hook, host, op):
    r = run_hook("qemu", "vm1", op, vm1(), config=MANAGED)
    assert r.rc == 0 and r.stdout == ""


@pytest.mark.parametrize("op", NETWORK_OPS)
def test_network_hook_never_writes_stdout(run_hook, host, op):
    r = run_hook("network", "mgd", op, port() if op.startswith("port") else hookdata(NET))
    assert r.rc == 0 and r.stdout == ""


@pytest.mark.parametrize("op", ["prepare", "migrate", "restore", "attach"])
def test_ignored_ops_touch_nothing(run_hook, host, state_path, op):
    before = host.snapshot()
    r = run_hook("qemu", "vm1", op, vm1(), config=MANAGED)
    assert (r.rc, r.stderr, r.stdout) == (0, "", "")
    assert host.snapshot() == before and host.journal == [] and not state_path.exists()


def test_start_manages_and_stopped_restores(run_hook, host, state_path):
    pristine = host.snapshot()
    r = run_hook("qemu", "vm1", "start", vm1(), config=MANAGED)
    assert r.rc == 0 and r.errors == [] and r.warnings == []
    assert state(host, "vnet0") == ({MAC}, (False, False))
    assert state(host, "vnet1") == ({MAC2}, (False, False))
    rec = json.loads((state_path / "domains" / "vm1.json").read_text())
    assert sorted(rec["ports"]) == ["vnet0", "vnet1"]
    assert rec["ports"]["vnet0"]["fdb"] == [[MAC, None]]
    r = run_hook("qemu", "vm1", "stopped", vm1(), subop="end", config=MANAGED)
    assert r.rc == 0 and r.errors == []
    assert host.snapshot() == pristine
    assert not (state_path / "domains" / "vm1.json").exists()


def test_every_event_twice_is_idempotent(run_hook, host):
    seq = [("network", "mgd", "start", hookdata(NET)),
           ("network", "mgd", "started", hookdata(NET)),
           ("qemu", "vm2", "prepare", vm2()),
           ("network", "mgd", "port-created", port()),
           ("qemu", "vm1", "start", vm1()), ("qemu", "vm2", "start", vm2()),
           ("qemu", "vm1", "started", vm1()), ("qemu", "vm2", "started", vm2()),
           ("qemu", "vm1", "reconnect", vm1()), ("qemu", "vm2", "reconnect", vm2()),
           ("network", "mgd", "updated", hookdata(NET)),
           ("network", "mgd", "port-created", port()),
           ("qemu", "vm2", "stopped", vm2()), ("network", "mgd", "port-deleted", port()),
           ("qemu", "vm2", "release", vm2()), ("network", "mgd", "stopped", hookdata(NET)),
           ("qemu", "vm1", "stopped", vm1()), ("qemu", "vm1", "release", vm1())]
    pristine = host.snapshot()
    for kind, obj, op, xml in seq:
        first = run_hook(kind, obj, op, xml, config=MANAGED)
        snap = host.snapshot()
        n = len(host.journal)
        second = run_hook(kind, obj, op, xml, config=MANAGED)
        assert first.rc == second.rc == 0 and first.errors == second.errors == []
        assert host.snapshot() == snap, f"replaying {kind} {op} changed the kernel"
        assert len(host.journal) == n, f"replaying {kind} {obj} {op} wrote to the kernel"
    assert host.snapshot() == pristine


# -- reconnect and strict mode -----------------------------------------------------------------


@pytest.mark.parametrize("config", [MANAGED, STRICT], ids=["default", "strict"])
def test_reconnect_never_fails_even_on_an_internal_error(run_hook, host, config):
    host.fail("replace_fdb", "vnet0", RuntimeError("a programmer error"), times=10)
    r = run_hook("qemu", "vm1", "reconnect", vm1(), config=config)
    assert r.rc == 0 and r.stdout == ""
    assert any("internal error" in ln for ln in r.errors)


@pytest.mark.parametrize("op,strict_rc", [("start", 1), ("started", 1), ("reconnect", 0),
                                          ("stopped", 0), ("release", 0)])
def test_internal_error_fails_only_strict_start_ops(run_hook, host, op, strict_rc):
    for config, want in ((MANAGED, 0), (STRICT, strict_rc)):
        if op in ("stopped", "release"):  # give the cleanup something to do
            assert run_hook("qemu", "vm1", "start", vm1(), config=MANAGED).rc == 0
        for method in ("replace_fdb", "set_port_flags", "delete_fdb"):
            host.fail(method, "vnet0", RuntimeError("boom"))
        r = run_hook("qemu", "vm1", op, vm1(), config=config)
        assert r.rc == want, (op, config, r)
        assert r.stdout == "" and any("internal error" in ln for ln in r.errors), r


def _conflict(host):
    host.add_veth("up0", "br0")
    host.add_static("up0", MAC)  # someone else's static entry for the guest's MAC


@pytest.mark.parametrize("op,want", [("start", 1), ("started", 1), ("reconnect", 0)])
def test_strict_config_fails_start_on_an_error(run_hook, host, op, want):
    _conflict(host)
    r = run_hook("qemu", "vm1", op, vm1(), config=STRICT)
    assert r.rc == want and r.stdout == ""
    assert "is already a static entry on port up0" in r.errors[0]
    if want:
        assert "strict mode" in r.errors[-1]
    # the conflicting port is untouched, the other one is managed
    assert state(host, "vnet0") == (set(), (True, True))
    assert state(host, "vnet1") == ({MAC2}, (False, False))


def test_default_mode_never_fails_start(run_hook, host):
    _conflict(host)
    r = run_hook("qemu", "vm1", "start", vm1(), config=MANAGED)
    assert r.rc == 0 and len(r.errors) == 1


def test_strict_policy_in_domain_metadata(run_hook, host):
    _conflict(host)
    xml = domain_xml("vm1", [bridge_iface("br0", "vnet0", MAC, "net0")],
                     metadata=policy_xml(strict="yes"))
    assert run_hook("qemu", "vm1", "start", xml, config=MANAGED).rc == 1


def test_strict_policy_in_network_metadata(run_hook, host):
    strict_net = network_xml("mgd", "nbr0", metadata=policy_xml(promiscLinks="no",
                                                                strict="yes"))
    host.add_veth("up1", "nbr0")
    host.add_static("up1", "52:54:00:00:02:01")
    assert run_hook("network", "mgd", "started", hookdata(strict_net)).rc == 0
    assert run_hook("qemu", "vm2", "start", vm2()).rc == 1
    assert run_hook("qemu", "vm2", "reconnect", vm2()).rc == 0


def test_argv_and_xml_disagree_on_the_name(run_hook, host):
    r = run_hook("qemu", "other", "start", vm1(), config=MANAGED)
    assert r.rc == 0 and len(r.warnings) == 1 and "names domain other" in r.warnings[0]
    assert state(host, "vnet0") == ({MAC}, (False, False))


def test_network_stopped_forgets_only_its_ports(run_hook, host, state_path):
    run_hook("network", "mgd", "started", hookdata(NET), config=MANAGED)
    run_hook("qemu", "vm1", "start", vm1(), config=MANAGED)
    run_hook("qemu", "vm2", "start", vm2(), config=MANAGED)
    run_hook("network", "mgd", "stopped", hookdata(NET), subop="end", config=MANAGED)
    assert not (state_path / "networks" / "mgd.json").exists()
    assert not (state_path / "domains" / "vm2.json").exists()
    assert json.loads((state_path / "domains" / "vm1.json").read_text())["ports"]


def test_state_dir_unusable_is_one_error_and_exit_0(run_hook, host, state_path):
    state_path.write_text("a file where the state dir should be")
    r = run_hook("qemu", "vm1", "start", vm1(), config=MANAGED)
    assert r.rc == 0 and r.stdout == "" and len(r.lines) == 1 and "state dir" in r.lines[0]
    assert "Traceback" not in r.stderr


# -- the real installed shim (no root needed for ops that never reach the kernel) ------------


@pytest.fixture
def shims(tmp_path):
    from netns import venv_python

    paths = install.install(str(tmp_path / "hooks"), venv_python(),
                            str(tmp_path / "config.toml"), str(tmp_path / "state"))
    return {os.path.basename(os.path.dirname(d.path)).split(".")[0]: d.path for d in paths}


def run_shim(path, args, data: bytes):
    env = {"HOME": "/root", "LC_ALL": "C", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PWD": "/"}
    return subprocess.run([path, *args], input=data, capture_output=True, env=env, cwd="/",
                          timeout=30)


UNMANAGED_VM = domain_xml("vm9", [bridge_iface("npt-nobr0", "npt-notap0", MAC)])


@pytest.mark.parametrize("op", ["prepare", "migrate", "restore", "stopped", "release",
                                "start", "reconnect", "bogus"])
@pytest.mark.parametrize("doc", ["valid", "malformed", "huge"])
def test_installed_qemu_shim_keeps_stdout_empty(shims, op, doc):
    data = {"valid": UNMANAGED_VM.encode(), "malformed": b"<domain><name>",
            "huge": UNMANAGED_VM.encode() + b" " * (11 * 1024 * 1024)}[doc]
    p = run_shim(shims["qemu"], ["vm9", op, "begin", "-"], data)
    assert p.returncode == 0, p.stderr
    assert p.stdout == b""
    assert b"Traceback" not in p.stderr
    if op in ("prepare", "migrate", "restore"):
        assert p.stderr == b""


def test_installed_network_shim_keeps_stdout_empty(shims, tmp_path):
    for op in ("start", "started", "updated", "stopped"):
        p = run_shim(shims["network"], ["plain", op, "begin", "-"],
                     hookdata(network_xml("plain", "npt-nobr0")).encode())
        assert p.returncode == 0 and p.stdout == b"" and p.stderr == b"", p.stderr


def test_shim_entry_point_sends_any_stray_print_to_stderr():
    """hook.run() (what the shims call) points fd 1 at stderr before anything runs, so even a
    stray print() in some code path cannot replace a migrating domain's XML."""
    from netns import venv_python

    code = ("import sys, libvirt_netplug.hook as h\n"
            "def main(*a, **k):\n"
            "    print('stray print'); sys.stdout.flush()\n"
            "    import os; os.write(1, b'stray write\\n'); return 0\n"
            "h.main = main\n"
            "sys.argv = ['qemu', 'vm1', 'migrate', 'begin', '-']\n"
            "sys.exit(h.run('qemu'))\n")
    p = subprocess.run([venv_python(), "-I", "-c", code], input=b"<domain/>",
                       capture_output=True, timeout=30)
    assert p.returncode == 0, p.stderr
    assert p.stdout == b""
    assert b"stray print" in p.stderr and b"stray write" in p.stderr
