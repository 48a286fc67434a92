"""Logging for entry points only (library modules just use logging.getLogger(__name__)).

Besides stderr, records go to the system log: to journald through its native protocol when
it runs (so each change is queryable by field: ``journalctl NETPLUG_DOMAIN=vm1``), else to
syslog. A record passes its fields as ``extra={"netplug": {"domain": …, "interface": …,
"mac": …, "bridge": …, "operation": …}}`` (any of ops.Context's fields, plus ``operation``
and ``device``); they become NETPLUG_DOMAIN=, NETPLUG_INTERFACE=, … journal fields. Stdlib
only: the hook imports this.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
from typing import Any, TextIO

SYSLOG_SOCKETS = ("/run/systemd/journal/dev-log", "/dev/log")
JOURNAL_SOCKET = "/run/systemd/journal/socket"
IDENTIFIER = "libvirt-netplug"
# logging level -> syslog priority (what PRIORITY= means to journald)
_PRIORITY = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))
# A datagram larger than this may be refused (EMSGSIZE): the message is cut to fit.
_MAX_MESSAGE = 48 * 1024


def record_fields(record: logging.LogRecord) -> dict[str, str]:
    """NETPLUG_* journal fields from a record's ``netplug`` extra (a dict, or a dataclass such
    as ops.Context); None values and non-identifier keys are left out."""
    extra = getattr(record, "netplug", None)
    if extra is None:
        return {}
    if not isinstance(extra, dict):
        extra = {k: v for k, v in vars(extra).items() if not k.startswith("_")}
    out = {}
    for key, value in extra.items():
        name = "NETPLUG_" + str(key).upper()
        if value is None or not name.replace("_", "").isalnum() or not name.isascii():
            continue
        out[name] = str(value)
    return out


class JournalHandler(logging.Handler):
    """journald's native protocol (sd_journal_send's wire format) over its datagram socket.

    Never blocks and never raises: the socket is non-blocking, and a record journald cannot
    take right now (a full queue, journald gone) is dropped, counted in ``dropped``; stderr
    still has it. Hooks must finish in bounded time.
    """

    def __init__(self, component: str, path: str | None = None,
                 identifier: str = IDENTIFIER):
        super().__init__()
        self.component = component
        self.path = path or JOURNAL_SOCKET
        self.identifier = identifier
        self.dropped = 0
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.setblocking(False)

    def fields(self, record: logging.LogRecord) -> dict[str, str]:
        priority = next((p for lvl, p in _PRIORITY if record.levelno >= lvl), 7)
        out = {"MESSAGE": self.format(record), "PRIORITY": str(priority),
               "SYSLOG_IDENTIFIER": self.identifier, "SYSLOG_FACILITY": "3",
               "SYSLOG_PID": str(os.getpid()), "CODE_FILE": record.pathname,
               "CODE_LINE": str(record.lineno), "CODE_FUNC": record.funcName,
               "NETPLUG_COMPONENT": self.component, "LOGGER": record.name}
        out.update(record_fields(record))
        return out

    @staticmethod
    def encode(fields: dict[str, str]) -> bytes:
        parts = []
        for key, value in fields.items():
            data = value.encode("utf-8", "replace")
            if b"\n" in data:  # the binary-safe form: KEY\n<64-bit LE length><value>\n
                parts.append(key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n")
            else:
                parts.append(key.encode() + b"=" + data + b"\n")
        return b"".join(parts)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = self.fields(record)
            data = self.encode(fields)
            try:
                self._sock.sendto(data, self.path)
            except OSError as e:
                if e.errno != errno.EMSGSIZE:  # too big: cut the message, try once more
                    raise
                fields["MESSAGE"] = fields["MESSAGE"][:_MAX_MESSAGE] + " …"
                self._sock.sendto(self.encode(fields), self.path)
        except (OSError, ValueError):
            self.dropped += 1
        except Exception:  # noqa: BLE001 - logging must never break a hook
            self.dropped += 1

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
    import logging.handlers  # the fallback only: ~3 ms a hook where journald runs

    for path in SYSLOG_SOCKETS:
        if not os.path.exists(path):
            continue
        try:
            sh = logging.handlers.SysLogHandler(
                address=path, facility=logging.handlers.SysLogHandler.LOG_DAEMON)
        except OSError:
            continue
        # A datagram to a busy syslog must never block the caller (a hook holding the state
        # lock): a full socket drops the line instead.
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
