"""Logging for the agent and the operator commands (library modules just use
logging.getLogger(__name__)); the hooks log through hooklog instead, without ``logging``.

Besides stderr, records go to the system log: to journald through its native protocol when
it runs (so each change is queryable by field: ``journalctl NETPLUG_DOMAIN=vm1``), else to
syslog. A record passes its fields as ``extra={"netplug": {"domain": …, "interface": …,
"mac": …, "bridge": …, "operation": …}}`` (any of ops.Context's fields, plus ``operation``
and ``device``); they become NETPLUG_DOMAIN=, NETPLUG_INTERFACE=, … journal fields. The
fields and the wire formats are hooklog's, so a record reads the same whoever sent it.
"""

from __future__ import annotations

import logging
import os

from . import hooklog
from .hooklog import IDENTIFIER, JOURNAL_SOCKET, SYSLOG_SOCKETS  # noqa: F401 - patched by tests

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, TextIO

class JournalHandler(logging.Handler):
    """journald's native protocol (sd_journal_send's wire format) over its datagram socket.

    Never blocks and never raises: the socket is non-blocking, and a record journald cannot
    take right now (a full queue, journald gone) is dropped, counted in ``dropped``; stderr
    still has it. The agent must never stall on its log.
    """

    def __init__(self, component: str, path: str | None = None,
                 identifier: str = IDENTIFIER):
        super().__init__()
        self.component = component
        self.path = path or JOURNAL_SOCKET
        self.identifier = identifier
        self.dropped = 0
        self._sock = hooklog.unix_dgram_socket()

    def fields(self, record: logging.LogRecord) -> dict[str, str]:
        return hooklog.journal_fields(
            self.format(record), record.levelno, self.component, identifier=self.identifier,
            pathname=record.pathname, lineno=record.lineno, func=record.funcName,
            logger=record.name, extra=getattr(record, "netplug", None))

    encode = staticmethod(hooklog.encode)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            hooklog.send_journal(self._sock, self.path, self.fields(record))
        except Exception:  # noqa: BLE001 - OSError (full, gone) or a bad record: dropped;
            self.dropped += 1  # logging must never break a caller

    def close(self) -> None:
        try:
            self._sock.close()
        finally:
            super().close()


def journal_available(path: str | None = None) -> bool:
    return os.path.exists(path or JOURNAL_SOCKET)


def stderr_is_journal(environ: Any = None, fd: int = 2) -> bool:
    """Whether stderr is journald's stream (a systemd service): then the native protocol
    carries the same records with their fields, and stderr would only duplicate them."""
    value = (environ if environ is not None else os.environ).get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    try:
        st = os.fstat(fd)
        return bool(value) and (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError):
        return False


def _system_log_handler(component: str) -> logging.Handler | None:
    """journald (native, with fields) when it runs, else syslog, else nothing."""
    if journal_available():
        h: logging.Handler = JournalHandler(component)
        h.setFormatter(_OneLine(f"{component}: %(message)s"))
        return h
    import logging.handlers  # the fallback only

    for path in SYSLOG_SOCKETS:
        if not os.path.exists(path):
            continue
        try:
            sh = logging.handlers.SysLogHandler(
                address=path, facility=logging.handlers.SysLogHandler.LOG_DAEMON)
        except OSError:
            continue
        # A datagram to a busy syslog must never block the caller (the agent holding the
        # state lock): a full socket drops the line instead.
        if sh.socket is not None:
            sh.socket.setblocking(False)
        sh.ident = f"{IDENTIFIER}[{os.getpid()}]: "
        sh.setFormatter(_OneLine(f"{component}: %(message)s"))
        return sh
    return None


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
        handler = _system_log_handler(component)
        if handler is not None:
            root.addHandler(handler)
    return root
