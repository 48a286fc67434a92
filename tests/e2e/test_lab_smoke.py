"""The lab itself works, on each libvirt release: private libvirtd, a real guest, a console
command, netplug's default paths private to the lab, clean teardown."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # `pytest` (not `python -m pytest`) does not add the repo root
    sys.path.insert(0, str(REPO))

from tests.lab import Lab  # noqa: E402
from tests.lab.__main__ import private_paths  # noqa: E402
from tests.lab.lab import NETNS_DIR, _alive, _pids_in_netns, _proc_starttime  # noqa: E402

pytestmark = pytest.mark.e2e



def test_lab_guest_joins_multicast_group_and_teardown_leaves_nothing(lab_release):
    t0 = time.monotonic()
    lab = Lab(release=lab_release)
    with lab:
        t_up = time.monotonic()
        lab.add_host_bridge("br0")
        lab.add_uplink("br0")
        guest = lab.start_guest("vm1", ["bridge:br0"], timeout=180)
        t_ready = time.monotonic()
        assert list(guest.macs) == ["eth0"]
        mac = guest.macs["eth0"]
        # The tap libvirt made lives in the lab's namespace, in br0, and not on the host.
        tap = guest.targets()[mac]
        assert lab.run("ip", "-o", "link", "show", tap).stdout.count("master br0") == 1
        assert not Path(f"/sys/class/net/{tap}").exists() or \
            Path(f"/sys/class/net/{tap}/address").read_text().strip() != "fe" + mac[2:]

        # The libvirtd that answers is the release this test is for.
        assert f"Running against daemon: {lab_release.versions()['libvirt']}" in \
            lab.daemon_version()

        # `python -m tests.lab shell`: netplug's default paths there are the lab's own.
        r = subprocess.run(lab.shell_argv()[:-1] + [
            "sh", "-c", "mkdir -p /run/libvirt-netplug/smoke && echo x > "
            "/etc/libvirt-netplug/smoke"], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        assert lab.host_path("/run/libvirt-netplug/smoke").is_dir()
        assert lab.host_path("/etc/libvirt-netplug/smoke").read_text() == "x\n"
        assert not Path("/run/libvirt-netplug/smoke").exists()
        assert not Path("/etc/libvirt-netplug/smoke").exists()
        assert str(lab.dir) in private_paths(lab)

        guest.check("ip maddr add 33:33:00:00:12:34 dev eth0")
        out = guest.check("ip maddr show dev eth0")
        assert "link  33:33:00:00:12:34 static" in out

        # Remember everything that must disappear.
        netns_inode = os.stat(NETNS_DIR / lab.name).st_ino
        procs = {pid: _proc_starttime(pid) for pid in _pids_in_netns(netns_inode)}
        names = {Path(f"/proc/{p}/comm").read_text().strip() for p in procs if _alive(p)}
        assert {"libvirtd", "virtlogd", "sleep"} <= names
        assert any(n.startswith("qemu-system") for n in names)
        lab_dir = lab.dir
        t_down = time.monotonic()

    t_gone = time.monotonic()
    leftovers = [p for p, start in procs.items() if _alive(p, start)]
    assert leftovers == [], f"lab processes still alive: {leftovers}"
    assert not (NETNS_DIR / lab.name).exists()
    assert lab.name not in Path("/proc/self/mountinfo").read_text()
    assert not lab_dir.exists()
    print(f"\nlab timings: start {t_up - t0:.1f} s (guest build "
          f"{lab.timings.get('guest_build', 0):.1f} s), guest boot-to-ready "
          f"{t_ready - t_up:.1f} s, teardown {t_gone - t_down:.1f} s")
