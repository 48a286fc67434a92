"""The engine's bulk runs pause the cyclic garbage collector, and always give it back."""

from __future__ import annotations

import gc

import pytest

from fakes import FakeKernel, bridge_iface, domain_xml, policy_xml
from libvirt_netplug.model import parse_domain
from libvirt_netplug.policy import Config
from libvirt_netplug.state import StateDir
from libvirt_netplug.sync import Desired, gc_paused, sync

GUEST = "52:54:00:aa:00:01"


class SpyKernel(FakeKernel):
    """Notes whether the collector was on each time the engine reads links."""

    def __init__(self):
        super().__init__()
        self.gc_seen: list[bool] = []

    def links(self):
        self.gc_seen.append(gc.isenabled())
        return super().links()

    def fdb(self, bridge, port=None):
        self.gc_seen.append(gc.isenabled())
        return super().fdb(bridge, port)


def desired() -> Desired:
    xml = domain_xml("vm1", [bridge_iface("br0", "vnet0", GUEST)],
                     metadata=policy_xml(promiscLinks="no"))
    return Desired((parse_domain(xml),), {}, Config())


@pytest.fixture
def kernel() -> SpyKernel:
    k = SpyKernel()
    k.add_bridge("br0")
    k.add_tap("vnet0", master="br0")
    return k


def test_sync_runs_with_the_collector_paused_and_turns_it_back_on(kernel, state_path):
    assert gc.isenabled()
    report = sync(kernel, StateDir(str(state_path)), desired())
    assert report.applied and not report.errors
    assert kernel.gc_seen and not any(kernel.gc_seen)
    assert gc.isenabled()


def test_the_collector_comes_back_when_the_run_fails(kernel, state_path):
    def broken():
        raise RuntimeError("boom")

    kernel.links = broken
    with pytest.raises(RuntimeError):
        sync(kernel, StateDir(str(state_path)), desired())
    assert gc.isenabled()


def test_a_nested_pause_leaves_re_enabling_to_the_outer_one():
    with gc_paused():
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()


def test_a_collector_the_caller_turned_off_stays_off():
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
