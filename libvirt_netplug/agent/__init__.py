"""``netplug agent``: the long-running daemon for what libvirt hooks cannot see.

Hooks never fire for NIC hotplug, vCPU resume, migration finish, restore or a guest changing
its RX filter, and a hook must never call libvirt. The agent listens to libvirt's events and
keeps the host in step, through the same engine as ``netplug reconcile`` (sync.sync: the same
planners, the same applier, the same state-dir lock as the hooks)::

    libvirt event loop thread (process-wide)       worker thread (whoever calls Agent.run)
    ----------------------------------------       ---------------------------------------
    domain LIFECYCLE / DEVICE_ADDED /         --.
      DEVICE_REMOVED / METADATA_CHANGE / REBOOT  |   WorkQueue.take()
    QEMU NIC_RX_FILTER_CHANGED                --+-->  {domain: reasons}  -> sync(only=domains)
    network LIFECYCLE                         --+-->  full resync        -> sync()
    connection closed (EOF, keepalive)        --'-->  lost               -> reconnect, full

Callbacks only mark work in the queue (a dict and a condition variable); they never call
libvirt or the kernel, so libvirt's event loop is never blocked.

Coalescing: a domain is one key in the queue however many events arrive for it, and one
sync serves them all. A marked domain becomes due ``debounce`` after its first mark (0 by
default: in the lab QEMU sent one event per guest action, and a wait only adds latency) and
is rate-limited by a per-domain
token bucket: ``burst`` syncs back to back (a guest change that arrives in two steps costs no
waiting), then one per ``min_interval`` (a guest rewriting its filter hundreds of times a
second costs at most 1/min_interval syncs a second). QEMU re-arms NIC_RX_FILTER_CHANGED only
when the filter is queried, and each sync queries it, so a burst always ends with a sync that
reads the final filter.

Latency: an RX-filter event for a domain whose XML the agent already holds skips libvirt's
XML (nothing in it changed: every XML change has its own event), asks QEMU about the NICs
the events named only (query-rx-filter by name: other NICs keep their recorded state and
their own events armed) through a cached domain handle before taking the state lock, then
plans and applies for that domain only; it reads only the macvtaps netplug syncs. Events for NICs netplug does not sync (libvirt's trustGuestRxFilters ones) are dropped.

Failures: any apply error, or an error reading libvirt, schedules a full resync with an
exponential backoff; a failed query-rx-filter re-marks its domain (the query is also what
re-arms QEMU's event). A lost connection is retried with backoff forever, followed by a full
resync; the agent never exits because libvirtd went away. A full resync also runs at start,
after every (re)connection and every ``resync_interval`` seconds.

The pieces, each readable and testable alone:

    workqueue.py  WorkQueue: the coalescing dirty set with its per-domain token bucket
    events.py     what an event means: the reasons the queue records and the worker reads
    session.py    LibvirtSession: the connection, its callbacks, query-rx-filter
    worker.py     Agent: the worker loop (sync, retries, backoff, reconnects)
    metrics.py    AgentMetrics: the Prometheus textfile with the agent's own series
    command.py    ``netplug agent``: arguments, signals, logging
"""

from ..lazy import exports

# Loaded on first use (PEP 562): `netplug plan` imports this package for its subcommand's
# arguments only, and a test of the queue need not load libvirt's session or the engine.
_EXPORTS = {
    "cmd_agent": "command", "register": "command",
    "RX_EVENT": "events", "lifecycle_reason": "events", "rx_reason": "events",
    "AgentMetrics": "metrics",
    "LibvirtSession": "session", "Session": "session", "start_event_loop": "session",
    "DEFAULT_URI": "worker", "Agent": "worker", "AgentOptions": "worker", "Backoff": "worker",
    "Work": "workqueue", "WorkQueue": "workqueue",
}
__all__ = sorted(_EXPORTS)

__getattr__ = exports(__name__, _EXPORTS)
