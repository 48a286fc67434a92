"""libvirt hook entry point: ``main(argv, stdin, stderr) -> int``.

libvirtd runs ``<hook> <object> <op> <subop> <extra>`` with the domain XML (qemu) or a
``<hookData>`` document (network) on stdin. Rules we keep (libvirt's):
- never call libvirt; never write to stdout (migrate/restore take stdout as replacement XML);
- no background children; bounded time (netlink timeouts, a bounded lock, an alarm backstop);
- ``reconnect`` never fails (a failure kills the running VM); by default no operation fails
  because of netplug: errors are logged and a half-applied port is rolled back. A ``strict``
  setting (config ``strict = true`` or policy ``strict='yes'``) makes start-type operations
  fail instead.

Events we ignore cost no more than starting Python: this module imports nothing up front
that the interpreter has not loaded already (``posix``, the module ``os`` wraps: importing
``os`` costs ~1 ms; ``_signal``, the module ``signal`` wraps with enums: ~3 ms); everything
else is imported when there is work.
"""

from __future__ import annotations

import posix
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
    def __init__(self, config: str | None, state_dir: str | None, log):
        from .policy import Config, load_config
        from .state import StateDir
        from .errors import PolicyError

        self.log = log
        self.state = StateDir(state_dir)
        self.errors = 0
        self.in_sync = False  # the run only read: everything was already as it should be
        self.config_error: str | None = None
        try:
            self.config = load_config(config, cache=self.state)
        except PolicyError as e:
            # Fail closed: a broken config must neither stop guests from starting nor turn
            # isolation off for the running ones. Ports it decides for are held as they are.
            self.config_error = str(e)
            self.config = Config()
            self.note_once("error", f"{e}; until it is fixed netplug keeps every port as it is "
                                    f"(nothing is added or undone for the bridges it names)",
                           f"config-error:{e}")
        self.strict = self.config.strict

    def note_once(self, level: str, message: str, key: str) -> None:
        from .plan import Note

        self.note(Note(level, message, once_key=key[:150]))

    def note(self, note) -> None:
        if note.once_key:
            try:
                if not self.state.first_time(note.once_key):
                    return
            except Exception:  # noqa: BLE001 - remembering is best effort; saying it is not
                pass
        level = {"info": 20, "warning": 30, "error": 40}[note.level]
        self.log.log(level, "%s", note.message)
        if note.level == "error":
            self.errors += 1


def _read_stdin(stdin) -> bytes:
    if stdin is None:
        return b""
    data = stdin.read(MAX_INPUT + 1)
    # Drain the rest, so libvirt never gets EPIPE writing a huge document; we reject it anyway.
    while data and len(data) > MAX_INPUT and stdin.read(1 << 20):
        pass
    return data or b""


def _networks_for(ctx: _Context, domain) -> dict:
    from .model import Network
    from .errors import StateError

    out = {}
    for iface in domain.interfaces:
        name = iface.source_network
        if name and name not in out:
            try:
                rec = ctx.state.network(name)
            except StateError as e:
                ctx.log.error("%s", e)
                ctx.errors += 1
                rec = {"name": name, "policyError": str(e)}  # held, as an invalid policy
            if rec is not None:
                out[name] = Network.from_record(rec)
    return out


def _own_record(ctx: _Context, name: str) -> dict | None:
    """The domain's record, or None (reported) when it cannot be trusted: then netplug does
    not know what it owns for that domain and changes nothing for it."""
    from .errors import StateError

    try:
        return ctx.state.domain(name)
    except StateError as e:
        ctx.log.error("domain %s: %s; netplug changes nothing for this domain until then",
                      name, e)
        ctx.errors += 1
        return None


def _sync_ports(ctx: _Context, name: str, intents: list, op: str, *,
                records_of=None, extra: dict | None = None) -> None:
    """Plan and apply one domain's ports: a read-only check first, outside the lock (a
    replayed event, such as every `reconnect` after a libvirtd restart, ends there), then
    under the lock: read again, write ahead, apply, record.

    ``records_of(record)`` picks the port records this run may change (default: all).
    """
    from .apply import ApplyResult, apply_recorded, observe_ports, record_ports
    from .kernel import NetlinkKernel
    from .plan import plan_ports
    from .state import copy_record

    pick = records_of or (lambda rec: rec.get("ports") or {})
    record = _own_record(ctx, name)
    if record is None:
        return
    if not any(it.managed or it.hold or it.claims for it in intents) and not pick(record):
        for n in plan_ports(intents, None).notes:
            ctx.note(n)
        ctx.in_sync = True
        return
    def owner_of(tap: str, ifindex: int) -> str | None:
        return ctx.state.port_owner(tap, ifindex, me=name)

    with NetlinkKernel() as kernel:
        observed = observe_ports(kernel, intents, pick(record), owner_of)
        plan = plan_ports(intents, observed, pick(record))
        if not plan.ops:
            after = copy_record(record)
            record_ports(after, plan, observed, ApplyResult())
            after.update(extra or {})
            if after == record or (not after.get("ports") and not record.get("ports")
                                   and not record.get("rx")):
                for n in plan.notes:
                    ctx.note(n)
                ctx.in_sync = True
                return  # in sync: nothing to change, nothing to write, no lock taken
        with ctx.state.lock():
            record = _own_record(ctx, name)
            if record is None:
                return
            observed = observe_ports(kernel, intents, pick(record), owner_of)
            plan = plan_ports(intents, observed, pick(record))
            for n in plan.notes:
                ctx.note(n)
            if plan.ops:
                ctx.log.info("domain %s %s: plan: %s", name, op,
                             "; ".join(o.what() for o in plan.ops))
            # With records_of (a network port), the plan covers those ports only; the
            # record written keeps the domain's other ports as they are.
            result = apply_recorded(kernel, ctx.state, name, record, plan, observed, ctx.log,
                                    extra)
            ctx.errors += len(result.errors)


def _apply_domain(ctx: _Context, domain, op: str) -> None:
    from .plan import bridge_intents, with_extra_macs

    intents = bridge_intents(domain, _networks_for(ctx, domain), ctx.config,
                             config_error=ctx.config_error)
    if any("unicast" in it.policy.rx for it in intents if it.managed):
        # A hook cannot ask QEMU for the guest's filter: the extra MACs the agent recorded
        # stay (the agent updates them).
        record = _own_record(ctx, domain.name)
        if record is None:
            return
        intents = with_extra_macs(intents, record.get("ports") or {}, None, [])
    if any(it.managed and it.policy.strict for it in intents):
        ctx.strict = True
    for it in intents:
        if not it.managed:
            ctx.log.debug("%s: not managed: %s", it.ctx.describe(), it.reason)
    _sync_ports(ctx, domain.name, intents, op, extra={"uuid": domain.uuid})


def _cleanup_domain(ctx: _Context, name: str) -> None:
    from .apply import apply_recorded, observe_ports
    from .kernel import NetlinkKernel
    from .plan import plan_cleanup

    with ctx.state.lock():
        record = _own_record(ctx, name)
        if record is None:
            return
        ports = record.get("ports") or {}
        if ports:
            with NetlinkKernel() as kernel:
                observed = observe_ports(kernel, [], ports)
                plan = plan_cleanup(ports, observed)
                if plan.ops:
                    ctx.log.info("domain %s: cleanup: %s", name,
                                 "; ".join(o.what() for o in plan.ops))
                apply_recorded(kernel, ctx.state, name, record, plan, observed, ctx.log)
        # The guest is gone; whatever the cleanup could not reach (a vanished tap) is gone
        # with it. RX-filter records die with their macvtaps.
        record["ports"], record["rx"] = {}, {}
        ctx.state.put_domain(name, record)


def _qemu(ctx: _Context, name: str, op: str, data: bytes) -> None:
    from .model import parse_domain
    from .errors import NetplugError

    if op in QEMU_CLEANUP:
        # Cleanup needs only the domain's name. If the XML cannot be read (malformed, or an
        # invalid netplug policy in it), argv still names the domain: clean up anyway (a
        # guest that stopped must not leave entries behind) and report the bad XML.
        try:
            cleanup_name = parse_domain(data).name
        except NetplugError as e:
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
        ctx.log.error("%s; netplug keeps network %s's ports as they are until it is fixed",
                      net.policy_error, net.name)
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
    elif op == "updated" and net.policy_error is None and not net.policy.manages_bridge_port:
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
    from .model import Interface
    from .plan import PortIntent
    from .policy import policy_from_mapping
    from .errors import PolicyError

    if not port.network.policy.manages_bridge_port or port.network.mac_table_manager == \
            "libvirt" or not port.owner_name:
        return
    record = _own_record(ctx, port.owner_name)
    if record is None:
        return
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
        try:
            policy = policy_from_mapping(r.get("policy") or {}, f"state of {tap}")
        except PolicyError as e:
            ctx.log.error("%s", e)
            ctx.errors += 1
            continue
        intents.append(PortIntent(port.owner_name, iface,
                                  port.plug_bridge or port.network.bridge,
                                  port.network.name, policy, True, "managed",
                                  extra_macs=tuple(r.get("extra") or ())))
    _sync_ports(ctx, port.owner_name, intents, "port-created",
                records_of=lambda rec: _port_records(rec, port.mac, port.network.name))


def _unplug(ctx: _Context, port) -> None:
    from .apply import apply_recorded, observe_ports
    from .kernel import NetlinkKernel
    from .plan import plan_cleanup

    if not port.owner_name:
        return
    with ctx.state.lock():
        record = _own_record(ctx, port.owner_name)
        if record is None:
            return
        known = _port_records(record, port.mac, port.network.name)
        if not known:
            return
        with NetlinkKernel() as kernel:
            observed = observe_ports(kernel, [], known)
            plan = plan_cleanup(known, observed)
            apply_recorded(kernel, ctx.state, port.owner_name, record, plan, observed, ctx.log)
        for tap in known:
            record["ports"].pop(tap, None)
        ctx.state.put_domain(port.owner_name, record)


def _unmanage_network(ctx: _Context, network: str) -> None:
    from .apply import apply_recorded, observe_ports
    from .kernel import NetlinkKernel
    from .plan import plan_cleanup

    with ctx.state.lock():
        with NetlinkKernel() as kernel:
            for dname, rec in ctx.state.domains().items():
                mine = {t: r for t, r in rec.get("ports", {}).items()
                        if r.get("network") == network}
                if not mine:
                    continue
                observed = observe_ports(kernel, [], mine)
                plan = plan_cleanup(mine, observed)
                apply_recorded(kernel, ctx.state, dname, rec, plan, observed, ctx.log)
                for tap in mine:
                    rec["ports"].pop(tap, None)
                ctx.state.put_domain(dname, rec)


def main(argv: list[str], stdin, stderr, *, kind: str | None = None,
         config: str | None = None, state_dir: str | None = None) -> int:
    """Run one hook invocation. ``kind`` is "qemu" or "network" (default: argv[0]'s name)."""
    kind = kind or (argv[0] if argv else "").rpartition("/")[2]  # os.path.basename
    obj = argv[1] if len(argv) > 1 else ""
    op = argv[2] if len(argv) > 2 else ""
    if kind == "qemu" and op in QEMU_IGNORED:
        _read_stdin(stdin)
        return 0
    from . import hooklog

    # Not the logging module: its imports cost a hook more than its work (hooklog).
    log = hooklog.setup(f"{kind or 'hook'}-hook", stderr)
    try:
        return _main(kind, obj, op, argv, stdin, config, state_dir, log)
    finally:
        log.close()


def _main(kind: str, obj: str, op: str, argv: list[str], stdin, config: str | None,
          state_dir: str | None, log) -> int:
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
    errors = _ErrorCounter()
    log.addHandler(errors)
    rc, ctx = _handle(kind, obj, op, stdin, config, state_dir, log)
    log.removeHandler(errors)
    if ctx is not None and ctx.in_sync and not errors.count and rc == 0:
        # A replay that found everything in place (every `reconnect` of a libvirtd restart,
        # usually) stays read-only: its result is the one already recorded.
        return rc
    # What `netplug status` shows as this domain's (network's) last hook run. Best effort.
    from . import hookresult
    from .state import state_dir_path

    hookresult.record(state_dir_path(state_dir), kind, obj, op,
                      argv[3] if len(argv) > 3 else "-", errors=errors.count,
                      error=errors.first, exit_status=rc)
    return rc


def _handle(kind: str, obj: str, op: str, stdin, config: str | None, state_dir: str | None,
            log) -> tuple[int, "_Context | None"]:
    """The run's exit status, and its context (None when it failed before having one)."""
    from .errors import NetplugError

    ctx = None
    try:
        data = _read_stdin(stdin)
        ctx = _Context(config, state_dir, log)
        if kind == "qemu":
            _qemu(ctx, obj, op, data)
        else:
            _network(ctx, obj, op, data)
    except NetplugError as e:
        log.error("%s %s %s: %s", kind, obj, op, e)
        if ctx is not None:
            ctx.errors += 1
        else:
            return 0, None
    except Exception:  # noqa: BLE001 - a programmer error must still never kill a VM
        log.exception("%s %s %s: internal error", kind, obj, op)
        if op == "reconnect":
            return 0, ctx
        return (1 if (ctx and ctx.strict and op in STRICT_OPS) else 0), ctx
    if ctx is not None and ctx.errors and ctx.strict and op in STRICT_OPS:
        log.error("%s %s %s: failing the operation because strict mode is on", kind, obj, op)
        return 1, ctx
    return 0, ctx


class _ErrorCounter:
    """A log handler (hooklog) that only counts this run's errors and keeps the first (for
    the hook's last result)."""

    level = 40  # hooklog.ERROR

    def __init__(self):
        self.count = 0
        self.first: str | None = None

    def handle(self, record) -> bool:
        if record.levelno >= self.level:
            self.count += 1
            if self.first is None:
                self.first = record.getMessage()
        return True


class _BoundedStderr:
    """stderr that never blocks the hook: libvirtd reads a hook's stderr, but if nobody
    does (a wedged reader, a full pipe), a blocking write would hold the hook — and the
    state lock with it — past any deadline. Each chunk is written only when poll(2) says the
    pipe has room (at least PIPE_BUF bytes, so a chunk that size cannot block); waiting for
    room is bounded for the whole run; past that, output is dropped. No O_NONBLOCK: stderr
    may be an operator's terminal, shared with their shell."""

    CHUNK = 4096  # PIPE_BUF on Linux
    WAIT_BUDGET = 2.0  # seconds of waiting for room, for the whole run
    MAX_BYTES = 256 * 1024  # more than any hook says; keeps a runaway from flooding libvirtd

    def __init__(self, fd: int = 2):
        import select
        import time

        self.fd = fd
        self._poll = select.poll()
        self._poll.register(fd, select.POLLOUT)
        self._time = time.monotonic
        self.waited = 0.0
        self.written = 0
        self.dropped = 0

    def write(self, text: str) -> int:
        data = text.encode("utf-8", "replace") if isinstance(text, str) else bytes(text)
        for i in range(0, len(data), self.CHUNK):
            chunk = data[i:i + self.CHUNK]
            if self.written + len(chunk) > self.MAX_BYTES or not self._room():
                self.dropped += len(data) - i
                break
            try:
                self.written += posix.write(self.fd, chunk)
            except OSError:
                self.dropped += len(data) - i
                break
        return len(text)

    def _room(self) -> bool:
        budget = max(0.0, self.WAIT_BUDGET - self.waited)
        t0 = self._time()
        try:
            ready = self._poll.poll(int(budget * 1000))
        except OSError:
            return False
        self.waited += self._time() - t0
        return bool(ready) and not any(ev & (0x8 | 0x10 | 0x20) for _fd, ev in ready)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.fd


def _standard_fds() -> None:
    """libvirtd gives hooks stdin, stdout and stderr, but a hook run by hand or by another
    tool may get some closed: open /dev/null in their place, so that nothing below (dup2,
    a write, a child) fails with EBADF — a failing `reconnect` kills the VM."""
    for fd in (0, 1, 2):
        try:
            posix.fstat(fd)
        except OSError:
            try:
                null = posix.open("/dev/null", posix.O_RDWR)
            except OSError:
                continue
            if null != fd:
                posix.dup2(null, fd)
                posix.close(null)


def run(kind: str, *, config: str | None = None, state_dir: str | None = None) -> int:
    """Entry point of the installed hook shims. Does not return: flushes and exits without
    the interpreter's teardown (nothing is left to tear down; it costs 15 ms a hook)."""
    rc = 0
    try:
        _standard_fds()
        # Whatever happens below, nothing may reach libvirt through stdout: for migrate and
        # restore it would replace the domain XML. Point fd 1 at stderr.
        posix.dup2(2, 1)
        err = _BoundedStderr(2)
        sys.stdout = sys.stderr = err  # stray prints and tracebacks too
        import _signal

        def _deadline(_signum, _frame):
            # Only non-blocking work here: the state lock is released by the exit itself.
            err.write(f"netplug {kind}-hook: ERROR: gave up after {HOOK_DEADLINE} s; "
                      f"run 'netplug reconcile' to finish what this hook left\n")
            posix._exit(0)

        _signal.signal(_signal.SIGALRM, _deadline)
        _signal.alarm(HOOK_DEADLINE)
        if sys.stdin is not None:
            stdin = sys.stdin.buffer
        else:
            import io

            stdin = io.open(0, "rb", closefd=False)  # os.fdopen
        rc = main(sys.argv, stdin, err, kind=kind, config=config, state_dir=state_dir)
    except BaseException:  # noqa: BLE001 - by default nothing fails a libvirt operation
        rc = 0
    finally:
        posix._exit(rc)  # nothing to flush: the hook's log writes each record as it comes
