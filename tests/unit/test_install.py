"""install-hooks / uninstall-hooks: exactly two files, bound to an interpreter, and nothing
that is not ours is ever overwritten or removed.

Proves: the shims land at HOOKS/qemu.d/libvirt-netplug and HOOKS/network.d/libvirt-netplug
(mode 0755), with the config and state dir written in (libvirtd passes hooks no environment)
and read back the same (read_shim, also for shims of the previous format); the shebang names
the given interpreter with -IS and the directories netplug and lxml live in are written in, so
that interpreter really runs them with no site module; the repo's hooks/* are
install.render(kind); installing says what changed (installed, updated, unchanged); foreign
files are refused (install) and kept (uninstall); uninstall leaves the hooks directory as it
was before install (the directories install created go when empty); the CLI reports errors
as one line with exit status 1, and as JSON with --json.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess

import pytest

from conftest import REPO
from libvirt_netplug import install
from libvirt_netplug.errors import NetplugError
from netns import netplug_cli, venv_python

SHIMS = ("qemu.d/libvirt-netplug", "network.d/libvirt-netplug")


def files_under(d):
    return sorted(os.path.relpath(os.path.join(p, f), d) for p, _, fs in os.walk(d) for f in fs)


SYS_PATH = ("/opt/py/lib/python3.11/site-packages",)


def test_install_writes_exactly_two_executable_shims(tmp_path):
    hooks = tmp_path / "hooks"
    done = install.install(str(hooks), "/opt/py/bin/python3", "/etc/np.toml", "/run/np",
                           sys_path=SYS_PATH)
    assert sorted(os.path.relpath(d.path, hooks) for d in done) == sorted(SHIMS)
    assert {d.action for d in done} == {"installed"}
    assert files_under(hooks) == sorted(SHIMS)
    for rel in SHIMS:
        kind = rel.split(".")[0]
        path = hooks / rel
        assert stat.S_IMODE(path.stat().st_mode) == 0o755
        text = path.read_text()
        assert text.splitlines()[0] == "#!/opt/py/bin/python3 -IS"
        assert f"sys.path += {list(SYS_PATH)!r}" in text
        assert f"run({kind!r}, config=CONFIG, state_dir=STATE_DIR)" in text
        shim = install.read_shim(str(path))
        assert (shim.python, shim.flags, shim.config, shim.state_dir, shim.sys_path) == \
            ("/opt/py/bin/python3", "-IS", "/etc/np.toml", "/run/np", SYS_PATH)
        # It created the hooks dir and HOOKS/KIND.d, and remembers that for uninstall.
        assert shim.created == (str(hooks), str(hooks / f"{kind}.d"))


def test_install_twice_says_what_changed_and_leaves_no_temporary_files(tmp_path):
    first = install.install(str(tmp_path), "/usr/bin/python3", sys_path=SYS_PATH)
    again = install.install(str(tmp_path), "/usr/bin/python3", sys_path=SYS_PATH)
    moved = install.install(str(tmp_path), "/usr/bin/python3.11", sys_path=SYS_PATH)
    assert [d.action for d in first] == ["installed"] * 2
    assert [d.action for d in again] == ["unchanged"] * 2
    assert [d.action for d in moved] == ["updated"] * 2
    assert files_under(tmp_path) == sorted(SHIMS)
    assert (tmp_path / SHIMS[0]).read_text().startswith("#!/usr/bin/python3.11 -IS\n")


def test_shims_of_the_previous_format_are_read(tmp_path):
    """Before the paths became assignments, the shim passed literals to run()."""
    path = tmp_path / SHIMS[0]
    path.parent.mkdir(parents=True)
    path.write_text("#!/opt/np/bin/python3 -I\n# libvirt-netplug hook shim (qemu): libvirtd "
                    "runs this\nimport sys\nfrom libvirt_netplug.hook import run\n"
                    "sys.exit(run('qemu', config='/etc/x.toml', state_dir='/run/x'))\n")
    shim = install.read_shim(str(path))
    assert (shim.python, shim.flags, shim.config, shim.state_dir) == \
        ("/opt/np/bin/python3", "-I", "/etc/x.toml", "/run/x")
    assert install.install(str(tmp_path), "/usr/bin/python3", sys_path=SYS_PATH)[0].action \
        == "updated"


def test_install_refuses_a_relative_interpreter_or_path(tmp_path):
    with pytest.raises(NetplugError, match="not an absolute path"):
        install.install(str(tmp_path), "python3")
    with pytest.raises(NetplugError, match="not an absolute path"):
        install.install(str(tmp_path), "/usr/bin/python3", "config.toml", sys_path=SYS_PATH)
    assert files_under(tmp_path) == []


def test_install_refuses_an_interpreter_without_netplug(tmp_path):
    """The interpreter is asked where netplug lives: one that has no netplug is refused
    before anything is written."""
    bare = tmp_path / "bare-python"  # the venv's interpreter without its site-packages
    bare.write_text(f'#!/bin/sh\nexec {venv_python()} -S "$@"\n')
    bare.chmod(0o755)
    with pytest.raises(NetplugError, match="cannot import libvirt_netplug"):
        install.install(str(tmp_path / "hooks"), str(bare))
    assert not (tmp_path / "hooks").exists()


def test_uninstall_leaves_the_hooks_dir_as_it_was(tmp_path):
    """Directories install created go (when empty); those that were there stay."""
    hooks = tmp_path / "etc" / "libvirt" / "hooks"
    (tmp_path / "etc" / "libvirt").mkdir(parents=True)
    install.install(str(hooks), "/usr/bin/python3", sys_path=SYS_PATH)
    install.install(str(hooks), "/usr/bin/python3.11", sys_path=SYS_PATH)  # an upgrade
    install.uninstall(str(hooks))
    assert sorted(os.listdir(tmp_path / "etc" / "libvirt")) == []
    # An existing, empty qemu.d stays after uninstall.
    (hooks / "qemu.d").mkdir(parents=True)
    install.install(str(hooks), "/usr/bin/python3", sys_path=SYS_PATH)
    (hooks / "network.d" / "50-other").write_text("#!/bin/sh\n")
    install.uninstall(str(hooks))
    assert files_under(hooks) == ["network.d/50-other"]
    assert (hooks / "qemu.d").is_dir()


@pytest.mark.parametrize("foreign", SHIMS)
def test_install_never_overwrites_a_foreign_hook(tmp_path, foreign):
    (tmp_path / foreign).parent.mkdir(parents=True)
    (tmp_path / foreign).write_text("#!/bin/sh\necho mine\n")
    with pytest.raises(NetplugError, match="not installed by netplug"):
        install.install(str(tmp_path), "/usr/bin/python3")
    assert (tmp_path / foreign).read_text() == "#!/bin/sh\necho mine\n"


def test_refused_install_writes_nothing(tmp_path):
    (tmp_path / SHIMS[1]).parent.mkdir(parents=True)
    (tmp_path / SHIMS[1]).write_text("#!/bin/sh\n")
    with pytest.raises(NetplugError):
        install.install(str(tmp_path), "/usr/bin/python3")
    assert files_under(tmp_path) == [SHIMS[1]]


def test_uninstall_removes_exactly_ours(tmp_path):
    install.install(str(tmp_path), "/usr/bin/python3", sys_path=SYS_PATH)
    (tmp_path / "qemu.d" / "10-other-hook").write_text("#!/bin/sh\n")
    (tmp_path / "qemu").write_text("#!/bin/sh\n")
    removed = install.uninstall(str(tmp_path))
    assert sorted(os.path.relpath(p, tmp_path) for p in removed) == sorted(SHIMS)
    assert files_under(tmp_path) == ["qemu", "qemu.d/10-other-hook"]
    assert install.uninstall(str(tmp_path)) == []


def test_uninstall_refuses_a_foreign_file_and_removes_nothing(tmp_path):
    install.install(str(tmp_path), "/usr/bin/python3", sys_path=SYS_PATH)
    (tmp_path / SHIMS[1]).write_text("#!/bin/sh\necho not netplug\n")
    with pytest.raises(NetplugError, match="not installed by netplug; leaving it alone"):
        install.uninstall(str(tmp_path))
    assert files_under(tmp_path) == sorted(SHIMS)


@pytest.mark.parametrize("kind", ["qemu", "network"])
def test_repo_hooks_are_the_rendered_template(kind):
    assert (REPO / "hooks" / kind).read_text() == install.render(kind)


def test_shim_runs_with_the_interpreter_it_is_bound_to(tmp_path):
    """Bind to a wrapper "interpreter" that records how it was called, then execs the venv's
    Python: the shim must go through it, with -IS (no site module: netplug is found through
    the paths written into the shim), under libvirtd's bare environment."""
    marker = tmp_path / "called"
    wrapper = tmp_path / "bin" / "python"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\necho "$@" > {marker}\nexec {venv_python()} "$@"\n')
    wrapper.chmod(0o755)
    (shim, _) = [d.path for d in install.install(
        str(tmp_path / "hooks"), str(wrapper), str(tmp_path / "c.toml"),
        str(tmp_path / "state"), sys_path=install.module_dirs(venv_python()))]
    env = {"HOME": "/root", "LC_ALL": "C", "PATH": "/usr/bin:/bin", "PWD": "/"}
    p = subprocess.run([shim, "vm1", "prepare", "begin", "-"], input=b"<domain/>",
                       capture_output=True, cwd="/", timeout=30, env=env)
    assert (p.returncode, p.stdout, p.stderr) == (0, b"", b"")
    assert marker.read_text().split() == ["-IS", shim, "vm1", "prepare", "begin", "-"]
    # An operation with work imports the whole hook path (lxml included) through those paths.
    p = subprocess.run([shim, "vm1", "started", "begin", "-"], input=b"<domain><name>vm1"
                       b"</name></domain>", capture_output=True, cwd="/", timeout=30, env=env)
    assert p.returncode == 0 and b"Traceback" not in p.stderr, p.stderr


def test_cli_install_and_uninstall(tmp_path):
    hooks = tmp_path / "hooks"
    p = subprocess.run([*netplug_cli(), "install-hooks", "--hooks-dir", str(hooks), "--python",
                        venv_python(), "--config", "/etc/x.toml", "--state-dir", "/run/x"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == [f"installed {hooks}/{s}" for s in SHIMS]
    assert "systemctl reload libvirtd" in p.stderr and "virtqemud virtnetworkd" in p.stderr
    shim = install.read_shim(str(hooks / SHIMS[0]))
    assert (shim.python, shim.config, shim.state_dir) == (venv_python(), "/etc/x.toml", "/run/x")
    assert shim.sys_path == install.module_dirs(venv_python())
    p = subprocess.run([*netplug_cli(), "install-hooks", "--json", "--hooks-dir", str(hooks),
                        "--python", venv_python(), "--config", "/etc/x.toml", "--state-dir",
                        "/run/x"], capture_output=True, text=True, timeout=30)
    doc = json.loads(p.stdout)
    assert (p.returncode, doc["version"], doc["changed"]) == (0, 1, False), p.stderr
    assert [h["action"] for h in doc["hooks"]] == ["unchanged"] * 2
    assert p.stderr == ""  # nothing changed: no reload needed
    (hooks / SHIMS[0]).write_text("#!/bin/sh\n")
    p = subprocess.run([*netplug_cli(), "uninstall-hooks", "--hooks-dir", str(hooks)],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 1 and len(p.stderr.splitlines()) == 1
    assert "Traceback" not in p.stderr and "leaving it alone" in p.stderr
    assert files_under(hooks) == sorted(SHIMS)


def test_cli_errors_are_json_with_json(tmp_path):
    (tmp_path / SHIMS[0]).parent.mkdir(parents=True)
    (tmp_path / SHIMS[0]).write_text("#!/bin/sh\n")
    p = subprocess.run([*netplug_cli(), "install-hooks", "--json", "--hooks-dir",
                        str(tmp_path)], capture_output=True, text=True, timeout=30)
    assert p.returncode == 1 and len(p.stderr.splitlines()) == 1
    doc = json.loads(p.stdout)
    assert doc == {"version": 1, "command": "install-hooks", "exit_status": 1,
                   "error": doc["error"]} and "not installed by netplug" in doc["error"]


def test_keep_paths_keeps_what_the_operator_chose(tmp_path):
    hooks = str(tmp_path / "hooks")
    base = [*netplug_cli(), "install-hooks", "--hooks-dir", hooks, "--python", venv_python()]
    assert subprocess.run([*base, "--config", "/etc/np/c.toml", "--state-dir", "/run/np"],
                          capture_output=True, timeout=30).returncode == 0
    p = subprocess.run([*base, "--keep-paths"], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0 and p.stdout.split()[0] == "unchanged", p.stdout + p.stderr
    shim = install.read_shim(os.path.join(hooks, SHIMS[0]))
    assert (shim.config, shim.state_dir) == ("/etc/np/c.toml", "/run/np")
    p = subprocess.run(base, capture_output=True, text=True, timeout=30)  # without: defaults
    assert install.read_shim(os.path.join(hooks, SHIMS[0])).config is None
