"""Logging to journald with fields (logsetup.JournalHandler), against a fake journal socket.

Proves: a record's ``netplug`` extra (a dict or ops.Context) becomes NETPLUG_DOMAIN=,
NETPLUG_INTERFACE=, NETPLUG_MAC=, NETPLUG_BRIDGE=, NETPLUG_OPERATION= fields beside MESSAGE,
PRIORITY and SYSLOG_IDENTIFIER, in journald's wire format (values with a newline in the
binary-safe form); with no journald, or a journald that does not read, logging never blocks
and never raises; setup() falls back to syslog when there is no journal; stderr is left as
it was.
"""

from __future__ import annotations

import io
import logging
import socket
import struct

import pytest

from libvirt_netplug import logsetup
from libvirt_netplug.ops import Context
from polling import hang_guard


def parse(datagram: bytes) -> dict[str, str]:
    out, i = {}, 0
    while i < len(datagram):
        nl = datagram.index(b"\n", i)
        line = datagram[i:nl]
        if b"=" in line:
            k, v = line.split(b"=", 1)
            out[k.decode()] = v.decode()
            i = nl + 1
        else:
            (n,) = struct.unpack("<Q", datagram[nl + 1:nl + 9])
            out[line.decode()] = datagram[nl + 9:nl + 9 + n].decode()
            i = nl + 9 + n + 1
    return out


@pytest.fixture
def journal(tmp_path):
    path = str(tmp_path / "socket")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    server.settimeout(5)
    yield path, server
    server.close()


def logger_with(handler) -> logging.Logger:
    log = logging.getLogger("libvirt_netplug.test_logsetup")
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.DEBUG)
    return log


def test_fields_reach_the_journal(journal):
    path, server = journal
    h = logsetup.JournalHandler("qemu-hook", path)
    h.setFormatter(logging.Formatter("qemu-hook: %(message)s"))
    log = logger_with(h)
    log.info("add static FDB entry %s on %s", "52:54:00:00:00:01", "vnet0",
             extra={"netplug": {"domain": "vm1", "interface": "net0",
                                "mac": "52:54:00:00:00:01", "bridge": "br0",
                                "operation": "fdb-replace", "network": None}})
    f = parse(server.recv(65536))
    assert f["MESSAGE"] == "qemu-hook: add static FDB entry 52:54:00:00:00:01 on vnet0"
    assert (f["PRIORITY"], f["SYSLOG_IDENTIFIER"], f["NETPLUG_COMPONENT"]) == \
        ("6", "libvirt-netplug", "qemu-hook")
    assert {k: v for k, v in f.items() if k.startswith("NETPLUG_") and k != "NETPLUG_COMPONENT"} \
        == {"NETPLUG_DOMAIN": "vm1", "NETPLUG_INTERFACE": "net0",
            "NETPLUG_MAC": "52:54:00:00:00:01", "NETPLUG_BRIDGE": "br0",
            "NETPLUG_OPERATION": "fdb-replace"}
    assert f["CODE_FUNC"] == "test_fields_reach_the_journal"
    log.error("boom", extra={"netplug": Context("vm2", "net1", None, bridge="br1")})
    f = parse(server.recv(65536))
    assert f["PRIORITY"] == "3" and f["NETPLUG_DOMAIN"] == "vm2" and "NETPLUG_MAC" not in f


def test_binary_safe_values():
    data = logsetup.JournalHandler.encode({"MESSAGE": "two\nlines", "A": "b"})
    assert data == b"MESSAGE\n" + struct.pack("<Q", 9) + b"two\nlines\nA=b\n"
    assert parse(data) == {"MESSAGE": "two\nlines", "A": "b"}


def test_no_journal_never_raises(tmp_path):
    h = logsetup.JournalHandler("agent", str(tmp_path / "absent"))
    logger_with(h).warning("nobody listens")
    assert h.dropped == 1


def test_a_journal_that_does_not_read_never_blocks(journal):
    path, _server = journal  # bound, never read: its queue fills up
    h = logsetup.JournalHandler("agent", path)
    log = logger_with(h)
    with hang_guard("3000 records to a full journal"):
        for i in range(3000):
            log.info("message %d", i)
    assert h.dropped > 0


def test_setup_prefers_the_journal_and_falls_back_to_syslog(tmp_path, monkeypatch):
    jpath = tmp_path / "journal"
    j = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    j.bind(str(jpath))
    spath = tmp_path / "devlog"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(spath))
    try:
        monkeypatch.setattr(logsetup, "JOURNAL_SOCKET", str(jpath))
        monkeypatch.setattr(logsetup, "SYSLOG_SOCKETS", (str(spath),))
        err = io.StringIO()
        root = logsetup.setup("reconcile", err)
        kinds = [type(h).__name__ for h in root.handlers]
        assert kinds == ["StreamHandler", "JournalHandler"]
        assert root.handlers[0].stream is err
        jpath.unlink()
        root = logsetup.setup("reconcile", err)
        assert [type(h).__name__ for h in root.handlers] == ["StreamHandler", "SysLogHandler"]
    finally:
        for h in list(logging.getLogger("libvirt_netplug").handlers):
            h.close()
        j.close()
        s.close()


def test_stderr_is_journal_compares_the_stream(tmp_path):
    f = open(tmp_path / "x", "w")
    import os

    st = os.fstat(f.fileno())
    assert logsetup.stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"},
                                      f.fileno())
    assert not logsetup.stderr_is_journal({"JOURNAL_STREAM": "1:2"}, f.fileno())
    assert not logsetup.stderr_is_journal({}, f.fileno())
    f.close()
