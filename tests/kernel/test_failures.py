"""Taps that vanish, writes that fail, strict mode: against the real kernel.

Proves: a tap missing at `start` or deleted between observation and apply (real ENODEV from
the kernel) gives exactly one one-line error naming the domain and interface, within a second,
no traceback; the other ports are still managed; a port is never left half-applied (a failed
write rolls back the FDB entry already added); strict mode turns such errors into a failed
`start` but never a failed `reconnect`.
"""

from __future__ import annotations

import errno
import io
import subprocess

import oracle
from fakes import bridge_iface, domain_xml, guest_mac, tap_mac

from .topo import CONFIG, HostWorld

A, B, C = guest_mac(1), guest_mac(2), guest_mac(3)


def three_taps(ns):
    ns.add_bridge("br0")
    ns.add_veth("up0", "up0p", master="br0")
    for i, mac in enumerate((A, B, C)):
        ns.add_tap(f"vnet{i}", "br0", address=tap_mac(mac))


def vm1(taps=("vnet0", "vnet1", "vnet2")) -> str:
    return domain_xml("vm1", [bridge_iface("br0", t, m, f"net{i}")
                              for i, (t, m) in enumerate(zip(taps, (A, B, C)))])


def state_of(ns, tap, mac):
    return oracle.static_macs(ns.name, tap), oracle.port_flags(ns.name, tap)


MANAGED = lambda mac: ({mac: []}, (False, False))  # noqa: E731
UNTOUCHED = ({}, (True, True))


def test_tap_missing_at_start_is_one_clear_error(ns, hooks):
    three_taps(ns)
    ns.del_link("vnet1")
    hooks.write_config(CONFIG)
    r = hooks.run_ok("qemu", "vm1", "start", vm1(), allow_errors=True)
    assert len(r.errors) == 1, r
    assert "domain vm1" in r.errors[0] and "interface net1" in r.errors[0] and \
        "vnet1" in r.errors[0], r
    assert state_of(ns, "vnet0", A) == MANAGED(A)
    assert state_of(ns, "vnet2", C) == MANAGED(C)
    assert sorted(hooks.domain_record("vm1")["ports"]) == ["vnet0", "vnet2"]


def test_strict_mode_fails_start_but_never_reconnect(ns, hooks):
    three_taps(ns)
    ns.del_link("vnet1")
    hooks.write_config("strict = true\n" + CONFIG)
    r = hooks.run("qemu", "vm1", "start", vm1())
    assert r.rc == 1 and r.stdout == b"" and "Traceback" not in r.stderr, r
    for op in ("reconnect", "stopped", "release"):
        r = hooks.run("qemu", "vm1", op, vm1())
        assert r.rc == 0 and r.stdout == b"" and "Traceback" not in r.stderr, r


# -- deleted between observation and apply: the hook's own code, in the namespace -------------


def _hook_main_with_kernel(kernel_cls, xml, config, state_dir, op="start"):
    """Runs in a forked child inside the namespace: hook.main with the seam's class swapped."""
    import libvirt_netplug.hook as hook
    import libvirt_netplug.kernel as kernel

    kernel.NetlinkKernel = kernel_cls
    err = io.StringIO()
    rc = hook.main(["qemu", "vm1", op, "begin", "-"], io.BytesIO(xml.encode()), err,
                   kind="qemu", config=config, state_dir=state_dir)
    return rc, err.getvalue()


def _kernel_deleting(victim: str, before: str):
    """A real NetlinkKernel that deletes ``victim`` (`ip link del`) just before its first
    ``before`` call on it: the kernel then answers ENODEV itself."""
    from libvirt_netplug.kernel import NetlinkKernel

    class Deleting(NetlinkKernel):
        done = False

        def _maybe(self, method, dev):
            if method == before and dev == victim and not Deleting.done:
                Deleting.done = True
                subprocess.run(["ip", "link", "del", victim], check=True)

        def replace_fdb(self, port, *a, **kw):
            self._maybe("replace_fdb", port)
            return super().replace_fdb(port, *a, **kw)

        def set_port_flags(self, port, *a, **kw):
            self._maybe("set_port_flags", port)
            return super().set_port_flags(port, *a, **kw)

    return Deleting


def _kernel_failing(victim: str, err: int):
    """A real NetlinkKernel whose set_port_flags on ``victim`` fails with ``err``."""
    from libvirt_netplug.errors import kernel_error
    from libvirt_netplug.kernel import NetlinkKernel

    class Failing(NetlinkKernel):
        def set_port_flags(self, port, *a, **kw):
            if port == victim:
                raise kernel_error("set port flags", port, err)
            return super().set_port_flags(port, *a, **kw)

    return Failing


def _run_inprocess(ns, hooks, kernel_cls):
    hooks.write_config(CONFIG)
    return ns.call(_hook_main_with_kernel, kernel_cls, vm1(), hooks.config, hooks.state_dir)


def test_tap_deleted_before_its_fdb_write(ns, hooks):
    three_taps(ns)
    rc, err = _run_inprocess(ns, hooks, _kernel_deleting("vnet1", "replace_fdb"))
    errors = [ln for ln in err.splitlines() if ": ERROR: " in ln]
    assert rc == 0 and "Traceback" not in err, err
    assert len(errors) == 1 and "domain vm1" in errors[0] and "interface net1" in errors[0] \
        and "No such device" in errors[0], err
    assert not oracle.exists(ns.name, "vnet1")
    assert state_of(ns, "vnet0", A) == MANAGED(A)
    assert state_of(ns, "vnet2", C) == MANAGED(C)
    assert sorted(hooks.domain_record("vm1")["ports"]) == ["vnet0", "vnet2"]


def test_tap_deleted_between_its_fdb_and_flag_writes(ns, hooks):
    three_taps(ns)
    rc, err = _run_inprocess(ns, hooks, _kernel_deleting("vnet1", "set_port_flags"))
    errors = [ln for ln in err.splitlines() if ": ERROR: " in ln]
    assert rc == 0 and "Traceback" not in err, err
    assert len(errors) == 1 and "interface net1" in errors[0], err
    assert oracle.where_is(ns.name, B) == []  # the entry went with the tap
    assert state_of(ns, "vnet0", A) == MANAGED(A)
    assert state_of(ns, "vnet2", C) == MANAGED(C)
    assert sorted(hooks.domain_record("vm1")["ports"]) == ["vnet0", "vnet2"]


def test_failed_flag_write_rolls_back_the_fdb_entry(ns, hooks):
    """EINVAL on the second write of a port: the first (the FDB entry) is undone, so the port is
    exactly as before, not half-managed; the other ports are managed; one error line."""
    three_taps(ns)
    before = oracle.view(oracle.snapshot(ns.name), ["vnet1"])
    rc, err = _run_inprocess(ns, hooks, _kernel_failing("vnet1", errno.EINVAL))
    errors = [ln for ln in err.splitlines() if ": ERROR: " in ln]
    assert rc == 0 and len(errors) == 1 and "interface net1" in errors[0], err
    assert oracle.diff(before, oracle.view(oracle.snapshot(ns.name), ["vnet1"])) == []
    assert state_of(ns, "vnet0", A) == MANAGED(A)
    assert state_of(ns, "vnet2", C) == MANAGED(C)
    assert "vnet1" not in hooks.domain_record("vm1")["ports"]
    # The next event retries the port, with the real kernel this time.
    hooks.run_ok("qemu", "vm1", "started", vm1())
    assert state_of(ns, "vnet1", B) == MANAGED(B)


def test_foreign_static_entry_for_the_guest_mac_leaves_the_port_alone(ns, hooks):
    """Someone else's static entry for the guest's MAC on another port: netplug must neither
    move it (a replace would) nor manage the tap; one error says what to fix."""
    world = HostWorld(ns).build()
    ns.fdb_add(world.macs["vnet1"], "up0", "static")
    hooks.write_config(CONFIG)
    before = oracle.snapshot(ns.name)
    r = hooks.run_ok("qemu", "vm1", "start", world.xml(), allow_errors=True)
    assert len(r.errors) == 1 and "net1" in r.errors[0] and "up0" in r.errors[0], r
    after = oracle.snapshot(ns.name)
    assert oracle.diff(oracle.view(before, ["vnet1", "up0"]),
                       oracle.view(after, ["vnet1", "up0"])) == []
    assert state_of(ns, "vnet0", world.macs["vnet0"]) == MANAGED(world.macs["vnet0"])
