"""Record the live XML libvirt shows for running guests, one interface of every shape.

    python -m tests.lab.capture_live_shapes [--out DIR] [--release libvirt11]

The hooks see the domain XML at start; the agent, reconcile, status and doctor read the LIVE
XML (``virsh dumpxml`` of a running domain), which is where libvirt rewrites an interface on
a network into what it really is (type='direct' for a macvtap network, type='bridge' for a
forward-mode bridge network). Writes, for the libvirt it runs against:

    OUT/libvirt-<version>/domain-vm1.xml       virsh dumpxml vm1 (running)
    OUT/libvirt-<version>/network-<name>.xml   virsh net-dumpxml of each network
    OUT/libvirt-<version>/index.json           versions, and the shape of each interface

Default OUT is <repo>/xml-samples/live; tests/unit/test_live_shapes.py reads every version
found there. Networks carry their netplug policy only in <metadata> (as `virsh net-define`
keeps it):

    np-iso      isolated, libvirt bridge npbr0           promiscLinks="no"
    np-hostbr   <forward mode='bridge'/> on host bridge br1   promiscLinks="no" sticky="yes"
    np-macvtap  <forward mode='bridge'><interface dev='low1'/>  rxFilters="multicast allmulti"
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from lxml import etree

from .capture_samples import add_host_devices
from .guest import REPO_ROOT
from .lab import Lab, Nic

log = logging.getLogger("tests.lab.capture_live")

NS = "urn:x-libvirt-netplug:1"


def network(name: str, body: str, **policy: str) -> str:
    attrs = " ".join(f'{k}="{v}"' for k, v in policy.items())
    return (f"<network><name>{name}</name><metadata><netplug:policy xmlns:netplug='{NS}' "
            f"{attrs}/></metadata>{body}</network>")


NETWORKS = {
    "np-iso": network("np-iso", "<bridge name='npbr0' stp='off'/>", promiscLinks="no"),
    "np-hostbr": network("np-hostbr", "<forward mode='bridge'/><bridge name='br1'/>",
                         promiscLinks="no", sticky="yes"),
    "np-macvtap": network("np-macvtap", "<forward mode='bridge'><interface dev='low1'/>"
                          "</forward>", rxFilters="multicast allmulti"),
}
NICS = [
    Nic("network", "np-iso", mac="52:54:00:00:02:01"),
    Nic("network", "np-hostbr", mac="52:54:00:00:02:02"),
    Nic("bridge", "br0", mac="52:54:00:00:02:03"),
    Nic("direct", "low0", mode="bridge", mac="52:54:00:00:02:04"),
    Nic("network", "np-macvtap", mac="52:54:00:00:02:05"),
]


def shapes(domain_xml: str) -> list[dict]:
    root = etree.fromstring(domain_xml.encode())
    out = []
    for iface in root.iterfind("devices/interface"):
        src = iface.find("source")
        out.append({"mac": iface.find("mac").get("address"), "type": iface.get("type"),
                    "source": dict(src.attrib) if src is not None else {}})
    return out


def capture(lab: Lab, out: Path) -> Path:
    add_host_devices(lab)
    for xml in NETWORKS.values():
        lab.define_network(xml)
    lab.start_guest("vm1", NICS)
    version = lab.virsh("version", "--daemon").stdout
    # The daemon's version names the directory: the host's virsh client (the "Using library"
    # line) drives both releases' daemons.
    lib = next((ln.split()[-1] for ln in version.splitlines()
                if "Running against daemon" in ln), "unknown")
    d = out / f"libvirt-{lib}"
    d.mkdir(parents=True, exist_ok=True)
    domain = lab.virsh("dumpxml", "vm1").stdout
    (d / "domain-vm1.xml").write_text(domain)
    for name in NETWORKS:
        (d / f"network-{name}.xml").write_text(lab.virsh("net-dumpxml", name).stdout)
    index = {"generator": "python -m tests.lab.capture_live_shapes",
             "virsh_version": version.strip().splitlines(), "interfaces": shapes(domain)}
    (d / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    return d


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "xml-samples" / "live")
    ap.add_argument("--release", help="libvirt release to run (tests.lab.release names, e.g. "
                                      "libvirt11; default: the host's)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    release = None
    if args.release:
        from .release import ensure_root, releases

        release = next((r for r in releases() if r.name == args.release), None)
        if release is None:
            ap.error(f"unknown release {args.release!r}")
        if not release.is_host:
            ensure_root(release)
    with Lab(release=release) as lab:
        d = capture(lab, args.out)
    log.info("wrote %s", d)
    return 0


if __name__ == "__main__":
    sys.exit(main())
