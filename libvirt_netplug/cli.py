"""The ``netplug`` command.

Every subcommand reports user errors as one line on stderr with exit status 1, never a
traceback; with ``--json`` the error is also a JSON document on stdout (docs/reconcile.md).
Subcommand modules are imported only when used.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable

from .errors import NetplugError
from .hook import QEMU_APPLY, QEMU_CLEANUP  # hook.py imports nothing more at module level
from .version import version

# The format version of every JSON document a command prints ("version" in the document):
# raised when a field changes meaning or goes away, not when one is added.
JSON_VERSION = 1

# The events `plan --op` models: the hook's own, plus these that it leaves alone.
IGNORED_OPS = ("prepare", "migrate", "restore")
PLAN_OPS = (*sorted(QEMU_APPLY), *sorted(QEMU_CLEANUP), *IGNORED_OPS)


def _read_file(path: str, what: str) -> bytes:
    """At most the XML size limit (and one byte more, so the parser can say it is over):
    `--domain-xml /dev/zero` must be an error, not a read until memory runs out."""
    from .xmlsafe import MAX_XML_BYTES

    try:
        if path == "-":
            return sys.stdin.buffer.read(MAX_XML_BYTES + 1)
        with open(path, "rb") as f:
            return f.read(MAX_XML_BYTES + 1)
    except OSError as e:
        raise NetplugError(f"{what} {path}: cannot read: {e.strerror}") from None


def cmd_plan(args: argparse.Namespace) -> int:
    from .model import parse_domain, parse_network
    from .plan import bridge_intents, plan_cleanup, plan_ports, Plan
    from .policy import Config, load_config

    op = args.op
    if op not in PLAN_OPS:
        raise NetplugError(f"unknown --op {op!r}; use one of {', '.join(PLAN_OPS)}")
    domain = parse_domain(_read_file(args.domain_xml, "domain XML"))
    networks = {}
    for path in args.network_xml:
        net = parse_network(_read_file(path, "network XML"))
        networks[net.name] = net
    # Without --config nothing host-specific leaks into the plan: the default config file is
    # read only when named, so the same inputs always give the same plan.
    if args.config:
        from .paths import resolve

        resolve(args.config)  # an explicit --config must exist
    config = load_config(args.config) if args.config else Config()
    intents = bridge_intents(domain, networks, config)
    if op in QEMU_APPLY:
        plan = plan_ports(intents, None)
    elif op in QEMU_CLEANUP:
        records = {it.tap: {"domain": it.domain, "interface": it.ctx.interface, "mac": it.mac,
                            "bridge": it.bridge, "network": it.network, "flags": True,
                            "fdb": [[it.mac, None]]}
                   for it in intents if it.managed}
        plan = plan_cleanup(records, None)
        plan = Plan(plan.ops, plan.notes, tuple(intents))
    else:
        plan = Plan(intents=tuple(intents))
    doc = {"version": JSON_VERSION, "command": "plan", "domain": domain.name, "op": op,
           **plan.to_json()}
    json.dump(doc, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")
    return 0


RELOAD_HINT = ("libvirt reads its hooks when its daemon starts or reloads: run 'systemctl "
               "reload libvirtd' (monolithic daemon) or 'systemctl reload virtqemud "
               "virtnetworkd' (modular daemons)")


def cmd_install_hooks(args: argparse.Namespace) -> int:
    from .install import install, read_shim, shim_paths

    config, state_dir = args.config, args.state_dir
    if args.keep_paths:
        # An upgrade (the Debian package's postinst) must not reset what the operator chose.
        old = read_shim(shim_paths(args.hooks_dir)["qemu"])
        if old is not None:
            config = config or old.config
            state_dir = state_dir or old.state_dir
    done = install(args.hooks_dir, args.python, config, state_dir)
    changed = any(d.action != "unchanged" for d in done)
    if args.json:
        _dump({"version": JSON_VERSION, "command": "install-hooks", "changed": changed,
               "hooks": [{"path": d.path, "action": d.action} for d in done]})
    else:
        for d in done:
            print(f"{d.action} {d.path}")
    if changed:
        print(RELOAD_HINT, file=sys.stderr)
    return 0


def cmd_uninstall_hooks(args: argparse.Namespace) -> int:
    from .install import uninstall

    removed = uninstall(args.hooks_dir)
    if args.json:
        _dump({"version": JSON_VERSION, "command": "uninstall-hooks", "changed": bool(removed),
               "removed": removed})
        return 0
    for path in removed:
        print(f"removed {path}")
    if not removed:
        print("no netplug hooks installed in " + args.hooks_dir, file=sys.stderr)
    else:
        print(RELOAD_HINT, file=sys.stderr)
    return 0


def _dump(doc: dict) -> None:
    json.dump(doc, sys.stdout, indent=2)
    sys.stdout.write("\n")


def cmd_hook(args: argparse.Namespace) -> int:
    from .hook import main
    from .paths import resolve

    # By hand, a hook uses what the installed shims give it unless told otherwise.
    paths = resolve(args.config, args.state_dir, hooks_dir=args.hooks_dir)
    return main([args.kind, *args.hook_args], sys.stdin.buffer, sys.stderr, kind=args.kind,
                config=paths.config.value, state_dir=paths.state_dir.value)


class _VersionAction(argparse.Action):
    """``--version``, with the version read only when asked for (argparse's own "version"
    action needs the string while the parser is built, i.e. in every command)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
                 help="show the version and exit"):
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"netplug {version()} (Python {sys.version.split()[0]}, "
              f"{os.path.dirname(os.path.abspath(__file__))})")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    from .paths import DEFAULT_HOOKS_DIR

    p = argparse.ArgumentParser(prog="netplug", description=(
        "Bridge MAC-table management and macvtap RX-filter sync for libvirt hosts."))
    p.add_argument("--version", action=_VersionAction)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sp = sub.add_parser("plan", help="print, as JSON, what the hook would do (no root, no "
                                     "kernel access)")
    sp.add_argument("--domain-xml", required=True, metavar="FILE", help="domain XML ('-': stdin)")
    sp.add_argument("--network-xml", action="append", default=[], metavar="FILE",
                    help="a libvirt network XML (repeatable)")
    sp.add_argument("--config", metavar="FILE", help="netplug config (TOML)")
    sp.add_argument("--op", default="start", help="hook operation to plan (default: start)")
    sp.set_defaults(func=cmd_plan)

    sp = sub.add_parser("install-hooks", help="install the libvirt hook shims",
                        description="Install HOOKS/qemu.d/libvirt-netplug and HOOKS/network.d/"
                                    "libvirt-netplug, bound to an interpreter. Prints per shim "
                                    "whether it was installed, updated or unchanged; the other "
                                    "commands and the agent read the config and state dir "
                                    "back from the shims.")
    sp.add_argument("--hooks-dir", default=DEFAULT_HOOKS_DIR,
                    help=f"libvirt's hooks directory (default: {DEFAULT_HOOKS_DIR})")
    sp.add_argument("--python", help="interpreter to bind the shims to (default: this one)")
    sp.add_argument("--config", help="config path to write into the shims (libvirtd passes "
                                     "no environment to hooks)")
    sp.add_argument("--state-dir", help="state dir to write into the shims")
    sp.add_argument("--keep-paths", action="store_true",
                    help="keep the config and state dir the installed shims use, unless "
                         "given (what a package upgrade does)")
    sp.add_argument("--json", action="store_true", help="print a JSON document")
    sp.set_defaults(func=cmd_install_hooks)

    sp = sub.add_parser("uninstall-hooks", help="remove exactly the shims install-hooks wrote")
    sp.add_argument("--hooks-dir", default=DEFAULT_HOOKS_DIR,
                    help=f"libvirt's hooks directory (default: {DEFAULT_HOOKS_DIR})")
    sp.add_argument("--json", action="store_true", help="print a JSON document")
    sp.set_defaults(func=cmd_uninstall_hooks)

    sp = sub.add_parser("hook", help="run a hook by hand, as libvirtd would (XML on stdin)")
    sp.add_argument("kind", choices=("qemu", "network"))
    sp.add_argument("hook_args", nargs=argparse.REMAINDER, metavar="OBJECT OP SUBOP EXTRA")
    sp.add_argument("--config", help="config (default: the installed hooks')")
    sp.add_argument("--state-dir", help="state dir (default: the installed hooks')")
    sp.add_argument("--hooks-dir", default=DEFAULT_HOOKS_DIR,
                    help=f"where the hook shims are installed (default: {DEFAULT_HOOKS_DIR})")
    sp.set_defaults(func=cmd_hook)

    for register in _extra_commands():
        register(sub)
    return p


def _extra_commands() -> list[Callable]:
    """register(subparsers) of the subcommands that live in their own modules."""
    import importlib

    out = []
    for modname in ("agent", "reconcile", "status", "doctor", "checkconfig"):
        try:
            mod = importlib.import_module(f"libvirt_netplug.{modname}")
        except ModuleNotFoundError as e:
            if e.name == f"libvirt_netplug.{modname}":
                continue
            raise
        out.append(mod.register)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except NetplugError as e:
        print(f"netplug {args.command}: error: {e}", file=sys.stderr)
        if getattr(args, "json", False):
            _dump({"version": JSON_VERSION, "command": args.command, "exit_status": 1,
                   "error": str(e)})
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
