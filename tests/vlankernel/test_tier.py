"""The VLAN-kernel tier, from the host: one VM boot runs every test of tests/vlankernel/inner,
and each of them is reported here under its own name:

    tests/vlankernel/test_tier.py::test_in_vlan_kernel[test_headline.py::test_…]

An inner failure fails its outer test with the inner report (assertion, traceback, captured
output); an inner skip skips it, and fails it under NETPLUG_REQUIRE_ALL=1 (as `make test` sets),
as does a host that cannot run the VM at all (no root, no QEMU, no kernel package).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # `pytest` (not `python -m pytest`) does not add the repo root
    sys.path.insert(0, str(REPO))

from tests.vlankernel import tier, vm  # noqa: E402
from tests.vlankernel.image import ImageError  # noqa: E402

PREFIX = tier.INNER + "/"


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("NETPLUG_REQUIRE_ALL") == "1":
        pytest.fail(f"NETPLUG_REQUIRE_ALL=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def pytest_generate_tests(metafunc):
    if "inner" not in metafunc.fixturenames:
        return
    try:
        ids = tier.collect()
    except RuntimeError as e:  # the inner tests do not even import: one test says why
        ids = [f"collection-error: {e}"]
    metafunc.parametrize("inner", ids, ids=[i.removeprefix(PREFIX).split("\n")[0] for i in ids])


@pytest.fixture(scope="module")
def tier_run() -> tier.TierRun:
    reason = vm.unavailable()
    if reason:
        _skip_or_fail(reason)
    try:
        return tier.run()
    except ImageError as e:
        _skip_or_fail(f"cannot build the VLAN-kernel VM: {e}")
        raise


def test_vlan_kernel_vm_ran(tier_run):
    """The VM booted, ran pytest to the end and brought a result back for every inner test."""
    r = tier_run.vm
    summary = (f"VM: {r.seconds:.1f} s wall, job started at {r.boot_seconds} s of guest uptime; "
               f"{len(tier_run.results)} inner results in {r.run_dir}")
    print(summary)
    problem = tier_run.problem()
    assert problem is None, f"{problem}\n{summary}\nconsole (last lines):\n{r.console_tail(60)}"


def test_in_vlan_kernel(inner, tier_run):
    if inner.startswith("collection-error: "):
        pytest.fail(inner, pytrace=False)
    res = tier_run.results.get(inner)
    if res is None:
        pytest.fail(f"{inner} has no result from the VM ({tier_run.problem()}); console (last "
                    f"lines):\n{tier_run.vm.console_tail(40)}", pytrace=False)
    if res.outcome == "skipped":
        _skip_or_fail(f"skipped in the VM: {res.message}")
    if res.outcome != "passed":
        pytest.fail(f"{inner} {res.outcome} in the VLAN-kernel VM ({res.seconds:.1f} s):\n"
                    f"{res.text or res.message}", pytrace=False)
