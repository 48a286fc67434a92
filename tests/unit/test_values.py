"""values.frozen / values.mutable: what @dataclass(frozen=True) / @dataclass gave the hook
path's classes, without dataclasses.

Proves, against dataclasses itself on the same class bodies: the same __init__ (positional,
keyword, defaults, default factories called per instance, a missing or unknown argument
refused), equality (same class only; a compare=False field ignored), hash, repr,
immutability (FrozenInstanceError, an AttributeError), ClassVar annotations left out,
inheritance (a subclass's fields after its base's, a base's default overridden), replace(),
fields(), asdict(), cached_property, copy/deepcopy/pickle; the mutable form is unhashable and
assignable; the hook path's classes are built with it, each with its __init__ from _inits.py
(none compiled at import), which is what values would generate for it today; a prebuilt
__init__ whose parameters or defaults no longer fit its class is not used.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import inspect
import os
import pickle
import types
from functools import cached_property
from typing import ClassVar

import pytest

from libvirt_netplug import values


def define(decorator, field):
    """The same class bodies, decorated either way."""

    @decorator
    class Base:
        ctx: str
        device: str
        kind: ClassVar[str] = "base"

        def what(self) -> str:
            return f"{self.kind} {self.device}"

    @decorator
    class Child(Base):
        mac: str
        vlan: int | None = None
        tags: tuple[int, ...] = ()
        kind: ClassVar[str] = "child"

    @decorator
    class Bag:
        name: str = "x"
        items: dict = field(default_factory=dict)
        sources: tuple[str, ...] = field(default=(), compare=False)

        @cached_property
        def size(self) -> int:
            return len(self.items)

    return Base, Child, Bag


OURS = define(values.frozen, values.field)
THEIRS = define(dataclasses.dataclass(frozen=True), dataclasses.field)


def pairs(make):
    return make(*OURS), make(*THEIRS)


def test_init_defaults_and_factories_as_dataclasses():
    for Base, Child, Bag in (OURS, THEIRS):
        c = Child("ctx", "vnet0", "52:54:00:00:00:01")
        assert (c.ctx, c.device, c.mac, c.vlan, c.tags) == ("ctx", "vnet0",
                                                             "52:54:00:00:00:01", None, ())
        assert Child(device="d", ctx="c", mac="m", tags=(1,)).tags == (1,)
        a, b = Bag(), Bag()
        assert a.items == {} and a.items is not b.items
        assert Bag.name == "x" and not hasattr(Bag, "items")  # no class attribute
        with pytest.raises(TypeError):
            Child("ctx", "vnet0")
        with pytest.raises(TypeError):
            Child("ctx", "vnet0", "m", colour="red")
        assert c.what() == "child vnet0" and Base.kind == "base"


def test_equality_hash_and_repr_as_dataclasses():
    def make(Base, Child, Bag):
        c1, c2 = Child("a", "b", "m", 5), Child("a", "b", "m", 5)
        return (c1 == c2, hash(c1) == hash(c2), c1 == Child("a", "b", "m", 6),
                Base("a", "b") == Child("a", "b", "m"), c1 == ("a", "b", "m", 5, ()),
                repr(c1).split(".")[-1], Bag("n", {}, ("s1",)) == Bag("n", {}, ("s2",)),
                {c1: 1}[c2])
    assert pairs(make)[0] == pairs(make)[1]
    ours = pairs(make)[0]
    assert ours[:5] == (True, True, False, False, False)
    assert ours[5] == "Child(ctx='a', device='b', mac='m', vlan=5, tags=())"
    assert ours[6] is True  # sources: compare=False


def test_frozen_and_cached_property():
    for (Base, Child, Bag), error in ((OURS, values.FrozenInstanceError),
                                      (THEIRS, dataclasses.FrozenInstanceError)):
        c = Child("a", "b", "m")
        with pytest.raises(error, match="cannot assign to field 'mac'"):
            c.mac = "x"
        with pytest.raises(error):
            del c.device
        with pytest.raises(error):
            c.other = 1
        assert c.mac == "m" and not hasattr(c, "other")
        bag = Bag("n", {"k": 1})
        assert bag.size == 1 and bag.size == 1
    assert issubclass(values.FrozenInstanceError, AttributeError)


def test_replace_fields_asdict_as_dataclasses():
    for (Base, Child, Bag), mod in ((OURS, values), (THEIRS, dataclasses)):
        c = Child("a", "b", "m", 5, (1, 2))
        r = mod.replace(c, vlan=7)
        assert (r, type(r)) == (Child("a", "b", "m", 7, (1, 2)), Child)
        assert [f.name for f in mod.fields(Child)] == ["ctx", "device", "mac", "vlan", "tags"]
        assert [f.name for f in mod.fields(c)] == ["ctx", "device", "mac", "vlan", "tags"]
        with pytest.raises(TypeError):
            mod.replace(c, colour="red")
    nested_ours = OURS[2]("n", {"k": OURS[0]("a", "b")}, ("s",))
    nested_theirs = THEIRS[2]("n", {"k": THEIRS[0]("a", "b")}, ("s",))
    assert values.asdict(nested_ours) == dataclasses.asdict(nested_theirs) == \
        {"name": "n", "items": {"k": {"ctx": "a", "device": "b"}}, "sources": ("s",)}


def test_copies_and_pickles_stay_equal_and_frozen():
    _Base, Child, _Bag = OURS
    globals()["_PickledChild"] = Child  # pickle finds classes by module + qualname
    Child.__qualname__ = "_PickledChild"
    try:
        c = Child("a", "b", "m", 5)
        for other in (copy.copy(c), copy.deepcopy(c), pickle.loads(pickle.dumps(c))):
            assert other == c and hash(other) == hash(c)
            with pytest.raises(values.FrozenInstanceError):
                other.mac = "x"
    finally:
        del globals()["_PickledChild"]


def test_mutable_is_assignable_and_unhashable():
    @values.mutable
    class Result:
        done: list = values.field(default_factory=list)
        errors: int = 0

    r = Result()
    r.errors += 1
    r.done.append("x")
    assert r == Result(["x"], 1) and repr(r).endswith(".Result(done=['x'], errors=1)")
    with pytest.raises(TypeError):
        hash(r)


def test_definitions_dataclasses_refuses_are_refused():
    with pytest.raises(TypeError):
        @values.frozen
        class Bad:
            a: int = 1
            b: int
    with pytest.raises(ValueError):
        @values.frozen
        class Shared:
            a: list = []  # noqa: RUF012


def test_the_hook_path_classes_are_values():
    from libvirt_netplug import kernel, model, ops, plan, policy

    for cls in (kernel.Link, kernel.FdbEntry, kernel.PortVlans, model.Interface, model.Domain,
                model.Network, model.NetworkPort, ops.Context, ops.ReplaceFdb, plan.Observed,
                plan.Plan, plan.PortIntent, policy.Policy, policy.Config):
        assert values.is_value(cls), cls


PREBUILT_MODULES = ("policy", "model", "ops", "plan", "apply", "kernel", "hookresult", "rxops")
INITS = os.path.join(os.path.dirname(values.__file__), "_inits.py")


def prebuilt_classes() -> list[type]:
    """The value classes whose __init__ _inits.py holds, in module and source order."""
    out = []
    for name in PREBUILT_MODULES:
        mod = importlib.import_module(f"libvirt_netplug.{name}")
        found = [c for c in vars(mod).values() if isinstance(c, type) and
                 "__value_fields__" in c.__dict__ and c.__module__ == mod.__name__]
        out += sorted(found, key=lambda c: inspect.getsourcelines(c)[1])
    return out


def test_the_prebuilt_inits_are_current():
    text = values.prebuilt_source(prebuilt_classes())
    if os.environ.get("NETPLUG_REGEN_INITS") == "1":
        with open(INITS, "w") as f:
            f.write(text)
    with open(INITS) as f:
        assert f.read() == text, ("libvirt_netplug/_inits.py is stale: NETPLUG_REGEN_INITS=1 "
                                  ".venv/bin/python -m pytest tests/unit/test_values.py")


def test_the_hook_path_classes_compile_no_init():
    classes = prebuilt_classes()
    assert len(classes) >= 20
    for cls in classes:
        assert cls.__init__.__code__.co_filename == INITS, cls
        assert cls.__init__.__qualname__ == f"{cls.__qualname__}.__init__"


def test_a_prebuilt_init_that_does_not_fit_is_not_used(monkeypatch):
    from libvirt_netplug import _inits

    exec(values.init_source({"a": values.Field(), "b": values.Field(1)}, "probe__Thing",
                            lambda _n, f: repr(f.default)), vars(_inits))
    monkeypatch.setattr(_inits, "probe__Thing", _inits.probe__Thing, raising=False)

    def thing(**annotated_defaults):
        ns = {"__annotations__": {"a": "int", **{k: "int" for k in annotated_defaults}},
              "__module__": "libvirt_netplug.probe", "__qualname__": "Thing",
              **annotated_defaults}
        return values.frozen(types.new_class("Thing", (), {}, lambda d: d.update(ns)))

    fits = thing(b=1)
    assert fits.__init__.__code__ is _inits.probe__Thing.__code__
    assert (fits(5).a, fits(5).b, fits(5, 2).b) == (5, 1, 2)
    for other in (thing(b=2), thing(b=True), thing(c=1), thing(b=1, c=3),
                  thing(b=values.field(default_factory=list))):
        assert other.__init__.__code__ is not _inits.probe__Thing.__code__
    assert thing(b=2)(5).b == 2 and thing(b=values.field(default_factory=list))(5).b == []
