"""The inner tests (tests/vlankernel/inner) need a kernel with bridge VLAN filtering and run
only inside the VLAN-kernel VM, which sets NETPLUG_IN_VLANKERNEL_VM=1 (vm.pytest_script). On the
host they are not collected at all: the host's side of this tier is test_tier.py, which boots
the VM and reports each inner test under its own name. (Skipping them on the host instead would
turn into failures under NETPLUG_REQUIRE_ALL=1.)
"""

from __future__ import annotations

import os

IN_VM = os.environ.get("NETPLUG_IN_VLANKERNEL_VM") == "1"

collect_ignore = ["test_tier.py"] if IN_VM else ["inner"]
