"""The agent's libvirt session: one connection whose event callbacks feed a WorkQueue.

libvirt-python is imported only here (and in libvirt_io); the worker talks to a ``Session``,
which unit tests replace with a fake. Callbacks run on libvirt's event-loop thread and only
mark the queue.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Iterable, Mapping, Protocol

from ..errors import NetplugError
from ..model import Domain
from ..policy import Config
from ..rxfilter import PartialFilters, RxFilter
from ..sync import Desired
from .events import CLOSE_REASONS, lifecycle_reason, rx_reason
from .workqueue import WorkQueue

log = logging.getLogger(__name__)


class Session(Protocol):
    """One connection to libvirtd, as the worker uses it (a fake in unit tests)."""

    def desired(self, config: Config, names: Iterable[str] | None = None) -> Desired: ...
    def rx_filters(self, domain: Domain, nics: Iterable[str] | None = None
                   ) -> Mapping[str, RxFilter] | None: ...
    def alive(self) -> bool: ...
    def close(self) -> None: ...


_loop_lock = threading.Lock()
_loop_thread: threading.Thread | None = None


def start_event_loop() -> None:
    """Register and run libvirt's default event loop in a daemon thread.

    libvirt's event implementation is process-global and can be registered only once, so this
    is the one piece of module-level state here; every connection of the process shares it.
    """
    global _loop_thread
    from ..libvirt_io import load_libvirt

    libvirt = load_libvirt()
    with _loop_lock:
        if _loop_thread is not None:
            return
        if libvirt.virEventRegisterDefaultImpl() < 0:
            raise NetplugError("cannot register libvirt's default event loop")

        def run() -> None:
            while True:
                if libvirt.virEventRunDefaultImpl() < 0:
                    log.error("libvirt event loop iteration failed")
                    time.sleep(0.1)

        _loop_thread = threading.Thread(target=run, name="libvirt-events", daemon=True)
        _loop_thread.start()


class LibvirtSession:
    """A libvirtd connection whose event callbacks feed a WorkQueue.

    Keepalive (5 s x 3) detects a hung libvirtd; the close callback reports EOF/keepalive
    loss to the queue. Events registered: domain LIFECYCLE, DEVICE_ADDED, DEVICE_REMOVED,
    METADATA_CHANGE (a netplug policy edited in place), REBOOT; network LIFECYCLE; and QEMU's
    NIC_RX_FILTER_CHANGED through libvirt's QEMU monitor events.
    """

    KEEPALIVE = (5, 3)

    def __init__(self, uri: str, queue: WorkQueue):
        from .. import libvirt_io

        libvirt = libvirt_io.load_libvirt()
        import libvirt_qemu

        start_event_loop()
        self.uri = uri
        self._libvirt = libvirt
        self._io = libvirt_io
        self._queue = queue
        self._closing = False
        self._dom_ids: list[int] = []
        self._net_ids: list[int] = []
        self._qemu_ids: list[int] = []
        self._handles: dict[str, Any] = {}  # uuid -> virDomain (a handle is just a name)
        self.conn = libvirt_io.connect(uri)
        self.rx_events = True
        q = queue
        try:
            try:
                self.conn.setKeepAlive(*self.KEEPALIVE)
            except libvirt.libvirtError as e:
                if e.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT:
                    raise
                # A driver running in this process (test:///, for instance): nothing to lose.
            self.conn.registerCloseCallback(self._on_close, None)
            dom_events = (
                (libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                 lambda c, d, ev, det, o: q.mark(d.name(), lifecycle_reason(ev, det))),
                (libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_ADDED,
                 lambda c, d, alias, o: q.mark(d.name(), f"device-added {alias}")),
                (libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED,
                 lambda c, d, alias, o: q.mark(d.name(), f"device-removed {alias}")),
                (libvirt.VIR_DOMAIN_EVENT_ID_METADATA_CHANGE,
                 lambda c, d, mtype, ns, o: q.mark(d.name(), "metadata-changed")),
                (libvirt.VIR_DOMAIN_EVENT_ID_REBOOT,
                 lambda c, d, o: q.mark(d.name(), "reboot")),
            )
            for event_id, cb in dom_events:
                self._dom_ids.append(self.conn.domainEventRegisterAny(None, event_id, cb, None))
            self._net_ids.append(self.conn.networkEventRegisterAny(
                None, libvirt.VIR_NETWORK_EVENT_ID_LIFECYCLE,
                lambda c, n, ev, det, o: q.mark_full(f"network {n.name()}"), None))
            try:
                self._qemu_ids.append(libvirt_qemu.qemuMonitorEventRegister(
                    self.conn, None, "NIC_RX_FILTER_CHANGED",
                    lambda c, d, ev, s, us, details, o: q.mark(d.name(), rx_reason(details)),
                    None, 0))
            except libvirt.libvirtError as e:
                if e.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT:
                    raise
                self.rx_events = False
                log.warning("%s has no QEMU monitor events: guest RX-filter changes are only "
                            "picked up by lifecycle events and full resyncs", uri)
        except libvirt.libvirtError as e:
            self.close()
            raise NetplugError(f"libvirt at {uri}: cannot register for events: "
                               f"{e.get_error_message()}") from None

    def _on_close(self, _conn, reason: int, _opaque) -> None:
        if not self._closing:
            self._queue.lost(f"connection to {self.uri} closed "
                             f"({CLOSE_REASONS.get(reason, reason)})")

    def desired(self, config: Config, names: Iterable[str] | None = None) -> Desired:
        if names is None:
            self._handles.clear()
        return self._io.read_desired(self.conn, config, names, missing_ok=True)

    def rx_filters(self, domain: Domain, nics: Iterable[str] | None = None
                   ) -> Mapping[str, RxFilter] | None:
        """The guest's filters: every NIC's, or (``nics``) only those NICs' (a PartialFilters).

        Asking one NIC by name is what its event needs: a smaller reply, and the domain's
        other NICs (e.g. the ones libvirt syncs with trustGuestRxFilters='yes') are left for
        whoever listens to their events."""
        key = domain.uuid or domain.name
        dom = self._handles.get(key)
        if dom is None:
            dom = self._handles[key] = self._io.lookup_domain(self.conn, domain)
        try:
            if nics is None:
                # One call for every NIC of the domain; it also re-arms QEMU's event for each.
                return self._io.query_rx_filters(dom)
            asked = sorted(set(nics))
            got: dict[str, RxFilter] = {}
            for nic in asked:
                got.update(self._io.query_rx_filters(dom, nic))
            return PartialFilters(got, asked)
        except NetplugError:
            self._handles.pop(key, None)
            raise

    def alive(self) -> bool:
        try:
            return bool(self.conn.isAlive())
        except self._libvirt.libvirtError:
            return False

    def close(self) -> None:
        """Deregister and close; errors (a dead connection) are expected and ignored."""
        import libvirt_qemu

        self._closing = True
        err = self._libvirt.libvirtError
        for cb_id in self._dom_ids:
            try:
                self.conn.domainEventDeregisterAny(cb_id)
            except err:
                pass
        for cb_id in self._net_ids:
            try:
                self.conn.networkEventDeregisterAny(cb_id)
            except err:
                pass
        for cb_id in self._qemu_ids:
            try:
                libvirt_qemu.qemuMonitorEventDeregister(self.conn, cb_id)
            except err:
                pass
        self._dom_ids, self._net_ids, self._qemu_ids = [], [], []
        try:
            self.conn.unregisterCloseCallback()
        except err:
            pass
        try:
            self.conn.close()
        except err:
            pass
