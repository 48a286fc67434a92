"""`make demo`, part 3: the uplink leaves promiscuous mode, on a kernel that can do it.

The host's kernel has no bridge VLAN filtering, so this part boots Debian's own kernel under
QEMU (tests/vlankernel/vm.py) and runs ``inside()`` there: a bridge whose uplink is a macvlan
(it can filter unicast), two guest taps, netplug's installed qemu hook run as libvirtd runs it,
and before/after reads of the uplink's promiscuity and unicast list next to a frame test.

Run as root: python -m tests.vlankernel demo (or python -m tests.lab.demo --part 3).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[2]
MARK = "DEMO| "  # console lines the host shows (the rest is boot noise)


def inside() -> bool:
    """Runs in the VM: print the demo, return whether everything came out as expected."""
    sys.path.insert(0, str(REPO / "tests"))
    from fakes import bridge_iface, domain_xml, guest_mac, policy_xml
    from netns import HookRig, NetNS

    from tests.vlankernel.inner.vlanworld import BROADCAST, UNKNOWN, UPLINK, VlanWorld, \
        entry_vlans, port_flags, promiscuity, unicast_list, vlan_filtering

    def say(text: str = "") -> None:
        for line in text.splitlines() or [""]:
            print(MARK + line, flush=True)

    guests = {"tapA": guest_mac(0xA), "tapB": guest_mac(0xB)}
    frames = {"to A's MAC": (guests["tapA"], None), "to B's MAC": (guests["tapB"], None),
              "to an unknown MAC": (UNKNOWN, None), "broadcast": (BROADCAST, None)}
    ok = True
    ns = NetNS.create()
    try:
        world = VlanWorld(ns).build(vlan_filtering=False)
        for tap, mac in guests.items():
            world.add_tap(tap, mac)

        def onoff(flags: tuple[bool, bool]) -> str:
            return "/".join("on" if x else "off" for x in flags)

        def vlans(tap: str, mac: str) -> str:
            got = entry_vlans(ns, tap, mac)
            return ", ".join("none" if v is None else str(v) for v in got) or "-"

        def state(title: str) -> tuple[int, set[str]]:
            promisc, uc = promiscuity(ns, UPLINK), unicast_list(ns, UPLINK)
            mine = sorted(uc & set(guests.values()))
            say(f"  {title}")
            say(f"    br0 vlan_filtering {vlan_filtering(ns, 'br0')}; " + "; ".join(
                f"{t} learning/flood {onoff(port_flags(ns, t))}, static entry for its guest "
                f"on VLANs {vlans(t, m)}" for t, m in guests.items()))
            say(f"    uplink {UPLINK}: promiscuity {promisc}; unicast list: "
                f"{', '.join(mine) or 'no guest MAC'}"
                f"{f' (+{len(uc) - len(mine)} bridge/port addresses)' if uc - set(mine) else ''}")
            return promisc, set(mine)

        def probe() -> dict:
            got = world.probe(frames)
            for name, recv in got.items():
                say(f"    frame from the outside host {name:<18} -> "
                    f"{', '.join(t for t, _v in recv) or 'no guest'}")
            return {name: [t for t, _v in recv] for name, recv in got.items()}

        say(f"== Part 3: the uplink leaves promiscuous mode (kernel {os.uname().release}, "
            f"bridge VLAN filtering, in a QEMU guest) ==")
        say(f"  br0: uplink {UPLINK} (macvlan on a veth; the outside host sends from up0p), "
            f"guest taps " + ", ".join(f"{t} ({m})" for t, m in guests.items()))
        with tempfile.TemporaryDirectory() as tmp:
            rig = HookRig(ns, tmp)
            rig.write_config('[bridge.br0]\npromiscLinks = "no"\nvlanFiltering = "yes"\n')
            promisc, mine = state("before netplug (as libvirt leaves the taps):")
            flooded = probe()
            ok &= promisc == 1 and not mine and flooded["to an unknown MAC"] == list(guests)

            xml = domain_xml("vm1", [bridge_iface("br0", t, m, f"net{i}")
                                     for i, (t, m) in enumerate(guests.items())])
            say("\n  libvirtd's `qemu vm1 start begin -` with the installed shim (config: "
                "[bridge.br0] promiscLinks=\"no\" vlanFiltering=\"yes\"):")
            r = rig.run("qemu", "vm1", "start", xml)
            say(f"    -> exit {r.rc}, {r.elapsed * 1000:.0f} ms under TCG")
            promisc, mine = state("after:")
            got = probe()
            ok &= r.rc == 0 and promisc == 0 and mine == set(guests.values())
            ok &= got == {"to A's MAC": ["tapA"], "to B's MAC": ["tapB"],
                          "to an unknown MAC": [], "broadcast": ["tapA", "tapB"]}

            world.add_tap("tapX", guest_mac(0xC))
            vm2 = domain_xml("vm2", [bridge_iface("br0", "tapX", guest_mac(0xC), "net0")],
                             metadata=policy_xml(promiscLinks="yes"))
            rig.run_inprocess("qemu", "vm2", "start", vm2)
            promisc, mine = promiscuity(ns, UPLINK), unicast_list(ns, UPLINK)
            say(f"\n  vm2 starts, its tap tapX still learning and flooding (promiscLinks='yes'): "
                f"uplink promiscuity {promisc}, guest MACs in its list: "
                f"{len(mine & set(guests.values()))}")
            ok &= promisc == 1
            rig.run_inprocess("qemu", "vm2", "stopped", vm2, "end")
            world.del_tap("tapX")
            promisc = promiscuity(ns, UPLINK)
            say(f"  vm2 stops (libvirt deletes tapX): uplink promiscuity {promisc}")
            ok &= promisc == 0
            r = rig.run("qemu", "vm1", "stopped", xml, "end")
            promisc = promiscuity(ns, UPLINK)
            say(f"  vm1 stops (`qemu vm1 stopped end -`, exit {r.rc}): netplug gives the taps "
                f"back their flooding; uplink promiscuity {promisc}")
            ok &= r.rc == 0 and promisc == 1
    finally:
        ns.delete()
    say(f"\n  part 3: {'OK' if ok else 'UNEXPECTED RESULT'}")
    return ok


def _progress(msg: str) -> None:
    print(f"[part 3] {msg}", file=sys.stderr, flush=True)


def part3(progress: Callable[[str], None] = _progress) -> bool:
    """Host side: boot the VLAN-kernel VM and show what ``inside()`` prints."""
    from tests.vlankernel import vm

    t0 = time.monotonic()
    reason = vm.unavailable()
    if reason:
        print(f"\n== Part 3 cannot run: {reason} ==")
        return False
    progress("part 3: building or checking the cached VLAN-kernel VM image (Debian's kernel + "
             "busybox initramfs)")
    img = vm.build()
    vm.precompile()
    progress(f"booting {img.kernel.package} under QEMU (TCG) on the host's root over 9p")
    script = (f"export PATH=/usr/sbin:/usr/bin:/sbin:/bin PYTHONDONTWRITEBYTECODE=1\n"
              f"modprobe -d {img.kernel.modroot} -a {' '.join(vm.TEST_MODULES)}\n"
              f"cd {REPO} && exec {vm.venv_python()} -m tests.vlankernel.demo --inside\n")
    print()
    r = vm.run_job(script, image=img, timeout=600,
                   on_line=lambda ln: ln.startswith(MARK) and print(ln[len(MARK):], flush=True))
    progress(f"VM ran {r.seconds:.0f} s ({time.monotonic() - t0:.0f} s with the image check); "
             f"console in {r.run_dir}")
    if r.rc is None:
        print(f"  part 3: the VM did not finish:\n{r.console_tail(30)}")
    return r.rc == 0


def main() -> bool:
    return part3()


if __name__ == "__main__":
    if sys.argv[1:] == ["--inside"]:
        sys.exit(0 if inside() else 1)
    sys.exit(0 if main() else 1)
