"""Every kind of bad input, through the hook entry point and through `netplug plan`.

Proves, for each bad document: the hook exits 0 (a bad document must not stop a guest unless
strict mode is on), writes exactly one line to stderr that names the domain (and the interface
where the fault is in one), never a traceback, nothing to stdout, makes no kernel change and
no state record, and returns within a second; with `strict = true` a `start` fails while
`reconnect` still succeeds. `netplug plan` on the same document: exit 1, exactly one line on
stderr, no traceback, within a second.
"""

from __future__ import annotations

import json
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from fakes import bridge_iface, domain_xml, hookdata, network_xml, networkport_xml, \
    policy_xml
from netns import netplug_cli

MB = 1024 * 1024
MAC = "52:54:00:00:00:01"
STRICT = 'strict = true\n[bridge.br0]\npromiscLinks = "no"\n'
MANAGED = '[bridge.br0]\npromiscLinks = "no"\n'


def dom(*ifaces: str, metadata: str = "") -> bytes:
    return domain_xml("vm1", list(ifaces), metadata=metadata).encode()


def nic(mac: str = MAC, tap: str | None = "vnet0", bridge: str = "br0", extra: str = "") -> str:
    return bridge_iface(bridge, tap, mac, "net0", extra=extra)


def raw_target(dev_attr: str) -> bytes:
    """An interface whose <target> is written by hand (for characters quoteattr would change)."""
    return (f"<domain><name>vm1</name><devices><interface type='bridge'>"
            f"<mac address='{MAC}'/><source bridge='br0'/><target {dev_attr}/>"
            f"<alias name='net0'/></interface></devices></domain>").encode()


def laughs(levels: int = 10) -> str:
    ents = '<!ENTITY lol0 "lol">' + "".join(
        f'<!ENTITY lol{i} "{f"&lol{i - 1};" * 10}">' for i in range(1, levels))
    return (f'<!DOCTYPE domain [{ents}]>'
            f'<domain><name>&lol{levels - 1};</name></domain>')


XXE = ('<!DOCTYPE domain [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>'
       '<domain><name>&xxe;</name></domain>')

# (id, document, words the one error line must contain)
BAD_DOMAINS = [
    ("malformed-unclosed", b"<domain><name>vm1</name><devices>", ["malformed XML"]),
    ("malformed-not-xml", b"this is not XML at all", ["malformed XML"]),
    ("malformed-garbage-bytes", b"\xff\xfe\x00<\x00d\x00", ["domain XML"]),
    ("empty-stdin", b"", ["empty input"]),
    ("whitespace-only-stdin", b"  \n\t\n", ["empty input"]),
    ("dtd-external-subset",
     b'<!DOCTYPE domain SYSTEM "http://198.51.100.1/libvirt.dtd"><domain><name>vm1</name>'
     b'</domain>', ["DTD"]),
    ("xxe-file", XXE.encode(), ["DTD"]),
    ("xxe-utf16", ('<?xml version="1.0" encoding="UTF-16"?>' + XXE).encode("utf-16"),
     ["domain XML"]),
    ("xxe-parameter-entity",
     b'<!DOCTYPE d [<!ENTITY % p SYSTEM "http://198.51.100.1/x.dtd"> %p;]><domain/>', ["DTD"]),
    ("entity-bomb", laughs().encode(), ["DTD"]),
    ("entity-bomb-utf16", ('<?xml version="1.0" encoding="UTF-16"?>' + laughs()).encode(
        "utf-16"), ["domain XML"]),
    ("over-10MB", dom(nic()).replace(b"<devices>", b"<devices>" + b" " * (10 * MB)),
     ["MB limit"]),
    ("over-10MB-comment", b"<domain><name>vm1</name><!--" + b"x" * (10 * MB + 10) +
     b"--></domain>", ["MB limit"]),
    ("wrong-root-element", network_xml().encode(), ["expected <domain>"]),
    ("no-name", b"<domain><devices/></domain>", ["missing <name>"]),
    ("mac-bad-hex", dom(nic(mac="52:54:00:zz:00:01")), ["invalid MAC", "net0"]),
    ("mac-five-octets", dom(nic(mac="52:54:00:00:01")), ["invalid MAC", "net0"]),
    ("mac-seven-octets", dom(nic(mac="52:54:00:00:00:01:02")), ["invalid MAC", "net0"]),
    ("mac-dashes", dom(nic(mac="52-54-00-00-00-01")), ["invalid MAC", "net0"]),
    ("mac-empty", dom(nic(mac="")), ["invalid MAC", "net0"]),
    ("mac-multicast", dom(nic(mac="01:00:5e:00:00:01")), ["not a unicast", "net0"]),
    ("mac-broadcast", dom(nic(mac="ff:ff:ff:ff:ff:ff")), ["not a unicast", "net0"]),
    ("mac-zero", dom(nic(mac="00:00:00:00:00:00")), ["not a unicast", "net0"]),
    ("mac-in-metadata", dom(nic(), metadata=policy_xml(
        interfaces={"52:54:00:00:00:0g": {"promiscLinks": "yes"}})), ["invalid MAC",
                                                                       "netplug:interface"]),
    ("ifname-empty", dom(nic(tap="")), ["empty interface name", "net0"]),
    ("ifname-16-bytes", dom(nic(tap="vnet0123456789ab")), ["16 bytes", "net0"]),
    ("ifname-16-bytes-utf8", dom(nic(tap="\u00e9" * 8)), ["16 bytes", "net0"]),
    ("ifname-slash", dom(nic(tap="vnet/0")), ["not a valid Linux interface name", "net0"]),
    ("ifname-space", dom(nic(tap="vnet 0")), ["not a valid Linux interface name", "net0"]),
    ("ifname-tab", raw_target("dev='vnet&#9;0'"), ["not a valid Linux interface name", "net0"]),
    ("ifname-newline", raw_target("dev='vnet&#10;0'"), ["not a valid Linux interface name"]),
    ("ifname-colon", dom(nic(tap="vnet0:1")), ["not a valid Linux interface name", "net0"]),
    ("ifname-dot", dom(nic(tap=".")), ["not a valid Linux interface name", "net0"]),
    ("ifname-dotdot", dom(nic(tap="..")), ["not a valid Linux interface name", "net0"]),
    ("ifname-source-bridge", dom(nic(bridge="br/0")), ["<source bridge>", "net0"]),
    ("target-without-dev", raw_target(""), ["empty interface name", "net0"]),
    ("vlan-tag-not-a-number", dom(nic(extra="<vlan><tag id='ten'/></vlan>")),
     ["<vlan><tag id>", "net0"]),
    ("vlan-tag-out-of-range", dom(nic(extra="<vlan><tag id='5000'/></vlan>")),
     ["<vlan><tag id>", "0-4095", "net0"]),
    ("vlan-trunk-tag-out-of-range",
     dom(nic(extra="<vlan trunk='yes'><tag id='10'/><tag id='70000'/></vlan>")),
     ["<vlan><tag id>", "70000", "net0"]),
    ("policy-bad-value", dom(nic(), metadata=policy_xml(promiscLinks="maybe")),
     ["promiscLinks", "'yes' or 'no'"]),
    ("policy-unknown-setting", dom(nic(), metadata=policy_xml(promiscLnks="no")),
     ["unknown policy setting"]),
    ("policy-twice", dom(nic(), metadata=policy_xml() + policy_xml()), ["more than one"]),
]


def _ids(table):
    return [t[0] for t in table]


def check_one_line(result, words):
    assert result.stdout == "", "stdout must stay empty (migrate/restore take it as XML)"
    assert "Traceback" not in result.stderr, result.stderr
    assert len(result.lines) == 1, result.stderr
    line = result.lines[0]
    for w in words:
        assert w in line, f"{w!r} not in {line!r}"


# -- the hook --------------------------------------------------------------------------------


@pytest.mark.parametrize("name,doc,words", BAD_DOMAINS, ids=_ids(BAD_DOMAINS))
@pytest.mark.parametrize("op", ["start", "started", "reconnect", "stopped", "release"])
def test_qemu_hook_bad_domain_xml(run_hook, fake, state_path, name, doc, words, op):
    fake.add_bridge("br0")
    fake.add_tap("vnet0", "br0", guest=MAC)
    before = fake.snapshot()
    r = run_hook("qemu", "vm1", op, doc, config=MANAGED)
    assert r.rc == 0
    check_one_line(r, words + ["ERROR", f"qemu vm1 {op}"])
    assert fake.snapshot() == before and fake.journal == []
    assert not (state_path / "domains").exists()


@pytest.mark.parametrize("name,doc,words", BAD_DOMAINS[:12], ids=_ids(BAD_DOMAINS[:12]))
def test_strict_mode_fails_start_on_bad_xml_but_not_reconnect(run_hook, name, doc, words):
    r = run_hook("qemu", "vm1", "start", doc, config=STRICT)
    assert r.rc == 1
    assert r.stdout == "" and "Traceback" not in r.stderr
    assert len(r.errors) == 2 and "strict" in r.errors[1]  # the cause, then why it fails
    for op in ("reconnect", "stopped", "release"):
        r = run_hook("qemu", "vm1", op, doc, config=STRICT)
        assert r.rc == 0, (op, r)


NET = network_xml("mgd", "nbr0", metadata=policy_xml(promiscLinks="no"))
BAD_NETWORK = [
    ("malformed", "start", b"<hookData><network>", ["malformed XML", "network mgd start"]),
    ("empty-stdin", "started", b"", ["empty input"]),
    ("xxe", "start", XXE.replace("domain", "hookData").encode(), ["DTD"]),
    ("entity-bomb", "started", laughs().replace("domain", "hookData").encode(), ["DTD"]),
    ("over-10MB", "start", hookdata(NET).encode() + b" " * (10 * MB), ["MB limit"]),
    ("hookdata-without-network", "start", b"<hookData/>", ["has no <network>"]),
    ("wrong-root", "start", b"<domain><name>x</name></domain>", ["expected <network>"]),
    ("network-no-name", "start", hookdata("<network/>").encode(), ["missing <name>"]),
    ("bridge-name-too-long", "start", hookdata(network_xml(bridge="nbr0123456789abc")).encode(),
     ["<bridge name>", "16 bytes"]),
    ("bridge-name-colon", "started", hookdata(network_xml(bridge="nbr:0")).encode(),
     ["<bridge name>"]),
    ("port-without-networkport", "port-created", hookdata(NET).encode(),
     ["no <networkport>"]),
    ("port-mac-invalid", "port-created",
     hookdata(NET, networkport_xml("vm1", "52:54:00:00:00")).encode(), ["invalid MAC", "vm1"]),
    ("port-mac-multicast", "port-deleted",
     hookdata(NET, networkport_xml("vm1", "33:33:00:00:00:01")).encode(), ["not a unicast"]),
    ("port-plug-bridge-invalid", "port-created",
     hookdata(NET, networkport_xml("vm1", MAC, bridge="nbr 0")).encode(), ["<plug bridge>"]),
    ("policy-invalid", "started", hookdata(network_xml(
        metadata=policy_xml(promiscLinks="nope"))).encode(), ["promiscLinks", "nope"]),
]


@pytest.mark.parametrize("name,op,doc,words", BAD_NETWORK, ids=_ids(BAD_NETWORK))
def test_network_hook_bad_xml(run_hook, fake, name, op, doc, words):
    r = run_hook("network", "mgd", op, doc)
    assert r.rc == 0
    check_one_line(r, words + ["ERROR"])
    assert fake.journal == []


def test_unknown_hook_object_is_one_line_and_harmless(run_hook):
    r = run_hook("lxc", "ct1", "start", dom(nic()))
    assert r.rc == 0
    check_one_line(r, ["unknown hook object", "'lxc'"])


@pytest.mark.parametrize("kind,obj", [("qemu", "vm1"), ("network", "mgd")])
@pytest.mark.parametrize("op", ["frobnicate", "", "START", "port-created;rm"])
def test_unknown_operation_is_one_warning(run_hook, fake, kind, obj, op):
    if kind == "qemu" and op == "port-created;rm":
        op = "attach;x"
    r = run_hook(kind, obj, op, dom(nic()), config=STRICT)
    assert r.rc == 0
    check_one_line(r, ["WARNING", "not one netplug handles"])
    assert fake.journal == []


def test_missing_target_at_start_is_one_clear_line(run_hook, fake):
    fake.add_bridge("br0")
    r = run_hook("qemu", "vm1", "start", dom(nic(tap=None)), config=MANAGED)
    assert r.rc == 0 and r.stdout == "" and "Traceback" not in r.stderr
    assert len(r.lines) == 1 and "vm1" in r.lines[0] and "net0" in r.lines[0] and \
        "target" in r.lines[0], r.stderr
    assert fake.journal == []


def test_missing_target_at_prepare_is_normal(run_hook, fake):
    """At `prepare` no interface has a <target> yet: nothing to say, nothing to do."""
    r = run_hook("qemu", "vm1", "prepare", dom(nic(tap=None)), config=MANAGED)
    assert (r.rc, r.stderr, r.stdout) == (0, "", "") and fake.journal == []


def test_tap_vanishing_mid_apply_is_one_error_and_no_half_applied_port(run_hook, fake,
                                                                        state_path):
    """ENODEV between the FDB entry and the flags of one port (the fake deletes the tap)."""
    fake.add_bridge("br0")
    for i in range(3):
        fake.add_tap(f"vnet{i}", "br0", guest=f"52:54:00:00:00:0{i + 1}")
    fake.fail("set_port_flags", "vnet1", vanish=True)
    xml = domain_xml("vm1", [bridge_iface("br0", f"vnet{i}", f"52:54:00:00:00:0{i + 1}",
                                          f"net{i}") for i in range(3)])
    r = run_hook("qemu", "vm1", "start", xml, config=MANAGED)
    assert r.rc == 0 and r.stdout == "" and "Traceback" not in r.stderr
    assert len(r.errors) == 1, r.stderr
    assert all(w in r.errors[0] for w in ("domain vm1", "interface net1", "No such device"))
    assert "vnet1" not in fake.devs
    for i in (0, 2):
        links = fake.links()
        assert (links[f"vnet{i}"].learning, links[f"vnet{i}"].flood) == (False, False)
        assert [e.mac for e in fake.fdb("br0", f"vnet{i}") if e.state == "static"] == \
            [f"52:54:00:00:00:0{i + 1}"]
    rec = json.loads((state_path / "domains" / "vm1.json").read_text())
    assert sorted(rec["ports"]) == ["vnet0", "vnet2"]


# -- netplug plan ----------------------------------------------------------------------------


def plan(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    # The timeout is the hang bound (a `netplug` process: ~0.3 s).
    return subprocess.run([*netplug_cli(), "plan", *args], input=stdin, capture_output=True,
                          timeout=30)


def check_plan_error(p, words):
    err = p.stderr.decode(errors="replace")
    assert p.returncode == 1, (p.returncode, err)
    assert p.stdout == b""
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("netplug plan: error: ")
    for w in words:
        assert w in err, f"{w!r} not in {err!r}"


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """Every bad document through `netplug plan`, one process each, run two at a time (the
    pool only shortens the tier)."""
    d = tmp_path_factory.mktemp("plan")
    good = d / "good-domain.xml"
    good.write_bytes(dom(nic()))
    jobs = {}
    for name, doc, _w in BAD_DOMAINS:
        (d / f"{name}.xml").write_bytes(doc)
        jobs[("domain", name)] = ["--domain-xml", str(d / f"{name}.xml")]
    for name, _op, doc, _w in BAD_NETWORK:
        (d / f"net-{name}.xml").write_bytes(doc)
        jobs[("network", name)] = ["--domain-xml", str(good), "--network-xml",
                                   str(d / f"net-{name}.xml")]
    with ThreadPoolExecutor(max_workers=max(2, (os.cpu_count() or 2))) as pool:
        futures = {key: pool.submit(plan, *args) for key, args in jobs.items()}
        return {key: f.result() for key, f in futures.items()}


@pytest.mark.parametrize("name,doc,words", BAD_DOMAINS, ids=_ids(BAD_DOMAINS))
def test_plan_bad_domain_xml(planned, name, doc, words):
    check_plan_error(planned[("domain", name)], words)


def test_plan_bad_domain_xml_on_stdin():
    check_plan_error(plan("--domain-xml", "-", stdin=b"<domain>"), ["malformed XML"])
    check_plan_error(plan("--domain-xml", "-", stdin=b""), ["empty input"])


@pytest.mark.parametrize("name,op,doc,words", [b for b in BAD_NETWORK
                                                if b[1] not in ("port-created", "port-deleted")],
                         ids=_ids([b for b in BAD_NETWORK
                                   if b[1] not in ("port-created", "port-deleted")]))
def test_plan_bad_network_xml(planned, name, op, doc, words):
    words = [w for w in words if w not in ("network mgd start", "unmanaged")]
    check_plan_error(planned[("network", name)], words)


@pytest.mark.parametrize("args,words", [
    (["--op", "frobnicate"], ["unknown --op 'frobnicate'"]),
    (["--op", ""], ["unknown --op ''"]),
    # A --config given explicitly must exist (a typo must not plan with an empty config).
    (["--config", "/nonexistent/dir/x.toml/"], ["config /nonexistent/dir/x.toml/: no such "
                                                "file"]),
], ids=["unknown-op", "empty-op", "config-path-is-not-a-file"])
def test_plan_bad_arguments(tmp_path, args, words):
    d = tmp_path / "domain.xml"
    d.write_bytes(dom(nic()))
    p = plan("--domain-xml", str(d), *args)
    check_plan_error(p, words)


@pytest.mark.parametrize("what", ["missing-file", "directory"])
def test_plan_unreadable_input(tmp_path, what):
    path = tmp_path / "nope.xml" if what == "missing-file" else tmp_path
    check_plan_error(plan("--domain-xml", str(path)), ["cannot read", str(path)])


def test_plan_bad_config_names_the_file(tmp_path):
    d = tmp_path / "domain.xml"
    d.write_bytes(dom(nic()))
    c = tmp_path / "netplug.toml"
    c.write_text("[bridge.br0]\npromiscLinks = 'perhaps'\n")
    check_plan_error(plan("--domain-xml", str(d), "--config", str(c)),
                     [str(c), "[bridge.br0]", "promiscLinks"])


def test_plan_interface_without_target_is_reported_not_an_error(tmp_path):
    """`netplug plan` also previews `prepare`-time XML, where no NIC has a <target> yet: the
    interface is listed as unmanaged with the reason (an empty <target dev> is an error)."""
    d = tmp_path / "domain.xml"
    d.write_bytes(dom(nic(tap=None)))
    c = tmp_path / "c.toml"
    c.write_text(MANAGED)
    p = plan("--domain-xml", str(d), "--config", str(c))
    assert p.returncode == 0 and p.stderr == b""
    (intent,) = json.loads(p.stdout)["interfaces"]
    assert not intent["managed"] and "no <target dev>" in intent["reason"]
    assert json.loads(p.stdout)["operations"] == []
