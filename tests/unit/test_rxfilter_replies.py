"""Recorded real query-rx-filter replies (xml-samples/rxfilter/, captured from the lab's Linux
guest by xml-samples/rxfilter/capture.py) → the macvtap operations netplug plans for them.

The planner is pure; the operations are then run by the real applier against the in-memory
kernel, so a sequence of replies can be replayed the way the agent would see them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fakes import FakeKernel
from libvirt_netplug.apply import apply
from libvirt_netplug.errors import InputError
from libvirt_netplug.model import parse_domain
from libvirt_netplug.ops import (AddMulticast, AddUnicast, DelMulticast, SetAddress,
                                 SetAllmulti, SetPromisc)
from libvirt_netplug.policy import Config
from libvirt_netplug.rxfilter import (RxFilter, macvtap_intents, parse_rx_filter_reply,
                                      plan_rx, plan_rx_cleanup)

SAMPLES = Path(__file__).resolve().parents[2] / "xml-samples" / "rxfilter"
INDEX = json.loads((SAMPLES / "index.json").read_text())
NICS = {n["alias"]: n for n in INDEX["nics"]}
KERNEL_OWN = {"33:33:00:00:00:01", "01:00:5e:00:00:01"}  # memberships the host itself holds


def reply(stem: str) -> dict[str, RxFilter]:
    [entry] = [s for s in INDEX["samples"] if s["scenario"] == stem]
    return parse_rx_filter_reply((SAMPLES / entry["file"]).read_text())


def intent(alias: str = "net0", tokens: str = "multicast allmulti", **policy):
    nic = NICS[alias]
    attrs = " ".join(f'{k}="{v}"' for k, v in policy.items())
    xml = f"""<domain><name>vm1</name><uuid>00000000-0000-4000-8000-000000000001</uuid>
      <metadata><netplug:policy xmlns:netplug="urn:x-libvirt-netplug:1"
          rxFilters="{tokens}" {attrs}/></metadata>
      <devices><interface type='direct'><mac address='{nic['mac']}'/>
        <source dev='{nic['lower']}' mode='{nic['mode']}'/><target dev='macvtap-{alias}'/>
        <model type='virtio'/><alias name='{alias}'/></interface></devices></domain>"""
    [it] = macvtap_intents(parse_domain(xml), {}, Config())
    assert it.managed, it.reason
    return it


class Host:
    """A macvtap on a lower device in the fake kernel, plus netplug's record for it."""

    def __init__(self, it):
        self.it = it
        self.kernel = FakeKernel()
        self.kernel.add("lower0", "veth", up=True)
        mode = "passthru" if it.mode == "passthrough" else it.mode
        self.dev = self.kernel.add(it.dev, "macvtap", address=it.interface.mac, up=True,
                                   lower="lower0", macvlan_mode=mode)
        self.dev.mc = set(KERNEL_OWN)
        self.record = None

    def step(self, f: RxFilter | None):
        link = self.kernel.link(self.it.dev)
        plan = plan_rx(self.it, f, link, self.kernel.device_addresses(self.it.dev),
                       self.record)
        result = apply(plan.ops, self.kernel)
        assert result.ok, result.errors
        self.record = dict(plan.record)
        return plan

    def converged(self, f: RxFilter | None) -> None:
        """Planning the same reply again changes nothing (ensure-style, idempotent)."""
        assert self.step(f).ops == ()


def kinds(ops) -> list[tuple[str, ...]]:
    return [(type(o).__name__, getattr(o, "mac", None) or str(getattr(o, "on", ""))) for o in ops]


# -- parsing ------------------------------------------------------------------------------------


@pytest.mark.parametrize("sample", INDEX["samples"], ids=lambda s: s["scenario"])
def test_every_recorded_reply_parses_with_both_nics(sample):
    filters = parse_rx_filter_reply((SAMPLES / sample["file"]).read_text())
    assert set(filters) == {"net0", "net1"}
    for name, f in filters.items():
        assert f.rejected == ()
        assert all(int(m[:2], 16) & 1 for m in f.multicast_table)
        assert not any(int(m[:2], 16) & 1 for m in f.unicast_table)
        if sample["scenario"] != "mac-change" or name != "net0":
            assert f.main_mac == NICS[name]["mac"]


def test_before_the_guest_driver_loads_qemu_reports_promiscuous():
    f = reply("before-driver")["net0"]
    assert f.promiscuous and f.multicast_table == () and f.main_mac == NICS["net0"]["mac"]


def test_error_replies_and_garbage_are_one_line_input_errors():
    with pytest.raises(InputError, match="not JSON"):
        parse_rx_filter_reply("{")
    with pytest.raises(InputError, match="Device 'net9' not found"):
        parse_rx_filter_reply({"error": {"class": "DeviceNotFound",
                                         "desc": "Device 'net9' not found"}})
    with pytest.raises(InputError, match="unexpected rx-filter mode"):
        parse_rx_filter_reply({"return": [{"name": "net0", "main-mac": "52:54:00:00:00:01",
                                           "multicast": "some"}]})


def test_guest_chosen_garbage_is_dropped_not_fatal():
    """Everything in the reply comes from the guest: a bad entry must not stop the rest."""
    f = parse_rx_filter_reply({"return": [{
        "name": "net0", "main-mac": "01:00:5e:00:00:01",  # multicast main MAC: refused
        "multicast-table": ["01:00:5e:01:02:03", "52:54:00:11:22:33", "zz"],
        "unicast-table": ["02:00:00:00:00:01", "33:33:00:00:00:01"]}]})["net0"]
    assert f.main_mac is None
    assert f.multicast_table == ("01:00:5e:01:02:03",)
    assert f.unicast_table == ("02:00:00:00:00:01",)
    assert len(f.rejected) == 4
    h = Host(intent("net1", "multicast mac unicast"))
    plan = h.step(f)
    assert kinds(plan.ops) == [("AddMulticast", "01:00:5e:01:02:03"),
                               ("AddUnicast", "02:00:00:00:00:01")]
    assert any("ignored invalid entries" in n.message for n in plan.notes)
    assert h.dev.address == NICS["net1"]["mac"]  # no 'mac' from a refused main MAC


# -- replies → operations ---------------------------------------------------------------------


def test_join_and_leave_a_group_adds_and_removes_exactly_that_address():
    h = Host(intent())
    first = h.step(reply("ready")["net0"])
    # The guest's solicited-node group is new to the macvtap; the all-nodes groups the host
    # already holds are still added as netplug's own (refcounted) membership.
    assert {o.mac for o in first.ops if isinstance(o, AddMulticast)} == \
        set(reply("ready")["net0"].multicast_table)
    h.converged(reply("ready")["net0"])
    join = h.step(reply("join-group")["net0"])
    assert kinds(join.ops) == [("AddMulticast", "01:00:5e:01:02:03")]
    join6 = h.step(reply("join-ipv6-group")["net0"])
    assert kinds(join6.ops) == [("AddMulticast", "33:33:00:00:12:34")]
    leave = h.step(reply("leave-group")["net0"])
    assert kinds(leave.ops) == [("DelMulticast", "01:00:5e:01:02:03"),
                                ("DelMulticast", "33:33:00:00:12:34")]
    assert h.dev.mc == KERNEL_OWN | set(reply("leave-group")["net0"].multicast_table)
    h.converged(reply("leave-group")["net0"])


def test_allmulticast_follows_the_guest_only_with_the_allmulti_token():
    h = Host(intent(tokens="multicast allmulti"))
    h.step(reply("ready")["net0"])
    assert kinds(h.step(reply("allmulti-on")["net0"]).ops) == [("SetAllmulti", "True")]
    assert h.dev.allmulti
    assert kinds(h.step(reply("allmulti-off")["net0"]).ops) == [("SetAllmulti", "False")]
    assert not h.dev.allmulti
    only_mc = Host(intent(tokens="multicast"))
    only_mc.step(reply("ready")["net0"])
    assert only_mc.step(reply("allmulti-on")["net0"]).ops == ()


def test_promiscuous_follows_the_guest_only_with_the_promisc_token():
    h = Host(intent(tokens="promisc"))
    assert kinds(h.step(reply("promisc-on")["net0"]).ops) == [("SetPromisc", "True")]
    assert kinds(h.step(reply("promisc-off")["net0"]).ops) == [("SetPromisc", "False")]
    without = Host(intent(tokens="multicast"))
    without.step(reply("promisc-on")["net0"])
    assert not without.dev.promisc


def test_mac_change_is_refused_and_logged_without_the_mac_token():
    h = Host(intent(tokens="multicast allmulti"))
    h.step(reply("ready")["net0"])
    plan = h.step(reply("mac-change")["net0"])
    assert not [o for o in plan.ops if isinstance(o, SetAddress)]
    assert h.dev.address == NICS["net0"]["mac"]
    [note] = [n for n in plan.notes if "refused" in n.message]
    assert "52:54:00:0a:00:99" in note.message and note.level == "warning"


def test_mac_change_is_followed_with_the_mac_token_and_undone_on_cleanup():
    h = Host(intent(tokens="multicast mac"))
    h.step(reply("ready")["net0"])
    plan = h.step(reply("mac-change")["net0"])
    assert kinds([o for o in plan.ops if isinstance(o, SetAddress)]) == \
        [("SetAddress", "52:54:00:0a:00:99")]
    assert h.dev.address == "52:54:00:0a:00:99"
    # Suspend/detach: everything netplug did is undone, the configured MAC comes back.
    ops = plan_rx_cleanup(h.it.dev, h.record, h.kernel.link(h.it.dev),
                          h.kernel.device_addresses(h.it.dev))
    apply(ops, h.kernel)
    assert h.dev.address == NICS["net0"]["mac"]
    # (The fake keeps one set per device, without the kernel's separate refcount for the
    # host's own memberships; tests/kernel checks those survive on the real kernel.)
    assert not h.dev.mc & (set(reply("ready")["net0"].multicast_table) - KERNEL_OWN)


def test_multicast_overflow_means_allmulticast_and_back():
    h = Host(intent(tokens="multicast"))
    h.step(reply("ready")["net0"])
    over = h.step(reply("multicast-overflow")["net0"])
    assert ("SetAllmulti", "True") in kinds(over.ops)
    assert h.dev.allmulti
    back = h.step(reply("multicast-overflow-cleared")["net0"])
    assert ("SetAllmulti", "False") in kinds(back.ops)
    assert not h.dev.allmulti
    assert h.dev.mc >= set(reply("multicast-overflow-cleared")["net0"].multicast_table)


def test_beyond_max_multicast_falls_back_to_allmulti_never_unbounded():
    h = Host(intent(tokens="multicast", maxMulticast=2))
    f = reply("join-ipv6-group")["net0"]  # 5 groups
    plan = h.step(f)
    assert not [o for o in plan.ops if isinstance(o, AddMulticast)]
    assert h.dev.allmulti
    assert any("maxMulticast 2" in n.message for n in plan.notes)


def test_unicast_table_goes_to_the_lower_device_in_passthrough_only():
    h = Host(intent("net1", tokens="unicast"))
    plan = h.step(reply("macvlan-unicast")["net1"])
    assert kinds(plan.ops) == [("AddUnicast", "02:00:00:00:00:01")]
    assert h.dev.uc == {"02:00:00:00:00:01"}
    h.converged(reply("macvlan-unicast")["net1"])
    # The same guest table on a bridge-mode macvtap: refused with a logged reason.
    bridged = Host(intent("net0", tokens="unicast"))
    f = reply("macvlan-unicast")["net1"]
    plan = bridged.step(RxFilter(**{**f.__dict__, "name": "net0",
                                    "main_mac": NICS["net0"]["mac"]}))
    assert plan.ops == ()
    assert any("only passthrough" in n.message for n in plan.notes)


def test_unicast_overflow_uses_promisc_only_when_allowed():
    with_promisc = Host(intent("net1", tokens="unicast promisc"))
    with_promisc.step(reply("macvlan-unicast")["net1"])
    plan = with_promisc.step(reply("unicast-overflow")["net1"])
    assert ("SetPromisc", "True") in kinds(plan.ops)
    assert ("DelUnicast", "02:00:00:00:00:01") in kinds(plan.ops)
    without = Host(intent("net1", tokens="unicast"))
    without.step(reply("macvlan-unicast")["net1"])
    plan = without.step(reply("unicast-overflow")["net1"])
    assert not [o for o in plan.ops if isinstance(o, SetPromisc)]
    assert any("maxUnicast" in n.message or "overflowed" in n.message for n in plan.notes)


def test_replaying_the_whole_recording_ends_where_the_guest_is():
    """Every recorded step in order, as the agent sees them: after each, the macvtap carries
    exactly the guest's table (plus the host's own memberships), and a repeat is a no-op."""
    h = Host(intent(tokens="multicast allmulti promisc"))
    for sample in INDEX["samples"]:
        f = reply(sample["scenario"])["net0"]
        h.step(f)
        if f.multicast_overflow:
            assert h.dev.allmulti
        else:
            assert h.dev.mc == KERNEL_OWN | set(f.multicast_table), sample["scenario"]
            assert h.dev.allmulti == (f.multicast == "all"), sample["scenario"]
        assert h.dev.promisc == f.promiscuous, sample["scenario"]
        h.converged(f)


def test_an_emptied_guest_table_removes_exactly_what_netplug_added():
    h = Host(intent())
    h.step(reply("ready")["net0"])
    h.kernel.add_multicast(h.it.dev, "01:00:5e:7f:00:01")  # an admin's own membership
    plan = h.step(RxFilter("net0", NICS["net0"]["mac"]))  # the guest left every group
    removed = {o.mac for o in plan.ops if isinstance(o, DelMulticast)}
    assert removed == set(reply("ready")["net0"].multicast_table)
    assert "01:00:5e:7f:00:01" in h.dev.mc
    assert not [o for o in plan.ops if isinstance(o, (SetAllmulti, SetPromisc, AddUnicast))]
