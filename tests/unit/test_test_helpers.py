"""The test helpers themselves: the kernel tier's skip reasons, the oracle's diff.

Proves: without root, without iproute2, or where `ip netns add` fails, the kernel tier gets a
skip reason that says so (and NETPLUG_REQUIRE_ALL=1 turns it into a failure, see
tests/kernel/conftest.py); the oracle's diff reports what changed.
"""

from __future__ import annotations

import subprocess

import pytest

import netns
import oracle


@pytest.fixture(autouse=True)
def _fresh_cache():
    netns.unavailable.cache_clear()
    yield
    netns.unavailable.cache_clear()


def test_not_root(monkeypatch):
    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    assert "need root" in netns.unavailable()


def test_no_iproute2(monkeypatch):
    monkeypatch.setattr(netns.os, "geteuid", lambda: 0)
    monkeypatch.setattr(netns.shutil, "which", lambda tool: None)
    assert "iproute2's `ip`" in netns.unavailable()


def test_ip_netns_refused(monkeypatch):
    monkeypatch.setattr(netns.os, "geteuid", lambda: 0)
    monkeypatch.setattr(netns.shutil, "which", lambda tool: "/sbin/" + tool)
    monkeypatch.setattr(netns.os.path, "exists", lambda p: True)
    monkeypatch.setattr(netns.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
        a, 1, "", "mount --make-shared /run/netns failed: Operation not permitted"))
    assert "`ip netns add` does not work here: mount --make-shared" in netns.unavailable()


def test_oracle_diff_is_readable():
    before = {"ports": {"vnet0": {"learning": True}}, "fdb": [{"mac": "a"}]}
    after = {"ports": {"vnet0": {"learning": False}}, "fdb": [{"mac": "b"}]}
    assert oracle.diff(before, after) == [
        '/fdb: removed {"mac": "a"}', '/fdb: added {"mac": "b"}',
        "/ports/vnet0/learning: true -> false"]
    assert oracle.diff(before, before) == []
