"""Replay the hook calls captured from a real libvirtd (xml-samples/captured/ from libvirt
9.0, xml-samples/captured-libvirt11/ from libvirt 11.3) through the
hook entry point (hook.main, with the installed shim's config and state dir), against a kernel
that does what libvirt and QEMU did around them.

For each capture and each libvirtd ("lab") in it, in its own namespace and state dir, every captured
event runs twice, in the captured order, with the captured argv and stdin. Around the events
the test plays libvirt's part: the bridges exist, a `qemu start` finds its domain's taps
created and enslaved, QEMU's exit (before `stopped`) deletes them, a network's `stopped`
deletes its bridge and its `start` recreates it. Proves, on real XML (type='bridge' NICs of a
host-bridge network, `stopped` without <target>, reconnect, save/restore, migration, network
restart, hot-(un)plug): exit 0, nothing on stdout, no traceback, a replay changes nothing;
after every start-type event exactly the NICs the policy names are managed (judged here from
the captured XML with the standard library, not by netplug's planner); at the end no record
and no static entry is left.
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import oracle
from conftest import SAMPLES
from netns import NetNS
from polling import wait_for

CAPTURES = sorted(p for p in SAMPLES.glob("captured*") if (p / "index.json").exists())
NS = "urn:x-libvirt-netplug:1"
CONFIG = '[bridge.br0]\npromiscLinks = "no"\n'  # the capture's host bridge br0 is managed here
CONFIG_MANAGED = {"br0"}
# The hook entry point runs in a forked child in the namespace (hook.main, as the shim calls
# it): the shims themselves are tested in test_events.py and test_hook_start.py; here the point
# is libvirt's real XML and order of events.


def samples(captured: Path) -> list[dict]:
    try:
        index = json.loads((captured / "index.json").read_text())
    except (OSError, ValueError):
        return []
    out = []
    for s in index.get("samples", []):
        path = captured / s["file"]
        argv = s.get("argv") or []
        if path.exists() and len(argv) >= 4:
            out.append({"path": path, "lab": s.get("lab", ""), "kind": argv[0].split("/")[-2]
                        .split(".")[0], "obj": argv[1], "op": argv[2], "subop": argv[3]})
    return out


def labs() -> list[tuple[Path, str]]:
    """(capture dir, lab) of every libvirtd in every capture."""
    return [(c, lab) for c in CAPTURES for lab in sorted({s["lab"] for s in samples(c)})]


# -- an independent reading of the captured XML (stdlib only) ---------------------------------


def network_policy(xml: bytes) -> tuple[str | None, str | None, str | None]:
    """(name, bridge, promiscLinks) of a <network> or <hookData>."""
    root = ET.fromstring(xml)
    net = root.find("network") if root.tag == "hookData" else root
    pol = net.find(f"metadata/{{{NS}}}policy")
    br = net.find("bridge")
    return (net.findtext("name"), br.get("name") if br is not None else None,
            pol.get("promiscLinks") if pol is not None else None)


def libvirt_bridge(xml: bytes) -> str | None:
    """The bridge libvirt itself creates for a network (not a host bridge it only uses)."""
    root = ET.fromstring(xml)
    net = root.find("network") if root.tag == "hookData" else root
    fwd, br = net.find("forward"), net.find("bridge")
    if br is None or (fwd is not None and fwd.get("mode") not in (None, "nat", "route",
                                                                  "open")):
        return None
    return br.get("name")


def bridged_nics(xml: bytes) -> list[dict]:
    """Every NIC of a domain that has a tap in a bridge: mac, tap, bridge, network."""
    out = []
    for i in ET.fromstring(xml).iterfind("devices/interface"):
        src, tgt, mac = i.find("source"), i.find("target"), i.find("mac")
        if i.get("type") not in ("bridge", "network") or src is None or tgt is None:
            continue
        if not src.get("bridge"):
            continue
        out.append({"mac": mac.get("address").lower(), "tap": tgt.get("dev"),
                    "bridge": src.get("bridge"), "network": src.get("network")})
    return out


def should_manage(nic: dict, policies: dict[str, str | None]) -> bool:
    if nic["network"]:
        pol = policies.get(nic["network"])
        if pol is not None:
            return pol == "no"
    return nic["bridge"] in CONFIG_MANAGED


# -- the replay -------------------------------------------------------------------------------


class Libvirt:
    """Plays libvirt's and QEMU's part in the kernel around the captured hook calls."""

    def __init__(self, ns: NetNS, bridges: set[str]):
        self.ns = ns
        self.taps: dict[str, list[str]] = {}  # domain -> its taps
        for br in sorted(bridges):
            self.add_bridge(br)

    def add_bridge(self, br: str) -> None:
        # Every bridge gets a veth port with carrier: without one, the bridge's own carrier
        # flips (a second later, via linkwatch) whenever a carrier-less tap joins or leaves,
        # which would show up in the replay comparison without netplug doing anything.
        self.ns.add_bridge(br)
        self.ns.add_veth(f"u-{br}"[:15], f"v-{br}"[:15], master=br)
        wait_for(lambda: oracle.link(self.ns.name, br).get("operstate") == "UP", 5,
                 f"{br} to come up")

    def has(self, dev: str) -> bool:
        return oracle.exists(self.ns.name, dev)

    def before(self, s: dict, xml: bytes) -> None:
        if s["kind"] == "qemu" and s["op"] == "start":
            self.taps[s["obj"]] = []
            for nic in bridged_nics(xml):
                if not self.has(nic["bridge"]):
                    self.add_bridge(nic["bridge"])
                self.ns.add_tap(nic["tap"], nic["bridge"], address="fe" + nic["mac"][2:])
                self.taps[s["obj"]].append(nic["tap"])
        elif s["kind"] == "qemu" and s["op"] == "stopped":
            for tap in self.taps.pop(s["obj"], []):  # QEMU exited: its taps are gone
                if self.has(tap):
                    self.ns.del_link(tap)

    def after(self, s: dict, xml: bytes) -> None:
        if s["kind"] != "network":
            return
        _name, bridge, _pol = network_policy(xml)
        if not bridge:
            return
        if s["op"] == "start" and not self.has(bridge):
            self.add_bridge(bridge)
        elif s["op"] == "stopped" and self.has(bridge) and libvirt_bridge(xml) == bridge:
            self.ns.del_link(bridge)  # libvirt's own bridge goes with the network
            self.ns.del_link(f"u-{bridge}"[:15])


@pytest.mark.skipif(not labs(), reason="no captured samples (xml-samples/captured*/)")
@pytest.mark.parametrize("captured,lab", labs() or [(None, "none")],
                         ids=[f"{c.name}-{lab}" for c, lab in labs()] or ["none"])
def test_replay_captured_events(captured, lab, ns, hooks):
    events = [s for s in samples(captured) if s["lab"] == lab]
    bridges, own = set(CONFIG_MANAGED), set()
    for s in events:
        data = s["path"].read_bytes()
        if s["kind"] == "qemu":
            bridges |= {n["bridge"] for n in bridged_nics(data)}
        elif s["op"] == "start":
            own.add(libvirt_bridge(data))
    hooks.write_config(CONFIG)
    world = Libvirt(ns, bridges - own)  # host bridges exist; libvirt makes its own
    policies: dict[str, str | None] = {}
    for s in events:
        data = s["path"].read_bytes()
        world.before(s, data)
        if s["kind"] == "network":
            name, _br, pol = network_policy(data)
            policies[name] = pol
        runs = []
        for _ in range(2):
            r = hooks.run_inprocess(s["kind"], s["obj"], s["op"], data, s["subop"])
            runs.append((r, oracle.snapshot(ns.name)))
        label = f"{s['path'].name} ({lab})"
        for r, _snap in runs:
            assert r.rc == 0 and r.stdout == b"" and "Traceback" not in r.stderr, (label, r)
            assert r.errors == [], (label, r)
        assert oracle.diff(runs[0][1], runs[1][1]) == [], f"replaying {label} changed"
        world.after(s, data)
        if s["kind"] == "qemu" and s["op"] in ("start", "started", "reconnect"):
            for nic in bridged_nics(data):
                statics = oracle.static_macs(ns.name, nic["tap"])
                flags = oracle.port_flags(ns.name, nic["tap"])
                if should_manage(nic, policies):
                    assert (statics, flags) == ({nic["mac"]: []}, (False, False)), (label, nic)
                else:
                    assert (statics, flags) == ({}, (True, True)), (label, nic)
    assert [e for e in oracle.master_entries(ns.name) if e.get("state") == "static"] == []
    domains = Path(hooks.state_dir) / "domains"
    assert (os.listdir(domains) if domains.exists() else []) == []
