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


@pytest.fixture(scope="session")
def lab_required() -> None:
    """Skip (and say why) where the lab cannot run; under `make test` and CI, which set
    NETPLUG_REQUIRE_ALL=1, fail instead, so a green run means the e2e tests really ran."""
    reason = lab_unavailable()
    if reason:
        if os.environ.get("NETPLUG_REQUIRE_ALL") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
