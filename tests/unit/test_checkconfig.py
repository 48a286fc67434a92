"""netplug check-config (for configuration management), against libvirt's test driver.

Proves: the config the hooks use is checked (or --config's); every network and domain libvirt
defines is checked by its netplug metadata, each problem one line naming the object and the
setting; --xml files are checked too; exit status 0 all valid, 2 invalid, 1 could not check;
--json carries the same with a format version, and errors as JSON.
"""

from __future__ import annotations

import json

import pytest

from fakes import bridge_iface, domain_xml, policy_xml
from fakes import network_xml as _network_xml
from libvirt_netplug import cli

pytest.importorskip("libvirt", reason="libvirt-python is not installed")


def network_xml(name, **kw):
    """fakes.network_xml with a UUID of its own (libvirt refuses two networks with one)."""
    return _network_xml(name, **kw).replace("000000000001", f"{abs(hash(name)) % 10**12:012d}")


def run(capsys, *argv):
    capsys.readouterr()
    rc = cli.main(["check-config", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def host(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('[bridge.br0]\npromiscLinks = "no"\n')
    node = tmp_path / "node.xml"

    def write(*docs):
        node.write_text("<node>" + "".join(docs) + "</node>")
        return ["--connect", f"test://{node}", "--config", str(config)]
    return config, write


def test_all_valid(host, capsys):
    config, write = host
    argv = write(network_xml("mgd", forward=None, metadata=policy_xml(promiscLinks="no")),
                 domain_xml("vm1", [bridge_iface("br0", "vnet0", "52:54:00:00:00:01")]))
    rc, out, err = run(capsys, *argv)
    assert (rc, err) == (0, "")
    assert out == (f"all valid: config {config}, 1 network(s) and 1 domain(s) defined in "
                   f"libvirt\n")
    rc, out, _ = run(capsys, *argv, "--verbose")
    assert f"ok: config {config}: [bridge.br0] promiscLinks=no" in out.splitlines()
    assert "ok: network mgd: promiscLinks=no" in out.splitlines()


def test_each_problem_is_one_line(host, capsys):
    config, write = host
    config.write_text('[bridge.br0]\npromiscLinks = "maybe"\n')
    argv = write(network_xml("bad", forward=None, metadata=policy_xml(rxFilters="multicast everything")),
                 network_xml("good", bridge="nbr1", forward=None, metadata=policy_xml(promiscLinks="no")),
                 domain_xml("vm1", metadata=policy_xml(sticky="perhaps")),
                 domain_xml("vm2"))
    rc, out, err = run(capsys, *argv)
    assert rc == 2 and err == ""
    lines = out.splitlines()
    assert len(lines) == 4, out
    assert lines[0].startswith(f"invalid: config {config} [bridge.br0]: promiscLinks='maybe'")
    assert lines[1].startswith("invalid: network bad <metadata><netplug:policy>: rxFilters has "
                               "unknown token 'everything'")
    assert lines[2].startswith("invalid: domain vm1 <metadata><netplug:policy>: "
                               "sticky='perhaps' is not valid")
    assert lines[3] == (f"3 invalid of 5 checked (config {config}, 2 network(s) and 2 "
                        f"domain(s) defined in libvirt)")
    rc, out, _ = run(capsys, *argv, "--json")
    doc = json.loads(out)
    assert (rc, doc["version"], doc["exit_status"], doc["valid"]) == (2, 1, 2, False)
    assert [(c["kind"], c["name"], c["valid"]) for c in doc["checked"]] == [
        ("config", str(config), False), ("network", "bad", False), ("network", "good", True),
        ("domain", "vm1", False), ("domain", "vm2", True)]


def test_files_and_no_libvirt(host, capsys, tmp_path):
    config, _ = host
    bad = tmp_path / "net.xml"
    bad.write_text(network_xml("x", metadata=policy_xml(promiscLinks="sometimes")))
    rc, out, _ = run(capsys, "--no-libvirt", "--config", str(config), "--xml", str(bad))
    assert rc == 2 and out.splitlines()[0].startswith(f"invalid: {bad}: network x ")


def test_could_not_check_is_exit_1(host, capsys, tmp_path):
    config, _ = host
    rc, out, err = run(capsys, "--config", str(config), "--connect",
                       "qemu+unix:///system?socket=/nonexistent", "--json")
    assert rc == 1 and "cannot connect to libvirt" in json.loads(out)["error"]
    assert len(err.splitlines()) == 1
    rc, out, err = run(capsys, "--no-libvirt", "--config", str(tmp_path / "nope.toml"))
    assert rc == 1 and "nope.toml: no such file" in err
