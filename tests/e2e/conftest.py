"""The e2e tier runs the real libvirt lab (tests/lab): it needs root, the lab's tools and
libvirt-python. Without them its tests skip and say why; under `make test` (and CI), which
set NETPLUG_REQUIRE_ALL=1, they fail instead, so a green run means they really ran."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # `pytest` (not `python -m pytest`) does not add the repo root
    sys.path.insert(0, str(REPO))

TOOLS = ("libvirtd", "virtlogd", "virsh", "qemu-system-x86_64", "ip", "bridge", "nsenter",
         "unshare")


def lab_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "the libvirt lab needs root"
    missing = [t for t in TOOLS if shutil.which(t, path="/usr/sbin:/usr/bin:/sbin:/bin") is None]
    if missing:
        return "lab tools missing: " + ", ".join(missing) + " (run scripts/setup-host.sh)"
    if importlib.util.find_spec("libvirt") is None:
        return "libvirt-python is not installed (pip install 'libvirt-netplug[agent]')"
    return None


@pytest.fixture(scope="session")
def lab_required() -> None:
    reason = lab_unavailable()
    if reason:
        if os.environ.get("NETPLUG_REQUIRE_ALL") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
