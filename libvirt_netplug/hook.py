"""libvirt hook entry point: ``main(argv, stdin, stderr) -> int``.

libvirtd runs ``<hook> <object> <op> <subop> <extra>`` with the domain XML (qemu) or a
``<hookData>`` document (network) on stdin. Rules we keep (libvirt's):
- never call libvirt; never write to stdout (migrate/restore take stdout as replacement XML);
- no background children; bounded time (netlink timeouts, a bounded lock, an alarm backstop);
- ``reconnect`` never fails (a failure kills the running VM); by default no operation fails
  because of netplug: errors are logged and a half-applied port is rolled back. A ``strict``
  setting (config ``strict = true`` or policy ``strict='yes'``) makes start-type operations
  fail instead.

This module imports only ``os`` and ``sys`` up front so events we ignore cost no more than
starting Python; everything else is imported when there is work.
"""

from __future__ import annotations

import os
import sys

MAX_INPUT = 10 * 1024 * 1024
HOOK_DEADLINE = 30  # seconds; the alarm is a backstop, netlink and lock waits are bounded

QEMU_APPLY = {"start", "started", "reconnect"}
QEMU_CLEANUP = {"stopped", "release"}
QEMU_IGNORED = {"prepare", "migrate", "restore", "attach"}
NETWORK_OPS = {"start", "started", "stopped", "port-created", "port-deleted", "updated"}
# Operations whose failure aborts something in libvirt: only these may honour `strict`.
STRICT_OPS = {"start", "started", "port-created"}


class _Context:
    def __init__(self, config: str | None, state_dir: str | None):
        from .policy import Config, load_config
        from .state import StateDir
        from .errors import PolicyError
        import logging

        self.log = logging.getLogger("libvirt_netplug.hook")
        self.state = StateDir(state_dir)
        try:
            self.config = load_config(config)
        except PolicyError as e:
            # A broken config must not stop guests from starting: log it, manage nothing
            # the config would have managed.
            self.log.error("%s; host bridges from the config are not managed until it is "
                           "fixed", e)
            self.config = Config()
        self.errors = 0
        self.strict = self.config.strict

    def note(self, note) -> None:
        if note.once_key and not self.state.first_time(note.once_key):
            return
        level = {"info": 20, "warning": 30, "error": 40}[note.level]
        self.log.log(level, "%s", note.message)
        if note.level == "error":
            self.errors += 1


def _read_stdin(stdin) -> bytes:
    data = stdin.read(MAX_INPUT + 1)
    # Drain the rest, so libvirt never gets EPIPE writing a huge document; we reject it anyway.
    while data and len(data) > MAX_INPUT and stdin.read(1 << 20):
        pass
    return data or b""


def _networks_for(ctx: _Context, domain) -> dict:
    from .model import Network

    out = {}
    for iface in domain.interfaces:
        name = iface.source_network
        if name and name not in out:
            rec = ctx.state.network(name)
            if rec is not None:
                out[name] = Network.from_record(rec)
    return out


def _apply_domain(ctx: _Context, domain, op: str) -> None:
    from .plan import bridge_intents, plan_ports

    intents = bridge_intents(domain, _networks_for(ctx, domain), ctx.config)
    if any(it.managed and it.policy.strict for it in intents):
        ctx.strict = True
    managed = [it for it in intents if it.managed]
    for it in intents:
        if not it.managed:
            ctx.log.debug("%s: not managed: %s", it.ctx.describe(), it.reason)
    with ctx.state.lock():
        record = ctx.state.domain(domain.name)
        if not managed and not record.get("ports"):
            for n in plan_ports(intents, None).notes:
                ctx.note(n)
            return
        # Only a domain with managed (or previously managed) ports pays for netlink.
        from .apply import apply, observe, record_ports
        from .kernel import NetlinkKernel

        with NetlinkKernel() as kernel:
            bridges = {it.bridge for it in managed} | {
                r.get("bridge") for r in record.get("ports", {}).values()}
            taps = {it.tap for it in managed} | set(record.get("ports", {}))
            observed = observe(kernel, bridges, taps)
            plan = plan_ports(intents, observed, record.get("ports"))
            for n in plan.notes:
                ctx.note(n)
            if plan.ops:
                ctx.log.info("domain %s %s: plan: %s", domain.name, op,
                             "; ".join(o.what() for o in plan.ops))
            result = apply(plan.ops, kernel, ctx.log)
            ctx.errors += len(result.errors)
            record_ports(record, plan, observed, result)
        record["uuid"] = domain.uuid
        ctx.state.put_domain(domain.name, record)


def _cleanup_records(ctx: _Context, kernel, records: dict) -> None:
    from .apply import apply, observe
    from .plan import plan_cleanup

    observed = observe(kernel, {r.get("bridge") for r in records.values()}, records)
    plan = plan_cleanup(records, observed)
    if plan.ops:
        ctx.log.info("cleanup: %s", "; ".join(o.describe() for o in plan.ops))
    apply(plan.ops, kernel, ctx.log)


def _cleanup_domain(ctx: _Context, name: str) -> None:
    from .kernel import NetlinkKernel

    with ctx.state.lock():
        record = ctx.state.domain(name)
        ports = record.get("ports") or {}
        if ports:
            with NetlinkKernel() as kernel:
                _cleanup_records(ctx, kernel, ports)
        # The guest is gone; whatever the cleanup could not reach (a vanished tap) is gone
        # with it. RX-filter records die with their macvtaps.
        record["ports"], record["rx"] = {}, {}
        ctx.state.put_domain(name, record)


def _qemu(ctx: _Context, name: str, op: str, data: bytes) -> None:
    from .model import parse_domain

    if op in QEMU_CLEANUP:
        # Cleanup needs only the domain's name. If the XML cannot be read, argv still names
        # the domain: clean up anyway (a guest that stopped must not leave entries behind)
        # and report the bad XML.
        from .errors import InputError

        try:
            cleanup_name = parse_domain(data).name
        except InputError as e:
            if not name:
                raise
            ctx.log.error("qemu %s %s: %s; cleaning up by the name in argv", name, op, e)
            ctx.errors += 1
            cleanup_name = name
        _cleanup_domain(ctx, cleanup_name)
        return
    domain = parse_domain(data)
    if domain.name != name:
        ctx.log.warning("hook argv names domain %s but the XML names %s; using the XML",
                        name, domain.name)
    _apply_domain(ctx, domain, op)


def _port_records(record: dict, mac: str, network: str) -> dict:
    """The ports of a domain's state record that belong to this libvirt network port."""
    return {tap: r for tap, r in record.get("ports", {}).items()
            if r.get("mac") == mac and r.get("network") == network}


def _network(ctx: _Context, name: str, op: str, data: bytes) -> None:
    from .model import parse_network, parse_network_port
    from .xmlsafe import parse_xml

    if op in ("port-created", "port-deleted"):
        port = parse_network_port(data)
        net = port.network
    else:
        net = parse_network(parse_xml(data, "network hook XML"), lenient=True)
    if net.name != name:
        ctx.log.warning("hook argv names network %s but the XML names %s; using the XML",
                        name, net.name)
    if net.policy_error and op in ("start", "started", "updated"):
        ctx.log.error("%s; network %s stays unmanaged until it is fixed", net.policy_error,
                      net.name)
        ctx.errors += 1
    if net.policy.strict:
        ctx.strict = True
    if op == "stopped":
        with ctx.state.lock():
            ctx.state.delete_network(net.name)
            ctx.state.forget(f"unmanaged:{net.name}:")
            # The bridge is gone with the network; records for its ports mean nothing now.
            for dname, rec in ctx.state.domains().items():
                ports = rec.get("ports", {})
                kept = {t: r for t, r in ports.items() if r.get("network") != net.name}
                if kept != ports:
                    rec["ports"] = kept
                    ctx.state.put_domain(dname, rec)
        return
    with ctx.state.lock():
        ctx.state.put_network(net.name, net.to_record())
    if net.mac_table_manager == "libvirt" and net.policy.manages_bridge_port and \
            ctx.state.first_time(f"macTableManager:{net.name}"):
        ctx.log.info("network %s: libvirt manages its MAC table (macTableManager='libvirt'); "
                     "netplug stays hands-off", net.name)
    if op == "started" and net.bridge and net.policy.vlan_filtering and \
            net.policy.manages_bridge_port and net.mac_table_manager != "libvirt":
        _vlan_filtering(ctx, net.bridge)
    if op == "port-created":
        _replug(ctx, port)
    elif op == "port-deleted":
        _unplug(ctx, port)
    elif op == "updated" and not net.policy.manages_bridge_port:
        _unmanage_network(ctx, net.name)
    elif op == "updated" and ctx.state.first_time(f"updated:{net.name}"):
        ctx.log.info("network %s updated: running guests pick up the policy at their next "
                     "event; run 'netplug reconcile' to apply it now", net.name)


def _vlan_filtering(ctx: _Context, bridge: str) -> None:
    from .apply import apply
    from .kernel import NetlinkKernel
    from .plan import plan_vlan_filtering

    with NetlinkKernel() as kernel:
        ops, notes = plan_vlan_filtering(bridge, kernel.link(bridge))
        for n in notes:
            ctx.note(n)
        ctx.errors += len(apply(ops, kernel, ctx.log).errors)


def _replug(ctx: _Context, port) -> None:
    """port-created for a port netplug managed before (network driver restart, re-plug)."""
    from .kernel import NetlinkKernel
    from .apply import apply, observe, record_ports
    from .model import Interface
    from .plan import PortIntent, plan_ports
    from .policy import policy_from_mapping

    if not port.network.policy.manages_bridge_port or port.network.mac_table_manager == \
            "libvirt" or not port.owner_name:
        return
    with ctx.state.lock():
        record = ctx.state.domain(port.owner_name)
        known = _port_records(record, port.mac, port.network.name)
        if not known:
            return  # a new port: the qemu start hook manages it once the tap exists
        intents = []
        for tap, r in known.items():
            iface = Interface(index=0, type="network", mac=port.mac, target=tap,
                              alias=r.get("interface"), source_bridge=port.plug_bridge,
                              source_network=port.network.name, source_dev=None,
                              source_mode=None, portid=port.uuid, model=None,
                              trust_guest_rx_filters=False, vlan_tag=None)
            policy = policy_from_mapping(r.get("policy") or {}, f"state of {tap}")
            intents.append(PortIntent(port.owner_name, iface,
                                      port.plug_bridge or port.network.bridge,
                                      port.network.name, policy, True, "managed"))
        with NetlinkKernel() as kernel:
            observed = observe(kernel, {i.bridge for i in intents}, known)
            others = {t: r for t, r in record.get("ports", {}).items() if t not in known}
            plan = plan_ports(intents, observed, known)
            for n in plan.notes:
                ctx.note(n)
            result = apply(plan.ops, kernel, ctx.log)
            ctx.errors += len(result.errors)
            record["ports"] = dict(known)
            record_ports(record, plan, observed, result)
            record["ports"].update(others)
        ctx.state.put_domain(port.owner_name, record)


def _unplug(ctx: _Context, port) -> None:
    from .kernel import NetlinkKernel

    if not port.owner_name:
        return
    with ctx.state.lock():
        record = ctx.state.domain(port.owner_name)
        known = _port_records(record, port.mac, port.network.name)
        if not known:
            return
        with NetlinkKernel() as kernel:
            _cleanup_records(ctx, kernel, known)
        for tap in known:
            record["ports"].pop(tap, None)
        ctx.state.put_domain(port.owner_name, record)


def _unmanage_network(ctx: _Context, network: str) -> None:
    from .kernel import NetlinkKernel

    with ctx.state.lock():
        with NetlinkKernel() as kernel:
            for dname, rec in ctx.state.domains().items():
                mine = {t: r for t, r in rec.get("ports", {}).items()
                        if r.get("network") == network}
                if not mine:
                    continue
                _cleanup_records(ctx, kernel, mine)
                for tap in mine:
                    rec["ports"].pop(tap)
                ctx.state.put_domain(dname, rec)


def main(argv: list[str], stdin, stderr, *, kind: str | None = None,
         config: str | None = None, state_dir: str | None = None) -> int:
    """Run one hook invocation. ``kind`` is "qemu" or "network" (default: argv[0]'s name)."""
    kind = kind or os.path.basename(argv[0] if argv else "")
    obj = argv[1] if len(argv) > 1 else ""
    op = argv[2] if len(argv) > 2 else ""
    if kind == "qemu" and op in QEMU_IGNORED:
        _read_stdin(stdin)
        return 0
    from . import logsetup
    from .errors import NetplugError

    logsetup.setup(f"{kind or 'hook'}-hook", stderr)
    import logging

    log = logging.getLogger("libvirt_netplug.hook")
    if kind not in ("qemu", "network"):
        log.error("unknown hook object %r (argv %s); expected to be run as the qemu or "
                  "network hook", kind, " ".join(argv[1:]))
        return 0
    known = QEMU_APPLY | QEMU_CLEANUP if kind == "qemu" else NETWORK_OPS
    if op not in known:
        _read_stdin(stdin)
        log.warning("%s %s: operation %r is not one netplug handles; ignored", kind,
                    obj or "?", op)
        return 0
    ctx = None
    try:
        data = _read_stdin(stdin)
        ctx = _Context(config, state_dir)
        if kind == "qemu":
            _qemu(ctx, obj, op, data)
        else:
            _network(ctx, obj, op, data)
    except NetplugError as e:
        log.error("%s %s %s: %s", kind, obj, op, e)
        if ctx is not None:
            ctx.errors += 1
        else:
            return 0
    except Exception:  # noqa: BLE001 - a programmer error must still never kill a VM
        log.exception("%s %s %s: internal error", kind, obj, op)
        if op == "reconnect":
            return 0
        return 1 if (ctx and ctx.strict and op in STRICT_OPS) else 0
    if ctx is not None and ctx.errors and ctx.strict and op in STRICT_OPS:
        log.error("%s %s %s: failing the operation because strict mode is on", kind, obj, op)
        return 1
    return 0


def run(kind: str, *, config: str | None = None, state_dir: str | None = None) -> int:
    """Entry point of the installed hook shims."""
    # Whatever happens below, nothing may reach libvirt through stdout: for migrate and
    # restore it would replace the domain XML. Point fd 1 at stderr.
    os.dup2(2, 1)
    import signal

    def _deadline(_signum, _frame):
        sys.stderr.write(f"netplug {kind}-hook: ERROR: gave up after {HOOK_DEADLINE} s\n")
        os._exit(0)

    signal.signal(signal.SIGALRM, _deadline)
    signal.alarm(HOOK_DEADLINE)
    return main(sys.argv, sys.stdin.buffer, sys.stderr, kind=kind, config=config,
                state_dir=state_dir)
