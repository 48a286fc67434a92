"""The VLAN-kernel tier's host-side plumbing, without booting anything.

Proves: inner node ids map onto pytest's junit (classname, name), parametrized ids included;
failures, errors and skips come back with their reports, a teardown error after a passing call
still counts as an error; a run is untrustworthy when the VM timed out, pytest in it did not
finish, or an inner test has no result; the host never collects the inner tests; the guest's
job exports what the inner tests need.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.vlankernel import tier, vm  # noqa: E402
from tests.vlankernel.image import Image, KernelTree  # noqa: E402
from polling import wait_for  # noqa: E402

HEAD = "tests/vlankernel/inner/test_headline.py::test_uplink"
TRUNK = "tests/vlankernel/inner/test_vlan_entries.py::test_libvirt_vlan_on_linux_bridge[trunk]"
STOP = "tests/vlankernel/inner/test_vlan_entries.py::test_stop"
SKIP = "tests/vlankernel/inner/test_vlan_entries.py::test_skipped"

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.vlankernel.inner.test_headline" name="test_uplink" time="20.5"/>
<testcase classname="tests.vlankernel.inner.test_vlan_entries"
          name="test_libvirt_vlan_on_linux_bridge[trunk]" time="3.4">
  <failure message="AssertionError: tapA: entries got [], want [10, 20]">long report</failure>
  <system-err>netplug qemu-hook: ERROR: Invalid argument</system-err>
</testcase>
<testcase classname="tests.vlankernel.inner.test_vlan_entries" name="test_stop" time="1.0"/>
<testcase classname="tests.vlankernel.inner.test_vlan_entries" name="test_stop" time="0.5">
  <error message="failed on teardown">teardown report</error>
</testcase>
<testcase classname="tests.vlankernel.inner.test_vlan_entries" name="test_skipped" time="0">
  <skipped message="no VLAN filtering" type="pytest.skip">why</skipped>
</testcase>
</testsuite></testsuites>"""


def test_junit_key_of_parametrized_and_class_tests():
    assert tier.junit_key(TRUNK) == ("tests.vlankernel.inner.test_vlan_entries",
                                     "test_libvirt_vlan_on_linux_bridge[trunk]")
    assert tier.junit_key("tests/vlankernel/inner/test_x.py::TestY::test_z") == \
        ("tests.vlankernel.inner.test_x.TestY", "test_z")


def test_parse_junit_outcomes(tmp_path):
    path = tmp_path / "junit.xml"
    path.write_text(JUNIT)
    res = tier.parse_junit(path, [HEAD, TRUNK, STOP, SKIP])
    assert {n: r.outcome for n, r in res.items()} == {
        HEAD: "passed", TRUNK: "failed", STOP: "error", SKIP: "skipped"}
    assert res[TRUNK].message.startswith("AssertionError: tapA")
    assert "long report" in res[TRUNK].text and "Invalid argument" in res[TRUNK].text
    assert res[STOP].seconds == 1.5 and "teardown report" in res[STOP].text
    assert res[SKIP].message == "no VLAN filtering"


def test_parse_junit_without_a_file(tmp_path):
    assert tier.parse_junit(tmp_path / "missing.xml", [HEAD]) == {}


def _run(tmp_path, *, rc=0, timed_out=False, results=(HEAD,)) -> tier.TierRun:
    r = vm.Result(rc, tmp_path, 60.0, timed_out, {"job": 3.0})
    return tier.TierRun(r, [HEAD, TRUNK], {n: tier.InnerResult(n, "passed", 1.0)
                                           for n in results})


def test_problem_names_what_went_wrong(tmp_path):
    assert _run(tmp_path, results=(HEAD, TRUNK)).problem() is None
    assert _run(tmp_path, rc=1, results=(HEAD, TRUNK)).problem() is None  # a test failed
    assert "time limit" in _run(tmp_path, timed_out=True).problem()
    assert "before the job finished" in _run(tmp_path, rc=None).problem()
    assert "exited 4" in _run(tmp_path, rc=4, results=(HEAD, TRUNK)).problem()
    assert TRUNK in _run(tmp_path).problem()


def test_host_does_not_collect_inner_tests(monkeypatch):
    import importlib

    monkeypatch.delenv("NETPLUG_IN_VLANKERNEL_VM", raising=False)
    conf = importlib.import_module("tests.vlankernel.conftest")
    assert importlib.reload(conf).collect_ignore == ["inner"]
    monkeypatch.setenv("NETPLUG_IN_VLANKERNEL_VM", "1")
    assert importlib.reload(conf).collect_ignore == ["test_tier.py"]


def test_pytest_script_exports_what_the_guest_needs(tmp_path):
    img = Image(KernelTree("linux-image-x", "6.1.0-x", tmp_path / "vmlinuz", tmp_path),
                tmp_path / "initrd")
    script = vm.pytest_script(img, ["-q", tier.INNER], {"NETPLUG_REQUIRE_ALL": "1"})
    for line in ("export PYTHONDONTWRITEBYTECODE=1", "export NETPLUG_IN_VLANKERNEL_VM=1",
                 "export NETPLUG_REQUIRE_ALL=1", f"modprobe -d {tmp_path} -a bridge",
                 "-p no:cacheprovider", f"--junitxml={vm.GUEST_DIR}/junit.xml"):
        assert line in script, line


class _FakeQemu:
    """A QMP server on a unix socket, as QEMU's `-qmp unix:…,server=on` (one client)."""

    def __init__(self, path: str):
        import socket
        import threading

        self.commands: list[dict] = []
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(path)
        self.srv.listen(1)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()
        self.done = False

    def poll(self):  # the relay's view of the QEMU process
        return 0 if self.done else None

    def _serve(self) -> None:
        import json

        conn, _ = self.srv.accept()
        with conn, conn.makefile("rwb") as f:
            f.write(b'{"QMP": {"version": {}, "capabilities": []}}\n')
            f.flush()
            for line in f:
                cmd = json.loads(line)
                self.commands.append(cmd)
                if cmd["execute"] == "query-rx-filter":
                    # An event first: the relay must skip it and return the answer.
                    f.write(b'{"event": "NIC_RX_FILTER_CHANGED", "data": {}}\n')
                    f.write(b'{"return": [{"name": "uplinknic", "promiscuous": false}]}\n')
                else:
                    f.write(b'{"return": {}}\n')
                f.flush()


def test_qmp_relay_answers_allowed_commands_and_refuses_others(tmp_path):
    """The guest asks through files in the run directory; the relay answers whole files, runs
    only query-rx-filter, and stops with QEMU."""
    import json

    qemu = _FakeQemu(str(tmp_path / "qmp.sock"))
    relay = vm.QmpRelay(str(tmp_path / "qmp.sock"), tmp_path, qemu)
    relay.POLL = 0.01
    relay.start()
    (tmp_path / "qmp-request-1.json").write_text(json.dumps(
        {"execute": "query-rx-filter", "arguments": {"name": "uplinknic"}}))
    (tmp_path / "qmp-request-2.json").write_text(json.dumps({"execute": "quit"}))
    (tmp_path / "qmp-request-3.json").write_text("{not json")
    wait_for(lambda: len(list(tmp_path.glob("qmp-reply-*.json"))) == 3, 10, "three replies",
             lambda: str(sorted(p.name for p in tmp_path.iterdir())))
    reply = {n: json.loads((tmp_path / f"qmp-reply-{n}.json").read_text()) for n in (1, 2, 3)}
    assert reply[1] == {"return": [{"name": "uplinknic", "promiscuous": False}]}
    assert "not allowed" in reply[2]["error"]["desc"]
    assert "bad request" in reply[3]["error"]["desc"]
    assert not list(tmp_path.glob("qmp-request-*"))  # every request consumed
    assert [c["execute"] for c in qemu.commands] == ["qmp_capabilities", "query-rx-filter"]
    qemu.done = True
    relay.join(10)
    assert not relay.is_alive()


def test_the_vm_has_a_virtio_nic_and_a_qmp_socket(tmp_path):
    image = Image(KernelTree("linux-image-test", "6.1.0-test", tmp_path / "vmlinuz", tmp_path),
                  tmp_path / "initrd")
    argv = vm.qemu_argv(image, tmp_path, 1024, 1, qmp_socket="/tmp/x/qmp.sock")
    assert f"virtio-net-pci,netdev=uplink,id={vm.UPLINK_NIC_ID},mac={vm.UPLINK_NIC_MAC}," \
           "romfile=" in argv
    assert argv[argv.index("-qmp") + 1] == "unix:/tmp/x/qmp.sock,server=on,wait=off"
    assert "virtio_net" in vm.TEST_MODULES
