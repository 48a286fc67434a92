"""Shared test settings.

Tiers: tests/unit (no root), tests/kernel (root + network namespaces; marked ``kernel`` here),
tests/e2e (the libvirt lab). Unit tests never touch the host's /run/libvirt-netplug or
/etc/libvirt-netplug: the environment points both at a per-test temporary directory.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "xml-samples"
GOLDEN = SAMPLES / "golden"
REGEN_GOLDEN = os.environ.get("NETPLUG_REGEN_GOLDEN") == "1"


def pytest_collection_modifyitems(config, items):
    kernel_dir = REPO / "tests" / "kernel"
    for item in items:
        if kernel_dir in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.kernel)


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory, monkeypatch):
    """No test reads the host's config or writes the host's state dir by accident."""
    d = tmp_path_factory.mktemp("env")
    monkeypatch.setenv("NETPLUG_STATE_DIR", str(d / "state"))
    monkeypatch.setenv("NETPLUG_CONFIG", str(d / "no-config.toml"))
    yield
    # hook.main() (an entry point) configures the package logger; undo it between tests.
    root = logging.getLogger("libvirt_netplug")
    for h in list(root.handlers):
        root.removeHandler(h)
    root.propagate = True


# -- the e2e tier: the real libvirt lab (tests/lab) ---------------------------------------------

LAB_TOOLS = ("libvirtd", "virtlogd", "virsh", "qemu-system-x86_64", "ip", "bridge", "nsenter",
             "unshare")


def lab_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "the libvirt lab needs root"
    missing = [t for t in LAB_TOOLS
               if shutil.which(t, path="/usr/sbin:/usr/bin:/sbin:/bin") is None]
    if missing:
        return "lab tools missing: " + ", ".join(missing) + " (run scripts/setup-host.sh)"
    if importlib.util.find_spec("libvirt") is None:
        return "libvirt-python is not installed (pip install 'libvirt-netplug[agent]')"
    return None


def skip_or_fail(reason: str) -> None:
    """Skip (and say why); under `make test` and CI, which set NETPLUG_REQUIRE_ALL=1, fail
    instead, so a green run means the tests really ran."""
    if os.environ.get("NETPLUG_REQUIRE_ALL") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def lab_required() -> None:
    """Skip (and say why) where the lab cannot run (fail under NETPLUG_REQUIRE_ALL=1)."""
    reason = lab_unavailable()
    if reason:
        skip_or_fail(reason)


def _lab_releases():
    if str(REPO) not in sys.path:  # `pytest` (not `python -m pytest`) lacks the repo root
        sys.path.insert(0, str(REPO))
    from tests.lab.release import releases

    return releases()


def pytest_generate_tests(metafunc):
    """Every e2e test that uses `lab_release` runs once per libvirt release (host's and the
    other Debian release's; NETPLUG_LAB_RELEASES narrows): its id says which, e.g.
    test_x[libvirt11]."""
    if "lab_release" in metafunc.fixturenames:
        rels = _lab_releases()
        metafunc.parametrize("lab_release", rels, ids=[r.name for r in rels], indirect=True,
                             scope="module")


_RELEASES_USED: dict[str, str] = {}


@pytest.fixture(scope="module")
def lab_release(request, lab_required):
    """The libvirt release (tests.lab.release.Release) this module's labs run; builds the other
    release's cached root on first use (about a minute). Skips, or fails under
    NETPLUG_REQUIRE_ALL=1, where the release cannot run (e.g. mmdebstrap missing)."""
    from tests.lab.release import ReleaseUnavailable, ensure_root

    rel = request.param
    reason = rel.unavailable()
    if reason:
        skip_or_fail(reason)
    if not rel.is_host:
        try:
            ensure_root(rel)
        except ReleaseUnavailable as e:
            skip_or_fail(str(e))
    _RELEASES_USED.setdefault(rel.name, rel.describe())
    return rel


def pytest_terminal_summary(terminalreporter):
    for line in _RELEASES_USED.values():
        terminalreporter.write_line(f"e2e release {line}")
