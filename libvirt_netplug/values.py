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
reads must not get slower); __init__ is ~15% faster. The hook path's classes do not even
compile their __init__ (~0.1 ms each, and ~0.6 ms for the first compile of a process): it
is written out in _inits.py, and used when its parameters are the class's fields.

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


def init_source(fields: dict[str, Field], name: str, default_text) -> str:
    """The source of an __init__ for ``fields`` named ``name``; ``default_text(name,
    field)`` writes a field's default value.

    object.__setattr__ per field (what a frozen dataclass does, minus an attribute lookup
    per field): the values stay in the instance's inline storage, where attribute reads are
    fastest. Storing into self.__dict__ instead would make __init__ 2x faster but every
    later read 2x slower (a materialized dict), and the instance 40% bigger."""
    params, body = [], []
    seen_default = False
    for field_name, f in fields.items():
        value = field_name
        if f.default is not MISSING:
            params.append(f"{field_name}={default_text(field_name, f)}")
            seen_default = True
        elif f.default_factory is not MISSING:
            params.append(f"{field_name}=MISSING")
            value = (f"default_of(self, {field_name!r}) if {field_name} is MISSING "
                     f"else {field_name}")
            seen_default = True
        else:
            if seen_default:
                raise TypeError(f"non-default argument {field_name!r} follows default "
                                f"argument")
            params.append(field_name)
        line = f"    _sa(self, {field_name!r}, {value})\n"
        if len(line) > 100:
            line = f"    _sa(self, {field_name!r},\n        {value})\n"
        body.append(line)
    return f"def {name}(self, {', '.join(params)}):\n" + ("".join(body) or "    pass\n")


def default_of(obj, name: str):
    """A new default value for field ``name`` of ``obj`` (its default_factory's)."""
    return type(obj).__value_fields__[name].default_factory()


def _make_init(cls, fields: dict[str, Field]):
    fn = _prebuilt_init(cls, fields)
    if fn is None:
        env = {"MISSING": MISSING, "_sa": object.__setattr__, "default_of": default_of}
        env.update((f"_d_{n}", f.default) for n, f in fields.items()
                   if f.default is not MISSING)
        src = init_source(fields, "__init__", lambda n, _f: f"_d_{n}")
        exec(compile(src, f"<values {cls.__module__}.{cls.__qualname__}>", "exec"), env)
        fn = env["__init__"]
    fn.__qualname__ = f"{cls.__qualname__}.__init__"
    return fn


def prebuilt_name(cls) -> str:
    """The name of a class's __init__ in _inits.py: module (without the package) and
    qualified name, e.g. ``kernel__Link``."""
    return f"{cls.__module__.rpartition('.')[2]}__{cls.__qualname__.replace('.', '_')}"


def _prebuilt_init(cls, fields: dict[str, Field]):
    """The class's __init__ from _inits.py if it is there and takes exactly these fields
    with these defaults (else None: the class compiles its own)."""
    if not cls.__module__.startswith(__package__ + "."):
        return None
    try:
        from . import _inits
    except ImportError:  # not there (an old install): every class compiles its own
        return None
    fn = getattr(_inits, prebuilt_name(cls), None)
    if fn is None:
        return None
    code = fn.__code__
    want = tuple(fields)
    defaults = tuple((type(f.default), f.default) if f.default is not MISSING else MISSING
                     for f in fields.values()
                     if f.default is not MISSING or f.default_factory is not MISSING)
    have = tuple(MISSING if d is MISSING else (type(d), d) for d in fn.__defaults__ or ())
    if code.co_varnames[1:code.co_argcount] != want or code.co_kwonlyargcount or \
            have != defaults:
        return None
    return fn


PREBUILT_HEADER = '''"""The __init__ of each value class of the hook path, written out (generated: do not edit).

values.frozen/values.mutable take a class's __init__ from here when its parameters and
defaults are the class's fields, instead of compiling one: compiling them cost every hook
~2.5 ms. One that no longer fits is not used (the class compiles its own, as any other
value class does), and tests/unit/test_values.py fails until this file is written again:
    NETPLUG_REGEN_INITS=1 .venv/bin/python -m pytest tests/unit/test_values.py
"""

from .values import MISSING, default_of

_sa = object.__setattr__
'''


def prebuilt_source(classes) -> str:
    """The text of _inits.py for ``classes`` (value classes of this package)."""
    def literal(name: str, f: Field) -> str:
        text = repr(f.default)
        if type(eval(text, {})) is not type(f.default) or eval(text, {}) != f.default:
            raise ValueError(f"default of {name} has no literal form: {text}")
        return text

    parts = [PREBUILT_HEADER]
    for cls in classes:
        src = init_source(cls.__value_fields__, prebuilt_name(cls), literal)
        head, _, body = src.partition("\n")
        parts.append("\n\n" + _wrap(head) + "\n" + body)
    return "".join(parts)


def _wrap(line: str, width: int = 99) -> str:
    """A def line cut at commas to ``width`` columns, continued under its first parameter."""
    if len(line) <= width:
        return line
    indent = " " * (line.index("(") + 1)
    out, cur = [], ""
    for piece in line.split(", "):
        candidate = f"{cur}, {piece}" if cur else piece
        if len(candidate) + (len(indent) if out else 0) > width - 1 and cur:
            out.append(cur + ",")
            cur = piece
        else:
            cur = candidate
    out.append(cur)
    return ("\n" + indent).join(out)


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
