"""What the installed hook imports, run as libvirtd runs it (issue 11: a hook's start-up is
most of its cost, and each of these modules cost every hook milliseconds).

The shim runs under its own interpreter with ``-X importtime`` added, against a real bridge
in a namespace; the work is checked with iproute2 (a hook that did nothing would import
little). Proves: the hook path — qemu start, an in-sync reconnect, stopped, a network's start
— imports none of the modules it does without (``logging``: hooklog writes the log;
``dataclasses``: values; ``typing``; ``socket`` and ``signal``: their C modules serve;
``inspect``, not even from lxml.etree: xmlsafe), and ``tomllib`` only when the config file
changed (the state dir keeps it parsed): a change, even of the same size, is applied. An
event the hook ignores imports nothing but the hook module.
"""

from __future__ import annotations

import os
import re
import time

import oracle
from fakes import bridge_iface, domain_xml, guest_mac, hookdata, network_xml, policy_xml, \
    tap_mac

from .topo import CONFIG

A, B = guest_mac(1), guest_mac(2)
# Modules the hook path must not import (each cost a hook milliseconds before it went);
# what lxml (the hook's parser, required) imports itself is lxml's doing (lxml 4.9 and 6
# import inspect), and what tomllib does, tomllib's (typing; only when the config changed).
NOT_ON_THE_HOOK_PATH = ("logging", "dataclasses", "inspect", "typing", "socket", "signal")
THEIR_OWN = ("lxml", "tomllib")
# What an event the hook ignores may import beyond the interpreter's own start-up.
NO_OP_IMPORTS = {"libvirt_netplug", "libvirt_netplug.hook", "__future__", "select"}
_IMPORT_LINE = re.compile(r"^import time:\s+\d+\s+\|\s+\d+\s+\|( *)(\S+)\s*$")


def _modules(lines: list[str]) -> tuple[set[str], set[str]]:
    """(every module -X importtime reports, those but what lxml and tomllib import
    themselves): it prints each module after the ones it imported, one level deeper."""
    every: set[str] = set()
    pending: dict[int, list[str]] = {}  # level -> subtrees waiting for their importer
    for ln in lines:
        m = _IMPORT_LINE.match(ln)
        if not m:
            continue
        level, name = len(m.group(1)) // 2, m.group(2)
        every.add(name)
        subtree = [name, *pending.pop(level + 1, [])]
        if name.split(".")[0] in THEIR_OWN:
            subtree = [name] if name == "tomllib" else []
        pending.setdefault(level, []).extend(subtree)
    return every, {name for names in pending.values() for name in names}


def _shim_interpreter(shim: str) -> list[str]:
    with open(shim) as f:
        return f.readline()[2:].split()


def run_importtime(ns, hooks, kind: str, obj: str, op: str, xml: str):
    """(hook run, modules imported) of the installed shim, -X importtime added to its #!."""
    from netns import HookRun

    shim = hooks.shims[kind]
    argv = [*_shim_interpreter(shim), "-X", "importtime", shim, obj, op, "begin", "-"]
    p = ns.run(hooks.env_argv(argv), input=xml.encode(), timeout=60, cwd="/")
    lines = p.stderr.decode(errors="replace").splitlines()
    modules = _modules(lines)
    said = "\n".join(ln for ln in lines if not ln.startswith("import time:")).encode()
    return HookRun(argv, p.returncode, p.stdout, said, 0.0), modules


def build(ns) -> str:
    ns.add_bridge("br0")
    ns.add_veth("up0", "up0p", master="br0")
    ns.add_tap("vnet0", "br0", address=tap_mac(A))
    ns.add_tap("vnet1", "br0", address=tap_mac(B))
    return domain_xml("vm1", [bridge_iface("br0", "vnet0", A, "net0"),
                              bridge_iface("br0", "vnet1", B, "net1")])


def check(run, modules, *, toml: bool = False) -> None:
    every, ours = modules
    what = " ".join(run.argv[-4:])
    assert run.rc == 0 and run.stdout == b"" and not run.errors, run
    assert "Traceback" not in run.stderr, run
    assert every, f"-X importtime printed nothing: {run}"
    unwanted = sorted(set(NOT_ON_THE_HOOK_PATH) & ours)
    assert not unwanted, f"{what} imported {unwanted}"
    assert "inspect" not in every, f"{what}: lxml.etree imported inspect (xmlsafe)"
    assert ("tomllib" in ours) is toml, f"{what}: tomllib {'not ' if toml else ''}imported"


def write_settled_config(hooks, text: str) -> None:
    """The config, old enough to be cached (policy.CACHE_SETTLE_NS): a file changed within
    its timestamps' granularity is parsed again by every hook until then."""
    from libvirt_netplug.policy import CACHE_SETTLE_NS

    hooks.write_config(text)
    age = time.time_ns() - os.stat(hooks.config).st_ctime_ns
    time.sleep(max(0.0, (CACHE_SETTLE_NS - age) / 1e9 + 0.1))


def managed(ns) -> dict:
    return {tap: (mac in oracle.static_macs(ns.name, tap), oracle.port_flags(ns.name, tap))
            for tap, mac in (("vnet0", A), ("vnet1", B))}


def test_the_hook_path_imports_none_of_what_it_does_without(ns, hooks):
    xml = build(ns)
    write_settled_config(hooks, CONFIG)
    # The first hook parses the config (and caches it); the others do not parse it again.
    check(*run_importtime(ns, hooks, "qemu", "vm1", "start", xml), toml=True)
    assert managed(ns) == {"vnet0": (True, (False, False)), "vnet1": (True, (False, False))}
    check(*run_importtime(ns, hooks, "qemu", "vm1", "reconnect", xml))
    net = hookdata(network_xml("mgd", "nbr0", metadata=policy_xml(promiscLinks="no")))
    check(*run_importtime(ns, hooks, "network", "mgd", "started", net))
    check(*run_importtime(ns, hooks, "qemu", "vm1", "stopped", xml))
    assert managed(ns) == {"vnet0": (False, (True, True)), "vnet1": (False, (True, True))}


def test_an_ignored_event_imports_nothing_but_the_hook_module(ns, hooks):
    shim = hooks.shims["qemu"]
    p = ns.run(hooks.env_argv([*_shim_interpreter(shim), "-X", "importtime", "-c", "pass"]),
               timeout=60, cwd="/")
    startup, _ = _modules(p.stderr.decode(errors="replace").splitlines())
    assert startup, p
    for op in ("prepare", "migrate", "restore", "attach"):
        run, (every, _ours) = run_importtime(ns, hooks, "qemu", "vm1", op, "<domain/>")
        assert run.rc == 0 and run.stdout == b"" and run.stderr == "", run
        assert every - startup <= NO_OP_IMPORTS, sorted(every - startup - NO_OP_IMPORTS)


def test_a_changed_config_is_parsed_again(ns, hooks):
    xml = build(ns)
    write_settled_config(hooks, CONFIG)
    check(*run_importtime(ns, hooks, "qemu", "vm1", "start", xml), toml=True)
    check(*run_importtime(ns, hooks, "qemu", "vm1", "reconnect", xml))
    assert managed(ns)["vnet0"] == (True, (False, False))
    # The operator lets br0 go: rewritten in place, same size ("on" for "no"): only the
    # timestamps tell the change.
    write_settled_config(hooks, CONFIG.replace('"no"', '"on"'))
    assert os.path.getsize(hooks.config) == len(CONFIG)
    check(*run_importtime(ns, hooks, "qemu", "vm1", "reconnect", xml), toml=True)
    assert managed(ns) == {"vnet0": (False, (True, True)), "vnet1": (False, (True, True))}
    check(*run_importtime(ns, hooks, "qemu", "vm1", "reconnect", xml))
