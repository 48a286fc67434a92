"""The netplug test lab: a private libvirtd + QEMU guests in their own namespaces.

See tests/lab/README.md. Main entry points::

    from tests.lab import Lab, Nic
    with Lab() as lab:
        lab.add_host_bridge("br0")
        g = lab.start_guest("vm1", ["bridge:br0"])
        rc, out = g.sh("ip maddr show dev eth0")
"""

from .guest import GuestConsole, GuestError, GuestImage, build_guest, cache_dir
from .lab import Guest, Lab, LabError, Nic, cleanup_stale, destroy_lab, list_labs

__all__ = [
    "Guest", "GuestConsole", "GuestError", "GuestImage", "Lab", "LabError", "Nic",
    "build_guest", "cache_dir", "cleanup_stale", "destroy_lab", "list_labs",
]
