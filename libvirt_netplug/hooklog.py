"""The hooks' logger, without the ``logging`` module (hook side), and the system log's wire
formats that logsetup's handlers use too.

A hook says a few lines per run; importing ``logging`` (re, traceback, threading, weakref,
string with it) cost every hook with work ~12 ms, more than all of its netlink work. This is
the part of logging a hook uses: ``debug``/``info``/``warning``/``error``/``exception``/
``log`` with %-style arguments, ``extra={"netplug": {...}}`` fields (a dict, or an object
such as ops.Context), ``isEnabledFor``, and ``addHandler``/``removeHandler`` for anything
with a ``handle(record)`` method (hook._ErrorCounter). Each record goes, as logsetup's
handlers would send it, to:

- the hook's stderr (hook._BoundedStderr: it never blocks), one line:
  ``netplug qemu-hook: ERROR: message`` (a traceback, as logging formats it, joined with
  " | ": libvirtd and journald both take a newline for the end of a record);
- the system log: journald's native protocol with the NETPLUG_* fields when journald runs,
  else a syslog datagram. Non-blocking and never raising: a record the system log cannot
  take now is dropped (stderr still has it); hooks must finish in bounded time.

The agent and the operator commands keep ``logging`` (logsetup); both sides build their
journal fields and syslog lines with the functions here, so a record reads the same in the
journal whoever sent it. Imports nothing at module level but ``os`` and ``sys``.
"""

from __future__ import annotations

import os
import sys

SYSLOG_SOCKETS = ("/run/systemd/journal/dev-log", "/dev/log")
JOURNAL_SOCKET = "/run/systemd/journal/socket"
IDENTIFIER = "libvirt-netplug"

DEBUG, INFO, WARNING, ERROR, CRITICAL = 10, 20, 30, 40, 50
_LEVEL_NAMES = {DEBUG: "DEBUG", INFO: "INFO", WARNING: "WARNING", ERROR: "ERROR",
                CRITICAL: "CRITICAL"}
# level -> syslog priority (what PRIORITY= means to journald), highest level first
_PRIORITY = ((CRITICAL, 2), (ERROR, 3), (WARNING, 4), (INFO, 6))
LOG_DAEMON = 3  # syslog facility
# A datagram larger than this may be refused (EMSGSIZE): the message is cut to fit.
MAX_MESSAGE = 48 * 1024
_EMSGSIZE = 90
_EAGAIN = 11


# -- wire formats (shared with logsetup) --------------------------------------------------------


def priority(levelno: int) -> int:
    """The syslog priority of a logging level (logging's numbers: 10 DEBUG … 50 CRITICAL)."""
    for level, prio in _PRIORITY:
        if levelno >= level:
            return prio
    return 7


def level_name(levelno: int) -> str:
    return _LEVEL_NAMES.get(levelno) or f"Level {levelno}"


def netplug_fields(extra) -> dict[str, str]:
    """NETPLUG_* journal fields from a record's ``netplug`` extra (a dict, or an object such
    as ops.Context); None values and non-identifier keys are left out."""
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


def journal_fields(message: str, levelno: int, component: str, *, identifier: str,
                   pathname: str, lineno: int, func: str, logger: str,
                   extra=None) -> dict[str, str]:
    """The fields of one journal record (``message`` already formatted, on one line)."""
    out = {"MESSAGE": message, "PRIORITY": str(priority(levelno)),
           "SYSLOG_IDENTIFIER": identifier, "SYSLOG_FACILITY": str(LOG_DAEMON),
           "SYSLOG_PID": str(os.getpid()), "CODE_FILE": pathname,
           "CODE_LINE": str(lineno), "CODE_FUNC": func,
           "NETPLUG_COMPONENT": component, "LOGGER": logger}
    out.update(netplug_fields(extra))
    return out


def encode(fields: dict[str, str]) -> bytes:
    """journald's native protocol (sd_journal_send's wire format) for one record."""
    parts = []
    for key, value in fields.items():
        data = value.encode("utf-8", "replace")
        if b"\n" in data:  # the binary-safe form: KEY\n<64-bit LE length><value>\n
            parts.append(key.encode() + b"\n" + len(data).to_bytes(8, "little") + data + b"\n")
        else:
            parts.append(key.encode() + b"=" + data + b"\n")
    return b"".join(parts)


def send_journal(sock, path: str, fields: dict[str, str]) -> None:
    """Send one record over a non-blocking datagram socket; a record too big for a datagram
    is sent again with its message cut. Raises OSError when journald cannot take it."""
    try:
        sock.sendto(encode(fields), path)
    except OSError as e:
        if e.errno != _EMSGSIZE:
            raise
        fields["MESSAGE"] = fields["MESSAGE"][:MAX_MESSAGE] + " …"
        sock.sendto(encode(fields), path)


def syslog_datagram(levelno: int, message: str, identifier: str = IDENTIFIER,
                    facility: int = LOG_DAEMON, pid: int | None = None) -> bytes:
    """One syslog line as logging's SysLogHandler sends it to /dev/log:
    ``<PRI>ident[pid]: message`` and a NUL."""
    pri = (facility << 3) | priority(levelno)
    pid = os.getpid() if pid is None else pid
    return f"<{pri}>{identifier}[{pid}]: {message}\0".encode("utf-8", "replace")


def one_line(text: str) -> str:
    """libvirtd and journald both take a newline for the end of a record."""
    return text.replace("\n", " | ")


def format_exception(exc_info) -> str:
    """A traceback as logging.Formatter.formatException writes it (no trailing newline)."""
    import traceback  # only where there is a traceback to write

    text = "".join(traceback.format_exception(*exc_info))
    return text[:-1] if text.endswith("\n") else text


def unix_dgram_socket(connect: str | None = None, kind: int | None = None):
    """A non-blocking AF_UNIX socket (datagram by default), connected to ``connect``."""
    import _socket  # socket's C module: importing socket costs a hook ~2 ms

    sock = _socket.socket(_socket.AF_UNIX, (kind or _socket.SOCK_DGRAM) | _socket.SOCK_CLOEXEC)
    try:
        if connect is not None:
            sock.connect(connect)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


# -- the hook's logger -------------------------------------------------------------------------


class Record:
    """What a handler gets: the attributes of a logging.LogRecord that netplug reads."""

    __slots__ = ("name", "levelno", "levelname", "msg", "args", "netplug", "exc_info",
                 "exc_text", "pathname", "lineno", "funcName", "_message")

    def __init__(self, name: str, levelno: int, msg, args: tuple, netplug, exc_info,
                 pathname: str, lineno: int, func: str):
        self.name, self.levelno, self.levelname = name, levelno, level_name(levelno)
        self.msg, self.netplug, self.exc_info = msg, netplug, exc_info
        # As logging does: a single non-empty mapping is the arguments (%(key)s formats).
        if args and len(args) == 1 and isinstance(args[0], dict) and args[0]:
            args = args[0]
        self.args = args
        self.exc_text = format_exception(exc_info) if exc_info else None
        self.pathname, self.lineno, self.funcName = pathname, lineno, func
        self._message: str | None = None

    def getMessage(self) -> str:
        if self._message is None:
            msg = str(self.msg)
            self._message = msg % self.args if self.args else msg
        return self._message

    def text(self) -> str:
        """The message with the traceback after it, as logging.Formatter puts them."""
        s = self.getMessage()
        if self.exc_text:
            s = (s if s.endswith("\n") else s + "\n") + self.exc_text
        return s


class _StreamSink:
    def __init__(self, stream, component: str):
        self.stream = stream
        self.prefix = f"netplug {component}: "

    def handle(self, record: Record) -> None:
        try:
            self.stream.write(one_line(f"{self.prefix}{record.levelname}: {record.text()}")
                              + "\n")
            self.stream.flush()
        except Exception:  # noqa: BLE001 - logging must never break a hook
            pass

    def close(self) -> None:
        pass


class JournalSink:
    """journald's native protocol over its datagram socket: never blocks, never raises; a
    record journald cannot take now is counted in ``dropped``."""

    def __init__(self, component: str, path: str | None = None,
                 identifier: str = IDENTIFIER):
        self.component, self.identifier = component, identifier
        self.path = path or JOURNAL_SOCKET
        self.dropped = 0
        self._sock = unix_dgram_socket()

    def handle(self, record: Record) -> None:
        try:
            fields = journal_fields(one_line(f"{self.component}: {record.text()}"),
                                    record.levelno, self.component,
                                    identifier=self.identifier, pathname=record.pathname,
                                    lineno=record.lineno, func=record.funcName,
                                    logger=record.name, extra=record.netplug)
            send_journal(self._sock, self.path, fields)
        except Exception:  # noqa: BLE001 - OSError (full, gone) or a bad record: dropped
            self.dropped += 1

    def close(self) -> None:
        self._sock.close()


class SyslogSink:
    """Syslog datagrams to /dev/log (a stream socket where the datagram one is refused, as
    logging's SysLogHandler does). Non-blocking: a full socket drops the line; a syslog
    that went away is reconnected once, non-blocking too."""

    def __init__(self, path: str, component: str, identifier: str = IDENTIFIER):
        self.path, self.component, self.identifier = path, component, identifier
        self.dropped = 0
        self._sock = self._connect()  # OSError: no syslog there

    def _connect(self):
        try:
            return unix_dgram_socket(self.path)
        except OSError:
            import _socket

            return unix_dgram_socket(self.path, _socket.SOCK_STREAM)

    def handle(self, record: Record) -> None:
        try:
            data = syslog_datagram(record.levelno,
                                   one_line(f"{self.component}: {record.text()}"),
                                   self.identifier)
        except Exception:  # noqa: BLE001 - a record that cannot be formatted
            self.dropped += 1
            return
        try:
            self._sock.send(data)
        except OSError as e:
            if e.errno == _EAGAIN:  # full: drop, never wait
                self.dropped += 1
                return
            try:
                self._sock.close()
                self._sock = self._connect()
                self._sock.send(data)
            except OSError:
                self.dropped += 1

    def close(self) -> None:
        self._sock.close()


def system_log_sink(component: str):
    """journald (native, with fields) when it runs, else syslog, else None."""
    if os.path.exists(JOURNAL_SOCKET):
        try:
            return JournalSink(component, JOURNAL_SOCKET)
        except OSError:
            return None
    for path in SYSLOG_SOCKETS:
        if not os.path.exists(path):
            continue
        try:
            return SyslogSink(path, component)
        except OSError:
            continue
    return None


class HookLogger:
    """A logger for one hook run (see the module docstring); its level is INFO by default."""

    def __init__(self, name: str, sinks=(), level: int = INFO):
        self.name = name
        self.level = level
        self.handlers = list(sinks)

    def isEnabledFor(self, level: int) -> bool:
        return level >= self.level

    def addHandler(self, handler) -> None:
        if handler not in self.handlers:
            self.handlers.append(handler)

    def removeHandler(self, handler) -> None:
        if handler in self.handlers:
            self.handlers.remove(handler)

    def debug(self, msg, *args, **kw) -> None:
        if DEBUG >= self.level:
            self._log(DEBUG, msg, args, **kw)

    def info(self, msg, *args, **kw) -> None:
        if INFO >= self.level:
            self._log(INFO, msg, args, **kw)

    def warning(self, msg, *args, **kw) -> None:
        if WARNING >= self.level:
            self._log(WARNING, msg, args, **kw)

    def error(self, msg, *args, **kw) -> None:
        if ERROR >= self.level:
            self._log(ERROR, msg, args, **kw)

    def exception(self, msg, *args, exc_info=True, **kw) -> None:
        if ERROR >= self.level:
            self._log(ERROR, msg, args, exc_info=exc_info, **kw)

    def log(self, level: int, msg, *args, **kw) -> None:
        if level >= self.level:
            self._log(level, msg, args, **kw)

    def _log(self, level: int, msg, args: tuple, exc_info=None, extra=None,
             stack_info=False, stacklevel=1) -> None:
        # The caller's place, for CODE_FILE/CODE_LINE/CODE_FUNC: the frame that called the
        # public method, which called this one.
        try:
            f = sys._getframe(1 + stacklevel)
            where = (f.f_code.co_filename, f.f_lineno, f.f_code.co_name)
        except ValueError:
            where = ("(unknown file)", 0, "(unknown function)")
        if exc_info:
            if isinstance(exc_info, BaseException):
                exc_info = (type(exc_info), exc_info, exc_info.__traceback__)
            elif not isinstance(exc_info, tuple):
                exc_info = sys.exc_info()
            if exc_info[0] is None:
                exc_info = None
        try:
            record = Record(self.name, level, msg, args,
                            (extra or {}).get("netplug"), exc_info or None, *where)
        except Exception:  # noqa: BLE001 - a traceback that cannot be formatted
            return
        for h in self.handlers:
            h.handle(record)

    def close(self) -> None:
        for h in self.handlers:
            close = getattr(h, "close", None)
            if close is not None:
                try:
                    close()
                except OSError:
                    pass


def setup(component: str, stream, level: int = INFO, syslog: bool = True,
          name: str = "libvirt_netplug.hook") -> HookLogger:
    """The hook's logger: ``stream`` (the hook's stderr) and the system log."""
    sinks = []
    if stream is not None:
        sinks.append(_StreamSink(stream, component))
    if syslog:
        sink = system_log_sink(component)
        if sink is not None:
            sinks.append(sink)
    return HookLogger(name, sinks, level)
