"""Talking to libvirtd (agent, reconcile, status, doctor only: hooks must never import this).

Everything libvirt-python raises is turned into a one-line NetplugError here.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from typing import Any, Iterable, Mapping

from .errors import NetplugError
from .model import Domain, Network, parse_domain, parse_network
from .policy import Config
from .rxfilter import RxFilter, parse_rx_filter_reply
from .sync import Desired, gc_paused

log = logging.getLogger(__name__)
from .paths import DEFAULT_URI  # noqa: F401 - re-exported


@functools.cache
def load_libvirt():
    """The libvirt module, with libvirt-python's print-every-error handler silenced (once:
    the agent's RX-event path calls this per query)."""
    try:
        import libvirt
    except ImportError:
        raise NetplugError("libvirt-python is not installed; install it with "
                           "pip install 'libvirt-netplug[agent]'") from None
    # libvirt-python prints every error to stderr by default; we report them ourselves.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    return libvirt


def connect(uri: str = DEFAULT_URI):
    libvirt = load_libvirt()
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as e:
        raise NetplugError(f"cannot connect to libvirt at {uri}: {e.get_error_message()}; is "
                           f"libvirtd running? (use --connect URI)") from None


def is_running(state: int) -> bool:
    libvirt = load_libvirt()
    return state in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_BLOCKED)


def read_networks(conn) -> tuple[dict[str, Network], list[str]]:
    libvirt = load_libvirt()
    nets: dict[str, Network] = {}
    errors: list[str] = []
    try:
        objs = conn.listAllNetworks(libvirt.VIR_CONNECT_LIST_NETWORKS_ACTIVE)
    except libvirt.libvirtError as e:
        raise NetplugError(f"cannot list networks: {e.get_error_message()}") from None
    for n in objs:
        try:
            net = parse_network(n.XMLDesc(0), lenient=True)
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_NETWORK:
                continue  # went away while we listed
            # Anything else (a lost connection) must not look like "no such network": the
            # planners would retire what netplug manages for it.
            raise NetplugError(f"network {n.name()}: {e.get_error_message()}") from None
        except NetplugError as e:
            errors.append(str(e))
            continue
        if net.policy_error:
            errors.append(net.policy_error)
        nets[net.name] = net
    return nets, errors


def read_domain(dom) -> Domain:
    return parse_domain(dom.XMLDesc(0))


@gc_paused()  # parsing every running domain's XML: see gc_paused
def read_desired(conn, config: Config, names: Iterable[str] | None = None, *,
                 missing_ok: bool = False) -> Desired:
    """Running domains (live XML) and active networks; names limits the domains read.

    With ``names`` each domain is looked up by name (one call each, not a listing of every
    domain). A name libvirt does not know is an error unless ``missing_ok`` (the agent: a
    transient domain that was destroyed is simply gone, and counts as not running).
    """
    read_at = time.time()
    libvirt = load_libvirt()
    networks, errors = read_networks(conn)
    domains: list[Domain] = []
    unreadable: set[str] = set()  # running, but XML or policy invalid: held, never retired
    known_running: set[str] = set()
    if names is None:
        # libvirtd filters by state, so a running domain costs one round trip (its XML), not
        # two: over a libvirtd socket virDomainGetState is an RPC per domain (~0.15 ms here,
        # ~0.3 s of a 2,000-domain in-sync reconcile). Names are local to the objects.
        try:
            objs = conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_RUNNING)
            known_running = {d.name() for d in objs}
            # Other states (blocked counts as running; crashed, pmsuspended... do not).
            objs += conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_OTHER)
        except libvirt.libvirtError as e:
            raise NetplugError(f"cannot list domains: {e.get_error_message()}") from None
    else:
        objs = []
        for name in sorted(set(names)):
            try:
                objs.append(conn.lookupByName(name))
            except libvirt.libvirtError as e:
                if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    raise NetplugError(f"domain {name}: {e.get_error_message()}") from None
                if not missing_ok:  # the agent: a destroyed transient domain is just gone
                    errors.append(f"domain {name}: not found")
    for d in objs:
        try:
            name = d.name()
            if name not in known_running and not is_running(d.state()[0]):
                continue
            domains.append(read_domain(d))
        except libvirt.libvirtError as e:
            # VIR_ERR_NO_DOMAIN: undefined while we read, so not running.
            if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise NetplugError(f"domain {d.name()}: {e.get_error_message()}") from None
        except NetplugError as e:
            errors.append(str(e))
            unreadable.add(name)
    return Desired(tuple(sorted(domains, key=lambda d: d.name)), networks, config,
                   tuple(errors), read_at, frozenset(unreadable))


def query_rx_filters(dom, nic: str | None = None) -> dict[str, RxFilter]:
    """QEMU's query-rx-filter for one NIC (by alias) or all; re-arms NIC_RX_FILTER_CHANGED.

    Note: libvirt marks a domain "tainted: custom-monitor" the first time a monitor command
    is sent through this API; it is informational.
    """
    libvirt = load_libvirt()
    import libvirt_qemu

    cmd: dict[str, Any] = {"execute": "query-rx-filter"}
    if nic:
        cmd["arguments"] = {"name": nic}
    try:
        reply = libvirt_qemu.qemuMonitorCommand(dom, json.dumps(cmd), 0)
    except libvirt.libvirtError as e:
        raise NetplugError(f"query-rx-filter{' ' + nic if nic else ''}: "
                           f"{e.get_error_message()}") from None
    return parse_rx_filter_reply(reply)


def lookup_domain(conn, domain: Domain):
    """libvirt's handle for a domain of ours: by UUID when the XML had one (a name can be
    reused by a later domain), else by name; NetplugError when it is gone."""
    libvirt = load_libvirt()
    try:
        return (conn.lookupByUUIDString(domain.uuid) if domain.uuid
                else conn.lookupByName(domain.name))
    except libvirt.libvirtError as e:
        raise NetplugError(f"domain {domain.name}: {e.get_error_message()}") from None


def rx_source_for(conn):
    """An RxSource (see sync.py) that asks QEMU through this connection."""

    def source(domain: Domain) -> Mapping[str, RxFilter] | None:
        return query_rx_filters(lookup_domain(conn, domain))

    return source
