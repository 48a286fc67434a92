"""Record what this libvirt really passes to hooks, as test inputs for netplug.

    python -m tests.lab.capture_samples [--release NAME] [--out DIR] [--no-migrate]

Starts a lab, installs tests/lab/capture-hook into hooks/qemu.d/ and hooks/network.d/, drives
the scenarios below and writes, in the order the hooks ran:

    OUT/NNN-<qemu|network>-<op>-<subop>.xml   the hook's stdin, byte for byte
    OUT/NNN-<...>.argv                        the hook's argv, one per line ($0 first)
    OUT/index.json                            per sample: file, step, lab, argv; plus the
                                              hook environment and the versions seen

RELEASE is the libvirt release the labs run (tests/lab/release.py: libvirt9, libvirt11, host,
other; default the host's). Default OUT is <repo>/xml-samples/captured for libvirt 9 and
<repo>/xml-samples/captured-<release>/ for the others, e.g. captured-libvirt11 (its old
*.xml/*.argv/index.json are replaced).

Scenario (lab "a"; networks, bridges and lower devices exist in both labs):
    netplug-iso     isolated network, libvirt-created bridge nbr0, no IP, with
                    <metadata><netplug:policy promiscLinks="no"/></metadata>
    netplug-hostbr  <forward mode='bridge'/> on host bridge br1 (a bridge libvirt does not manage)
    netplug-macvtap <forward mode='bridge'><interface dev='low1'/> (macvtap through a network)
    br0             host bridge for <interface type='bridge'>
    low0            veth lower device for <interface type='direct' mode='bridge'>
    vm1             one NIC on each of the above
  steps: net-start, start, libvirtd restart (reconnect), net-destroy + net-start with vm1
  running, hotplug + unplug of a type='network' NIC, save + restore, shutdown (ACPI), start,
  destroy, start + live migration (p2p, tunnelled) to a second lab "b" of the same release,
  destroy there; then (unless --no-vlan) vm2 with a VLAN tag on a type='bridge' NIC (libvirt
  11 configures Linux-bridge VLANs; on a kernel without bridge VLAN filtering its start may
  fail, which is recorded in the notes).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

from .guest import REPO_ROOT
from .lab import Lab, LabError, Nic
from .release import release as find_release

log = logging.getLogger("tests.lab.capture")

HOOK_TEMPLATE = Path(__file__).with_name("capture-hook")

NET_ISO = """<network>
  <name>netplug-iso</name>
  <metadata>
    <netplug:policy xmlns:netplug="urn:x-libvirt-netplug:1" promiscLinks="no"/>
  </metadata>
  <bridge name='nbr0' stp='off'/>
</network>
"""
NET_HOSTBR = """<network>
  <name>netplug-hostbr</name>
  <forward mode='bridge'/>
  <bridge name='br1'/>
</network>
"""
NET_MACVTAP = """<network>
  <name>netplug-macvtap</name>
  <forward mode='bridge'>
    <interface dev='low1'/>
  </forward>
</network>
"""
NICS = [
    Nic("network", "netplug-iso", mac="52:54:00:00:01:01"),
    Nic("network", "netplug-hostbr", mac="52:54:00:00:01:02"),
    Nic("bridge", "br0", mac="52:54:00:00:01:03"),
    Nic("direct", "low0", mode="bridge", mac="52:54:00:00:01:04"),
    Nic("network", "netplug-macvtap", mac="52:54:00:00:01:05"),
]
VLAN_NICS = [
    Nic("bridge", "br0", mac="52:54:00:00:02:01", extra="<vlan><tag id='42'/></vlan>"),
]
HOTPLUG_NIC = "<interface type='network'><mac address='52:54:00:00:01:09'/>" \
              "<source network='netplug-iso'/><model type='virtio'/></interface>"


class Recorder:
    def __init__(self) -> None:
        self.step = "setup"
        self.marks: list[tuple[int, str]] = []  # (time_ns, step) in order

    def begin(self, step: str) -> None:
        log.info("step: %s", step)
        self.step = step
        self.marks.append((time.time_ns(), step))

    def step_at(self, t_ns: int) -> str:
        step = "setup"
        for t, s in self.marks:
            if t <= t_ns:
                step = s
        return step


def prepare_lab(lab: Lab, rec_dir: Path) -> None:
    """Hooks, host devices and networks (identical in every lab, so migration can work)."""
    rec_dir.mkdir(parents=True, exist_ok=True)
    hook = HOOK_TEMPLATE.read_text().replace("@DIR@", str(rec_dir))
    lab.install_hook("qemu", hook, "00-capture")
    lab.install_hook("network", hook, "00-capture")
    lab.reload_libvirtd()
    add_host_devices(lab)


def add_host_devices(lab: Lab) -> None:
    """What the captured guests' NICs sit on: host bridges br0 and br1 (each with an uplink)
    and the macvtap lower devices low0 and low1."""
    for i in (0, 1):
        lab.add_host_bridge(f"br{i}")
        lab.add_uplink(f"br{i}", f"upl{i}")
    for i in (0, 1):
        lab.add_lower_veth(f"low{i}")


def wait_state(lab: Lab, dom: str, state: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = lab.virsh("domstate", dom, check=False)
        if r.stdout.strip() == state:
            return
        time.sleep(0.2)
    raise LabError(f"{dom} did not reach state {state!r} within {timeout:.0f} s")


def settle(seconds: float = 1.0) -> None:
    """Hooks of asynchronous events (guest shutdown) may still be running."""
    time.sleep(seconds)


def run_scenarios(a: Lab, rec: Recorder, rec_dir: Path, migrate: bool, vlan: bool) -> dict:
    notes: dict = {}
    rec.begin("net-start")
    for xml in (NET_ISO, NET_HOSTBR, NET_MACVTAP):
        a.define_network(xml)

    rec.begin("start")
    g = a.start_guest("vm1", NICS)
    log.info("vm1 ready, MACs %s", g.macs)

    rec.begin("libvirtd-restart")
    a.restart_libvirtd()
    settle()

    rec.begin("net-restart")
    a.virsh("net-destroy", "netplug-iso")
    a.virsh("net-start", "netplug-iso")
    settle()

    rec.begin("hotplug")
    path = a.dir / "xml" / "hotplug.xml"
    path.write_text(HOTPLUG_NIC)
    a.virsh("attach-device", "vm1", str(path), "--live")
    settle()
    rec.begin("unplug")
    a.virsh("detach-device", "vm1", str(path), "--live")
    settle(2)

    rec.begin("save")
    save = a.dir / "vm1.save"
    a.virsh("save", "vm1", str(save))
    rec.begin("restore")
    a.virsh("restore", str(save))
    save.unlink()
    rc, out = g.sh("echo alive")
    notes["restore_guest_alive"] = rc == 0 and out.strip() == "alive"

    rec.begin("shutdown")
    a.virsh("shutdown", "vm1")
    try:
        wait_state(a, "vm1", "shut off", 60)
        notes["shutdown"] = "acpi power button -> busybox acpid -> poweroff -f"
    except LabError:
        notes["shutdown"] = "guest ignored the ACPI power button; destroyed instead"
        a.virsh("destroy", "vm1")
    settle()

    rec.begin("start-again")
    g = a.start_domain("vm1")
    g.wait_ready()

    rec.begin("destroy")
    a.virsh("destroy", "vm1")
    settle()

    if migrate:
        notes["migrate"] = migrate_scenario(a, rec, rec_dir)
    if vlan:
        notes["vlan"] = vlan_scenario(a, rec)
    return notes


def vlan_scenario(a: Lab, rec: Recorder) -> str:
    """vm2 with <vlan><tag id='42'/></vlan> on a type='bridge' NIC: start, destroy."""
    rec.begin("vlan-start")
    a.define_domain("vm2", VLAN_NICS)
    r = a.virsh("start", "vm2", check=False)
    if r.returncode != 0:
        settle()
        return f"start failed: {r.stderr.strip()}"
    settle()
    rec.begin("vlan-destroy")
    a.virsh("destroy", "vm2")
    settle()
    return "started and destroyed"


def migrate_scenario(a: Lab, rec: Recorder, rec_dir: Path) -> str:
    rec.begin("migrate-setup")
    with Lab(a.name.removeprefix("netplug-lab-") + "-b", release=a.release) as b:
        prepare_lab(b, rec_dir / "b")
        for xml in (NET_ISO, NET_HOSTBR, NET_MACVTAP):
            b.define_network(xml)
        g = a.start_domain("vm1")
        g.wait_ready()
        g.check("ip maddr add 33:33:00:00:12:34 dev eth0")
        rec.begin("migrate")
        t0 = time.monotonic()
        r = a.virsh("migrate", "--live", "--p2p", "--tunnelled", "--persistent",
                    "--undefinesource", "vm1", b.host_uri, check=False, timeout=300)
        if r.returncode != 0:
            return f"failed: {r.stderr.strip()}"
        took = time.monotonic() - t0
        gb = b.guest("vm1")
        rc, out = gb.sh("ip maddr show dev eth0")
        alive = rc == 0 and "33:33:00:00:12:34" in out
        rec.begin("destroy-migrated")
        b.virsh("destroy", "vm1")
        settle()
        return (f"ok: p2p tunnelled live migration between two labs in {took:.1f} s; guest "
                f"{'answered' if alive else 'did NOT answer'} on the destination")


def collect(rec_dir: Path, out: Path, rec: Recorder, meta: dict) -> int:
    for old in list(out.glob("*.xml")) + list(out.glob("*.argv")) + list(out.glob("index.json")):
        old.unlink()
    out.mkdir(parents=True, exist_ok=True)
    samples = []
    envs = set()
    entries = sorted(rec_dir.glob("*/*.argv"),
                     key=lambda p: tuple(int(x) for x in p.stem.split("-")))
    for i, argv_file in enumerate(entries, 1):
        stem = argv_file.stem
        t_ns = int(stem.split("-")[0])
        argv = argv_file.read_text().splitlines()
        kind = Path(argv[0]).parent.name.removesuffix(".d")  # qemu.d/00-capture -> qemu
        lab = argv_file.parent.name
        op, subop = (argv[2:4] + ["-", "-"])[:2]
        name = f"{i:03d}-{kind}-{op}-{subop}"
        shutil.copyfile(argv_file.with_suffix(".stdin"), out / f"{name}.xml")
        (out / f"{name}.argv").write_text("\n".join(argv) + "\n")
        env = argv_file.with_suffix(".env").read_text()
        envs.add(tuple(sorted(line.split("=", 1)[0] for line in env.splitlines() if "=" in line)))
        samples.append({"file": f"{name}.xml", "step": rec.step_at(t_ns), "lab": lab,
                        "argv": argv})
    meta["hook_environment_variables"] = sorted({v for e in envs for v in e})
    meta["samples"] = samples
    (out / "index.json").write_text(json.dumps(meta, indent=1) + "\n")
    return len(samples)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--release", help="libvirt release of the labs (default: the host's)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--no-migrate", action="store_true")
    ap.add_argument("--no-vlan", action="store_true")
    args = ap.parse_args(argv)
    rel = find_release(args.release)
    if args.out is None:
        sub = "captured" if rel.name == "libvirt9" else f"captured-{rel.name}"
        args.out = REPO_ROOT / "xml-samples" / sub
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    rec = Recorder()
    t0 = time.monotonic()
    with Lab(release=rel) as a:
        rec_dir = a.dir / "captures"   # outside the bind mounts: same path inside and out
        prepare_lab(a, rec_dir / "a")
        meta = {
            "generator": "python -m tests.lab.capture_samples",
            "release": rel.name,
            "libvirt": a.virsh("version", "--daemon").stdout.strip().splitlines(),
        }
        notes = run_scenarios(a, rec, rec_dir, migrate=not args.no_migrate,
                              vlan=not args.no_vlan)
        meta["notes"] = notes
        n = collect(rec_dir, args.out, rec, meta)
    log.info("wrote %d samples to %s in %.0f s; notes: %s", n, args.out,
             time.monotonic() - t0, json.dumps(notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
