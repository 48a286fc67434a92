"""The installed qemu shim, run exactly as libvirtd runs it, against a real bridge.

Proves: at `start begin` each managed tap gets a static NTF_MASTER FDB entry for the guest's
<mac address> (never the tap's fe:… address) and learning/flood off; nothing else in the
namespace changes bit for bit (unmanaged bridge, unmanaged ports, foreign static entries);
a replay changes nothing; stopped/release put back exactly what was there before.
"""

from __future__ import annotations


import oracle
from fakes import tap_mac

from .topo import CONFIG, FOREIGN_U, FOREIGN_UP, HostWorld


def test_start_manages_each_guest_tap_and_nothing_else(ns, hooks):
    world = HostWorld(ns).build()
    hooks.write_config(CONFIG)
    before = oracle.snapshot(ns.name)

    r = hooks.run_ok("qemu", "vm1", "start", world.xml())

    after = oracle.snapshot(ns.name)
    for tap, mac in world.macs.items():
        assert oracle.static_macs(ns.name, tap) == {mac: []}, r
        assert oracle.port_flags(ns.name, tap) == (False, False), r
        # The tap's own fe:… address stays what it was: the kernel's permanent (local) entry.
        assert oracle.where_is(ns.name, tap_mac(mac)) == [(tap, "permanent")]
        assert oracle.where_is(ns.name, mac) == [(tap, "static")]
    unmanaged = oracle.view(before, HostWorld.UNMANAGED)
    assert oracle.diff(unmanaged, oracle.view(after, HostWorld.UNMANAGED)) == []
    assert oracle.where_is(ns.name, FOREIGN_UP) == [("up0", "static")]
    assert oracle.static_macs(ns.name, "vnetU") == {FOREIGN_U: ["sticky"]}
    rec = hooks.domain_record("vm1")
    assert sorted(rec["ports"]) == world.managed


def test_start_twice_then_stopped_restores_everything(ns, hooks):
    world = HostWorld(ns, ntaps=3).build()
    hooks.write_config(CONFIG)
    pristine = oracle.snapshot(ns.name)

    hooks.run_ok("qemu", "vm1", "start", world.xml())
    managed = oracle.snapshot(ns.name)
    hooks.run_ok("qemu", "vm1", "start", world.xml())
    assert oracle.diff(managed, oracle.snapshot(ns.name)) == []

    hooks.run_ok("qemu", "vm1", "stopped", world.xml(), subop="end")
    assert oracle.diff(pristine, oracle.snapshot(ns.name)) == []
    assert hooks.domain_record("vm1") is None
    hooks.run_ok("qemu", "vm1", "release", world.xml(), subop="end")
    assert oracle.diff(pristine, oracle.snapshot(ns.name)) == []


def test_mac_with_trailing_newline_is_rejected_or_cleaned_up(ns, hooks):
    world = HostWorld(ns, ntaps=1).build()
    hooks.write_config(CONFIG)
    pristine = oracle.snapshot(ns.name)
    xml = world.xml()
    for q in ("'", '"'):
        xml = xml.replace(f"52:54:00:00:00:01{q}", f"52:54:00:00:00:01&#10;{q}")
    assert "&#10;" in xml
    hooks.run("qemu", "vm1", "start", xml)
    hooks.run("qemu", "vm1", "stopped", xml, subop="end")
    assert oracle.diff(pristine, oracle.snapshot(ns.name)) == []
