"""netplug policy: what to manage, parsed from XML metadata, attributes and the TOML config.

Sources, lowest precedence first (each later source overrides the fields it sets):
1. config file ``[bridge.NAME]`` (host bridges) or ``[direct.LOWERDEV]`` (macvtap lower devices)
2. ``promiscLinks='no'`` on a network's ``<bridge>`` element, where the XML still carries it
3. network metadata ``<netplug:policy …/>``
4. domain metadata ``<netplug:policy …/>`` attributes (every interface of the domain)
5. domain metadata ``<netplug:interface mac='…' …/>`` inside it (one interface, by MAC)
"""

from __future__ import annotations

import os
from functools import cached_property

from .errors import PolicyError
from .values import field, fields, frozen

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~2 ms a hook)
if TYPE_CHECKING:
    from typing import Any, Mapping, Protocol

    class ConfigCache(Protocol):  # state.StateDir
        def read_cache(self, name: str) -> Any: ...
        def write_cache(self, name: str, doc: dict[str, Any]) -> None: ...

NS = "urn:x-libvirt-netplug:1"
DEFAULT_CONFIG = "/etc/libvirt-netplug/config.toml"
RX_TOKENS = ("multicast", "allmulti", "mac", "promisc", "unicast")
DEFAULT_MAX_MULTICAST = 64
DEFAULT_MAX_UNICAST = 64
MAX_CAP = 4096  # a cap is a safety limit, not a way to say "unbounded"

MAX_CONFIG_BYTES = 256 * 1024  # every hook reads it: a real config is a few hundred bytes

_BOOL_WORDS = {"yes": True, "on": True, "true": True, "no": False, "off": False, "false": False}


@frozen
class Policy:
    """A (partial) policy: None means "not set here", so layers can be merged."""

    promisc_links: bool | None = None
    sticky: bool | None = None
    vlan_filtering: bool | None = None
    strict: bool | None = None
    rx_filters: frozenset[str] | None = None
    max_multicast: int | None = None
    max_unicast: int | None = None
    sources: tuple[str, ...] = field(default=(), compare=False)

    def over(self, base: "Policy") -> "Policy":
        """This policy layered over ``base``: our set fields win."""
        if base.is_empty() and not base.sources:
            return self
        if self.is_empty() and not self.sources:
            return base
        merged = {name: getattr(self, name) if getattr(self, name) is not None
                  else getattr(base, name) for name in _FIELDS}
        return Policy(**merged, sources=base.sources + self.sources)

    @property
    def manages_bridge_port(self) -> bool:
        return self.promisc_links is False

    @property
    def rx(self) -> frozenset[str]:
        return self.rx_filters or frozenset()

    @property
    def multicast_cap(self) -> int:
        return self.max_multicast if self.max_multicast is not None else DEFAULT_MAX_MULTICAST

    @property
    def unicast_cap(self) -> int:
        return self.max_unicast if self.max_unicast is not None else DEFAULT_MAX_UNICAST

    def is_empty(self) -> bool:
        return self._empty

    @cached_property
    def _empty(self) -> bool:
        # Cached: policies are merged a few times per interface, for thousands of interfaces.
        return all(getattr(self, name) is None for name in _FIELDS)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, key in _ATTRS.items():
            value = getattr(self, key)
            if value is None:
                continue
            if isinstance(value, bool):
                value = "yes" if value else "no"
            elif isinstance(value, frozenset):
                value = " ".join(t for t in RX_TOKENS if t in value)
            out[name] = value
        return out


_FIELDS = tuple(f.name for f in fields(Policy) if f.name != "sources")

# XML attribute / TOML key → Policy field
_ATTRS = {
    "promiscLinks": "promisc_links",
    "sticky": "sticky",
    "vlanFiltering": "vlan_filtering",
    "strict": "strict",
    "rxFilters": "rx_filters",
    "maxMulticast": "max_multicast",
    "maxUnicast": "max_unicast",
}


def _parse_bool(value: Any, where: str, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
        return _BOOL_WORDS[value.strip().lower()]
    raise PolicyError(f"{where}: {key}={value!r} is not valid; use 'yes' or 'no'")


def _parse_cap(value: Any, where: str, key: str) -> int:
    try:
        n = int(value, 10) if isinstance(value, str) else value
    except ValueError:
        n = None
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= MAX_CAP:
        raise PolicyError(f"{where}: {key}={value!r} is not valid; use a number from 0 to "
                          f"{MAX_CAP}")
    return n


def _parse_rx(value: Any, where: str, key: str) -> frozenset[str]:
    if isinstance(value, str):
        tokens = value.replace(",", " ").split()
    elif isinstance(value, list) and all(isinstance(t, str) for t in value):
        tokens = value
    else:
        raise PolicyError(f"{where}: {key}={value!r} is not valid; use a space-separated list "
                          f"of {', '.join(RX_TOKENS)}")
    unknown = [t for t in tokens if t not in RX_TOKENS]
    if unknown:
        raise PolicyError(f"{where}: {key} has unknown token {unknown[0]!r}; known tokens: "
                          f"{', '.join(RX_TOKENS)}")
    return frozenset(tokens)


def policy_from_mapping(values: Mapping[str, Any], where: str) -> Policy:
    """Build a Policy from XML attributes or a TOML table; errors name ``where`` and the key."""
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        name = _ATTRS.get(key)
        if name is None:
            raise PolicyError(f"{where}: unknown policy setting {key!r}; known: "
                              f"{', '.join(_ATTRS)}")
        if name in ("max_multicast", "max_unicast"):
            kwargs[name] = _parse_cap(value, where, key)
        elif name == "rx_filters":
            kwargs[name] = _parse_rx(value, where, key)
        else:
            kwargs[name] = _parse_bool(value, where, key)
    return Policy(**kwargs, sources=(where,))


def policy_from_element(el, where: str) -> Policy:
    """A ``<netplug:policy>`` or ``<netplug:interface>`` element's attributes (minus mac)."""
    attrs = {k: v for k, v in el.attrib.items() if k != "mac" and not k.startswith("{")}
    return policy_from_mapping(attrs, where)


@frozen
class Config:
    """The host config file: policies for host bridges and macvtap lower devices."""

    path: str | None = None
    bridges: Mapping[str, Policy] = field(default_factory=dict)
    direct: Mapping[str, Policy] = field(default_factory=dict)
    strict: bool = False

    def bridge_policy(self, bridge: str | None) -> Policy:
        return self.bridges.get(bridge or "", Policy())

    def direct_policy(self, dev: str | None) -> Policy:
        return self.direct.get(dev or "", Policy())


def _ifname_ok(name: str) -> bool:
    return 0 < len(name.encode("utf-8", "surrogateescape")) < 16 and name not in (".", "..") \
        and not any(c in name for c in "/: \t\n\r\x00")


def config_path(explicit: str | None = None) -> str:
    return explicit or os.environ.get("NETPLUG_CONFIG") or DEFAULT_CONFIG


def load_config(path: str | None = None, cache: ConfigCache | None = None) -> Config:
    """Load the TOML config; a missing file is an empty config, a broken one a PolicyError.

    ``cache`` (the hooks' StateDir): where the parsed config is kept between runs, keyed by
    the file's device, inode, size and timestamps, so a hook parses TOML only when the file
    changed (tomllib costs every hook ~3 ms). What the cache holds is what tomllib returned,
    checked again by the same code on every use; only a valid config is cached; a cache
    that is absent, unreadable or not trusted means parsing the file, as without one.
    """
    path = config_path(path)
    try:
        # O_NONBLOCK: a FIFO put in the config's place must not hang every hook.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return Config(path=None)
    except OSError as e:
        raise PolicyError(f"config {path}: cannot read: {e.strerror}") from None
    try:
        with os.fdopen(fd, "rb") as f:
            import stat

            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise PolicyError(f"config {path}: not a regular file")
            key = [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
            if cache is not None:
                cached = _cached_config(cache, path, key)
                if cached is not None:
                    return cached
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise PolicyError(f"config {path}: cannot read: {e.strerror}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise PolicyError(f"config {path}: over {MAX_CONFIG_BYTES // 1024} KiB; a netplug "
                          f"config is a few tables of settings: check the file")
    import tomllib  # only where there is a config file to read, and no cache of it

    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise PolicyError(f"config {path}: invalid TOML: {e}") from None
    except RecursionError:  # tomllib recurses per level of nested arrays/inline tables
        raise PolicyError(f"config {path}: invalid TOML: arrays or tables nested too deeply; "
                          f"a netplug config is [bridge.NAME] and [direct.DEV] tables of "
                          f"settings") from None
    config = config_from_dict(data, path)  # raises for an invalid config: never cached
    if cache is not None:
        _cache_config(cache, path, key, data)
    return config


CONFIG_CACHE = "config"  # cache/config.json in the state dir
CONFIG_CACHE_FORMAT = 1
# A file changed this recently may change again within the granularity of its timestamps
# (a clock tick; 1 s on ext4 with small inodes, 2 s on FAT) and keep its size: not cached yet.
CACHE_SETTLE_NS = 2_000_000_000


def _cached_config(cache: ConfigCache, path: str, key: list[int]) -> Config | None:
    doc = cache.read_cache(CONFIG_CACHE)
    if not isinstance(doc, dict) or doc.get("format") != CONFIG_CACHE_FORMAT or \
            doc.get("path") != path or doc.get("key") != key or \
            not isinstance(doc.get("data"), dict):
        return None
    try:
        return config_from_dict(doc["data"], path)
    except PolicyError:
        return None  # not what a valid config parses to: parse the file instead


def _cache_config(cache: ConfigCache, path: str, key: list[int], data: dict) -> None:
    import time

    if time.time_ns() - max(key[3], key[4]) < CACHE_SETTLE_NS:
        return
    cache.write_cache(CONFIG_CACHE, {"format": CONFIG_CACHE_FORMAT, "path": path, "key": key,
                                     "data": data})


def config_from_dict(data: Mapping[str, Any], path: str) -> Config:
    bridges: dict[str, Policy] = {}
    direct: dict[str, Policy] = {}
    strict = False
    for key, value in data.items():
        if key == "strict":
            strict = _parse_bool(value, f"config {path}", "strict")
        elif key in ("bridge", "direct"):
            if not isinstance(value, dict):
                raise PolicyError(f"config {path}: [{key}] must be a table of tables, e.g. "
                                  f"[{key}.br0]")
            target = bridges if key == "bridge" else direct
            for name, table in value.items():
                where = f"config {path} [{key}.{name}]"
                if not _ifname_ok(name):
                    raise PolicyError(f"{where}: {name!r} is not a valid Linux interface name "
                                      f"(1-15 bytes, no '/', ':' or whitespace)")
                if not isinstance(table, dict):
                    raise PolicyError(f"{where}: must be a table of settings")
                target[name] = policy_from_mapping(table, where)
        else:
            raise PolicyError(f"config {path}: unknown setting or section {key!r}; known: "
                              f"strict, [bridge.NAME], [direct.DEV]")
    return Config(path=path, bridges=bridges, direct=direct, strict=strict)


__all__ = ["NS", "Policy", "Config", "load_config", "policy_from_mapping",
           "policy_from_element", "RX_TOKENS"]
