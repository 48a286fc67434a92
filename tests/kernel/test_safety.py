"""Never break a bridge (issue 10): what hostile domain XML, a broken config, a killed hook, an
untrusted state dir or a stuck stderr can make netplug do — against the real kernel, with the
installed shims run as libvirtd runs them, checked through the oracle.

Threat model (SECURITY.md): a domain's XML is written by whoever may define domains, who need
not be root; nothing in it may let one guest reach the host's or another guest's traffic, and
an invalid config or policy fails closed: it never turns isolation off for running guests.
"""

from __future__ import annotations

import io
import os
import subprocess

import pytest

import oracle
from fakes import bridge_iface, domain_xml, guest_mac, hookdata, network_iface, network_xml, \
    policy_xml, tap_mac
from netns import HOOK_PATH, venv_python

from .topo import CONFIG, HostWorld

BR_ADDR = "02:00:00:00:00:b0"
UP_ADDR = "02:00:00:00:00:c0"
A, B = guest_mac(1), guest_mac(2)


def world_with_fixed_addresses(ns) -> HostWorld:
    world = HostWorld(ns, ntaps=2).build()
    ns.ip("link", "set", "br0", "address", BR_ADDR)
    ns.ip("link", "set", "up0", "address", UP_ADDR)
    return world


def evil_xml(mac: str, tap: str, bridge: str = "br0", name: str = "evil") -> str:
    return domain_xml(name, [bridge_iface(bridge, tap, mac, "net0")])


def errors_naming(run, *words) -> list[str]:
    return [ln for ln in run.errors if all(w in ln for w in words)]


# -- 1. addresses netplug must never claim ------------------------------------------------------


@pytest.mark.parametrize("owner", ["bridge", "uplink", "admin-permanent", "guest-tap-address"])
def test_a_host_address_as_guest_mac_is_refused_and_never_moved(ns, hooks, owner):
    """A guest MAC equal to the bridge's own address (or the uplink's, an admin's permanent
    entry, another tap's own address) must never move that entry onto the guest's tap (the
    host would be cut off the bridge and the guest would get its traffic) nor, at stop, be
    deleted."""
    world = world_with_fixed_addresses(ns)
    hooks.write_config(CONFIG)
    if owner == "admin-permanent":
        ns.bridge("fdb", "add", "02:00:00:00:0e:01", "dev", "up0", "master", "permanent")
    mac = {"bridge": BR_ADDR, "uplink": UP_ADDR, "admin-permanent": "02:00:00:00:0e:01",
           "guest-tap-address": tap_mac(world.macs["vnet1"])}[owner]
    where_before = oracle.where_is(ns.name, mac)
    assert where_before and all(state == "permanent" for _p, state in where_before)
    ns.add_tap("vnet7", "br0", address=tap_mac(mac))  # the tap libvirt would make for it
    hooks.run_ok("qemu", "vm1", "start", world.xml())
    pristine = oracle.snapshot(ns.name)

    r = hooks.run("qemu", "evil", "start", evil_xml(mac, "vnet7"))
    assert r.rc == 0 and r.stdout == b"" and "Traceback" not in r.stderr, r
    assert errors_naming(r, "domain evil", mac, "host-local" if owner != "bridge" else
                         "bridge br0"), r
    assert oracle.where_is(ns.name, mac) == where_before
    assert oracle.port_flags(ns.name, "vnet7") == (True, True)
    for op in ("stopped", "release"):
        hooks.run_ok("qemu", "evil", op, evil_xml(mac, "vnet7"), subop="end")
    assert oracle.diff(pristine, oracle.snapshot(ns.name)) == []


def test_another_guests_static_mac_is_refused_naming_its_domain(ns, hooks):
    world = world_with_fixed_addresses(ns)
    hooks.write_config(CONFIG)
    hooks.run_ok("qemu", "vm1", "start", world.xml())
    pristine = oracle.snapshot(ns.name)
    ns.add_tap("vnet7", "br0", address=tap_mac(A))  # a second tap for vm1's MAC
    r = hooks.run("qemu", "evil", "start", evil_xml(A, "vnet7"))
    assert errors_naming(r, "domain evil", A, "vnet0", "domain vm1"), r
    hooks.run_ok("qemu", "evil", "stopped", evil_xml(A, "vnet7"), subop="end")
    ns.del_link("vnet7")
    assert oracle.diff(pristine, oracle.snapshot(ns.name)) == []


# -- 2. which ports netplug may touch -----------------------------------------------------------


@pytest.mark.parametrize("target", ["up0", "br0", "loose", "vnet1"])
def test_target_dev_naming_a_port_that_is_not_this_guests_tap_changes_nothing(ns, hooks,
                                                                               target):
    """<target dev> is whatever the domain's author wrote: the uplink, the bridge itself, a
    veth that is no port, or another domain's tap must not get an entry or lose flooding —
    neither at start nor when the impostor stops."""
    world = world_with_fixed_addresses(ns)
    hooks.write_config(CONFIG)
    ns.add_veth("loose", "loosep")
    hooks.run_ok("qemu", "vm1", "start", world.xml())
    pristine = oracle.snapshot(ns.name)
    # The impostor uses the MAC that passes every other check for that device.
    mac = {"up0": "52:54:00:00:0c:01", "br0": "52:54:00:00:0c:02", "loose": "52:54:00:00:0c:03",
           "vnet1": world.macs["vnet1"]}[target]
    if target in ("up0", "loose"):
        ns.ip("link", "set", target, "address", tap_mac(mac))
        pristine = oracle.snapshot(ns.name)
    xml = evil_xml(mac, target)
    r = hooks.run("qemu", "evil", "start", xml)
    assert r.rc == 0 and r.stdout == b"" and "Traceback" not in r.stderr, r
    assert errors_naming(r, "domain evil", target), r
    assert oracle.diff(pristine, oracle.snapshot(ns.name)) == []
    hooks.run_ok("qemu", "evil", "reconnect", xml, allow_errors=True)
    for op in ("stopped", "release"):
        hooks.run_ok("qemu", "evil", op, xml, subop="end")
    assert oracle.diff(pristine, oracle.snapshot(ns.name)) == []
    if target == "vnet1":  # vm1's record still owns its port
        assert "vnet1" in hooks.domain_record("vm1")["ports"]


# -- 3. fail closed ---------------------------------------------------------------------------


@pytest.mark.parametrize("broken", ['bogus = 1\n', '[bridge.br0]\npromiscLinks = "maybe"\n',
                                    '[bridge.br0\n'], ids=["unknown-key", "bad-value",
                                                          "invalid-toml"])
def test_invalid_config_then_reconnect_keeps_isolation(ns, hooks, broken):
    world = HostWorld(ns, ntaps=2).build()
    hooks.write_config(CONFIG)
    hooks.run_ok("qemu", "vm1", "start", world.xml())
    managed = oracle.snapshot(ns.name)
    hooks.write_config(CONFIG + broken if broken != '[bridge.br0\n' else broken)
    runs = [hooks.run("qemu", "vm1", "reconnect", world.xml()) for _ in range(2)]
    assert all(r.rc == 0 and "Traceback" not in r.stderr for r in runs), runs
    assert oracle.diff(managed, oracle.snapshot(ns.name)) == []
    # Said once (libvirtd restarts send a reconnect per domain: not one error each time).
    assert len([ln for r in runs for ln in r.errors if "config" in ln]) == 1, runs
    # The guest stops while the config is still broken: its cleanup needs no policy.
    hooks.run_ok("qemu", "vm1", "stopped", world.xml(), subop="end", allow_errors=True)
    for tap in world.managed:
        assert oracle.static_macs(ns.name, tap) == {}
        assert oracle.port_flags(ns.name, tap) == (True, True)


def test_invalid_domain_policy_at_stop_still_cleans_up(ns, hooks):
    world = HostWorld(ns, ntaps=2).build()
    hooks.write_config(CONFIG)
    pristine = oracle.snapshot(ns.name)
    hooks.run_ok("qemu", "vm1", "start", world.xml())
    bad = world.xml().replace('promiscLinks="yes"', 'promiscLinks="perhaps"')
    assert bad != world.xml()
    r = hooks.run("qemu", "vm1", "reconnect", bad)  # kept as it is
    assert r.rc == 0 and len(r.errors) == 1, r
    for tap, mac in world.macs.items():
        assert oracle.static_macs(ns.name, tap) == {mac: []}
    r = hooks.run("qemu", "vm1", "stopped", bad, subop="end")
    assert r.rc == 0 and "cleaning up" in r.stderr, r
    assert oracle.diff(pristine, oracle.snapshot(ns.name)) == []


def test_invalid_network_policy_update_keeps_its_ports(ns, hooks):
    ns.add_bridge("nbr0")
    ns.add_tap("vnet5", "nbr0", address=tap_mac(A))
    good = network_xml("mgd", "nbr0", metadata=policy_xml(promiscLinks="no"))
    bad = network_xml("mgd", "nbr0", metadata=policy_xml(promiscLinks="nah"))
    xml = domain_xml("vm1", [network_iface("mgd", "nbr0", "vnet5", A, "net0")])
    hooks.run_ok("network", "mgd", "started", hookdata(good))
    hooks.run_ok("qemu", "vm1", "start", xml)
    managed = oracle.snapshot(ns.name)
    r = hooks.run("network", "mgd", "updated", hookdata(bad))
    assert r.rc == 0 and r.errors, r
    hooks.run_ok("qemu", "vm1", "reconnect", xml, allow_errors=True)
    assert oracle.diff(managed, oracle.snapshot(ns.name)) == []


# -- 4. crash consistency ------------------------------------------------------------------------


def _killed_hook(argv, data, config, state_dir, kill_after):
    """In a forked child in the namespace: hook.main with the process dying (as from SIGKILL:
    no cleanup, no finally) right after its kill_after-th kernel write request."""
    from libvirt_netplug import hook, netlink

    real = netlink.Netlink.request
    count = [0]

    def request(self, *a, **kw):
        real(self, *a, **kw)
        count[0] += 1
        if count[0] >= kill_after:
            os._exit(137)

    netlink.Netlink.request = request
    rc = hook.main(argv, io.BytesIO(data), io.StringIO(), kind="qemu", config=config,
                   state_dir=state_dir)
    return rc, count[0]


def test_a_hook_killed_after_any_kernel_request_leaves_nothing_stop_cannot_undo(ns, hooks):
    """Kill `start` after its 1st, 2nd, … kernel request; `stopped` must then leave the
    kernel exactly as before the start (records are written before the kernel changes)."""
    world = HostWorld(ns, ntaps=2).build()
    hooks.write_config(CONFIG)
    pristine = oracle.snapshot(ns.name)
    xml = world.xml().encode()
    argv = hooks.argv("qemu", "vm1", "start")
    total = None
    k = 1
    while total is None or k <= total:
        status, out = ns.fork_call(_killed_hook, argv, xml, hooks.config, hooks.state_dir, k)
        if out is not None:
            total = out[1]  # ran to the end: that many requests in all
            assert k > total
            break
        assert status == 137, status  # the child died as killed, with nothing to say
        assert oracle.diff(pristine, oracle.snapshot(ns.name)) != []  # it did change things
        stop = hooks.run_ok("qemu", "vm1", "stopped", world.xml(), subop="end")
        assert oracle.diff(pristine, oracle.snapshot(ns.name)) == [], (k, stop)
        k += 1
    assert total is not None and total >= 4  # two entries and two ports' flags at least
    assert k > 4


def _start_on_a_state_dir_that_fails(argv, data, config, state_dir, err):
    """hook.main in a forked child whose state dir really is full (ENOSPC: a 64 KiB tmpfs,
    filled) or read-only (EROFS: a read-only bind mount), in a mount namespace of its own."""
    import ctypes
    import errno as errno_mod
    from libvirt_netplug import hook

    libc = ctypes.CDLL(None, use_errno=True)

    def check(rc, what):
        if rc != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"{what}: {os.strerror(e)}")

    CLONE_NEWNS, MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = (
        0x00020000, 1, 32, 4096, 16384, 1 << 18)
    check(libc.unshare(CLONE_NEWNS), "unshare")
    check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "make / private")
    os.makedirs(state_dir, mode=0o755, exist_ok=True)
    sd = state_dir.encode()
    if err == "ENOSPC":
        check(libc.mount(b"tmpfs", sd, b"tmpfs", 0, b"size=64k,mode=0755"), "mount tmpfs")
        fd = os.open(os.path.join(state_dir, "filler"), os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno_mod.ENOSPC, e
        finally:
            os.close(fd)
    else:
        check(libc.mount(sd, sd, None, MS_BIND, None), "bind")
        check(libc.mount(None, sd, None, MS_REMOUNT | MS_BIND | MS_RDONLY, None), "remount ro")
    stderr = io.StringIO()
    rc = hook.main(argv, io.BytesIO(data), stderr, kind="qemu", config=config,
                   state_dir=state_dir)
    return rc, stderr.getvalue()


@pytest.mark.parametrize("err", ["ENOSPC", "EROFS"])
def test_state_dir_that_cannot_be_written_means_nothing_is_applied(ns, hooks, err):
    """Write-ahead: a record that cannot be written means no kernel change it would name."""
    world = HostWorld(ns, ntaps=2).build()
    hooks.write_config(CONFIG)
    pristine = oracle.snapshot(ns.name)
    rc, stderr = ns.call(_start_on_a_state_dir_that_fails, hooks.argv("qemu", "vm1", "start"),
                         world.xml().encode(), hooks.config, hooks.state_dir, err)
    want = "No space left on device" if err == "ENOSPC" else "Read-only file system"
    assert rc == 0 and want in stderr and "Traceback" not in stderr, stderr
    assert oracle.diff(pristine, oracle.snapshot(ns.name)) == []


# -- 5. trust nothing in the state dir ------------------------------------------------------------


def test_a_state_dir_others_can_write_is_refused(ns, hooks):
    world = HostWorld(ns, ntaps=1).build()
    hooks.write_config(CONFIG)
    os.makedirs(hooks.state_dir, exist_ok=True)
    os.chmod(hooks.state_dir, 0o777)
    pristine = oracle.snapshot(ns.name)
    for op in ("start", "reconnect"):
        r = hooks.run("qemu", "vm1", op, world.xml())
        assert r.rc == 0 and r.stdout == b"" and "Traceback" not in r.stderr, r
        assert errors_naming(r, hooks.state_dir, "not be writable by others"), r
    assert oracle.diff(pristine, oracle.snapshot(ns.name)) == []


def test_the_lock_file_is_never_followed_through_a_symlink(ns, hooks, tmp_path):
    world = HostWorld(ns, ntaps=1).build()
    hooks.write_config(CONFIG)
    os.makedirs(hooks.state_dir, mode=0o755, exist_ok=True)
    victim = tmp_path / "victim"
    os.symlink(victim, os.path.join(hooks.state_dir, "lock"))
    pristine = oracle.snapshot(ns.name)
    r = hooks.run("qemu", "vm1", "start", world.xml())
    assert r.rc == 0 and errors_naming(r, "lock"), r
    assert not victim.exists()  # O_CREAT through the link would have made it
    assert oracle.diff(pristine, oracle.snapshot(ns.name)) == []


@pytest.mark.parametrize("corrupt", ['{"ports": {', '{"ports": {"vnet0": {"mac": 5}}}',
                                     '[1, 2]'], ids=["truncated", "wrong-shape", "not-object"])
def test_a_corrupt_record_affects_only_its_own_domain(ns, hooks, corrupt):
    world = HostWorld(ns, ntaps=2).build()
    hooks.write_config(CONFIG)
    os.makedirs(os.path.join(hooks.state_dir, "domains"), mode=0o755, exist_ok=True)
    with open(os.path.join(hooks.state_dir, "domains", "vm9.json"), "w") as f:
        f.write(corrupt)
    os.chmod(os.path.join(hooks.state_dir, "domains", "vm9.json"), 0o600)
    hooks.run_ok("qemu", "vm1", "start", world.xml())  # another domain: not affected
    for tap, mac in world.macs.items():
        assert oracle.static_macs(ns.name, tap) == {mac: []}
    r = hooks.run("qemu", "vm9", "start", domain_xml("vm9", []))
    assert r.rc == 0 and "Traceback" not in r.stderr and errors_naming(r, "vm9"), r
    hooks.run_ok("qemu", "vm1", "stopped", world.xml(), subop="end")
    for tap in world.managed:
        assert oracle.static_macs(ns.name, tap) == {}


# -- 6. bounded time, always -----------------------------------------------------------------


def test_a_stderr_pipe_nobody_reads_does_not_hold_the_hook(ns, hooks):
    """libvirtd reads a hook's stderr; if nobody does and the pipe is full, the hook must still
    finish (and release the lock) instead of blocking on its first log line — and its alarm
    handler must not block on it either."""
    world = HostWorld(ns, ntaps=2).build()
    hooks.write_config(CONFIG)
    r_fd, w_fd = os.pipe()
    os.set_blocking(w_fd, False)
    try:
        while True:
            os.write(w_fd, b"x" * 4096)
    except BlockingIOError:
        pass
    os.set_blocking(w_fd, True)
    p = ns.popen(hooks.env_argv(hooks.argv("qemu", "vm1", "start")), cwd="/",
                 stdin=subprocess.PIPE, stdout=w_fd, stderr=w_fd)
    try:
        # The hang bound (the hook takes well under a second) stays below the hook's 30 s
        # alarm: a hook blocked on stderr times out here instead of being ended by its alarm.
        p.communicate(world.xml().encode(), timeout=25)
    finally:
        if p.poll() is None:
            p.kill()
        os.close(w_fd)
        os.close(r_fd)
    assert p.returncode == 0
    for tap, mac in world.macs.items():  # and it did its work
        assert oracle.static_macs(ns.name, tap) == {mac: []}
    hooks.run_ok("qemu", "vm1", "reconnect", world.xml())  # the lock is free


# -- 7. reconnect never fails -------------------------------------------------------------------


@pytest.mark.parametrize("closed", ["<&-", ">&-", "2>&-", "<&- >&- 2>&-"])
def test_reconnect_with_standard_fds_closed_exits_0(ns, hooks, closed):
    world = HostWorld(ns, ntaps=1).build()
    hooks.write_config(CONFIG)
    hooks.run_ok("qemu", "vm1", "start", world.xml())
    xml_path = os.path.join(hooks.root, "vm1.xml")
    with open(xml_path, "w") as f:
        f.write(world.xml())
    shim = " ".join(hooks.argv("qemu", "vm1", "reconnect"))
    redirect = closed if "<&-" in closed else f"<{xml_path} {closed}"
    p = ns.run(["env", "-i", "HOME=/root", "LC_ALL=C", f"PATH={HOOK_PATH}", "PWD=/", "sh", "-c",
                f"exec {shim} {redirect}"], cwd="/")
    assert p.returncode == 0, p


# -- 8. bounded input ----------------------------------------------------------------------------


def test_a_huge_or_deep_config_is_one_error_and_holds_the_ports(ns, hooks):
    world = HostWorld(ns, ntaps=1).build()
    hooks.write_config(CONFIG)
    hooks.run_ok("qemu", "vm1", "start", world.xml())
    managed = oracle.snapshot(ns.name)
    # Refused for what it is, before a parse: a 10 MB config used to take 12 s per hook.
    for text, why in (("#" * (10 * 1024 * 1024), "over 256 KiB"),
                      ("a = " + "[" * 20000 + "]" * 20000, "nested too deeply")):
        hooks.write_config(text)
        r = hooks.run("qemu", "vm1", "reconnect", world.xml())
        assert r.rc == 0 and "Traceback" not in r.stderr and len(r.lines) <= 1, r
        assert r.lines and why in r.lines[0], r  # the one error names the limit it hit
        assert oracle.diff(managed, oracle.snapshot(ns.name)) == []


def test_plan_reads_at_most_its_limit(tmp_path):
    p = subprocess.run([venv_python(), "-m", "libvirt_netplug.cli", "plan", "--domain-xml",
                        "/dev/zero"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr.count("\n") == 1 and "over the 10 MB limit" in p.stderr, p.stderr
