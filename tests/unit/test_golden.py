"""Golden files: libvirt XML → plan, byte for byte.

Hand-written samples (xml-samples/*.xml): `netplug plan` of every domain document for the
ops `start` and `stopped`, with every network document there and xml-samples/golden/config.toml,
compared with xml-samples/golden/NAME.OP.json.
Captured samples (xml-samples/captured*/ from a real libvirtd: captured/ libvirt 9.0,
captured-libvirt11/ libvirt 11.3; see tests/lab/capture_samples.py): each domain
document is planned for the op its hook was called with (NAME.argv), with the network
documents the same libvirtd had handed the network hook before it (latest per name), as the
state dir would hold them; golden files under xml-samples/golden/<capture dir>/.
Network documents (<network> or a network hook's <hookData>) are compared as parsed models.
A document netplug rejects has its one-line error as its golden result.

Regenerate after an intended change:  NETPLUG_REGEN_GOLDEN=1 .venv/bin/python -m pytest \
tests/unit/test_golden.py  — then review the diff like code.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from conftest import GOLDEN, REGEN_GOLDEN, SAMPLES
from libvirt_netplug import values

CONFIG = GOLDEN / "config.toml"
OPS = ("start", "stopped")


def _root_tag(path: Path) -> str | None:
    from libvirt_netplug.errors import InputError
    from libvirt_netplug.xmlsafe import parse_xml

    try:
        return parse_xml(path.read_bytes(), str(path)).tag
    except InputError:
        return None


def collection(base: Path, recursive: bool) -> tuple[list[Path], list[Path]]:
    """(domain documents, network documents) under ``base``."""
    files = sorted(base.rglob("*.xml") if recursive else base.glob("*.xml"))
    domains, networks = [], []
    for f in files:
        tag = _root_tag(f)
        if tag in ("network", "hookData"):
            networks.append(f)
        else:
            domains.append(f)  # <domain>, or something broken: its error is its golden
    return domains, networks


def _argv(path: Path) -> list[str] | None:
    """The hook argv recorded next to a captured document (NNN-KIND-OP-SUBOP.argv)."""
    a = path.with_suffix(".argv")
    return a.read_text().split("\n")[:5] if a.exists() else None


def _labs(base: Path) -> dict[str, str]:
    """Captured file -> the lab (libvirtd) it came from, from captured/index.json."""
    try:
        index = json.loads((base / "index.json").read_text())
        return {s["file"]: s.get("lab", "") for s in index.get("samples", [])}
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


def _networks_seen_before(doc: Path, networks: list[Path], labs: dict[str, str]) -> list[Path]:
    """For a captured domain document: the network documents its libvirtd had handed the
    network hook before it (the latest per network name) — what the state dir would hold."""
    from libvirt_netplug.errors import NetplugError
    from libvirt_netplug.model import parse_network

    latest: dict[str, Path] = {}
    for n in sorted(networks):
        if n.name >= doc.name or labs.get(n.name, "") != labs.get(doc.name, ""):
            continue
        try:
            latest[parse_network(n.read_bytes(), lenient=True).name] = n
        except NetplugError:
            continue
    return list(latest.values())


def cases():
    out = []
    for n in collection(SAMPLES, recursive=False)[1]:
        out.append(pytest.param("model", n, (), None, GOLDEN / f"{n.stem}.model.json",
                                id=f"{n.stem}:model"))
    domains, networks = collection(SAMPLES, recursive=False)
    for d in domains:
        for op in OPS:
            out.append(pytest.param("plan", d, tuple(networks), op,
                                    GOLDEN / f"{d.stem}.{op}.json", id=f"{d.stem}:{op}"))
    for captured in sorted(p for p in SAMPLES.glob("captured*") if p.is_dir()):
        out += captured_cases(captured)
    return out


def captured_cases(captured: Path) -> list:
    """Cases of one capture (captured/ is libvirt 9.0, captured-libvirt11/ libvirt 11.3, …);
    goldens under golden/<its name>/."""
    out = []
    labs = _labs(captured)
    domains, networks = collection(captured, recursive=True)
    for d in domains:
        rel = d.relative_to(captured).with_suffix("")
        argv = _argv(d)
        op = argv[2] if argv and len(argv) > 2 else "start"
        out.append(pytest.param("plan", d, tuple(_networks_seen_before(d, networks, labs)),
                                op, GOLDEN / captured.name / f"{rel}.{op}.json",
                                id=f"{captured.name}/{rel}:{op}"))
    for n in networks:
        rel = n.relative_to(captured).with_suffix("")
        out.append(pytest.param("model", n, (), None,
                                GOLDEN / captured.name / f"{rel}.model.json",
                                id=f"{captured.name}/{rel}:model"))
    return out


def _unique_networks(paths) -> list[Path]:
    """One document per network name (the last given wins, as in the state dir)."""
    from libvirt_netplug.errors import NetplugError
    from libvirt_netplug.model import parse_network

    seen: dict[str, Path] = {}
    for p in paths:
        try:
            seen[parse_network(p.read_bytes(), lenient=True).name] = p
        except NetplugError:
            continue
    return list(seen.values())


def run_plan(domain: Path, networks, op: str) -> dict:
    """`netplug plan` in-process (same parser and command function as the CLI)."""
    from libvirt_netplug import cli
    from libvirt_netplug.errors import NetplugError

    argv = ["plan", "--domain-xml", str(domain), "--config", str(CONFIG), "--op", op]
    for n in _unique_networks(networks):
        argv += ["--network-xml", str(n)]
    args = cli.build_parser().parse_args(argv)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            rc = args.func(args)
    except NetplugError as e:
        return {"exit": 1, "error": str(e).replace(str(SAMPLES), "xml-samples")}
    doc = json.loads(out.getvalue())
    # The envelope (format version, command) is checked once below; goldens hold the plan.
    assert (doc.pop("version"), doc.pop("command")) == (1, "plan")
    return {"exit": rc, "plan": doc}


def run_model(path: Path) -> dict:
    from libvirt_netplug.errors import NetplugError
    from libvirt_netplug.model import parse_network, parse_network_port

    data = path.read_bytes()
    try:
        if b"<networkport" in data:
            port = parse_network_port(data)
            d = values.asdict(port)
            d["network"] = port.network.to_record()
            return {"networkport": d}
        return {"network": parse_network(data, lenient=True).to_record()}
    except NetplugError as e:
        return {"error": str(e)}


@pytest.mark.parametrize("what,doc,networks,op,golden", cases())
def test_golden(what, doc, networks, op, golden):
    got = run_plan(doc, networks, op) if what == "plan" else run_model(doc)
    text = json.dumps(got, indent=2, sort_keys=False) + "\n"
    if REGEN_GOLDEN or not golden.exists():
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(text)
        if not REGEN_GOLDEN:
            pytest.fail(f"{golden} did not exist; written now — review it and commit it")
        return
    assert text == golden.read_text(), (
        f"{doc.name} ({op or 'model'}) no longer matches {golden}; if the change is intended, "
        f"regenerate with NETPLUG_REGEN_GOLDEN=1 and review the diff")


def test_no_orphan_golden_files():
    """Every golden file belongs to a sample (a renamed sample leaves no stale golden)."""
    wanted = {p.values[4] for p in cases()}
    present = {p for p in GOLDEN.rglob("*.json")}
    orphans = sorted(str(p.relative_to(GOLDEN)) for p in present - wanted)
    if REGEN_GOLDEN:
        for o in orphans:
            (GOLDEN / o).unlink()
        return
    assert orphans == [], "stale golden files (regenerate with NETPLUG_REGEN_GOLDEN=1)"


def test_cli_plan_output_is_the_golden_json():
    """The in-process run above is what the real `netplug plan` prints."""
    import subprocess

    from netns import netplug_cli

    doc = SAMPLES / "domain-host-bridges.xml"
    p = subprocess.run([*netplug_cli(), "plan", "--domain-xml", str(doc), "--config",
                        str(CONFIG)], capture_output=True, timeout=30)
    assert p.returncode == 0, p.stderr
    golden = json.loads((GOLDEN / "domain-host-bridges.start.json").read_text())
    assert json.loads(p.stdout) == {"version": 1, "command": "plan", **golden["plan"]}
