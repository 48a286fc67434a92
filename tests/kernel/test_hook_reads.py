"""A hook reads only what it needs (issue 11): its own taps, its bridge, and the bridge's entry
for each (MAC, VLAN) it plans — never a dump of every port or of the whole FDB, so its cost
does not grow with the bridge. And a replay of a domain that is in sync (every `reconnect`
after a libvirtd restart) reads, writes nothing and takes no lock.

The requests are counted in the hook's own process (hook.main in a forked child, the netlink
transport wrapped there only), on a bridge with 2 and with 600 foreign ports.
"""

from __future__ import annotations

import io
import os

import oracle
from fakes import bridge_iface, domain_xml, guest_mac, state_lock_held, tap_mac

from .topo import CONFIG

A, B = guest_mac(1), guest_mac(2)
RTM_NAMES = {16: "NEWLINK", 18: "GETLINK", 19: "SETLINK", 28: "NEWNEIGH", 29: "DELNEIGH",
             30: "GETNEIGH", 114: "GETVLAN"}


def _counted_hook(argv, data, config, state_dir):
    from libvirt_netplug import hook, netlink

    seen: list[tuple[str, str]] = []
    real = (netlink.Netlink.request, netlink.Netlink.get, netlink.Netlink.dump)

    def wrap(kind, fn):
        def call(self, msgtype, *a, **kw):
            seen.append((kind, RTM_NAMES.get(msgtype, str(msgtype))))
            return fn(self, msgtype, *a, **kw)
        return call

    netlink.Netlink.request = wrap("request", real[0])
    netlink.Netlink.get = wrap("get", real[1])
    netlink.Netlink.dump = wrap("dump", real[2])
    err = io.StringIO()
    rc = hook.main(argv, io.BytesIO(data), err, kind="qemu", config=config,
                   state_dir=state_dir)
    return rc, seen, err.getvalue()


def build(ns, foreign: int) -> str:
    ns.add_bridge("br0")
    ns.add_veth("up0", "up0p", master="br0")
    ns.add_tap("vnet0", "br0", address=tap_mac(A))
    ns.add_tap("vnet1", "br0", address=tap_mac(B))
    # Other ports, with entries (each tap's own address is one; add a static one each).
    script = []
    for i in range(foreign):
        script.append(f"tuntap add dev ft{i} mode tap")
        script.append(f"link set ft{i} master br0")
    if script:
        ns.run(["ip", "-batch", "-"], input="\n".join(script).encode(), check=True,
               timeout=300)
        fdb = [f"fdb add 02:00:00:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x} dev "
               f"ft{i} master static" for i in range(foreign)]
        ns.run(["bridge", "-batch", "-"], input="\n".join(fdb).encode(), check=True,
               timeout=300)
    return domain_xml("vm1", [bridge_iface("br0", "vnet0", A, "net0"),
                              bridge_iface("br0", "vnet1", B, "net1")])


def run_counted(ns, hooks, op, xml):
    rc, seen, err = ns.call(_counted_hook, hooks.argv("qemu", "vm1", op), xml.encode(),
                            hooks.config, hooks.state_dir, timeout=120)
    assert rc == 0 and "ERROR" not in err, err
    return seen


def test_the_hooks_requests_do_not_depend_on_the_bridge_size(ns, hooks):
    hooks.write_config(CONFIG)
    xml = build(ns, 600)
    assert len(oracle.bridge_links(ns.name)) > 600
    start = run_counted(ns, hooks, "start", xml)
    replay = run_counted(ns, hooks, "reconnect", xml)
    stop = run_counted(ns, hooks, "stopped", xml)
    for seen in (start, replay, stop):
        dumps = [s for s in seen if s[0] == "dump"]
        assert not [d for d in dumps if d[1] in ("GETLINK", "GETNEIGH")], seen  # no bulk reads
    # The same domain on a bridge with 2 other ports asks exactly as much.
    from netns import NetNS, HookRig
    small = NetNS.create()
    try:
        rig = HookRig(small, hooks.root + "-small")
        rig.write_config(CONFIG)
        xml2 = build(small, 2)
        assert run_counted(small, rig, "start", xml2) == start
        assert run_counted(small, rig, "reconnect", xml2) == replay
        assert run_counted(small, rig, "stopped", xml2) == stop
    finally:
        small.delete()
    assert [s for s in replay if s[0] == "request"] == []  # a replay changes nothing


def _reconnect_while_locked(argv, data, config, state_dir):
    """hook.main for a replay while another process holds the state lock."""
    from libvirt_netplug import hook

    err = io.StringIO()
    rc = hook.main(argv, io.BytesIO(data), err, kind="qemu", config=config,
                   state_dir=state_dir)
    return rc, err.getvalue()


def test_a_replay_in_sync_takes_no_lock_and_writes_nothing(ns, hooks):
    import fcntl

    hooks.write_config(CONFIG)
    xml = build(ns, 0)
    hooks.run_ok("qemu", "vm1", "start", xml)
    def files():
        out = {}
        for d, _dirs, names in os.walk(hooks.state_dir):
            for n in names:
                st = os.stat(os.path.join(d, n))
                out[os.path.join(d, n)] = (st.st_ino, st.st_mtime_ns, st.st_size)
        return out

    before = files()
    fd = os.open(os.path.join(hooks.state_dir, "lock"), os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # reconcile (or a stuck hook) holds the lock
    try:
        assert state_lock_held(hooks.state_dir)
        rc, err = ns.call(_reconnect_while_locked, hooks.argv("qemu", "vm1", "reconnect"),
                          xml.encode(), hooks.config, hooks.state_dir)
    finally:
        os.close(fd)
    # Had it asked for the lock, it would have given up after its 10 s wait and logged "lock
    # held by another netplug process": an empty stderr says it never asked.
    assert rc == 0 and err == "", err
    assert files() == before  # not a record, not the last hook result: nothing written
