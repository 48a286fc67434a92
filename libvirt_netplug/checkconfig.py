"""``netplug check-config``: is every netplug policy on this host valid? (for config management)

Checks the config file (the one the hooks use, unless --config says otherwise) and the netplug
policy in the metadata of every network and domain libvirt has defined, running or not (their
persistent XML: what the next start uses), plus any XML files given with --xml. Changes
nothing. Exit status: 0 all valid, 2 something is invalid (each problem is one line naming
the file or object and what to fix), 1 could not check (libvirt unreachable, a file
unreadable).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Any, TextIO

from .errors import NetplugError

EXIT_VALID, EXIT_ERROR, EXIT_INVALID = 0, 1, 2


@dataclass(frozen=True)
class Checked:
    kind: str  # config | network | domain | file
    name: str
    error: str | None = None
    policy: str | None = None  # a summary of what it sets ("promiscLinks=no"), if anything

    @property
    def valid(self) -> bool:
        return self.error is None

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "valid": self.valid,
                "error": self.error, "policy": self.policy}

    def line(self) -> str:
        if self.error:
            return f"invalid: {self.error}"
        return f"ok: {self.kind} {self.name}" + (f": {self.policy}" if self.policy else "")


def _summary(policy) -> str | None:
    doc = policy.to_json()
    return ", ".join(f"{k}={v}" for k, v in doc.items()) or None


def check_config_file(setting) -> Checked:
    import os

    from .policy import load_config

    if not os.path.exists(setting.value):
        return Checked("config", setting.value, policy=f"no such file ({setting.source}): "
                                                       f"an empty config")
    try:
        config = load_config(setting.value)
    except NetplugError as e:
        return Checked("config", setting.value, str(e))
    parts = [f"[bridge.{b}] {_summary(p) or 'empty'}" for b, p in sorted(config.bridges.items())]
    parts += [f"[direct.{d}] {_summary(p) or 'empty'}" for d, p in sorted(config.direct.items())]
    if config.strict:
        parts.insert(0, "strict")
    return Checked("config", setting.value, policy="; ".join(parts) or "no policies")


def check_document(kind: str, name: str, xml: bytes | str) -> Checked:
    """One network or domain XML: its netplug metadata must parse (strictly)."""
    from .model import parse_domain, parse_network

    try:
        if kind == "network":
            net = parse_network(xml)
            return Checked(kind, net.name, policy=_summary(net.policy))
        dom = parse_domain(xml)
    except NetplugError as e:
        return Checked(kind, name, str(e))
    parts = [_summary(dom.policy)] if _summary(dom.policy) else []
    parts += [f"{mac}: {_summary(p)}" for mac, p in dom.interface_policies]
    return Checked(kind, dom.name, policy="; ".join(parts) or None)


def check_file(path: str) -> Checked:
    from .xmlsafe import parse_xml

    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise NetplugError(f"{path}: cannot read: {e.strerror}") from None
    try:
        root = parse_xml(data, path)
    except NetplugError as e:
        return Checked("file", path, str(e))
    kind = {"network": "network", "hookData": "network", "domain": "domain"}.get(root.tag)
    if kind is None:
        return Checked("file", path, f"{path}: root element is <{root.tag}>, expected <domain> "
                                     f"or <network>")
    got = check_document(kind, path, data)
    return Checked(got.kind, f"{got.name} ({path})", got.error and f"{path}: {got.error}",
                   got.policy)


def check_libvirt(uri: str) -> list[Checked]:
    """Every defined network and domain, by its persistent XML (a transient one: live)."""
    from . import libvirt_io

    libvirt = libvirt_io.load_libvirt()
    conn = libvirt_io.connect(uri)
    out = []
    def persistent_xml(obj, inactive_flag: int) -> str:
        if obj.isPersistent():
            try:
                return obj.XMLDesc(inactive_flag)
            except libvirt.libvirtError as e:
                # Drivers without the flag (the test driver's networks): the live XML carries
                # the same metadata.
                if e.get_error_code() not in (libvirt.VIR_ERR_NO_SUPPORT,
                                              libvirt.VIR_ERR_INVALID_ARG):
                    raise
        return obj.XMLDesc(0)

    try:
        for net in sorted(conn.listAllNetworks(0), key=lambda n: n.name()):
            out.append(check_document("network", net.name(), persistent_xml(
                net, libvirt.VIR_NETWORK_XML_INACTIVE)))
        for dom in sorted(conn.listAllDomains(0), key=lambda d: d.name()):
            out.append(check_document("domain", dom.name(), persistent_xml(
                dom, libvirt.VIR_DOMAIN_XML_INACTIVE)))
    except libvirt.libvirtError as e:
        raise NetplugError(f"libvirt at {uri}: {e.get_error_message()}") from None
    return out


def run(args: argparse.Namespace, out: TextIO) -> int:
    from .reconcile import command_paths

    paths = command_paths(args)
    results = [check_config_file(paths.config)]
    results += [check_file(p) for p in args.xml]
    if not args.no_libvirt:
        results += check_libvirt(args.connect)
    invalid = [r for r in results if not r.valid]
    status = EXIT_INVALID if invalid else EXIT_VALID
    if args.json:
        from .cli import JSON_VERSION

        json.dump({"version": JSON_VERSION, "command": "check-config", "exit_status": status,
                   "connect": None if args.no_libvirt else args.connect,
                   "paths": paths.to_json(), "valid": not invalid,
                   "checked": [r.to_json() for r in results]}, out, indent=2)
        out.write("\n")
        return status
    for r in results:
        if not r.valid or args.verbose:
            out.write(r.line() + "\n")
    counts = {k: sum(1 for r in results if r.kind == k) for k in ("network", "domain")}
    what = (f"config {paths.config.value}" + (f", {len(args.xml)} file(s)" if args.xml else "")
            + ("" if args.no_libvirt else f", {counts['network']} network(s) and "
               f"{counts['domain']} domain(s) defined in libvirt"))
    out.write(f"{len(invalid)} invalid of {len(results)} checked ({what})\n" if invalid else
              f"all valid: {what}\n")
    return status


def register(subparsers) -> None:
    from .paths import DEFAULT_URI, add_path_arguments

    sp = subparsers.add_parser(
        "check-config", help="validate the config and every network's and domain's policy",
        description=__doc__.split("\n\n", 1)[1].replace("\n", " "))
    sp.add_argument("--connect", "-c", metavar="URI", default=DEFAULT_URI,
                    help=f"libvirt URI (default: {DEFAULT_URI})")
    add_path_arguments(sp)
    sp.add_argument("--xml", action="append", default=[], metavar="FILE",
                    help="also check this domain or network XML file (repeatable)")
    sp.add_argument("--no-libvirt", action="store_true",
                    help="check only the config (and --xml files), not what libvirt defines")
    sp.add_argument("--json", action="store_true", help="print a JSON document")
    sp.add_argument("--verbose", "-v", action="store_true", help="also list what is valid")
    sp.set_defaults(func=cmd_check_config)


def cmd_check_config(args: argparse.Namespace) -> int:
    return run(args, sys.stdout)
