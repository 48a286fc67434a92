"""netplug inside a lab: install the hooks the way an operator would, and look at the result.

The hooks run inside the lab's mount namespace, so their config and state paths are lab-private
paths (under /etc/libvirt and /run/libvirt, which the lab bind-mounts): a lab never reads or
writes the host's /etc/libvirt-netplug or /run/libvirt-netplug.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .lab import Lab

REPO = Path(__file__).resolve().parents[2]
CONFIG = "/etc/libvirt/netplug/config.toml"  # inside the lab
STATE = "/run/libvirt/netplug-state"  # inside the lab


@dataclass
class Netplug:
    lab: Lab
    python: str

    @property
    def config_path(self) -> Path:
        return self.lab.host_path(CONFIG)

    @property
    def state_path(self) -> Path:
        return self.lab.host_path(STATE)

    def write_config(self, text: str) -> None:
        self.config_path.parent.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(text)

    def domain_record(self, name: str) -> dict | None:
        p = self.state_path / "domains" / f"{name}.json"
        return json.loads(p.read_text()) if p.exists() else None

    def netplug(self, *args: str, check: bool = True, timeout: float = 120,
                input: str | None = None) -> subprocess.CompletedProcess:
        """Run the netplug CLI inside the lab (its namespaces, its libvirtd, its state dir)."""
        return self.lab.run(self.python, "-m", "libvirt_netplug.cli", *args, check=check,
                            timeout=timeout, input=input,
                            env={**os.environ, "NETPLUG_CONFIG": CONFIG,
                                 "NETPLUG_STATE_DIR": STATE, "PYTHONPATH": str(REPO)})


def install_netplug(lab: Lab, config: str = "", python: str | None = None) -> Netplug:
    """`netplug install-hooks` into the lab's hooks dir, bound to this interpreter, then make
    libvirtd re-read its hooks."""
    np = Netplug(lab, python or sys.executable)
    np.write_config(config)
    lab.expose_host_program(np.python)  # a release root's libvirtd runs the shims chrooted
    subprocess.run([np.python, "-m", "libvirt_netplug.cli", "install-hooks",
                    "--hooks-dir", str(lab.hooks_dir), "--config", CONFIG, "--state-dir", STATE],
                   check=True, capture_output=True, text=True, cwd=REPO)
    lab.reload_libvirtd()
    return np


def uninstall_netplug(lab: Lab) -> None:
    subprocess.run([sys.executable, "-m", "libvirt_netplug.cli", "uninstall-hooks",
                    "--hooks-dir", str(lab.hooks_dir)], check=True, capture_output=True,
                   cwd=REPO)
    lab.reload_libvirtd()


# -- looking at the lab's kernel (iproute2 JSON only: an oracle independent of netplug) ------

def port_table(lab: Lab, ports: list[str]) -> list[dict]:
    """learning / flood / static FDB MACs of each port, from `bridge -j`."""
    links = {p["ifname"]: p for p in json.loads(
        lab.run("bridge", "-j", "-d", "link", "show").stdout or "[]")}
    fdb = json.loads(lab.run("bridge", "-j", "fdb", "show").stdout or "[]")
    rows = []
    for port in ports:
        link = links.get(port, {})
        static = sorted(e["mac"] for e in fdb if e.get("ifname") == port and e.get("master")
                        and e.get("state") == "static")
        rows.append({"port": port, "bridge": link.get("master"),
                     "learning": link.get("learning"), "flood": link.get("flood"),
                     "static_fdb": static})
    return rows


def frames_reaching(lab: Lab, tap: str, peer: str, dst: str, count: int = 200,
                    settle: float = 0.3) -> int:
    """How many of COUNT test frames to DST, injected at PEER, went out of TAP (counted by a
    packet socket on TAP: those frames only, not whatever else the guest is sent)."""
    code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); "
            f"from tests.oracle import frames_out_of; "
            f"print(frames_out_of({tap!r}, {peer!r}, {dst!r}, {count}, 'netplug-e2e', {settle}))")
    return int(lab.run(sys.executable, "-c", code).stdout)
