"""Install/uninstall the hook shims into libvirt's hook directories.

libvirt (>= 6.5) runs every executable in ``HOOKS/qemu.d/`` and ``HOOKS/network.d/``. We
install one file into each, bound to the interpreter netplug is installed in. libvirtd runs
hooks with an almost empty environment, so settings such as the config path are written into
the shim, not read from the environment; the operator commands read them back from the shim
(paths.py), so hooks and commands always agree.

The shim starts Python as cheaply as it can: ``-I`` (no environment, no user site) and ``-S``
(no site module: no .pth files, no site-packages scan), with the directories netplug and its
dependencies live in written into it explicitly. That works the same for a venv, a regular
install, an editable install and the Debian package, because the directories are asked of the
interpreter itself at install time.

Exactly what install-hooks created goes on uninstall: the two shims, and the directories it
had to create for them (recorded in the shim) when they are empty again.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from dataclasses import dataclass

from .errors import NetplugError
from .paths import DEFAULT_HOOKS_DIR

SHIM_NAME = "libvirt-netplug"
MARKER = "# libvirt-netplug hook shim"
KINDS = ("qemu", "network")
# What a hook imports beyond the standard library: install checks the interpreter finds them
# through the shim's sys.path, and doctor checks it again.
HOOK_MODULES = ("libvirt_netplug", "lxml")
PROBE_IMPORTS = ("libvirt_netplug.hook", "libvirt_netplug.model", "libvirt_netplug.apply",
                 "libvirt_netplug.kernel", "libvirt_netplug.state", "libvirt_netplug.hooklog")

TEMPLATE = '''#!{python}{flags}
{marker} ({kind}): libvirtd runs this; it hands over to libvirt_netplug.hook.
# Managed by `netplug install-hooks` / `netplug uninstall-hooks`; do not edit.
import sys
{path_line}CONFIG = {config!r}
STATE_DIR = {state_dir!r}
{created_line}from libvirt_netplug.hook import run
sys.exit(run({kind!r}, config=CONFIG, state_dir=STATE_DIR))
'''


@dataclass(frozen=True)
class Shim:
    """What an installed shim says (read with ast, never executed)."""

    python: str | None
    flags: str
    config: str | None
    state_dir: str | None
    sys_path: tuple[str, ...] = ()
    created: tuple[str, ...] = ()  # directories install-hooks created for it


@dataclass(frozen=True)
class Installed:
    path: str
    action: str  # installed | updated | unchanged


def render(kind: str, python: str = "/usr/bin/env python3", config: str | None = None,
           state_dir: str | None = None, sys_path: tuple[str, ...] | list[str] = (),
           created: tuple[str, ...] | list[str] = ()) -> str:
    """The shim's text. With ``/usr/bin/env`` (the repo's hooks/*, for reading and running
    from a checkout) there are no interpreter flags: env would take them as a program name."""
    flags = "" if python.startswith("/usr/bin/env") else " -IS"
    path_line = ""
    if sys_path:
        path_line = ("# -IS: no environment, no site module; netplug and its dependencies:\n"
                     f"sys.path += {list(sys_path)!r}\n")
    created_line = f"CREATED = {list(created)!r}  # removed by uninstall-hooks when empty\n" \
        if created else ""
    return TEMPLATE.format(python=python, flags=flags, marker=MARKER, kind=kind,
                           path_line=path_line, config=config, state_dir=state_dir,
                           created_line=created_line)


def shim_paths(hooks_dir: str = DEFAULT_HOOKS_DIR) -> dict[str, str]:
    return {kind: os.path.join(hooks_dir, f"{kind}.d", SHIM_NAME) for kind in KINDS}


def read_shim(path: str) -> Shim | None:
    """Parse one of our shims; None if the file is missing or not ours. Shims of earlier
    versions (``run('qemu', config=…, state_dir=…)`` literals) are understood too."""
    try:
        with open(path, errors="replace") as f:
            text = f.read(65536)
    except OSError:
        return None
    if MARKER not in text:
        return None
    first = text.splitlines()[0] if text else ""
    argv = first[2:].split() if first.startswith("#!") else []
    python = argv[0] if argv and not argv[0].endswith("/env") else None
    flags = " ".join(argv[1:]) if python else ""
    values: dict[str, object] = {}
    try:
        tree = ast.parse(text)
    except SyntaxError:
        tree = ast.Module(body=[], type_ignores=[])
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and \
                isinstance(node.targets[0], ast.Name):
            _literal(values, node.targets[0].id, node.value)
        elif isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Attribute) and \
                node.target.attr == "path":
            _literal(values, "SYS_PATH", node.value)
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "run":
            for kw in node.keywords:
                if kw.arg in ("config", "state_dir"):
                    _literal(values, f"run.{kw.arg}", kw.value)
    config = values.get("CONFIG", values.get("run.config"))
    state_dir = values.get("STATE_DIR", values.get("run.state_dir"))
    return Shim(python, flags, config if isinstance(config, str) else None,
                state_dir if isinstance(state_dir, str) else None,
                tuple(p for p in values.get("SYS_PATH") or () if isinstance(p, str)),
                tuple(p for p in values.get("CREATED") or () if isinstance(p, str)))


def _literal(into: dict, key: str, node: ast.AST) -> None:
    try:
        into[key] = ast.literal_eval(node)
    except ValueError:
        pass


# -- the interpreter ----------------------------------------------------------------------------


def module_dirs(python: str) -> tuple[str, ...]:
    """The directories ``python`` imports netplug and its hook dependencies from (asked of
    that interpreter, site enabled as an operator would run it)."""
    code = ("import importlib.util, json, os\n"
            "out = []\n"
            f"for name in {HOOK_MODULES!r}:\n"
            "    spec = importlib.util.find_spec(name)\n"
            "    if spec is None:\n"
            "        raise SystemExit(f'cannot import {name}')\n"
            "    where = list(spec.submodule_search_locations or [])\n"
            "    d = os.path.dirname(where[0] if where else spec.origin)\n"
            "    if d not in out:\n"
            "        out.append(d)\n"
            "print(json.dumps(out))\n")
    try:
        p = subprocess.run([python, "-I", "-c", code], capture_output=True, text=True,
                           timeout=60, cwd="/")
    except OSError as e:
        raise NetplugError(f"interpreter {python}: cannot run: {e.strerror}") from None
    except subprocess.TimeoutExpired:
        raise NetplugError(f"interpreter {python}: no answer within 60 s") from None
    if p.returncode != 0:
        why = (p.stderr.strip().splitlines() or [f"exit status {p.returncode}"])[-1]
        raise NetplugError(f"interpreter {python}: {why}; install netplug into it (pip "
                           f"install libvirt-netplug) or pass --python") from None
    return tuple(json.loads(p.stdout))


def probe(python: str, flags: str, sys_path: tuple[str, ...] | list[str],
          timeout: float = 30) -> str | None:
    """Start ``python`` the way the shim does and import what a hook imports; None if that
    works, else one line saying why not."""
    code = (f"import sys; sys.path += {list(sys_path)!r}; "
            + "; ".join(f"import {m}" for m in PROBE_IMPORTS))
    argv = [python, *([flags] if flags else []), "-c", code]
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd="/",
                           env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"})
    except OSError as e:
        return f"cannot run {python}: {e.strerror}"
    except subprocess.TimeoutExpired:
        return f"{python} did not finish importing the hook within {timeout:.0f} s"
    if p.returncode != 0:
        return (p.stderr.strip().splitlines() or [f"exit status {p.returncode}"])[-1]
    return None


# -- install / uninstall ------------------------------------------------------------------------


def install(hooks_dir: str = DEFAULT_HOOKS_DIR, python: str | None = None,
            config: str | None = None, state_dir: str | None = None, *,
            sys_path: tuple[str, ...] | list[str] | None = None) -> list[Installed]:
    """Install both shims; returns what happened to each (installed, updated, unchanged).

    ``sys_path`` None: ask ``python`` where netplug and lxml live, and check the shim's
    interpreter can import the hook with exactly those paths. Nothing is written unless both
    shims can be.
    """
    python = python or sys.executable
    if not os.path.isabs(python):
        raise NetplugError(f"interpreter {python!r} is not an absolute path")
    for path in (config, state_dir):
        if path is not None and not os.path.isabs(path):
            raise NetplugError(f"{path!r} is not an absolute path; libvirtd runs hooks from /")
    paths = shim_paths(hooks_dir)
    old: dict[str, Shim | None] = {}
    for kind, path in paths.items():  # refuse before writing anything: no half-done install
        if os.path.lexists(path):
            old[kind] = read_shim(path)
            if old[kind] is None:
                raise NetplugError(f"{path} exists and was not installed by netplug; move it "
                                   f"away and run install-hooks again")
    if sys_path is None:
        sys_path = module_dirs(python)
        why = probe(python, "-IS", sys_path)
        if why:
            raise NetplugError(f"interpreter {python} cannot run the hook: {why}")
    # Directories this install creates, plus those an earlier install created (kept across
    # reinstalls and upgrades, so uninstall can still remove them).
    missing = _missing_dirs(paths.values())
    done = []
    for kind, path in paths.items():
        before = old.get(kind)
        created = list(before.created) if before else []
        created += [d for d in missing if d not in created and
                    os.path.commonpath([d, os.path.dirname(path)]) == d]
        text = render(kind, python, config, state_dir, tuple(sys_path), tuple(created))
        try:
            with open(path) as f:
                unchanged = f.read() == text
        except OSError:
            unchanged = False
        if unchanged and os.access(path, os.X_OK):
            done.append(Installed(path, "unchanged"))
            continue
        try:
            os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                f.write(text)
            os.chmod(tmp, 0o755)
            os.replace(tmp, path)
        except OSError as e:
            raise NetplugError(f"cannot install {path}: {e.strerror}") from None
        done.append(Installed(path, "updated" if before else "installed"))
    return done


def _missing_dirs(shim_files) -> list[str]:
    """Directories that do not exist yet on the way to the shims, outermost first."""
    out = []
    for f in shim_files:
        d = os.path.dirname(os.path.abspath(f))
        chain = []
        while d and not os.path.isdir(d):
            chain.append(d)
            parent = os.path.dirname(d)
            if parent == d:
                break
            d = parent
        for c in reversed(chain):
            if c not in out:
                out.append(c)
    return out


def uninstall(hooks_dir: str = DEFAULT_HOOKS_DIR) -> list[str]:
    """Remove exactly our shims, and the directories install-hooks created when empty."""
    present = [p for p in shim_paths(hooks_dir).values() if os.path.lexists(p)]
    shims = {}
    for path in present:
        shims[path] = read_shim(path)
        if shims[path] is None:
            raise NetplugError(f"{path} was not installed by netplug; leaving it alone")
    removed = []
    created: list[str] = []
    for path in present:
        try:
            os.unlink(path)
        except OSError as e:
            raise NetplugError(f"cannot remove {path}: {e.strerror}") from None
        removed.append(path)
        created += [d for d in shims[path].created if d not in created]
    # Innermost first; a directory someone else put files in stays.
    for d in sorted(created, key=len, reverse=True):
        try:
            os.rmdir(d)
        except OSError:
            pass
    return removed
