"""The macvtap RX-filter operations (the agent's and reconcile's; hooks never load them).

Part of ops.py's vocabulary (``from libvirt_netplug.ops import AddMulticast`` works too).
"""

from __future__ import annotations

from typing import ClassVar, TYPE_CHECKING

from .ops import Operation
from .values import frozen

if TYPE_CHECKING:
    from .kernel import Kernel


@frozen
class AddMulticast(Operation):
    mac: str
    kind: ClassVar[str] = "multicast-add"

    def what(self) -> str:
        return f"add multicast {self.mac} to {self.device}"

    def run(self, kernel: Kernel) -> None:
        kernel.add_multicast(self.device, self.mac)

    def inverse(self) -> Operation:
        return DelMulticast(self.ctx, self.device, self.mac)


@frozen
class DelMulticast(Operation):
    mac: str
    kind: ClassVar[str] = "multicast-delete"

    def what(self) -> str:
        return f"remove multicast {self.mac} from {self.device}"

    def run(self, kernel: Kernel) -> None:
        kernel.del_multicast(self.device, self.mac)


@frozen
class AddUnicast(Operation):
    mac: str
    kind: ClassVar[str] = "unicast-add"

    def what(self) -> str:
        return f"add unicast {self.mac} to {self.device} (lower device filter)"

    def run(self, kernel: Kernel) -> None:
        kernel.add_unicast(self.device, self.mac)

    def inverse(self) -> Operation:
        return DelUnicast(self.ctx, self.device, self.mac)


@frozen
class DelUnicast(Operation):
    mac: str
    kind: ClassVar[str] = "unicast-delete"

    def what(self) -> str:
        return f"remove unicast {self.mac} from {self.device}"

    def run(self, kernel: Kernel) -> None:
        kernel.del_unicast(self.device, self.mac)


@frozen
class SetAllmulti(Operation):
    on: bool
    kind: ClassVar[str] = "allmulti"

    def what(self) -> str:
        return f"set allmulticast {'on' if self.on else 'off'} on {self.device}"

    def run(self, kernel: Kernel) -> None:
        kernel.set_allmulti(self.device, self.on)

    def inverse(self) -> Operation:
        return SetAllmulti(self.ctx, self.device, not self.on)


@frozen
class SetPromisc(Operation):
    on: bool
    kind: ClassVar[str] = "promisc"

    def what(self) -> str:
        return f"set promisc {'on' if self.on else 'off'} on {self.device}"

    def run(self, kernel: Kernel) -> None:
        kernel.set_promisc(self.device, self.on)

    def inverse(self) -> Operation:
        return SetPromisc(self.ctx, self.device, not self.on)


@frozen
class SetAddress(Operation):
    mac: str
    prev_mac: str | None = None
    kind: ClassVar[str] = "address"

    def what(self) -> str:
        return f"set address {self.mac} on {self.device}"

    def run(self, kernel: Kernel) -> None:
        kernel.set_address(self.device, self.mac)

    def inverse(self) -> Operation | None:
        return SetAddress(self.ctx, self.device, self.prev_mac) if self.prev_mac else None
