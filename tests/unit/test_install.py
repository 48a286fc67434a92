"""install-hooks / uninstall-hooks: exactly two files, bound to an interpreter, and nothing
that is not ours is ever overwritten or removed.

Proves: the shims land at HOOKS/qemu.d/libvirt-netplug and HOOKS/network.d/libvirt-netplug
(mode 0755), with the config and state dir written in (libvirtd passes hooks no environment);
the shebang names the given interpreter with -I and that interpreter really runs them; the
repo's hooks/* are install.render(kind); foreign files are refused (install) and kept
(uninstall); the CLI reports errors as one line with exit status 1.
"""

from __future__ import annotations

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


def test_install_writes_exactly_two_executable_shims(tmp_path):
    hooks = tmp_path / "hooks"
    written = install.install(str(hooks), "/opt/py/bin/python3", "/etc/np.toml", "/run/np")
    assert sorted(os.path.relpath(p, hooks) for p in written) == sorted(SHIMS)
    assert files_under(hooks) == sorted(SHIMS)
    for rel in SHIMS:
        kind = rel.split(".")[0]
        path = hooks / rel
        assert stat.S_IMODE(path.stat().st_mode) == 0o755
        text = path.read_text()
        assert text == install.render(kind, "/opt/py/bin/python3", "/etc/np.toml", "/run/np")
        assert text.splitlines()[0] == "#!/opt/py/bin/python3 -I"
        assert f"run({kind!r}, config='/etc/np.toml', state_dir='/run/np')" in text


def test_install_twice_is_fine_and_leaves_no_temporary_files(tmp_path):
    install.install(str(tmp_path), "/usr/bin/python3")
    install.install(str(tmp_path), "/usr/bin/python3.11")
    assert files_under(tmp_path) == sorted(SHIMS)
    assert (tmp_path / SHIMS[0]).read_text().startswith("#!/usr/bin/python3.11 -I\n")


def test_install_refuses_a_relative_interpreter(tmp_path):
    with pytest.raises(NetplugError, match="not an absolute path"):
        install.install(str(tmp_path), "python3")
    assert files_under(tmp_path) == []


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
    install.install(str(tmp_path), "/usr/bin/python3")
    (tmp_path / "qemu.d" / "10-other-hook").write_text("#!/bin/sh\n")
    (tmp_path / "qemu").write_text("#!/bin/sh\n")
    removed = install.uninstall(str(tmp_path))
    assert sorted(os.path.relpath(p, tmp_path) for p in removed) == sorted(SHIMS)
    assert files_under(tmp_path) == ["qemu", "qemu.d/10-other-hook"]
    assert install.uninstall(str(tmp_path)) == []


def test_uninstall_refuses_a_foreign_file_and_removes_nothing(tmp_path):
    install.install(str(tmp_path), "/usr/bin/python3")
    (tmp_path / SHIMS[1]).write_text("#!/bin/sh\necho not netplug\n")
    with pytest.raises(NetplugError, match="not installed by netplug; leaving it alone"):
        install.uninstall(str(tmp_path))
    assert files_under(tmp_path) == sorted(SHIMS)


@pytest.mark.parametrize("kind", ["qemu", "network"])
def test_repo_hooks_are_the_rendered_template(kind):
    assert (REPO / "hooks" / kind).read_text() == install.render(kind)


def test_shim_runs_with_the_interpreter_it_is_bound_to(tmp_path):
    """Bind to a wrapper "interpreter" that records how it was called, then execs the venv's
    Python: the shim must go through it, with -I, under libvirtd's bare environment."""
    marker = tmp_path / "called"
    wrapper = tmp_path / "bin" / "python"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\necho "$@" > {marker}\nexec {venv_python()} "$@"\n')
    wrapper.chmod(0o755)
    (shim, _) = install.install(str(tmp_path / "hooks"), str(wrapper),
                                str(tmp_path / "c.toml"), str(tmp_path / "state"))
    p = subprocess.run([shim, "vm1", "prepare", "begin", "-"], input=b"<domain/>",
                       capture_output=True, cwd="/", timeout=30,
                       env={"HOME": "/root", "LC_ALL": "C", "PATH": "/usr/bin:/bin", "PWD": "/"})
    assert (p.returncode, p.stdout, p.stderr) == (0, b"", b"")
    assert marker.read_text().split() == ["-I", shim, "vm1", "prepare", "begin", "-"]


def test_cli_install_and_uninstall(tmp_path):
    hooks = tmp_path / "hooks"
    p = subprocess.run([*netplug_cli(), "install-hooks", "--hooks-dir", str(hooks), "--python",
                        venv_python(), "--config", "/etc/x.toml", "--state-dir", "/run/x"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == [f"installed {hooks}/{s}" for s in SHIMS]
    assert (hooks / SHIMS[0]).read_text() == install.render("qemu", venv_python(),
                                                            "/etc/x.toml", "/run/x")
    (hooks / SHIMS[0]).write_text("#!/bin/sh\n")
    p = subprocess.run([*netplug_cli(), "uninstall-hooks", "--hooks-dir", str(hooks)],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 1 and len(p.stderr.splitlines()) == 1
    assert "Traceback" not in p.stderr and "leaving it alone" in p.stderr
    assert files_under(hooks) == sorted(SHIMS)
