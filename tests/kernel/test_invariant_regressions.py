"""Failures the invariant machine (test_invariants.py) found, each replayed as a plain test.

Every test is a shrunk sequence of events on the same host (invariant_world.World: a real
bridge in a fresh namespace, foreign ports and entries around it, guests whose taps come and
go as libvirtd makes them). World checks every invariant after every step through the oracle
and raises InvariantViolation naming what broke, so each sequence asserts the CORRECT outcome;
the last lines restate the point of the test with the oracle directly. They fail on the code
of 2026-11-30 (main at ce275a4) and are the acceptance check of issue 10's fixes.
"""

from __future__ import annotations

import pytest

import oracle

from .invariant_world import (BR0_ADDR, EVIL_MAC, FTAP_ADDR, INVALID_CONFIGS, UP0_ADDR, World,
                              make_domains)


@pytest.fixture
def host(ns, tmp_path):
    """A host whose guests are vm0 (one interface on br0) and vm1 (one on network mgd)."""
    return World(ns, str(tmp_path), make_domains([["br0"], ["net"]]))


def managed(w: World, tap: str, mac: str) -> bool:
    return (oracle.static_macs(w.ns.name, tap) == {mac: []}
            and oracle.port_flags(w.ns.name, tap) == (False, False))


def untouched(w: World, tap: str) -> bool:
    statics = [e for e in oracle.master_entries(w.ns.name, tap) if e.get("state") == "static"]
    return not statics and oracle.port_flags(w.ns.name, tap) == (True, True)


# -- issue 10 item 3: fail closed ---------------------------------------------------------------


@pytest.mark.parametrize("variant", INVALID_CONFIGS)
def test_invalid_config_then_reconnect_keeps_isolation(host, variant):
    """One unknown key (or a bad value, broken TOML, an unknown section) in config.toml, then
    `reconnect` (what every libvirtd restart sends): today learning and flood go back on and
    the guest's entry is deleted. What was applied must be kept."""
    host.boot("vm0")
    host.edit_config(variant)
    host.event("vm0", "reconnect")
    host.event("vm0", "started")
    assert managed(host, "vn00", "52:54:00:00:01:01")


def test_invalid_domain_policy_at_stop_still_cleans_up(host):
    """The domain's live policy became invalid while it ran (virsh metadata --live): today
    `stopped` raises on the policy before cleaning up, so the entry and the flags netplug set
    outlive the guest (on its tap until libvirt deletes it, for good if the tap is reused)."""
    host.boot("vm0")
    host.edit_meta("vm0", "invalid")
    host.stop("vm0")
    assert untouched(host, "vn00")


def test_invalid_domain_policy_then_reconcile_keeps_isolation(host):
    """reconcile cannot read the running domain's policy: today it drops the domain from the
    running set and retires its record, turning isolation off for a running guest."""
    host.boot("vm0")
    host.edit_meta("vm0", "invalid")
    host.reconcile()
    assert managed(host, "vn00", "52:54:00:00:01:01")


@pytest.mark.parametrize("then", ["nothing", "reconnect", "reconcile"])
def test_invalid_network_policy_keeps_isolation(host, then):
    """The network's metadata policy made invalid (virsh net-update/net-edit): today the
    `updated` hook treats it as "not managed" and hands every running guest's port back
    (learning/flood on, entry deleted); with that fixed, the next reconnect (the recorded
    policy has an error) and reconcile (the live one) still do. Keep what was applied."""
    host.boot("vm1")
    host.network_update("invalid")
    if then == "reconnect":
        host.network_restart()
        host.event("vm1", "reconnect")
    elif then == "reconcile":
        host.reconcile()
    assert managed(host, "vn10", "52:54:00:00:02:01")


# -- issue 10 item 4: crash consistency ----------------------------------------------------------


@pytest.mark.parametrize("kill_after", [1, 2])
def test_start_killed_mid_apply_then_stop_leaves_nothing(host, kill_after):
    """`start` killed right after its first kernel write (the entry) or its second (the
    flags), before the record is written: today `stopped` finds no record, and the entry
    (and flags off) stay on the tap."""
    host.boot("vm0", kill_after=kill_after)
    host.stop("vm0")
    assert untouched(host, "vn00")
    host.release("vm0")
    assert oracle.where_is(host.ns.name, "52:54:00:00:01:01") == []


def test_start_killed_then_started_then_stop_leaves_nothing(host):
    """`start` killed after both writes of its port; `started` then finds the port right and
    changes nothing, so (today) it records that netplug owns neither the entry nor the flags:
    `stopped` leaves both."""
    host.boot("vm0", kill_after=2)
    host.event("vm0", "started")
    host.stop("vm0")
    assert untouched(host, "vn00")


# -- issue 10 item 2: which ports netplug may touch ----------------------------------------------


@pytest.mark.parametrize("source,target", [
    ("br0", "up0"),    # the uplink
    ("br0", "ftap"),   # a foreign tap (an admin's, flags off, a sticky entry of its own)
    ("br0", "itap"),   # an idle foreign tap
    ("br0", "vn00"),   # another running guest's tap
    ("brU", "upU"),    # the uplink of a bridge nobody manages (the domain's policy says no)
    ("brU", "fU"),     # a foreign tap on that bridge
], ids=["uplink", "foreign-tap", "idle-tap", "other-guests-tap", "unmanaged-uplink",
        "unmanaged-foreign-tap"])
def test_hostile_target_dev_changes_nothing(host, source, target):
    """A domain XML (written by whoever may define domains, not root) whose <target dev>
    names a device that is not its tap: today that port gets learning/flood off and a static
    entry for the impostor's MAC."""
    host.boot("vm0")
    host.boot("vm1")
    host.evil_start(source, target, EVIL_MAC)
    host.evil_event("reconnect")
    host.evil_stop()
    host.event("vm0", "reconnect")
    assert managed(host, "vn00", "52:54:00:00:01:01")


def test_impostor_stop_does_not_remove_the_victims_entry(host):
    """An impostor names vm0's tap and vm0's MAC. While vm0's entry is missing (deleted by
    hand) the impostor's reconnect re-adds it and records it as its own; vm0's reconnect
    finds it in place; the impostor's stop then deletes it: vm0 loses its entry."""
    host.boot("vm0")
    host.evil_start("br0", "vn00", "52:54:00:00:01:01")
    host.drift_fdb("vm0", 0, "delete")
    host.evil_event("reconnect")
    host.event("vm0", "reconnect")
    host.evil_stop()
    assert managed(host, "vn00", "52:54:00:00:01:01")


def test_impostor_with_the_victims_mac_cannot_override_its_policy(host):
    """An impostor names vm0's tap AND vm0's MAC (so the tap's address matches the MAC, and no
    extra entry shows). vm0's own policy then says promiscLinks='yes' for that interface and
    its reconnect hands the port back; the impostor's reconnect takes it again (found by the
    machine through reconcile, which plans both domains' intents for one tap)."""
    host.boot("vm0")
    host.evil_start("br0", "vn00", "52:54:00:00:01:01")
    host.edit_meta("vm0", "first-yes")
    host.event("vm0", "reconnect")
    host.evil_event("reconnect")
    host.reconcile()
    assert untouched(host, "vn00")


# -- issue 10 item 1: addresses netplug must never claim ------------------------------------------


def test_guest_mac_equal_to_the_bridge_address_is_refused(host):
    """A guest whose MAC is the bridge's own address: today the bridge's local entry (not in
    netplug's FDB read: its port is the bridge itself) is replaced by a static entry on the
    guest's tap, and `stopped` deletes it: the host is cut off on br0."""
    host.boot("vm0")
    host.evil_start("br0", "evtap", BR0_ADDR)
    assert ("br0", "permanent") in oracle.where_is(host.ns.name, BR0_ADDR)
    host.evil_stop()
    assert oracle.where_is(host.ns.name, BR0_ADDR) == [("br0", "permanent")]


@pytest.mark.parametrize("mac", [UP0_ADDR, FTAP_ADDR, "52:54:00:00:01:01"],
                         ids=["uplink-address", "foreign-tap-address", "running-guests-mac"])
def test_guest_mac_owned_by_another_port_is_left_alone(host, mac):
    """Guards (these pass today): a MAC that is another port's own address or a running
    guest's entry is refused, and the owner keeps it through the impostor's stop."""
    host.boot("vm0")
    host.evil_start("br0", "evtap", mac)
    host.evil_stop()
    host.event("vm0", "reconnect")
    assert managed(host, "vn00", "52:54:00:00:01:01")
