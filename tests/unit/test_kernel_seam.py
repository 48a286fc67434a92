"""The seam's value types and error translation (no kernel needed).

Proves: errnos become the exceptions callers catch, with one-line messages naming the operation
and the device; and documents a crash NetlinkKernel.fdb() would hit on a VLAN-filtering bridge.
"""

from __future__ import annotations

import errno

import pytest

from libvirt_netplug.errors import DeviceGone, KernelError, NotSupported, kernel_error
from libvirt_netplug.kernel import FdbEntry


@pytest.mark.parametrize("err,cls", [(errno.ENODEV, DeviceGone), (errno.ENXIO, DeviceGone),
                                     (errno.EOPNOTSUPP, NotSupported),
                                     (errno.EINVAL, KernelError), (errno.EPERM, KernelError)])
def test_errno_translation(err, cls):
    e = kernel_error("add fdb entry 52:54:00:00:00:01", "vnet0", err)
    assert type(e) is cls and e.errno == err and e.device == "vnet0"
    assert str(e).startswith("add fdb entry 52:54:00:00:00:01 on vnet0: ")
    assert "\n" not in str(e)


def test_fdb_entries_with_and_without_vlan_sort():
    entries = [FdbEntry("vnet0", "fe:54:00:00:00:01", 1, "permanent"),
               FdbEntry("vnet0", "fe:54:00:00:00:01", None, "permanent")]
    assert [e.vlan for e in sorted(entries)] == [None, 1]
