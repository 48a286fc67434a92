"""QEMU's view of this VM's own virtio-net NIC, asked from inside the VM.

The host's runner (tests/vlankernel/vm.py, QmpRelay) holds the QMP socket; a test writes one
command into the run directory (/run/netplug-vm) and waits for the answer there. What QEMU
reports (`query-rx-filter`) is what the guest's NIC driver told the device — an oracle outside
the guest kernel, which netplug never talks to.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

from polling import HANG_SECONDS, wait_for

RUN_DIR = Path("/run/netplug-vm")  # vm.GUEST_DIR: the run directory, seen from the guest
NIC_ID = "uplinknic"               # vm.UPLINK_NIC_ID
NIC_MAC = "52:54:00:12:34:56"      # vm.UPLINK_NIC_MAC
_seq = itertools.count()


def qmp(command: dict, timeout: float = 3 * HANG_SECONDS) -> dict:
    """Run one (allowed) QMP command through the host and return QEMU's ``return`` value."""
    n = f"{os.getpid()}-{next(_seq)}"
    tmp = RUN_DIR / f"qmp-request-{n}.tmp"
    tmp.write_text(json.dumps(command))
    tmp.rename(RUN_DIR / f"qmp-request-{n}.json")
    reply = RUN_DIR / f"qmp-reply-{n}.json"
    wait_for(reply.exists, timeout, "QEMU's answer through the host's relay", interval=0.05)
    answer = json.loads(reply.read_text())
    reply.unlink()
    assert "return" in answer, f"QMP {command.get('execute')}: {answer}"
    return answer["return"]


def nic_rx_filter() -> dict:
    """QEMU's RX filter of the VM's virtio-net NIC: promiscuous, unicast, unicast-table, …"""
    (f,) = qmp({"execute": "query-rx-filter", "arguments": {"name": NIC_ID}})
    return f


def virtio_nic() -> str:
    """The name, in the VM's initial namespace, of the NIC QEMU gave this VM (virtio_net)."""
    for dev in sorted(os.listdir("/sys/class/net")):
        if (Path("/sys/class/net") / dev / "address").read_text().strip() == NIC_MAC:
            return dev
    raise AssertionError(f"no NIC with address {NIC_MAC} in the VM (vm.py gives it one)")
