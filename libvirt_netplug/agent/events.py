"""What libvirt's events mean to the agent: the "reasons" the work queue records.

A callback turns an event into a short reason string ("lifecycle STARTED (migrated)",
"rx-filter net1", "device-added net2"); the first word is the event kind (the ``event`` label
of netplug_agent_events_total). The worker reads them back: a batch made only of RX-filter
reasons can skip libvirt's XML and ask QEMU about the NICs they name.
"""

from __future__ import annotations

import json
from typing import Iterable

RX_EVENT = "rx-filter"


def rx_reason(details: str | None) -> str:
    """The queue reason for a NIC_RX_FILTER_CHANGED event: "rx-filter <NIC alias>"."""
    try:
        name = json.loads(details or "{}").get("name")
    except (ValueError, AttributeError):
        name = None
    return f"{RX_EVENT} {name}" if isinstance(name, str) and name else RX_EVENT


_LIFECYCLE = {0: "DEFINED", 1: "UNDEFINED", 2: "STARTED", 3: "SUSPENDED", 4: "RESUMED",
              5: "STOPPED", 6: "SHUTDOWN", 7: "PMSUSPENDED", 8: "CRASHED"}
# The details that say why (for the log): migration, save/restore, post-copy.
_DETAIL = {(2, 1): "migrated", (2, 2): "restored", (3, 1): "migrating", (3, 4): "restoring",
           (3, 7): "post-copy", (4, 1): "migrated", (4, 3): "post-copy", (5, 3): "migrated",
           (5, 4): "saved"}


def lifecycle_reason(event: int, detail: int) -> str:
    why = _DETAIL.get((event, detail))
    return f"lifecycle {_LIFECYCLE.get(event, event)}" + (f" ({why})" if why else "")


CLOSE_REASONS = {0: "error", 1: "end of file", 2: "keepalive timeout", 3: "client"}


def rx_only(reasons: Iterable[str]) -> bool:
    """Whether every reason is an RX-filter event (nothing in the domain's XML changed)."""
    return all(r.split(" ", 1)[0] == RX_EVENT for r in reasons)


def named_nics(reasons: Iterable[str]) -> frozenset[str] | None:
    """The NICs that RX-filter reasons ("rx-filter net1", see rx_reason) name; None when one
    of them names none."""
    nics = set()
    for r in reasons:
        nic = r.partition(" ")[2]
        if not nic:
            return None
        nics.add(nic)
    return frozenset(nics)
