"""Inner tests of the VLAN-kernel tier: root, a kernel with bridge VLAN filtering, a fresh
network namespace per test (tests/netns.py), netplug's hook shims installed once per session.

Where the kernel cannot filter VLANs (someone ran these on the host), every test skips with the
reason, or fails under NETPLUG_REQUIRE_ALL=1.
"""

from __future__ import annotations

import copy
import os
import shutil

import pytest

from netns import HookRig, NetNS, cleanup_stale, unavailable


def _no_vlan_filtering() -> str | None:
    """Why this kernel cannot run these tests, or None: a bridge must offer vlan_filtering."""
    ns = NetNS.create()
    try:
        ns.ip("link", "add", "brprobe", "type", "bridge")
        p = ns.run(["cat", "/sys/class/net/brprobe/bridge/vlan_filtering"])
        if p.returncode != 0:
            return ("this kernel has no bridge VLAN filtering (CONFIG_BRIDGE_VLAN_FILTERING): "
                    "these tests run inside the VLAN-kernel VM (python -m tests.vlankernel)")
        return None
    finally:
        ns.delete()


@pytest.fixture(scope="session")
def _vlan_kernel() -> None:
    reason = unavailable() or _no_vlan_filtering()
    if reason:
        if os.environ.get("NETPLUG_REQUIRE_ALL") == "1":
            pytest.fail(f"NETPLUG_REQUIRE_ALL=1 but {reason}", pytrace=False)
        pytest.skip(reason)
    cleanup_stale()


@pytest.fixture
def ns(_vlan_kernel):
    n = NetNS.create()
    try:
        yield n
    finally:
        n.delete()


@pytest.fixture(scope="session")
def _shims(_vlan_kernel, tmp_path_factory) -> HookRig:
    """`netplug install-hooks` once: an interpreter start costs seconds under TCG."""
    return HookRig(None, str(tmp_path_factory.mktemp("netplug")))


@pytest.fixture
def rig(ns, _shims) -> HookRig:
    """The installed shims, driving this test's namespace, with an empty config and state."""
    shutil.rmtree(_shims.state_dir, ignore_errors=True)
    if os.path.exists(_shims.config):
        os.unlink(_shims.config)
    r = copy.copy(_shims)
    r.ns = ns
    return r
