"""Where things are: one answer for the hooks, the operator commands and the agent.

libvirtd runs hooks with an almost empty environment, so ``netplug install-hooks`` writes the
config file and state dir into the shims it installs. Everything else (reconcile, status,
doctor, check-config, the agent) must use the same paths, or it works against the hooks (a
reconcile with another config undoes what the hooks did). So a command resolves each path
like this, first match wins:

1. its own option (``--config``, ``--state-dir``): the operator said so; a ``--config`` that
   does not exist is an error, not an empty config;
2. the environment (``NETPLUG_CONFIG``, ``NETPLUG_STATE_DIR``);
3. what the installed hook shims use (``HOOKS/qemu.d/libvirt-netplug``, read, never run);
4. the defaults (/etc/libvirt-netplug/config.toml, /run/libvirt-netplug).

``Paths.mismatches()`` lists where 1 or 2 disagree with 3 (doctor reports them, commands that
write warn). Operator side only: the hook path never imports this module.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

from .errors import NetplugError
from .policy import DEFAULT_CONFIG
from .state import DEFAULT_STATE_DIR

DEFAULT_URI = "qemu:///system"
DEFAULT_HOOKS_DIR = "/etc/libvirt/hooks"
CONFIG_ENV = "NETPLUG_CONFIG"
STATE_ENV = "NETPLUG_STATE_DIR"


@dataclass(frozen=True)
class Setting:
    """A resolved path and where it came from ("--config", "$NETPLUG_CONFIG", "hooks",
    "default")."""

    value: str
    source: str

    def describe(self) -> str:
        return f"{self.value} (from {self.source})"


@dataclass(frozen=True)
class Paths:
    config: Setting
    state_dir: Setting
    hooks_dir: str
    hooks: "HookPaths | None"  # what the installed shims use; None: no shim installed

    def mismatches(self) -> list[str]:
        """Where this command's paths differ from the installed hooks' (one line each)."""
        if self.hooks is None:
            return []
        out = []
        for what, mine, theirs in (("config", self.config, self.hooks.config),
                                   ("state dir", self.state_dir, self.hooks.state_dir)):
            if os.path.normpath(mine.value) != os.path.normpath(theirs):
                out.append(f"{what} {mine.describe()} is not the hooks' {theirs} "
                           f"({self.hooks.shim})")
        return out

    def to_json(self) -> dict:
        return {"config": self.config.value, "config_source": self.config.source,
                "state_dir": self.state_dir.value, "state_dir_source": self.state_dir.source,
                "hooks_dir": self.hooks_dir,
                "hooks": self.hooks.to_json() if self.hooks else None}


@dataclass(frozen=True)
class HookPaths:
    """The paths an installed shim passes to the hook (None in the shim: the default)."""

    shim: str
    config: str
    state_dir: str
    python: str | None
    sys_path: tuple[str, ...] = ()
    problem: str | None = None  # the shims disagree with each other, or one is unreadable

    def to_json(self) -> dict:
        return {"shim": self.shim, "config": self.config, "state_dir": self.state_dir,
                "python": self.python, "sys_path": list(self.sys_path),
                "problem": self.problem}


def installed_hook_paths(hooks_dir: str = DEFAULT_HOOKS_DIR) -> HookPaths | None:
    """What the installed shims use, from their text (never executed); None if none is ours."""
    from . import install

    found = []
    for kind, path in install.shim_paths(hooks_dir).items():  # the qemu shim first
        shim = install.read_shim(path)
        if shim is not None:
            found.append((path, shim))
    if not found:
        return None
    path, shim = found[0]
    problem = None
    for other_path, other in found[1:]:
        if (other.config, other.state_dir) != (shim.config, shim.state_dir):
            problem = (f"the shims disagree: {path} uses config {shim.config or 'default'}, "
                       f"state dir {shim.state_dir or 'default'}; {other_path} uses config "
                       f"{other.config or 'default'}, state dir {other.state_dir or 'default'}")
    return HookPaths(path, shim.config or DEFAULT_CONFIG, shim.state_dir or DEFAULT_STATE_DIR,
                     shim.python, shim.sys_path, problem)


def resolve(config: str | None = None, state_dir: str | None = None, *,
            hooks_dir: str | None = None,
            environ: Mapping[str, str] | None = None) -> Paths:
    """The paths a command uses (see the module docstring). Raises NetplugError for an
    explicit ``config`` that does not exist."""
    environ = os.environ if environ is None else environ
    hooks_dir = hooks_dir or DEFAULT_HOOKS_DIR
    hooks = installed_hook_paths(hooks_dir)

    def implied(env: str, from_hooks: str | None, default: str) -> Setting:
        if environ.get(env):
            return Setting(environ[env], f"${env}")
        if hooks is not None and from_hooks:
            return Setting(from_hooks, f"hooks {hooks.shim}")
        return Setting(default, "default")

    config_implied = implied(CONFIG_ENV, hooks and hooks.config, DEFAULT_CONFIG)
    state_implied = implied(STATE_ENV, hooks and hooks.state_dir, DEFAULT_STATE_DIR)
    if config and not os.path.exists(config):
        raise NetplugError(f"config {config}: no such file; give an existing file, or leave "
                           f"--config out to use {config_implied.describe()}")
    return Paths(Setting(config, "--config") if config else config_implied,
                 Setting(state_dir, "--state-dir") if state_dir else state_implied,
                 hooks_dir, hooks)


def add_path_arguments(sp) -> None:
    """--config, --state-dir and --hooks-dir, as every command that reads the state has them."""
    sp.add_argument("--config", metavar="FILE",
                    help="netplug config (default: $NETPLUG_CONFIG, else the one the "
                         f"installed hooks use, else {DEFAULT_CONFIG})")
    sp.add_argument("--state-dir", metavar="DIR",
                    help="state dir (default: $NETPLUG_STATE_DIR, else the one the installed "
                         f"hooks use, else {DEFAULT_STATE_DIR})")
    sp.add_argument("--hooks-dir", metavar="DIR", default=DEFAULT_HOOKS_DIR,
                    help="where the hook shims are installed, to read their paths (default: "
                         f"{DEFAULT_HOOKS_DIR})")
