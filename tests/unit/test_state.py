"""The state directory: atomic writes, the lock, and many writers at once.

Proves: records round-trip (any domain name, even with '/' or '..', stays inside the dir);
readers never see a half-written file while writers replace it; many processes doing
read-modify-write under the lock lose nothing — neither on different domains nor on one
shared record; a held lock makes others give up after the timeout with a one-line error; a
corrupt file is a one-line error that says what to do.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time

import pytest

from libvirt_netplug.errors import StateError
from libvirt_netplug.state import StateDir
from polling import hang_guard

CTX = multiprocessing.get_context("fork")


def port(i: int = 0, **extra) -> dict:
    """A well-formed port record (the shape cleanup trusts); ``extra`` adds fields."""
    return {"mac": f"52:54:00:00:{i >> 8 & 255:02x}:{i & 255:02x}", "bridge": "br0",
            "ifindex": 10 + i, "fdb": [], "flags": False, "saved": None, **extra}


def test_round_trip_and_names(tmp_path):
    s = StateDir(str(tmp_path / "st"))
    names = ["vm1", "a/b", "..", ".hidden", "ünïcode", "with space", "50%"]
    for n in names:
        s.put_domain(n, {"domain": n, "ports": {"vnet0": port(1)}})
    assert sorted(s.domains()) == sorted(names)
    for n in names:
        assert s.domain(n)["domain"] == n
    assert all(os.path.dirname(os.path.join(s.path, "domains", f)) ==
               os.path.join(s.path, "domains") for f in os.listdir(os.path.join(s.path,
                                                                             "domains")))
    s.put_network("mgd", {"name": "mgd"})
    assert s.network("mgd") == {"name": "mgd"} and list(s.networks()) == ["mgd"]
    s.delete_network("mgd")
    assert s.network("mgd") is None


def test_domain_named_like_a_temporary_file(tmp_path):
    s = StateDir(str(tmp_path))
    s.put_domain(".tmp-vm", {"ports": {"vnet0": port()}})
    assert list(s.domains()) == [".tmp-vm"]


def test_empty_record_deletes_the_file(tmp_path):
    s = StateDir(str(tmp_path))
    s.put_domain("vm1", {"ports": {"x": port()}})
    s.put_domain("vm1", {"ports": {}, "rx": {}})
    assert s.domains() == {} and s.domain("vm1") == {"domain": "vm1", "ports": {}, "rx": {}}


def test_env_default(tmp_path, monkeypatch):
    monkeypatch.setenv("NETPLUG_STATE_DIR", str(tmp_path / "env"))
    assert StateDir().path == str(tmp_path / "env")


def test_corrupt_file_is_a_clear_error(tmp_path):
    s = StateDir(str(tmp_path))
    (tmp_path / "domains").mkdir()
    (tmp_path / "domains" / "vm1.json").write_text('{"ports": {')
    with pytest.raises(StateError) as e:
        s.domain("vm1")
    assert "vm1.json" in str(e.value) and "netplug reconcile" in str(e.value)
    assert "\n" not in str(e.value)


LONE = "\\ud800"  # JSON's escape for a lone surrogate: a str no bytes encode


@pytest.mark.parametrize("text", [
    f'{{"ports": {{"{LONE}": {{}}}}}}',                                        # the tap's name
    f'{{"ports": {{"vnet0": {{"mac": "52:54:00:00:00:01", "bridge": "{LONE}", '
    f'"ifindex": 3}}}}}}',                                                    # its bridge
    f'{{"ports": {{"vnet0": {{"mac": "{LONE}", "bridge": "br0", "ifindex": 3}}}}}}',
    f'{{"rx": {{"{LONE}": {{}}}}}}',                                           # a macvtap's name
])
def test_a_record_with_a_lone_surrogate_is_its_own_domains_error(tmp_path, text):
    """Seen by a property test: encoding such a name raised UnicodeEncodeError out of the
    record check, which would have stopped reconcile and status for every domain."""
    s = StateDir(str(tmp_path))
    s.put_domain("good", {"domain": "good", "ports": {"vnet1": port(1)}})
    (tmp_path / "domains" / "bad.json").write_text(text)
    assert sorted(s.domains()) == ["good"]
    assert list(s.record_errors()) == ["bad"] and "bad.json" in s.record_errors()["bad"]


def test_first_time_and_forget(tmp_path):
    s = StateDir(str(tmp_path))
    assert s.first_time("unmanaged:mgd:x") and not s.first_time("unmanaged:mgd:x")
    assert s.first_time("unmanaged:other:x")
    s.forget("unmanaged:mgd:")
    assert s.first_time("unmanaged:mgd:x") and not s.first_time("unmanaged:other:x")


def _hold_lock(path, ready, release):
    with StateDir(path).lock():
        ready.set()
        release.wait(10)


def test_lock_timeout_is_bounded_and_clear(tmp_path):
    ready, release = CTX.Event(), CTX.Event()
    holder = CTX.Process(target=_hold_lock, args=(str(tmp_path), ready, release))
    holder.start()
    try:
        assert ready.wait(10)
        t0 = time.monotonic()
        with hang_guard("a lock wait of 0.3 s"), \
                pytest.raises(StateError, match="lock held by another netplug process"):
            with StateDir(str(tmp_path)).lock(timeout=0.3):
                pass
        assert time.monotonic() - t0 >= 0.3  # it waited its timeout, then gave up
    finally:
        release.set()
        holder.join(10)
    with StateDir(str(tmp_path)).lock(timeout=0.3):
        pass  # released with its holder


def _writer(path, name, n, shared):
    s = StateDir(path)
    for i in range(n):
        with s.lock():
            rec = s.domain(name)
            rec["ports"][f"vnet{i}"] = port(i, pad="x" * 2000)
            s.put_domain(name, rec)
            if shared:
                common = s.domain("shared")
                common["ports"][f"{name}-{i}"] = port(i)
                s.put_domain("shared", common)


def test_many_writers_lose_nothing(tmp_path):
    path = str(tmp_path / "state")
    procs = [CTX.Process(target=_writer, args=(path, f"vm{p}", 25, True)) for p in range(12)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    s = StateDir(path)
    doms = s.domains()
    assert sorted(doms) == sorted([f"vm{p}" for p in range(12)] + ["shared"])
    for p in range(12):
        assert sorted(doms[f"vm{p}"]["ports"]) == sorted(f"vnet{i}" for i in range(25))
    assert len(doms["shared"]["ports"]) == 12 * 25
    assert [f for f in os.listdir(os.path.join(path, "domains")) if f.startswith(".tmp-")] == []


def _reader(path, stop, bad):
    s = StateDir(path)
    while not stop.is_set():
        try:
            rec = s.domain("big")  # no lock: readers must still never see a torn file
            if rec.get("ports") and len(rec["ports"]) != 200:
                bad.value += 1
        except StateError:
            bad.value += 1


def test_writes_are_atomic_for_lockless_readers(tmp_path):
    path = str(tmp_path)
    s = StateDir(path)
    stop, bad = CTX.Event(), CTX.Value("i", 0)
    readers = [CTX.Process(target=_reader, args=(path, stop, bad)) for _ in range(3)]
    for r in readers:
        r.start()
    try:
        for i in range(150):
            s.put_domain("big", {"ports": {f"vnet{j}": port(j, n=i, pad="y" * 500)
                                           for j in range(200)}})
    finally:
        stop.set()
        for r in readers:
            r.join(10)
    assert bad.value == 0


def test_failed_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    s = StateDir(str(tmp_path))
    s.put_domain("vm1", {"ports": {"vnet0": port(n=1)}})

    def full(*a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(json, "dump", full)
    with pytest.raises(StateError, match="No space left on device"):
        s.put_domain("vm1", {"ports": {"vnet0": port(n=2)}})
    monkeypatch.undo()
    assert s.domain("vm1")["ports"]["vnet0"]["n"] == 1  # the old record survives
    assert sorted(os.listdir(tmp_path / "domains")) == ["vm1.json"]


def test_file_names_are_urllib_quoting_without_importing_it():
    """The hook path's own percent-encoding must name files exactly as urllib.parse.quote
    (safe="") did, or an upgrade would lose track of existing records."""
    import random
    import urllib.parse

    from libvirt_netplug.state import quote, unquote

    rng = random.Random(7)
    names = ["vm1", "a/b", "..", ".hidden", "ünïcode", "with space", "50%", "%41", "~_-.", "%",
             "a%2", "x" * 300] + ["".join(chr(rng.randint(1, 0x2FF)) for _ in range(20))
                                  for _ in range(500)]
    for n in names:
        assert quote(n) == urllib.parse.quote(n, safe=""), n
        assert unquote(quote(n)) == n == urllib.parse.unquote(quote(n))


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_the_lock_is_released_on_an_error_and_after_a_timeout(tmp_path):
    """state.lock() is a class, not contextlib's: it acquires on enter, releases on exit
    whatever happens in the block, and leaves no descriptor behind when it times out."""
    s = StateDir(str(tmp_path))
    before = _fds()
    with pytest.raises(RuntimeError):
        with s.lock():
            raise RuntimeError("in the block")
    assert _fds() == before
    ready, release = CTX.Event(), CTX.Event()
    holder = CTX.Process(target=_hold_lock, args=(str(tmp_path), ready, release))
    holder.start()
    try:
        assert ready.wait(10)
        before = _fds()
        with pytest.raises(StateError, match="lock held"):
            with s.lock(timeout=0.05):
                pass
        assert _fds() == before
    finally:
        release.set()
        holder.join(10)
    with s.lock(timeout=0.3):
        with pytest.raises(StateError, match="lock held"):
            with StateDir(str(tmp_path)).lock(timeout=0.05):
                pass  # exclusive, also within one process


def test_copy_record_is_deepcopy_for_records():
    import copy

    from libvirt_netplug.state import copy_record

    rec = {"domain": "vm1", "version": 2, "uuid": None, "ports": {
        "vnet0": {"mac": "52:54:00:00:00:01", "ifindex": 7, "fdb": [["52:54:00:00:00:01", None],
                                                                     ["52:54:00:00:00:01", 10]],
                  "flags": True, "saved": [True, False], "policy": {"promiscLinks": "no"},
                  "weight": 1.5, "pair": ("a", ["b"])}},
           "rx": {}, "odd": {1, 2}}
    got = copy_record(rec)
    assert got == copy.deepcopy(rec) == rec
    assert type(got["ports"]["vnet0"]["pair"]) is tuple
    got["ports"]["vnet0"]["fdb"][0][1] = 5
    got["ports"]["vnet0"]["pair"][1].append("c")
    got["odd"].add(3)
    assert rec["ports"]["vnet0"]["fdb"][0][1] is None and rec["ports"]["vnet0"]["pair"] == \
        ("a", ["b"]) and rec["odd"] == {1, 2}
