"""python -m tests.lab COMMAND — manage netplug labs by hand (progress on stderr).

    build                         build (or verify) the cached guest kernel + initramfs
    up [--name N] [--release R] [--bridge BR]... [--lower DEV]... [--guest VM=NIC+NIC...]
                                  start a lab that outlives this command; prints how to use it
                                  (R: libvirt9, libvirt11, host, other; default the host's)
    list                          labs on this host (stale = owner process gone)
    shell NAME [CMD...]           a shell (or CMD) inside the lab's namespaces; netplug's
                                  default paths there are the lab's own (printed on entry)
    guest NAME VM CMD             run CMD in guest VM over its serial console
    down NAME... | --all          tear labs down
    cleanup [--all]               remove stale labs (--all: every lab)
    capture [ARGS...]             python -m tests.lab.capture_samples ARGS

NIC specs: network:NAME, bridge:BR, direct:LOWER[:MODE], each optionally ",mac=52:54:00:…".
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from .guest import GuestError, build_guest
from .lab import PREFIX, Lab, LabError, cleanup_stale, destroy_lab, list_labs


def _lab_name(name: str) -> str:
    return name if name.startswith(PREFIX) else PREFIX + name


def cmd_build(_args) -> int:
    t0 = time.monotonic()
    img = build_guest()
    print(f"kernel  {img.kernel}\ninitrd  {img.initrd}\npackage {img.kernel_package}\n"
          f"took    {time.monotonic() - t0:.1f} s")
    return 0


def private_paths(lab: Lab) -> str:
    """What a netplug command typed inside the lab uses: every path is the lab's own."""
    rows = [("libvirt", "qemu:///system", lab.dir / "run/libvirt/libvirt-sock"),
            ("hooks", "/etc/libvirt/hooks", lab.hooks_dir),
            ("config", "/etc/libvirt-netplug/config.toml",
             lab.host_path("/etc/libvirt-netplug/config.toml")),
            ("state", "/run/libvirt-netplug", lab.host_path("/run/libvirt-netplug"))]
    return "\n".join(f"  {what:8}{inside:36}(host: {host})" for what, inside, host in rows)


def cmd_up(args) -> int:
    lab = Lab(args.name, release=args.release)
    lab.start()
    try:
        for br in args.bridge:
            lab.add_host_bridge(br)
            port, peer = lab.add_uplink(br)
            logging.info("bridge %s with uplink %s (test end %s)", br, port, peer)
        for dev in args.lower:
            name, peer = lab.add_lower_veth(dev)
            logging.info("lower device %s (test end %s)", name, peer)
        for spec in args.guest:
            vm, _, nics = spec.partition("=")
            g = lab.start_guest(vm, [n for n in nics.split("+") if n])
            logging.info("guest %s ready: %s", vm, g.macs)
    except BaseException:
        lab.stop()
        raise
    lab.detach()
    short = lab.name.removeprefix(PREFIX)
    print(f"lab       {lab.name}\nrelease   {lab.release.describe()}\n"
          f"dir       {lab.dir}\nhooks     {lab.hooks_dir}\n"
          f"libvirtd  log {lab.libvirtd_log_path}\n"
          f"host URI  export LIBVIRT_DEFAULT_URI='{lab.host_uri}'\n"
          f"shell     python -m tests.lab shell {short}\n"
          f"down      python -m tests.lab down {short}\n"
          f"inside the lab (lab-private; the host's /etc/libvirt-netplug and "
          f"/run/libvirt-netplug are not visible there):\n{private_paths(lab)}")
    return 0


def cmd_list(_args) -> int:
    for lab in list_labs():
        owner = lab["owner"]
        print(f"{lab['name']}  {'STALE' if lab['stale'] else 'live'}  owner pid "
              f"{owner.get('pid', '?')}{' (detached)' if owner.get('detached') else ''}  "
              f"{lab['dir']}")
    return 0


def cmd_shell(args) -> int:
    lab = Lab.attach(_lab_name(args.name))
    argv = lab.shell_argv() if not args.cmd else lab.shell_argv()[:-1] + args.cmd
    if not args.cmd:
        print(f"lab: {lab.name} ({lab.release.name}); netplug commands here use the lab's own "
              f"paths, never the host's:\n{private_paths(lab)}", file=sys.stderr)
    os.execvp(argv[0], argv)
    return 127  # not reached


def cmd_guest(args) -> int:
    lab = Lab.attach(_lab_name(args.name))
    rc, out = lab.guest(args.vm).sh(" ".join(args.cmd), timeout=args.timeout)
    sys.stdout.write(out)
    return rc


def cmd_down(args) -> int:
    names = [lab["name"] for lab in list_labs()] if args.all else [_lab_name(n)
                                                                   for n in args.names]
    for name in names:
        logging.info("removing %s", name)
        destroy_lab(name)
    return 0


def cmd_cleanup(args) -> int:
    removed = cleanup_stale(all_labs=args.all)
    logging.info("removed %d lab(s)%s", len(removed), ": " + ", ".join(removed) if removed
                 else "")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.lab", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("build").set_defaults(func=cmd_build)
    p = sub.add_parser("up")
    p.add_argument("--name")
    p.add_argument("--release", help="libvirt9, libvirt11, host (default) or other")
    p.add_argument("--bridge", action="append", default=[])
    p.add_argument("--lower", action="append", default=[])
    p.add_argument("--guest", action="append", default=[], metavar="VM=NIC+NIC")
    p.set_defaults(func=cmd_up)
    sub.add_parser("list").set_defaults(func=cmd_list)
    p = sub.add_parser("shell")
    p.add_argument("name")
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_shell)
    p = sub.add_parser("guest")
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("name")
    p.add_argument("vm")
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_guest)
    p = sub.add_parser("down")
    p.add_argument("--all", action="store_true")
    p.add_argument("names", nargs="*")
    p.set_defaults(func=cmd_down)
    p = sub.add_parser("cleanup")
    p.add_argument("--all", action="store_true")
    p.set_defaults(func=cmd_cleanup)
    p = sub.add_parser("capture", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=lambda a: __import__("tests.lab.capture_samples",
                                             fromlist=["main"]).main(a.rest))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="lab: %(message)s", stream=sys.stderr)
    try:
        return args.func(args)
    except (LabError, GuestError, ValueError) as e:
        print(f"lab: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
