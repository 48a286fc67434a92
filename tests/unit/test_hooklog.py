"""The hooks' logger (hooklog), which replaces the logging module on the hook path.

Proves: for the same calls, hooklog writes byte for byte what logsetup's handlers (the
logging module, as the agent and the operator commands use it) write — on stderr (levels,
%-arguments, a traceback joined on one line, a message with a newline), to journald (every
field, NETPLUG_* from a dict or an ops.Context) and to syslog (the same datagram); DEBUG is
off; logging to a journal or a syslog that does not read never blocks and never raises; a
hook run counts its errors for its last result (hook._ErrorCounter through hooklog).
"""

from __future__ import annotations

import io
import json
import logging
import socket

import pytest

from libvirt_netplug import hooklog, logsetup
from libvirt_netplug.ops import Context
from polling import hang_guard
from .test_logsetup import parse

MAC = "52:54:00:00:00:01"


def calls(log) -> None:
    """The same calls on either logger, from the same lines (CODE_LINE/CODE_FUNC agree)."""
    log.info("add static FDB entry %s on %s", MAC, "vnet0",
             extra={"netplug": {"domain": "vm1", "interface": "net0", "mac": MAC,
                                "bridge": "br0", "operation": "fdb-replace", "network": None}})
    log.debug("not managed: %s", "vnet9")
    log.warning("two\nlines %d%%", 5)
    log.log(40, "%(who)s failed", {"who": "vnet1"},
            extra={"netplug": Context("vm2", "net1", None, bridge="br1")})
    try:
        raise ValueError("a programmer error")
    except ValueError:
        log.exception("%s %s %s: internal error", "qemu", "vm1", "start")
    try:
        raise KeyError("k")
    except KeyError as e:
        log.error("with a given exception", exc_info=e)


@pytest.fixture
def stdlib_logger():
    root = logging.getLogger("libvirt_netplug")
    saved = (root.level, list(root.handlers), root.propagate)
    yield logging.getLogger("libvirt_netplug.hook")
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    root.setLevel(saved[0])
    root.handlers[:] = saved[1]
    root.propagate = saved[2]


def test_stderr_is_what_logging_writes(stdlib_logger):
    ours, theirs = io.StringIO(), io.StringIO()
    calls(hooklog.setup("qemu-hook", ours, syslog=False))
    logsetup.setup("qemu-hook", theirs, syslog=False)
    calls(stdlib_logger)
    assert ours.getvalue() == theirs.getvalue()
    lines = ours.getvalue().splitlines()
    assert len(lines) == 5  # DEBUG is off
    assert lines[0] == f"netplug qemu-hook: INFO: add static FDB entry {MAC} on vnet0"
    assert lines[1] == "netplug qemu-hook: WARNING: two | lines 5%"
    assert lines[3].startswith("netplug qemu-hook: ERROR: qemu vm1 start: internal error | "
                               "Traceback (most recent call last): | ")
    assert lines[3].endswith("ValueError: a programmer error")


@pytest.fixture
def journal(tmp_path):
    path = str(tmp_path / "journal")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    server.settimeout(5)
    yield path, server
    server.close()


def received(server, n: int) -> list[dict[str, str]]:
    return [parse(server.recv(1 << 20)) for _ in range(n)]


def test_journal_fields_are_what_logging_sends(journal, monkeypatch, stdlib_logger):
    path, server = journal
    monkeypatch.setattr(hooklog, "JOURNAL_SOCKET", path)
    monkeypatch.setattr(logsetup, "JOURNAL_SOCKET", path)
    log = hooklog.setup("qemu-hook", None)
    assert [type(h).__name__ for h in log.handlers] == ["JournalSink"]
    calls(log)
    ours = received(server, 5)
    logsetup.setup("qemu-hook", None)
    calls(stdlib_logger)
    theirs = received(server, 5)
    assert ours == theirs
    f = ours[0]
    assert f["MESSAGE"] == f"qemu-hook: add static FDB entry {MAC} on vnet0"
    assert (f["PRIORITY"], f["SYSLOG_IDENTIFIER"], f["NETPLUG_COMPONENT"], f["LOGGER"]) == \
        ("6", "libvirt-netplug", "qemu-hook", "libvirt_netplug.hook")
    assert {k: v for k, v in f.items() if k.startswith("NETPLUG_") and k != "NETPLUG_COMPONENT"} \
        == {"NETPLUG_DOMAIN": "vm1", "NETPLUG_INTERFACE": "net0", "NETPLUG_MAC": MAC,
            "NETPLUG_BRIDGE": "br0", "NETPLUG_OPERATION": "fdb-replace"}
    assert f["CODE_FUNC"] == "calls" and f["CODE_FILE"] == __file__
    assert ours[2]["PRIORITY"] == "3" and ours[2]["NETPLUG_DOMAIN"] == "vm2"
    assert "NETPLUG_MAC" not in ours[2]


def test_syslog_datagrams_are_what_logging_sends(tmp_path, monkeypatch, stdlib_logger):
    path = str(tmp_path / "devlog")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    server.settimeout(5)
    try:
        for mod in (hooklog, logsetup):
            monkeypatch.setattr(mod, "JOURNAL_SOCKET", str(tmp_path / "no-journal"))
            monkeypatch.setattr(mod, "SYSLOG_SOCKETS", (str(tmp_path / "absent"), path))
        log = hooklog.setup("network-hook", None)
        assert [type(h).__name__ for h in log.handlers] == ["SyslogSink"]
        calls(log)
        ours = [server.recv(1 << 20) for _ in range(5)]
        logsetup.setup("network-hook", None)
        calls(stdlib_logger)
        theirs = [server.recv(1 << 20) for _ in range(5)]
    finally:
        server.close()
    assert ours == theirs
    pid = __import__("os").getpid()
    assert ours[0] == (f"<30>libvirt-netplug[{pid}]: network-hook: add static FDB entry {MAC} "
                       f"on vnet0\0").encode()
    assert ours[2].startswith(b"<27>")


def test_a_journal_or_syslog_that_does_not_read_never_blocks(tmp_path, journal, monkeypatch):
    path, _server = journal  # bound, never read: its queue fills up
    monkeypatch.setattr(hooklog, "JOURNAL_SOCKET", path)
    log = hooklog.setup("qemu-hook", None)
    with hang_guard("3000 records to a full journal"):
        for i in range(3000):
            log.info("message %d", i)
    assert log.handlers[0].dropped > 0
    devlog = str(tmp_path / "devlog")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(devlog)
    try:
        monkeypatch.setattr(hooklog, "JOURNAL_SOCKET", str(tmp_path / "absent"))
        monkeypatch.setattr(hooklog, "SYSLOG_SOCKETS", (devlog,))
        log = hooklog.setup("qemu-hook", None)
        with hang_guard("3000 records to a full syslog"):
            for i in range(3000):
                log.info("message %d", i)
        assert log.handlers[0].dropped > 0
    finally:
        s.close()
    log.error("syslog gone")  # reconnecting fails: dropped, not raised
    assert log.handlers[0].dropped > 0


def test_no_system_log_and_a_broken_stream_never_raise(tmp_path, monkeypatch):
    monkeypatch.setattr(hooklog, "JOURNAL_SOCKET", str(tmp_path / "absent"))
    monkeypatch.setattr(hooklog, "SYSLOG_SOCKETS", (str(tmp_path / "absent"),))

    class Broken(io.StringIO):
        def write(self, s):
            raise OSError(5, "EIO")

    log = hooklog.setup("qemu-hook", Broken())
    assert len(log.handlers) == 1
    log.error("nobody hears this")
    log.info("bad %d arguments", "x")  # logging drops a record it cannot format


def test_a_hook_run_counts_its_errors_for_its_last_result(run_hook, fake, state_path):
    fake.add_bridge("br0")
    from fakes import bridge_iface, domain_xml

    xml = domain_xml("vm1", [bridge_iface("br0", "vnet0", MAC, "net0"),
                             bridge_iface("br0", "vnet1", "52:54:00:00:00:02", "net1")])
    r = run_hook("qemu", "vm1", "start", xml, config='[bridge.br0]\npromiscLinks = "no"\n')
    assert r.rc == 0 and len(r.errors) == 2, r  # neither tap exists
    doc = json.loads((state_path / "hooks" / "qemu" / "vm1.json").read_text())
    assert (doc["ok"], doc["errors"]) == (False, 2)
    assert r.errors[0] == f"netplug qemu-hook: ERROR: {doc['error']}"
