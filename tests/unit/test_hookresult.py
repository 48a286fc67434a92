"""The hook's last-result files (hookresult.py): the spec the hook writes and status reads.

Proves: a record round-trips with every field; names are quoted like state records; the last
run wins; a file of another format or a broken one is skipped, never fatal; writing is best
effort (an unwritable state dir raises nothing and leaves no temporary file).
"""

from __future__ import annotations

import json
import os

from libvirt_netplug import hookresult


def test_round_trip_and_layout(tmp_path):
    hookresult.record(str(tmp_path), "qemu", "vm/1", "start", "begin", errors=1,
                      error="domain vm/1: tap\nvnet0 does not exist", exit_status=0, now=5.0)
    path = tmp_path / "hooks" / "qemu" / "vm%2F1.json"
    doc = json.loads(path.read_text())
    assert doc == {"format": 1, "object": "qemu", "name": "vm/1", "operation": "start",
                   "subop": "begin", "at": 5.0, "ok": False, "errors": 1,
                   "error": "domain vm/1: tap vnet0 does not exist", "exit_status": 0,
                   "pid": os.getpid()}
    r = hookresult.read(str(tmp_path), "qemu", "vm/1")
    assert (r.operation, r.ok, r.errors, r.at) == ("start", False, 1, 5.0)
    hookresult.record(str(tmp_path), "qemu", "vm/1", "started", "begin", now=6.0)
    assert hookresult.read_all(str(tmp_path), "qemu")["vm/1"].summary() == "started ok"
    assert os.listdir(path.parent) == ["vm%2F1.json"]


def test_bad_files_are_skipped(tmp_path):
    d = tmp_path / "hooks" / "qemu"
    d.mkdir(parents=True)
    (d / "a.json").write_text("{broken")
    (d / "b.json").write_text('{"format": 99, "at": 1}')
    (d / "c.json.tmp-12").write_text("{}")
    hookresult.record(str(tmp_path), "qemu", "d", "stopped", "end", now=1.0)
    assert list(hookresult.read_all(str(tmp_path), "qemu")) == ["d"]


def test_writing_is_best_effort(tmp_path):
    (tmp_path / "hooks").write_text("not a directory")
    hookresult.record(str(tmp_path), "qemu", "vm1", "start", "begin")  # raises nothing
    hookresult.record(str(tmp_path), "bogus", "vm1", "start", "begin")
    assert sorted(os.listdir(tmp_path)) == ["hooks"]
