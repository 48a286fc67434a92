"""``netplug agent``: the command line of the daemon (systemd/netplug-agent.service)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from ..paths import DEFAULT_URI

log = logging.getLogger(__name__)


def cmd_agent(args: argparse.Namespace) -> int:
    from .. import logsetup
    from ..paths import resolve
    from ..policy import load_config
    from ..state import StateDir
    from .worker import Agent, AgentOptions

    # Under systemd stderr is a journal stream: log natively instead (the same records, with
    # NETPLUG_* fields to query), not twice. Elsewhere stderr, and no copy in the system log.
    native = logsetup.stderr_is_journal() and logsetup.journal_available()
    logsetup.setup("agent", None if native else sys.stderr,
                   logging.DEBUG if args.verbose else logging.INFO, syslog=native)
    # The hooks' config and state dir unless told otherwise: an agent with other paths than
    # the hooks undoes their work.
    paths = resolve(args.config, args.state_dir, hooks_dir=args.hooks_dir)
    for m in paths.mismatches():
        log.warning("%s: the agent and the hooks disagree about what netplug manages", m)
    config = load_config(paths.config.value)
    options = AgentOptions(uri=args.connect, resync_interval=args.resync_interval,
                           debounce=args.debounce / 1000.0,
                           min_interval=args.min_interval / 1000.0)
    agent = Agent(options, state=StateDir(paths.state_dir.value), config=config,
                  config_path=paths.config.value, metrics_file=args.metrics_file)
    signals = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
    # Block the signals before any thread exists (threads inherit the mask), and take them
    # synchronously here: no handler ever runs inside libvirt's loop or the worker.
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        worker = threading.Thread(target=agent.run, name="netplug-worker")
        log.info("starting (libvirt %s, state dir %s, config %s)", args.connect,
                 paths.state_dir.describe(), paths.config.describe()
                 + ("" if config.path else ": no such file, nothing managed through it"))
        worker.start()
        stopping = False
        while worker.is_alive():
            info = signal.sigtimedwait(signals, 1.0)
            if info is None:
                continue
            if info.si_signo == signal.SIGHUP:
                log.info("SIGHUP: reloading the config and resyncing")
                agent.reload()
            elif not stopping:
                log.info("%s: stopping", signal.Signals(info.si_signo).name)
                stopping = True
                agent.stop()
        worker.join()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    return 0 if stopping else 1


def register(subparsers) -> None:
    sp = subparsers.add_parser(
        "agent", help="run the event agent: macvtap RX-filter sync, hotplug, resume, "
                      "migration (a daemon; see systemd/netplug-agent.service)",
        description="Listen to libvirt's events and keep bridge ports and macvtap RX filters "
                    "in step with the running guests. Full resync at start, after every "
                    "reconnection, after errors and every --resync-interval seconds. "
                    "SIGHUP re-reads the config; SIGTERM/SIGINT stop.")
    from ..paths import add_path_arguments

    sp.add_argument("--connect", "-c", default=DEFAULT_URI, metavar="URI",
                    help=f"libvirt URI (default {DEFAULT_URI})")
    add_path_arguments(sp)
    sp.add_argument("--metrics-file", metavar="FILE",
                    help="write Prometheus metrics to FILE (node_exporter textfile format) "
                         "after every sync")
    sp.add_argument("--resync-interval", type=_nonneg_float, default=300.0, metavar="SEC",
                    help="full resync every SEC seconds (default 300; 0: only at start, "
                         "reconnect and after errors)")
    sp.add_argument("--debounce", type=_nonneg_float, default=0.0, metavar="MS",
                    help="wait MS milliseconds after a domain's first event before syncing "
                         "it (default 0: QEMU sends one event per guest change, see "
                         "bench/rx_sync_latency.py)")
    sp.add_argument("--min-interval", type=_nonneg_float, default=50.0, metavar="MS",
                    help="rate limit per domain: after 3 back-to-back syncs, at most one "
                         "every MS milliseconds; bounds the cost of a guest flooding RX-filter "
                         "changes (default 50)")
    sp.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    sp.set_defaults(func=cmd_agent)


def _nonneg_float(value: str) -> float:
    try:
        f = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if f < 0 or f != f or f == float("inf"):
        raise argparse.ArgumentTypeError(f"{value!r}: use a number >= 0")
    return f

