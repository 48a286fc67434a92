"""Hooks of two domains running at once on one bridge (libvirtd starts guests in parallel).

Proves: 2×20 `start begin` runs of the installed shim, all in flight together, all exit 0 with
empty stdout; both domains end fully managed (oracle) and both are recorded in the state dir
with every port — no run lost another's record.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import oracle
from fakes import bridge_iface, domain_xml, guest_mac, tap_mac

from .topo import CONFIG

RUNS = 20


def test_two_domains_started_concurrently_on_one_bridge(ns, hooks):
    ns.add_bridge("br0")
    ns.add_veth("up0", "up0p", master="br0")
    doms = {}
    for d, name in enumerate(("vmA", "vmB")):
        ifaces = []
        for i in range(2):
            tap, mac = f"vnet{d}{i}", guest_mac(0x100 * (d + 1) + i)
            ns.add_tap(tap, "br0", address=tap_mac(mac))
            ifaces.append(bridge_iface("br0", tap, mac, f"net{i}"))
        doms[name] = domain_xml(name, ifaces)
    hooks.write_config(CONFIG)

    def one(job):
        name, _n = job
        p = hooks.spawn("qemu", name, "start", doms[name])
        out, err = p.communicate(doms[name].encode(), timeout=60)
        return name, p.returncode, out, err.decode(errors="replace")

    jobs = [(name, n) for n in range(RUNS) for name in doms]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        results = list(pool.map(one, jobs))

    for name, rc, out, err in results:
        assert rc == 0 and out == b"" and "Traceback" not in err and ": ERROR: " not in err, \
            (name, rc, out, err)
    for name in doms:
        rec = hooks.domain_record(name)
        assert rec is not None, f"{name} not recorded"
        d = "AB".index(name[-1])
        assert sorted(rec["ports"]) == [f"vnet{d}0", f"vnet{d}1"]
        for i in range(2):
            tap, mac = f"vnet{d}{i}", guest_mac(0x100 * (d + 1) + i)
            assert rec["ports"][tap]["mac"] == mac
            assert oracle.static_macs(ns.name, tap) == {mac: []}
            assert oracle.port_flags(ns.name, tap) == (False, False)
