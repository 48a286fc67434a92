"""Unit tier: no root, no kernel. The seam (``NetlinkKernel``) is always the in-memory fake,
so no unit test can read or change the host's network even by mistake."""

from __future__ import annotations

import io
from dataclasses import dataclass

import pytest

from fakes import FakeKernel
from netns import StderrLines


@pytest.fixture(autouse=True)
def fake(monkeypatch) -> FakeKernel:
    """The kernel every unit test sees (empty unless the test adds devices)."""
    return FakeKernel().install_into(monkeypatch)


@dataclass
class HookResult(StderrLines):
    rc: int
    stderr: str
    stdout: str


@pytest.fixture
def config_path(tmp_path):
    return tmp_path / "config.toml"


@pytest.fixture
def state_path(tmp_path):
    return tmp_path / "state"


@pytest.fixture
def run_hook(capfd, config_path, state_path):
    """hook.main() as the shim calls it, with in-memory stdin/stderr; fd 1 is checked too."""
    from libvirt_netplug import hook

    def run(kind: str, obj: str, op: str, data: bytes | str, subop: str = "begin",
            config: str | None = None) -> HookResult:
        if config is not None:
            config_path.write_text(config)
        if isinstance(data, str):
            data = data.encode()
        err = io.StringIO()
        capfd.readouterr()
        rc = hook.main([kind, obj, op, subop, "-"], io.BytesIO(data), err, kind=kind,
                       config=str(config_path), state_dir=str(state_path))
        out = capfd.readouterr().out
        return HookResult(rc, err.getvalue(), out)

    return run
