"""Invariants under any sequence of events (issue 10 item 9): a model-based, stateful test.

Hypothesis's rule-based state machine drives random sequences of what happens on a libvirt
host, on a REAL bridge in a fresh network namespace per example (the world and the model are in
invariant_world.py): guests started, restarted (`started`, `reconnect`), stopped and released,
with their taps created and deleted as libvirtd does; the network driver re-plugging ports;
the config edited (valid and invalid: an unknown key, a bad value, broken TOML); a domain's
policy edited live, and the network's (valid and invalid); a hook killed right after its k-th
kernel write; ports changed by hand (flags flipped, the guest's entry deleted or learned on the
uplink); `netplug reconcile`; and a domain whose XML someone hostile wrote (its <target dev>
names the uplink, the bridge, a foreign tap or another guest's tap; its MAC is the bridge's,
the uplink's, a foreign tap's, an admin's entry's or another running guest's).

After EVERY step, read through the independent oracle: foreign state is bit for bit what it
was; every running managed guest's port has exactly its static entry and learning/flood off
(except while the config or its policy is invalid: then what was applied is kept; and while
it is "dirty" after a kill or a change by hand, until its next event, stop or reconcile); a
stopped guest leaves nothing; no entry or flag change anywhere else. Every hook: `reconnect`
exits 0 (and so does every other event: strict mode is off), nothing on stdout, no traceback.

Running it:
- default ("ci" profile): derandomized (the same 30 sequences of up to 25 steps every run),
  no example database, no shrinking: 40-50 s on this project's 2-core VM when every
  invariant holds (measured 2026-11-30 against the hook path with issue 10's bugs stubbed
  out); a failure on today's code is reported within seconds;
- longer, random, with a database under .pytest_cache so a failure is replayed first
  (400 sequences of up to 50 steps: about 20 minutes):
    NETPLUG_INVARIANTS=long .venv/bin/python -m pytest tests/kernel/test_invariants.py
  (NETPLUG_INVARIANTS_EXAMPLES=N and NETPLUG_INVARIANTS_STEPS=N override either profile;
  NETPLUG_INVARIANTS_SHRINK=1 turns shrinking on, =0 off: shrinking a failure takes up to
  five minutes, Hypothesis's own limit).
- NETPLUG_INVARIANTS_RULES=-evil,-kill (a comma list of rule families to leave out: boot,
  event, stop, kill, network, config, meta, drift, reconcile, evil) keeps a known bug from
  hiding the others while it is being fixed.

A failure prints the shrunk sequence as Python (state.boot(i=0) ...) and, in the assertion,
the same steps as World calls: test_invariant_regressions.py holds one plain test per
distinct failure found this way.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

try:  # the `test` extra; `make deps` installs it
    import hypothesis  # noqa: F401
except ImportError:
    if os.environ.get("NETPLUG_REQUIRE_ALL") == "1":  # `make test`: a skip is a failure
        raise
    pytest.skip("hypothesis is not installed (pip install 'libvirt-netplug[test]')",
                allow_module_level=True)
from hypothesis import HealthCheck, Phase, settings, strategies as st  # noqa: E402
from hypothesis.configuration import set_hypothesis_home_dir  # noqa: E402
from hypothesis.database import DirectoryBasedExampleDatabase  # noqa: E402
from hypothesis.stateful import (RuleBasedStateMachine, initialize, precondition, rule,  # noqa
                                 run_state_machine_as_test)

from netns import NetNS, unavailable  # noqa: E402

from .invariant_world import (BR0_ADDR, CONFIGS, EVIL_MAC, FOREIGN_UP, FTAP_ADDR, MANAGED,  # noqa
                              METAS, NET_POLICIES, UP0_ADDR, Evil, World, make_domains)
from fakes import tap_mac  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Hypothesis keeps caches (and, in the "long" profile, its example database) in its home
# directory, by default ./.hypothesis: keep them with pytest's, out of the work tree.
set_hypothesis_home_dir(os.path.join(REPO, ".pytest_cache", "hypothesis-home"))
FAMILIES = ("boot", "event", "stop", "kill", "network", "config", "meta", "drift", "reconcile",
            "evil")

_COMMON = dict(deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                      HealthCheck.data_too_large])
PROFILES = {
    # CI: the same sequences every run (derandomize), nothing stored between runs.
    # Shrinking a failure costs minutes (Hypothesis gives up after five): CI reports the
    # sequence as found; NETPLUG_INVARIANTS_SHRINK=1 replays the same run and shrinks it.
    "ci": settings(max_examples=30, stateful_step_count=25, derandomize=True, database=None,
                   phases=[Phase.explicit, Phase.reuse, Phase.generate], **_COMMON),
    # Local: random sequences, failures kept and replayed first.
    "long": settings(max_examples=400, stateful_step_count=50, derandomize=False,
                     database=DirectoryBasedExampleDatabase(
                         os.path.join(REPO, ".pytest_cache", "hypothesis")), **_COMMON),
}


def profile() -> settings:
    name = os.environ.get("NETPLUG_INVARIANTS", "ci")
    if name not in PROFILES:
        raise pytest.UsageError(f"NETPLUG_INVARIANTS={name!r}: use one of {', '.join(PROFILES)}")
    overrides = {}
    if os.environ.get("NETPLUG_INVARIANTS_EXAMPLES"):
        overrides["max_examples"] = int(os.environ["NETPLUG_INVARIANTS_EXAMPLES"])
    if os.environ.get("NETPLUG_INVARIANTS_STEPS"):
        overrides["stateful_step_count"] = int(os.environ["NETPLUG_INVARIANTS_STEPS"])
    shrink = os.environ.get("NETPLUG_INVARIANTS_SHRINK")
    if shrink is not None:
        phases = [p for p in Phase if p is not Phase.explain]
        overrides["phases"] = phases if shrink == "1" else \
            [p for p in phases if p is not Phase.shrink]
    return settings(PROFILES[name], **overrides)


def _enabled() -> set[str]:
    spec = os.environ.get("NETPLUG_INVARIANTS_RULES", "")
    off = {s.strip()[1:] for s in spec.split(",") if s.strip().startswith("-")}
    unknown = off - set(FAMILIES)
    if unknown:
        raise pytest.UsageError(f"NETPLUG_INVARIANTS_RULES: unknown rule families {unknown}; "
                                f"known: {', '.join(FAMILIES)}")
    return set(FAMILIES) - off


ENABLED = _enabled()


def family(name: str):
    return precondition(lambda self: name in ENABLED)


# Interface kinds of a guest: on the config-managed host bridge (most), on the managed
# network, on the bridge nobody manages.
KIND = st.sampled_from(["br0", "br0", "net", "brU"])
DOMAINS = st.lists(st.lists(KIND, min_size=1, max_size=2), min_size=2, max_size=4)
PICK = st.integers(0, 7)  # an index into whatever is eligible, modulo its length
KILL = st.integers(1, 5)  # the hook dies right after this kernel write request
HOSTILE_TARGETS = ("up0", "br0", "ftap", "itap", "upU", "fU", "brU", "nbr0", "victim-tap", "own")
HOSTILE_MACS = ("fresh", "br0-addr", "up0-addr", "ftap-addr", "admin-entry", "victim-mac",
                "victim-tap-addr")


class HostMachine(RuleBasedStateMachine):
    world: World | None = None

    @initialize(spec=DOMAINS)
    def build(self, spec):
        self.ns = NetNS.create()
        self.tmp = tempfile.mkdtemp(prefix="netplug-inv-")
        self.world = World(self.ns, self.tmp, make_domains(spec))

    def teardown(self):
        if self.world is not None:
            self.ns.delete()
            shutil.rmtree(self.tmp, ignore_errors=True)

    # -- choosing among what is eligible --------------------------------------------------------

    def _doms(self, phase: str, bootable: bool = False):
        w = self.world
        if w is None:
            return []
        return [d for d in w.doms.values() if d.phase == phase and
                not (bootable and not w.may_boot(d))]

    def _managed_ifaces(self):
        return [(d, f) for d in self._doms("running") for f in d.ifaces
                if f.exp == MANAGED and not f.dirty]

    @staticmethod
    def _pick(items, i):
        return items[i % len(items)]

    # -- a guest's life -------------------------------------------------------------------------

    @family("boot")
    @precondition(lambda self: self._doms("off", bootable=True))
    @rule(i=PICK)
    def boot(self, i):
        self.world.boot(self._pick(self._doms("off", bootable=True), i).name)

    @family("event")
    @precondition(lambda self: self._doms("running"))
    @rule(i=PICK, op=st.sampled_from(["started", "reconnect"]))
    def event(self, i, op):
        self.world.event(self._pick(self._doms("running"), i).name, op)

    @family("stop")
    @precondition(lambda self: self._doms("running"))
    @rule(i=PICK)
    def stop(self, i):
        self.world.stop(self._pick(self._doms("running"), i).name)

    @family("stop")
    @precondition(lambda self: self._doms("stopped"))
    @rule(i=PICK)
    def release(self, i):
        self.world.release(self._pick(self._doms("stopped"), i).name)

    # -- hooks killed mid-apply -----------------------------------------------------------------

    @family("kill")
    @precondition(lambda self: self._doms("off", bootable=True))
    @rule(i=PICK, k=KILL)
    def boot_killed(self, i, k):
        self.world.boot(self._pick(self._doms("off", bootable=True), i).name, kill_after=k)

    @family("kill")
    @precondition(lambda self: self._doms("running"))
    @rule(i=PICK, op=st.sampled_from(["started", "reconnect"]), k=KILL)
    def event_killed(self, i, op, k):
        self.world.event(self._pick(self._doms("running"), i).name, op, kill_after=k)

    @family("kill")
    @precondition(lambda self: self._doms("running"))
    @rule(i=PICK, k=KILL)
    def stop_killed(self, i, k):
        self.world.stop(self._pick(self._doms("running"), i).name, kill_after=k)

    # -- the network driver -------------------------------------------------------------------

    @family("network")
    @precondition(lambda self: self.world is not None)
    @rule()
    def network_restart(self):
        self.world.network_restart()

    @family("network")
    @precondition(lambda self: self.world is not None)
    @rule(variant=st.sampled_from(sorted(NET_POLICIES)))
    def network_update(self, variant):
        self.world.network_update(variant)

    # -- the operator ---------------------------------------------------------------------------

    @family("config")
    @precondition(lambda self: self.world is not None)
    @rule(variant=st.sampled_from(sorted(CONFIGS)))
    def edit_config(self, variant):
        self.world.edit_config(variant)

    @family("meta")
    @precondition(lambda self: self.world is not None)
    @rule(i=PICK, variant=st.sampled_from(METAS))
    def edit_meta(self, i, variant):
        self.world.edit_meta(self._pick(sorted(self.world.doms), i), variant)

    @family("drift")
    @precondition(lambda self: self._managed_ifaces())
    @rule(i=PICK, flags=st.sampled_from([(True, True), (True, False), (False, True)]))
    def drift_flags(self, i, flags):
        d, f = self._pick(self._managed_ifaces(), i)
        self.world.drift_flags(d.name, f.index, *flags)

    @family("drift")
    @precondition(lambda self: self._managed_ifaces())
    @rule(i=PICK, how=st.sampled_from(["delete", "move"]))
    def drift_fdb(self, i, how):
        d, f = self._pick(self._managed_ifaces(), i)
        self.world.drift_fdb(d.name, f.index, how)

    @family("reconcile")
    @precondition(lambda self: self.world is not None)
    @rule()
    def reconcile(self):
        self.world.reconcile()

    # -- someone hostile ----------------------------------------------------------------------

    def _evil_off(self):
        w = self.world
        return w is not None and (w.evil is None or w.evil.phase == "off")

    def _evil_running(self):
        w = self.world
        return w is not None and w.evil is not None and w.evil.phase == "running"

    @family("evil")
    @precondition(lambda self: self._evil_off())
    @rule(on_unmanaged=st.booleans(), dev=st.sampled_from(HOSTILE_TARGETS),
          mac=st.sampled_from(HOSTILE_MACS), i=PICK)
    def evil_start(self, on_unmanaged, dev, mac, i):
        """A hostile domain on br0 (or on brU: its own policy says promiscLinks='no' for all
        its interfaces). A victim is a running guest's interface on the same bridge, chosen
        among those that hold their entry now."""
        source = "brU" if on_unmanaged else "br0"
        victims = [f for d in self._doms("running") for f in d.ifaces
                   if (mac == "victim-mac" and f.exp == MANAGED and not f.dirty) or
                   (mac != "victim-mac" and f.bridge == source)]
        victim = self._pick(victims, i) if victims else None
        target = dev
        if dev == "victim-tap":
            target = victim.tap if victim else "itap"
        elif dev == "own":
            target = Evil.TAP
        macs = {"fresh": EVIL_MAC, "br0-addr": BR0_ADDR, "up0-addr": UP0_ADDR,
                "ftap-addr": FTAP_ADDR, "admin-entry": FOREIGN_UP,
                "victim-mac": victim.mac if victim else BR0_ADDR,
                "victim-tap-addr": tap_mac(victim.mac) if victim else UP0_ADDR}
        the_mac = macs[mac]
        if target == Evil.TAP and the_mac == EVIL_MAC:
            the_mac = BR0_ADDR  # its own tap and a MAC nobody has: that is just a guest
        self.world.evil_start(source, target, the_mac)

    @family("evil")
    @precondition(lambda self: self._evil_running())
    @rule(op=st.sampled_from(["started", "reconnect"]))
    def evil_event(self, op):
        self.world.evil_event(op)

    @family("evil")
    @precondition(lambda self: self._evil_running())
    @rule()
    def evil_stop(self):
        self.world.evil_stop()


@pytest.fixture
def kernel_required():
    reason = unavailable()
    if reason:
        if os.environ.get("NETPLUG_REQUIRE_ALL") == "1":
            pytest.fail(f"NETPLUG_REQUIRE_ALL=1 but {reason}", pytrace=False)
        pytest.skip(reason)


def test_invariants_hold_under_any_sequence(kernel_required):
    run_state_machine_as_test(HostMachine, settings=profile())
