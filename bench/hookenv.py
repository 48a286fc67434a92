"""The hook as a host runs it, for the benches (not part of netplug; root only).

- Interpreters: the project's ``.venv`` (an editable install, on the interpreter `make deps`
  used), and Debian's ``/usr/bin/python3`` as a host would use it: a venv made by
  /usr/bin/python3 with ``--system-site-packages`` (so lxml is python3-lxml from apt) and a
  regular (not editable) install of this working tree into it, built from a copy so the tree
  gets no build/ or *.egg-info. Made by the bench, untimed, and removed afterwards. The
  Debian packages it needs are in scripts/setup-host.sh; a missing one is named in one line.
- Shims: always written by ``netplug install-hooks`` of the interpreter under test, and
  measured as written. A bench that also wants the other form (``#!PY -IS`` with netplug's
  and lxml's directories in ``sys.path``, or ``#!PY -I`` with the site module) builds it from
  the installed shim and labels it "built by the bench".
- Runs: libvirtd's environment for hooks (HOME, LC_ALL=C, PATH, PWD), cwd /, XML on stdin.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.join(REPO, "tests") not in sys.path:
    sys.path.insert(0, os.path.join(REPO, "tests"))
from netns import venv_python  # noqa: E402  (the tests' helper: the worktree's .venv)

SYSTEM_PYTHON = "/usr/bin/python3"
# venv + ensurepip, lxml for the system interpreter, and `wheel` to build the regular install
# of the working tree without fetching anything.
DEBIAN_PACKAGES = ("python3-venv", "python3-lxml", "python3-wheel")
HOOK_ENV = {"HOME": "/root", "LC_ALL": "C",
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "PWD": "/"}
# What a hook imports beyond the standard library (where the -IS shim's sys.path must reach).
HOOK_MODULES = ("libvirt_netplug", "lxml")


def run(argv, **kw) -> subprocess.CompletedProcess:
    """A setup command; its failure ends the bench with what it said."""
    p = subprocess.run(argv, capture_output=True, text=True, **kw)
    if p.returncode != 0:
        raise SystemExit(f"bench: {' '.join(argv)} failed (exit {p.returncode}): "
                         f"{(p.stderr or p.stdout).strip()[-1500:]}")
    return p


# -- interpreters ------------------------------------------------------------------------------


def missing_debian_packages() -> list[str]:
    out = []
    for pkg in DEBIAN_PACKAGES:
        p = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True,
                           text=True)
        if "install ok installed" not in p.stdout:
            out.append(pkg)
    return out


def debian_python(tmp: str, rev: str | None = None) -> str:
    """A venv of /usr/bin/python3 (system site packages: apt's lxml) with a regular install
    of this working tree — or, with ``rev``, of that git revision of it (an A/B in one run);
    returns its bin/python (a symlink to /usr/bin/python3)."""
    missing = missing_debian_packages()
    if missing or not os.path.exists(SYSTEM_PYTHON):
        raise SystemExit(f"bench: Debian's python3 needs {' '.join(missing or ['python3'])}: "
                         f"run scripts/setup-host.sh (or apt-get install {' '.join(missing)})")
    tag = f"-{rev_tag(rev)}" if rev else ""
    src = os.path.join(tmp, f"netplug-src{tag}")
    os.makedirs(src)
    if rev:
        archive = subprocess.run(["git", "-C", REPO, "archive", rev, "pyproject.toml",
                                  "libvirt_netplug"], capture_output=True)
        if archive.returncode != 0:
            raise SystemExit(f"bench: git archive {rev} failed: "
                             f"{archive.stderr.decode(errors='replace').strip()}")
        subprocess.run(["tar", "-x", "-C", src], input=archive.stdout, check=True)
    else:
        shutil.copy(os.path.join(REPO, "pyproject.toml"), src)
        shutil.copytree(os.path.join(REPO, "libvirt_netplug"),
                        os.path.join(src, "libvirt_netplug"),
                        ignore=shutil.ignore_patterns("__pycache__"))
    venv = os.path.join(tmp, f"debian-venv{tag}")
    run([SYSTEM_PYTHON, "-m", "venv", "--system-site-packages", venv])
    py = os.path.join(venv, "bin", "python")
    run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", src], cwd=tmp)
    where = json.loads(run([py, "-I", "-c", "import json, lxml, libvirt_netplug; print(json.dumps("
                                            "[lxml.__file__, libvirt_netplug.__file__]))"],
                           cwd="/").stdout)
    if not where[0].startswith("/usr/lib/python3/dist-packages/"):
        raise SystemExit(f"bench: Debian's python3 imports lxml from {where[0]}, not from "
                         f"python3-lxml")
    if not where[1].startswith(venv):
        raise SystemExit(f"bench: the Debian venv imports netplug from {where[1]}")
    return py


def project_python() -> str:
    return venv_python()


def rev_tag(rev: str) -> str:
    """A file-name-safe form of a git revision (HEAD~2 -> HEAD_2)."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in rev)


def interpreters(names: list[str], tmp: str) -> dict[str, str]:
    """{"debian": …, "venv": …} for the names asked for (setup, untimed). ``debian@REV``:
    Debian's python3 with git revision REV of this tree installed instead of the working
    tree, to compare two versions in one run."""
    out = {}
    for name in names:
        if name == "debian":
            out[name] = debian_python(tmp)
        elif name.startswith("debian@") and len(name) > 7:
            out[name] = debian_python(tmp, name[7:])
        elif name == "venv":
            out[name] = project_python()
        else:
            raise SystemExit(f"bench: unknown interpreter {name!r}; use debian, debian@REV "
                             f"or venv")
    return out


def describe(name: str, python: str) -> str:
    if name == "debian":
        return (f"Debian {SYSTEM_PYTHON} (venv --system-site-packages, python3-lxml, "
                f"regular install)")
    if name.startswith("debian@"):
        return (f"Debian {SYSTEM_PYTHON} (as debian), git revision {name[7:]} of this tree "
                f"installed")
    real = os.path.realpath(python)
    return f"project .venv ({real}, editable install)"


# -- shims -------------------------------------------------------------------------------------


def netplug_cli(python: str) -> list[str]:
    script = os.path.join(os.path.dirname(python), "netplug")
    return [script] if os.path.exists(script) else [python, "-m", "libvirt_netplug.cli"]


def install_hooks(python: str, hooks_dir: str, config: str, state_dir: str) -> str:
    """`netplug install-hooks` of that interpreter; returns the qemu shim's path."""
    run([*netplug_cli(python), "install-hooks", "--hooks-dir", hooks_dir, "--python", python,
         "--config", config, "--state-dir", state_dir], cwd="/")
    return os.path.join(hooks_dir, "qemu.d", "libvirt-netplug")


def shim_command(shim: str) -> tuple[str, list[str]]:
    """(interpreter, flags) of a shim's #! line."""
    with open(shim) as f:
        first = f.readline()
    if not first.startswith("#!"):
        raise SystemExit(f"bench: {shim} has no #! line")
    argv = first[2:].split()
    return argv[0], argv[1:]


def no_site(flags: list[str]) -> bool:
    """Whether the flags include -S (alone or in a cluster such as -IS)."""
    return any(f.startswith("-") and not f.startswith("--") and "S" in f[1:] for f in flags)


def form(shim: str) -> str:
    """'-IS' or '-I' (what a reader of the output needs to know about a shim)."""
    _py, flags = shim_command(shim)
    return "-IS" if no_site(flags) else " ".join(flags) or "(no flags)"


def module_dirs(python: str) -> list[str]:
    """Where ``python`` (with its site module) finds netplug and lxml: what an -IS shim puts
    in sys.path (the same question install-hooks asks for its -IS shims)."""
    code = ("import importlib.util, json, os\nout = []\n"
            f"for name in {HOOK_MODULES!r}:\n"
            "    spec = importlib.util.find_spec(name)\n"
            "    where = list(spec.submodule_search_locations or [])\n"
            "    d = os.path.dirname(where[0] if where else spec.origin)\n"
            "    if d not in out:\n        out.append(d)\n"
            "print(json.dumps(out))\n")
    return json.loads(run([python, "-I", "-c", code], cwd="/").stdout)


def other_form(shim: str, dest: str) -> str:
    """The installed shim in the other form, built by the bench: -IS with an explicit
    sys.path if install-hooks wrote -I, or -I with the site module if it wrote -IS."""
    python, flags = shim_command(shim)
    with open(shim) as f:
        lines = f.read().splitlines(keepends=True)
    body = [ln for ln in lines[1:] if not ln.startswith(("sys.path +=", "# -IS:"))]
    if no_site(flags):
        text = f"#!{python} -I\n" + "".join(body)
    else:
        dirs = module_dirs(python)
        out, done = [], False
        for ln in body:
            out.append(ln)
            if not done and ln.strip() == "import sys":
                out.append(f"sys.path += {dirs!r}  # -IS, built by the bench\n")
                done = True
        if not done:
            raise SystemExit(f"bench: cannot build an -IS shim from {shim} (no 'import sys')")
        text = f"#!{python} -IS\n" + "".join(out)
    with open(dest, "w") as f:
        f.write(text)
    os.chmod(dest, 0o755)
    return dest


def shim_label(key: str, shim: str) -> str:
    return f"{form(shim)} shim, " + ("as installed" if key == "installed" else "built by the bench")


# -- timing ------------------------------------------------------------------------------------


def run_hook(argv: list[str], stdin: bytes) -> tuple[float, subprocess.CompletedProcess]:
    """One process as libvirtd runs a hook; returns (seconds, result)."""
    t0 = time.perf_counter()
    p = subprocess.run(argv, input=stdin, capture_output=True, env=HOOK_ENV, cwd="/")
    return time.perf_counter() - t0, p


def check_hook(argv: list[str], p: subprocess.CompletedProcess) -> None:
    if p.returncode != 0 or p.stdout:
        raise SystemExit(f"bench: {' '.join(argv)} failed (rc {p.returncode}): "
                         f"stdout={p.stdout[:200]!r} stderr={p.stderr[-500:]!r}")


def summary(samples_ms: list[float]) -> dict:
    s = sorted(samples_ms)
    p90 = s[min(len(s) - 1, int(round(0.9 * (len(s) - 1))))]
    return {"median_ms": round(statistics.median(s), 2), "p90_ms": round(p90, 2),
            "min_ms": round(s[0], 2), "max_ms": round(s[-1], 2), "runs": len(s)}


def load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def cores() -> int:
    return len(os.sched_getaffinity(0))


def write_json(doc: dict, where: str | None) -> None:
    if where == "-":
        print(json.dumps(doc, indent=2))
    elif where:
        with open(where, "w") as f:
            json.dump(doc, f, indent=2)
