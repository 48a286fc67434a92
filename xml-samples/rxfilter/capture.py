"""Record real QEMU query-rx-filter replies from the lab's Linux guest (unit-test inputs).

    .venv/bin/python xml-samples/rxfilter/capture.py     # as root; ~1 minute

Boots one lab guest with two virtio NICs on macvtaps (net0: bridge mode on low0, net1:
passthrough on low1), drives the guest through the scenarios below over its serial console
and writes, for each step, the reply exactly as libvirt returned it:

    NN-<scenario>.json     the query-rx-filter reply (both NICs), byte for byte
    index.json             per file: scenario, the guest command that led to it, and the
                           NICs (alias, MAC, macvtap mode) the replies describe

The MACs are fixed so the replies are deterministic apart from the guest's IPv6 memberships.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))

from tests.lab import Lab  # noqa: E402
from tests.lab.lab import Nic  # noqa: E402

NICS = [
    {"alias": "net0", "mac": "52:54:00:0a:00:01", "lower": "low0", "mode": "bridge"},
    {"alias": "net1", "mac": "52:54:00:0a:00:02", "lower": "low1", "mode": "passthrough"},
]

# (file stem, guest command run before the query, what it shows)
MANY_GROUPS = " ".join(f"01:00:5e:00:01:{i:02x}" for i in range(70))
MANY_MACVLANS = ("i=0; while [ $i -lt 66 ]; do ip link add link eth1 name u$i address "
                 "02:00:00:00:01:$(printf %02x $i) type macvlan mode private && ip link set u$i up; "
                 "i=$((i+1)); done")
SCENARIOS = [
    ("ready", "", "the guest driver's filter after boot (IPv4/IPv6 all-nodes, solicited-node)"),
    ("join-group", "ip maddr add 01:00:5e:01:02:03 dev eth0",
     "eth0 joined one IPv4 multicast group"),
    ("join-ipv6-group", "ip maddr add 33:33:00:00:12:34 dev eth0",
     "eth0 joined an IPv6 multicast group too"),
    ("leave-group", "ip maddr del 01:00:5e:01:02:03 dev eth0; "
                    "ip maddr del 33:33:00:00:12:34 dev eth0", "both groups left"),
    ("allmulti-on", "ip link set eth0 allmulticast on", "eth0 all-multicast"),
    ("allmulti-off", "ip link set eth0 allmulticast off", "back to normal"),
    ("promisc-on", "ip link set eth0 promisc on", "eth0 promiscuous"),
    ("promisc-off", "ip link set eth0 promisc off", "back to normal"),
    ("mac-change", "ip link set eth0 address 52:54:00:0a:00:99",
     "eth0 changed its main MAC"),
    ("mac-restore", "ip link set eth0 address 52:54:00:0a:00:01", "eth0 MAC back"),
    ("macvlan-unicast", "ip link add link eth1 name mv0 address 02:00:00:00:00:01 type macvlan "
                        "mode private && ip link set mv0 up",
     "a macvlan on eth1 puts its address in eth1's unicast table"),
    ("multicast-overflow", f"for m in {MANY_GROUPS}; do ip maddr add $m dev eth0; done",
     "70 groups on eth0: more than QEMU's 64-entry table holds"),
    ("multicast-overflow-cleared", f"for m in {MANY_GROUPS}; do ip maddr del $m dev eth0; done",
     "the 70 groups left again"),
    ("unicast-overflow", MANY_MACVLANS,
     "66 more macvlans on eth1: the unicast table overflows"),
]


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import libvirt
    import libvirt_qemu

    libvirt.registerErrorHandler(lambda *_: None, None)
    index = []
    for old in HERE.glob("[0-9][0-9]-*.json"):
        old.unlink()
    with Lab("rxcapture") as lab:
        for n in NICS:
            lab.add_lower_veth(n["lower"])
        nics = [Nic("direct", n["lower"], mode="passthrough" if n["mode"] == "passthrough"
                    else n["mode"], mac=n["mac"]) for n in NICS]
        lab.define_domain("vm1", nics)
        conn = libvirt.open(lab.host_uri)
        guest = lab.start_domain("vm1")
        dom = conn.lookupByName("vm1")

        def record(stem: str, command: str, note: str) -> None:
            reply = libvirt_qemu.qemuMonitorCommand(dom, '{"execute":"query-rx-filter"}', 0)
            name = f"{len(index):02d}-{stem}.json"
            (HERE / name).write_text(reply if reply.endswith("\n") else reply + "\n")
            index.append({"file": name, "scenario": stem, "guest_command": command,
                          "note": note})
            logging.info("%s: %s", name, note)

        # Before the guest's virtio-net driver loads: QEMU's reset state.
        record("before-driver", "", "right after virsh start, before the guest driver loads")
        guest.wait_ready(180)
        time.sleep(1.0)  # IPv6 autoconfiguration joins its groups shortly after link-up
        for stem, command, note in SCENARIOS:
            if command:
                guest.check(command, timeout=120)
                time.sleep(0.5)
            record(stem, command, note)
        (HERE / "index.json").write_text(json.dumps({
            "nics": NICS, "libvirt": conn.getLibVersion(), "qemu": conn.getVersion(),
            "samples": index}, indent=1) + "\n")
        conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
