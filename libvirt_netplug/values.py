"""Value classes for the hook path, without ``dataclasses`` (hook side).

``@frozen`` gives a class what ``@dataclass(frozen=True)`` gave it here, ``@mutable`` what
``@dataclass`` did: an ``__init__`` from the annotated fields (in order, base classes'
first; defaults, ``field(default_factory=…)``; ``ClassVar`` annotations are not fields),
``__eq__`` (same class, equal compared fields), ``__repr__``, and for ``@frozen`` ``__hash__``
and ``__setattr__``/``__delattr__`` raising FrozenInstanceError. ``replace()``, ``fields()``
and ``asdict()`` work as dataclasses' do. Instances keep a ``__dict__``, so
``functools.cached_property`` works on them as on a frozen dataclass.

Why: on Debian's python3 importing ``dataclasses`` pulls in inspect, ast and dis (~5 ms),
and creating a frozen dataclass costs ~0.3 ms (an exec per method); the hook creates ~25 of
these classes on every run. Here a class costs one small exec (its ``__init__``); ``__eq__``,
``__hash__`` and ``__repr__`` are closures over its field names. Instances are laid out as a
frozen dataclass's (reconcile builds a Link and an FdbEntry per port: their creation and
reads must not get slower); __init__ is ~15% faster.

The operator side (status, doctor, the agent, sync, reconcile…) may keep dataclasses.
"""

from __future__ import annotations

from operator import attrgetter


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING = _Missing()


class FrozenInstanceError(AttributeError):
    """Assigning to (or deleting) a field of a frozen instance."""


class Field:
    __slots__ = ("name", "default", "default_factory", "compare")

    def __init__(self, default=MISSING, default_factory=MISSING, compare: bool = True):
        if default is not MISSING and default_factory is not MISSING:
            raise ValueError("cannot specify both default and default_factory")
        self.name: str = ""
        self.default, self.default_factory, self.compare = default, default_factory, compare

    def __repr__(self) -> str:
        return (f"Field(name={self.name!r}, default={self.default!r}, "
                f"default_factory={self.default_factory!r}, compare={self.compare!r})")


def field(*, default=MISSING, default_factory=MISSING, compare: bool = True) -> Field:
    return Field(default, default_factory, compare)


def _is_classvar(annotation) -> bool:
    # Annotations are strings here (``from __future__ import annotations``).
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    return text.startswith(("ClassVar", "typing.ClassVar"))


def _fields_of(cls) -> dict[str, Field]:
    out: dict[str, Field] = {}
    for base in reversed(cls.__mro__[1:]):
        out.update(base.__dict__.get("__value_fields__", {}))
    for name, annotation in cls.__dict__.get("__annotations__", {}).items():
        if _is_classvar(annotation):
            continue
        value = cls.__dict__.get(name, MISSING)
        if isinstance(value, Field):
            f = value
            if f.default is MISSING:
                delattr(cls, name)  # as dataclasses do: no class attribute without a default
            else:
                setattr(cls, name, f.default)
        else:
            f = Field(value)
        if f.default is not MISSING and type(f.default).__hash__ is None:
            raise ValueError(f"mutable default {type(f.default)} for field {name} is not "
                             f"allowed: use default_factory")
        f.name = name
        out[name] = f
    return out


def _make_init(cls, fields: dict[str, Field]):
    # object.__setattr__ per field (what a frozen dataclass does, minus an attribute lookup
    # per field): the values stay in the instance's inline storage, where attribute reads
    # are fastest. Storing into self.__dict__ instead would make __init__ 2x faster but
    # every later read 2x slower (a materialized dict), and the instance 40% bigger.
    params, body, env = [], [], {"MISSING": MISSING, "_sa": object.__setattr__}
    seen_default = False
    for name, f in fields.items():
        if f.default is not MISSING:
            env[f"_d_{name}"] = f.default
            params.append(f"{name}=_d_{name}")
            body.append(f"    _sa(self, {name!r}, {name})")
            seen_default = True
        elif f.default_factory is not MISSING:
            env[f"_f_{name}"] = f.default_factory
            params.append(f"{name}=MISSING")
            body.append(f"    _sa(self, {name!r}, _f_{name}() if {name} is MISSING else {name})")
            seen_default = True
        else:
            if seen_default:
                raise TypeError(f"non-default argument {name!r} follows default argument")
            params.append(name)
            body.append(f"    _sa(self, {name!r}, {name})")
    src = (f"def __init__(self, {', '.join(params)}):\n"
           + ("\n".join(body) or "    pass") + "\n")
    exec(compile(src, f"<values {cls.__module__}.{cls.__qualname__}>", "exec"), env)
    fn = env["__init__"]
    fn.__qualname__ = f"{cls.__qualname__}.__init__"
    return fn


def _key(names: tuple[str, ...]):
    if len(names) > 1:
        return attrgetter(*names)
    if names:
        one = attrgetter(names[0])
        return lambda obj: (one(obj),)
    return lambda obj: ()


def _build(cls, frozen: bool):
    fields = _fields_of(cls)
    names = tuple(fields)
    key = _key(tuple(n for n, f in fields.items() if f.compare))
    own = cls.__dict__

    def __eq__(self, other):
        if other.__class__ is self.__class__:
            return key(self) == key(other)
        return NotImplemented

    def __repr__(self):
        return (f"{self.__class__.__qualname__}("
                + ", ".join(f"{n}={getattr(self, n)!r}" for n in names) + ")")

    methods = {"__init__": _make_init(cls, fields), "__repr__": __repr__, "__eq__": __eq__}
    if frozen:
        field_set = frozenset(names)

        def __hash__(self):
            return hash(key(self))

        def __setattr__(self, name, value):
            if type(self) is cls or name in field_set:
                raise FrozenInstanceError(f"cannot assign to field {name!r}")
            super(cls, self).__setattr__(name, value)

        def __delattr__(self, name):
            if type(self) is cls or name in field_set:
                raise FrozenInstanceError(f"cannot delete field {name!r}")
            super(cls, self).__delattr__(name)

        methods.update(__hash__=__hash__, __setattr__=__setattr__, __delattr__=__delattr__)
    elif "__hash__" not in own:
        methods["__hash__"] = None  # mutable and compared by value: unhashable
    for name, fn in methods.items():
        if name == "__hash__" and own.get("__hash__") is not None:
            continue  # the class's own
        if name in own and name != "__hash__":
            continue
        if fn is not None:
            fn.__qualname__ = f"{cls.__qualname__}.{name}"
        setattr(cls, name, fn)
    cls.__value_fields__ = fields
    cls.__match_args__ = names
    return cls


def frozen(cls):
    """``@dataclass(frozen=True)`` for the hook path (see the module docstring)."""
    return _build(cls, True)


def mutable(cls):
    """``@dataclass`` for the hook path (see the module docstring)."""
    return _build(cls, False)


def fields(obj) -> tuple[Field, ...]:
    """The fields of a value class or instance, in order (as dataclasses.fields)."""
    try:
        return tuple(obj.__value_fields__.values())
    except AttributeError:
        raise TypeError("must be called with a value class or instance") from None


def is_value(obj) -> bool:
    return hasattr(type(obj) if not isinstance(obj, type) else obj, "__value_fields__")


def replace(obj, /, **changes):
    """A copy of ``obj`` with ``changes`` (as dataclasses.replace)."""
    for name in obj.__value_fields__:
        if name not in changes:
            changes[name] = getattr(obj, name)
    return obj.__class__(**changes)


def asdict(obj) -> dict:
    """``obj``'s fields as a dict, value instances inside it as dicts too (as
    dataclasses.asdict; other values are returned as they are, not copied)."""
    return {name: _plain(getattr(obj, name)) for name in obj.__value_fields__}


def _plain(value):
    if hasattr(type(value), "__value_fields__"):
        return asdict(value)
    if isinstance(value, (list, tuple)):
        items = [_plain(v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, dict):
        return type(value)((_plain(k), _plain(v)) for k, v in value.items())
    return value
