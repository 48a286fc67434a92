"""Kernel tier: a fresh network namespace per test, skipped with a reason when impossible."""

from __future__ import annotations

import os

import pytest

from netns import HookRig, NetNS, cleanup_stale, unavailable


@pytest.fixture(scope="session", autouse=True)
def _kernel_session():
    reason = unavailable()
    if reason is None:
        cleanup_stale()
    yield


@pytest.fixture
def ns():
    reason = unavailable()
    if reason:
        if os.environ.get("NETPLUG_REQUIRE_ALL") == "1":  # `make test`: a skip is a failure
            pytest.fail(f"NETPLUG_REQUIRE_ALL=1 but {reason}", pytrace=False)
        pytest.skip(reason)
    n = NetNS.create()
    try:
        yield n
    finally:
        n.delete()


@pytest.fixture
def hooks(ns, tmp_path) -> HookRig:
    return HookRig(ns, str(tmp_path))
