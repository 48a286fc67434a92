"""Exceptions a person can act on.

Every NetplugError is a *user* error: its str() is one line that names the object and the
cause and, where we can, says what to change. Entry points print it without a traceback.
Anything else that escapes is a programmer error and keeps its traceback.
"""

from __future__ import annotations

import errno as _errno
import os


class NetplugError(Exception):
    """A one-line, user-facing error."""


class InputError(NetplugError):
    """Bad input: XML, MAC addresses, interface names, hook arguments."""


class PolicyError(NetplugError):
    """An invalid netplug policy (XML metadata, attribute or TOML config)."""


class StateError(NetplugError):
    """The state directory cannot be read, written or locked."""


class KernelError(NetplugError):
    """A netlink/ioctl operation failed; names the device, the operation and the cause."""

    def __init__(self, op: str, device: str, err: int, detail: str = ""):
        self.op = op
        self.device = device
        self.errno = err
        self.detail = detail
        cause = os.strerror(err) if err else "failed"
        extra = f" ({detail})" if detail else ""
        super().__init__(f"{op} on {device}: {cause}{extra}")


class DeviceGone(KernelError):
    """The device disappeared (ENODEV): a tap deleted under us, a domain that stopped."""


class NotSupported(KernelError):
    """The kernel or the device does not support the operation (EOPNOTSUPP, EINVAL on a knob)."""


def kernel_error(op: str, device: str, err: int, detail: str = "") -> KernelError:
    """Translate an errno once, at the seam, into the exception callers can catch."""
    if err in (_errno.ENODEV, _errno.ENXIO):
        return DeviceGone(op, device, err, detail)
    if err in (_errno.EOPNOTSUPP,):
        return NotSupported(op, device, err, detail)
    return KernelError(op, device, err, detail)
