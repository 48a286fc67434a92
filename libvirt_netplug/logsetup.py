"""Logging for entry points only (library modules just use logging.getLogger(__name__))."""

from __future__ import annotations

import logging
import logging.handlers
import os
from typing import TextIO

SYSLOG_SOCKETS = ("/run/systemd/journal/dev-log", "/dev/log")


class _OneLine(logging.Formatter):
    """One line per record: libvirtd and journald both treat newlines as record breaks."""

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace("\n", " | ")


def setup(component: str, stream: TextIO | None, level: int = logging.INFO,
          syslog: bool = True) -> logging.Logger:
    root = logging.getLogger("libvirt_netplug")
    root.setLevel(level)
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    root.propagate = False
    if stream is not None:
        h = logging.StreamHandler(stream)
        h.setFormatter(_OneLine(f"netplug {component}: %(levelname)s: %(message)s"))
        root.addHandler(h)
    if syslog:
        for path in SYSLOG_SOCKETS:
            if not os.path.exists(path):
                continue
            try:
                sh = logging.handlers.SysLogHandler(
                    address=path, facility=logging.handlers.SysLogHandler.LOG_DAEMON)
            except OSError:
                continue
            # A datagram to a busy journald must never block the caller (a hook holding the
            # state lock): a full socket drops the line instead.
            if sh.socket is not None:
                sh.socket.setblocking(False)
            sh.ident = f"libvirt-netplug[{os.getpid()}]: "
            sh.setFormatter(_OneLine(f"{component}: %(message)s"))
            root.addHandler(sh)
            break
    return root
