"""Log records with fields reach a real journald, and `journalctl NETPLUG_DOMAIN=vm1` finds
them (root: journald runs in a private mount namespace, over a tmpfs /run, so the host's
journal is never touched).

Proves: logsetup (the agent's and the operator commands' logging) and hooklog (the hooks'
logger, without the logging module) send each record natively (not through syslog) when
journald runs, with the record's NETPLUG_* fields queryable by journalctl; a hook's component
and priority are kept.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from polling import wait_for

JOURNALD = "/lib/systemd/systemd-journald"


@pytest.fixture
def journald():
    if not os.path.exists(JOURNALD) or not shutil.which("journalctl"):
        reason = f"needs {JOURNALD} and journalctl (Debian package systemd)"
        if os.environ.get("NETPLUG_REQUIRE_ALL") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    script = ("set -e; mount -t tmpfs tmpfs /run; mkdir -p /run/systemd/journal /run/log; "
              "if [ -d /var/log/journal ]; then mount -t tmpfs tmpfs /var/log/journal; fi; "
              f"exec {JOURNALD}")
    proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    enter = ["nsenter", "-t", str(proc.pid), "-m", "--"]
    try:
        wait_for(lambda: subprocess.run([*enter, "test", "-S", "/run/systemd/journal/socket"])
                 .returncode == 0, 20, "journald's socket",
                 lambda: proc.stderr.read1().decode() if proc.poll() is not None else "")
        yield enter
    finally:
        proc.terminate()
        proc.wait(10)


CHILDREN = {"logsetup": """
import logging, sys
from libvirt_netplug import logsetup
root = logsetup.setup("qemu-hook", sys.stderr)
assert [type(h).__name__ for h in root.handlers] == ["StreamHandler", "JournalHandler"]
log = logging.getLogger("libvirt_netplug.apply")
""", "hooklog": """
import sys
from libvirt_netplug import hooklog
log = hooklog.setup("qemu-hook", sys.stderr)
assert [type(h).__name__ for h in log.handlers] == ["_StreamSink", "JournalSink"]
assert "logging" not in sys.modules
"""}
RECORDS = """
log.info("add static FDB entry 52:54:00:00:00:01 on vnet0", extra={"netplug": {
    "domain": "vm1", "interface": "net0", "mac": "52:54:00:00:00:01", "bridge": "br0",
    "operation": "fdb-replace"}})
log.error("domain vm2: tap vnet9 does not exist", extra={"netplug": {"domain": "vm2"}})
"""


@pytest.mark.parametrize("logger", sorted(CHILDREN))
def test_journalctl_finds_records_by_domain(journald, logger):
    p = subprocess.run([*journald, sys.executable, "-c", CHILDREN[logger] + RECORDS],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "netplug qemu-hook: INFO: add static FDB entry" in p.stderr  # stderr as before

    def query(*match):
        r = subprocess.run([*journald, "journalctl", "-D", "/run/log/journal", "--no-pager",
                            "-o", "json", *match], capture_output=True, text=True, timeout=30)
        return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]

    [entry] = wait_for(lambda: query("NETPLUG_DOMAIN=vm1"), 10, "the vm1 record")
    assert entry["MESSAGE"] == "qemu-hook: add static FDB entry 52:54:00:00:00:01 on vnet0"
    assert (entry["NETPLUG_INTERFACE"], entry["NETPLUG_MAC"], entry["NETPLUG_BRIDGE"],
            entry["NETPLUG_OPERATION"]) == ("net0", "52:54:00:00:00:01", "br0", "fdb-replace")
    assert (entry["SYSLOG_IDENTIFIER"], entry["PRIORITY"], entry["_TRANSPORT"]) == \
        ("libvirt-netplug", "6", "journal")
    [err] = wait_for(lambda: query("NETPLUG_DOMAIN=vm2", "PRIORITY=3"), 10, "the vm2 error")
    assert err["NETPLUG_COMPONENT"] == "qemu-hook"
