"""Install/uninstall the hook shims into libvirt's hook directories.

libvirt (>= 6.5) runs every executable in ``HOOKS/qemu.d/`` and ``HOOKS/network.d/``. We
install one file into each, bound to the interpreter netplug is installed in. libvirtd runs
hooks with an almost empty environment, so settings such as the config path are written into
the shim, not read from the environment.
"""

from __future__ import annotations

import os
import sys

from .errors import NetplugError

DEFAULT_HOOKS_DIR = "/etc/libvirt/hooks"
SHIM_NAME = "libvirt-netplug"
MARKER = "# libvirt-netplug hook shim"

TEMPLATE = '''#!{python} -I
{marker} ({kind}): libvirtd runs this; it hands over to libvirt_netplug.hook.
# Managed by `netplug install-hooks` / `netplug uninstall-hooks`; do not edit.
import sys
from libvirt_netplug.hook import run
sys.exit(run({kind!r}, config={config!r}, state_dir={state_dir!r}))
'''


def render(kind: str, python: str = "/usr/bin/env python3", config: str | None = None,
           state_dir: str | None = None) -> str:
    if python.startswith("/usr/bin/env"):
        # `env` with an extra argument needs -S; the repo's template is for reading and for
        # running from a checkout, the installed shim always names the real interpreter.
        head = TEMPLATE.replace("#!{python} -I", "#!{python}")
    else:
        head = TEMPLATE
    return head.format(python=python, marker=MARKER, kind=kind, config=config,
                       state_dir=state_dir)


def _paths(hooks_dir: str) -> dict[str, str]:
    return {kind: os.path.join(hooks_dir, f"{kind}.d", SHIM_NAME) for kind in ("qemu", "network")}


def install(hooks_dir: str = DEFAULT_HOOKS_DIR, python: str | None = None,
            config: str | None = None, state_dir: str | None = None) -> list[str]:
    python = python or sys.executable
    if not os.path.isabs(python):
        raise NetplugError(f"interpreter {python!r} is not an absolute path")
    paths = _paths(hooks_dir)
    for path in paths.values():  # refuse before writing anything: no half-done install
        if os.path.exists(path) and not _ours(path):
            raise NetplugError(f"{path} exists and was not installed by netplug; move it away "
                               f"and run install-hooks again")
    written = []
    for kind, path in paths.items():
        try:
            os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                f.write(render(kind, python, config, state_dir))
            os.chmod(tmp, 0o755)
            os.replace(tmp, path)
        except OSError as e:
            raise NetplugError(f"cannot install {path}: {e.strerror}") from None
        written.append(path)
    return written


def _ours(path: str) -> bool:
    try:
        with open(path, errors="replace") as f:
            return MARKER in f.read(4096)
    except OSError:
        return False


def uninstall(hooks_dir: str = DEFAULT_HOOKS_DIR) -> list[str]:
    present = [p for p in _paths(hooks_dir).values() if os.path.exists(p)]
    for path in present:
        if not _ours(path):
            raise NetplugError(f"{path} was not installed by netplug; leaving it alone")
    removed = []
    for path in present:
        try:
            os.unlink(path)
        except OSError as e:
            raise NetplugError(f"cannot remove {path}: {e.strerror}") from None
        removed.append(path)
    return removed
