"""`netplug plan` behaviour beyond the golden files, and the CLI as a library entry point.

Proves: plan needs no root and no kernel, is deterministic, and prints nothing on stderr for
good input; --op prepare lists intents without operations; network XML may be given as a
network hook's <hookData>; cli.main() can be called more than once in one process.
"""

from __future__ import annotations

import json
import subprocess


from conftest import GOLDEN, SAMPLES
from netns import netplug_cli


def plan(*args):
    p = subprocess.run([*netplug_cli(), "plan", *args], capture_output=True, text=True,
                       timeout=30)
    return p.returncode, p.stdout, p.stderr


def test_plan_is_deterministic_and_quiet():
    args = ["--domain-xml", str(SAMPLES / "domain-networks.xml"), "--config",
            str(GOLDEN / "config.toml")]
    for n in ("mgd", "attrnet", "ltm", "plain", "override"):
        args += ["--network-xml", str(SAMPLES / f"network-{n}.xml")]
    a, b = plan(*args), plan(*reversed_pairs(args))
    assert a[0] == 0 and a[2] == "" and a == b


def reversed_pairs(args):
    pairs = [args[i:i + 2] for i in range(0, len(args), 2)]
    return [x for pair in reversed(pairs) for x in pair]


def test_plan_prepare_lists_intents_only():
    rc, out, err = plan("--domain-xml", str(SAMPLES / "domain-host-bridges.xml"), "--config",
                        str(GOLDEN / "config.toml"), "--op", "prepare")
    doc = json.loads(out)
    assert rc == 0 and doc["operations"] == [] and len(doc["interfaces"]) == 4


def test_plan_accepts_hookdata_as_network_xml():
    rc, out, err = plan("--domain-xml", str(SAMPLES / "domain-networks.xml"), "--network-xml",
                        str(SAMPLES / "hookdata-port-created.xml"))
    managed = [i["interface"] for i in json.loads(out)["interfaces"] if i["managed"]]
    assert rc == 0 and managed == ["net0"]


def test_cli_main_can_run_twice_in_one_process(capsys, monkeypatch):
    from libvirt_netplug import cli

    argv = ["plan", "--domain-xml", str(SAMPLES / "domain-prepare.xml")]
    assert cli.main(argv) == 0
    assert cli.main(argv) == 0


def test_bash_completion_knows_every_command_and_option():
    """completion/netplug.bash (shipped by the Debian package) lists what argparse accepts."""
    import argparse
    import re

    from conftest import REPO
    from libvirt_netplug import cli

    text = (REPO / "completion" / "netplug.bash").read_text()
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    commands = re.search(r'local commands="([^"]+)"', text).group(1).split()
    assert sorted(commands) == sorted(sub.choices)
    for name, sp in sub.choices.items():
        want = sorted(o for a in sp._actions for o in a.option_strings
                      if o.startswith("--") and o != "--help")
        got = re.search(rf'^\s+{re.escape(name)}\) echo "([^"]*)"', text, re.M)
        assert got and sorted(got.group(1).split()) == want, name


def test_hook_by_hand_uses_the_installed_hooks_paths(tmp_path, monkeypatch, capsys):
    """`netplug hook` without options acts on the config and state dir the shims name."""
    from fakes import bridge_iface, domain_xml
    from libvirt_netplug import cli, install
    from netns import venv_python

    monkeypatch.delenv("NETPLUG_CONFIG")
    monkeypatch.delenv("NETPLUG_STATE_DIR")
    cfg, state, hooks = tmp_path / "c.toml", tmp_path / "state", tmp_path / "hooks"
    cfg.write_text("")
    install.install(str(hooks), venv_python(), str(cfg), str(state))
    xml = domain_xml("vm1", [bridge_iface("br0", "tap0", "52:54:00:00:00:01", "net0")])
    monkeypatch.setattr("sys.stdin", type("In", (), {"buffer": __import__("io").BytesIO(
        xml.encode())})())
    # `stopped` always records its run (a replay in sync would only read).
    assert cli.main(["hook", "--hooks-dir", str(hooks), "qemu", "vm1", "stopped", "end",
                     "-"]) == 0
    # The hooks' state dir, not the default one: the run's result is recorded there.
    assert (state / "hooks" / "qemu" / "vm1.json").exists()
