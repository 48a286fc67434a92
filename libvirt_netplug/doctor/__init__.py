"""``netplug doctor``: is netplug set up right on this host, and per managed bridge, is the goal
reached; if not, why and what to do.

The goal on a bridge with promiscLinks='no': every guest tap has a static FDB entry for its
guest's MAC with learning and flood off (guests get only their own unicast), and the uplink is
out of promiscuous mode. The second half is the kernel's job (br_manage_promisc() in
net/bridge/br_if.c): only with vlan_filtering on, the bridge itself not promiscuous, and
exactly one port still learning or flooding, does it take that port out of promiscuous mode
and copy the static entries into its unicast filter, and only if the port's driver can filter
unicast (IFF_UNICAST_FLT: most NICs, virtio_net, macvlan; not veth, tap or dummy).

Doctor checks, without libvirtd: the paths (config, state dir) that hooks, agent and this
command use agree; the hooks are installed and start with a working interpreter; the config
is valid; the state dir is usable and every record in it readable; the kernel's capabilities;
the agent. With libvirtd: what reconcile reads (the engine in dry-run mode, one bulk kernel
read) plus each uplink's address lists, per managed bridge, and policies that conflict with
libvirt's own. Findings never contradict each other: the verdict of a bridge is built from
its findings. Read-only. Output: findings as text or JSON (docs/reconcile.md).

The pieces: findings.py (Finding), host.py (checks without libvirt), bridges.py (per bridge,
``explain_bridge`` pure), policies.py (libvirt's networks and guests), command.py (the
diagnosis, its output, the command).
"""

from ..lazy import exports

# Loaded on first use (PEP 562): the CLI imports this package for the subcommand's arguments.
_EXPORTS = {
    "Finding": "findings", "LEVELS": "findings",
    "PortView": "bridges", "BridgeView": "bridges", "explain_bridge": "bridges",
    "bridge_view": "bridges", "managed_bridges": "bridges",
    "vlan_filtering_support": "bridges",
    "kernel_vlan_filtering": "host", "check_kernel": "host", "check_paths": "host",
    "check_hooks": "host", "check_config": "host", "check_state_dir": "host",
    "agent_pids": "host", "check_agent": "host", "AgentPaths": "host",
    "agent_paths_of": "host", "running_agent_paths": "host", "unit_agent_paths": "host",
    "policy_findings": "policies", "macvtap_findings": "policies",
    "Diagnosis": "command", "diagnose": "command", "host_findings": "command",
    "register": "command", "run": "command", "cmd_doctor": "command",
}
__all__ = sorted(_EXPORTS)

__getattr__ = exports(__name__, _EXPORTS)
