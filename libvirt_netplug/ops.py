"""Operations: the plan's vocabulary. Each names what it changes and for whom.

An Operation is a frozen value: ``describe()`` for logs and the CLI, ``to_json()`` for
``netplug plan``/``--json``, ``run(kernel)`` to perform it and ``inverse()`` to roll back a
half-applied port.
"""

from __future__ import annotations

import errno

from .errors import NotSupported
from .values import asdict, frozen

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~2 ms a hook)
if TYPE_CHECKING:  # annotations only: the hook loads netlink only when it has work
    from typing import Any, ClassVar

    from .kernel import Kernel


@frozen
class Context:
    """Who an operation is for: every kernel change names domain, interface, bridge and MAC."""

    domain: str | None = None
    interface: str | None = None  # alias (net0) or #index
    mac: str | None = None  # the guest's MAC
    bridge: str | None = None
    network: str | None = None
    lower: str | None = None  # a macvtap's lower device

    def describe(self) -> str:
        parts = []
        if self.domain:
            parts.append(f"domain {self.domain}")
        if self.interface:
            parts.append(f"interface {self.interface}")
        if self.mac:
            parts.append(f"mac {self.mac}")
        if self.bridge:
            parts.append(f"bridge {self.bridge}")
        if self.network:
            parts.append(f"network {self.network}")
        if self.lower:
            parts.append(f"lower {self.lower}")
        return ", ".join(parts)


@frozen
class Operation:
    ctx: Context
    device: str  # the device changed: tap, macvtap or bridge

    kind: ClassVar[str] = "operation"

    def what(self) -> str:
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.what()} [{self.ctx.describe()}]"

    def to_json(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "ctx" and not k.startswith("prev")
             and not (k == "also_vlans" and not v)}
        return {"action": self.kind, **d, "context": {k: v for k, v in asdict(self.ctx).items()
                                                       if v is not None}}

    def run(self, kernel: Kernel) -> None:
        raise NotImplementedError

    def inverse(self) -> "Operation | None":
        return None


@frozen
class ReplaceFdb(Operation):
    mac: str
    vlan: int | None = None
    sticky: bool = False
    # With no VLAN given, the kernel also creates the entry on every VLAN the port is in:
    # these are those VLANs, as observed when planning (what the record will hold).
    also_vlans: tuple[int, ...] = ()
    kind: ClassVar[str] = "fdb-replace"

    def what(self) -> str:
        vlan = f" vlan {self.vlan}" if self.vlan is not None else ""
        if self.also_vlans:
            vlan = f" (and on VLAN {', '.join(map(str, self.also_vlans))})"
        sticky = " sticky" if self.sticky else ""
        return f"add static{sticky} FDB entry {self.mac}{vlan} on {self.device}"

    @property
    def keys(self) -> tuple[tuple[str, int | None], ...]:
        """The (MAC, VLAN) entries this operation makes."""
        return ((self.mac, self.vlan), *((self.mac, v) for v in self.also_vlans))

    def run(self, kernel: Kernel) -> None:
        kernel.replace_fdb(self.device, self.mac, self.vlan, self.sticky)

    def inverse(self) -> Operation:
        return DeleteFdb(self.ctx, self.device, self.mac, self.vlan)


@frozen
class DeleteFdb(Operation):
    mac: str
    vlan: int | None = None
    kind: ClassVar[str] = "fdb-delete"

    def what(self) -> str:
        vlan = f" vlan {self.vlan}" if self.vlan is not None else ""
        return f"delete FDB entry {self.mac}{vlan} on {self.device}"

    def run(self, kernel: Kernel) -> None:
        kernel.delete_fdb(self.device, self.mac, self.vlan)


@frozen
class SetPortFlags(Operation):
    learning: bool
    flood: bool
    prev_learning: bool | None = None
    prev_flood: bool | None = None
    kind: ClassVar[str] = "port-flags"

    def what(self) -> str:
        onoff = {True: "on", False: "off"}
        return f"set learning {onoff[self.learning]} flood {onoff[self.flood]} on {self.device}"

    def run(self, kernel: Kernel) -> None:
        kernel.set_port_flags(self.device, learning=self.learning, flood=self.flood)

    def inverse(self) -> Operation | None:
        if self.prev_learning is None or self.prev_flood is None:
            return SetPortFlags(self.ctx, self.device, True, True)
        return SetPortFlags(self.ctx, self.device, self.prev_learning, self.prev_flood)


@frozen
class SetVlanFiltering(Operation):
    on: bool = True
    kind: ClassVar[str] = "vlan-filtering"

    def what(self) -> str:
        return f"set vlan_filtering {'on' if self.on else 'off'} on bridge {self.device}"

    def run(self, kernel: Kernel) -> None:
        # Support is known before planning (Link.vlan_filtering is None without it); if the
        # kernel still does not take it, say so rather than report success.
        if not kernel.set_vlan_filtering(self.device, self.on):
            raise NotSupported(self.what(), self.device, errno.EOPNOTSUPP,
                               "the bridge did not switch; no bridge VLAN filtering here")


# The macvtap RX-filter operations live in rxops.py: the hooks never use them, and each
# value class costs the hook's start to create. They are still importable from here.
_RX_OPS = ("AddMulticast", "DelMulticast", "AddUnicast", "DelUnicast", "SetAllmulti",
           "SetPromisc", "SetAddress")


def __getattr__(name: str):
    if name in _RX_OPS:
        from . import rxops

        return getattr(rxops, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
