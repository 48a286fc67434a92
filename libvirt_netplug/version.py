"""The installed distribution's version (the Debian package and pip both record it)."""

from __future__ import annotations

_cached: str | None = None


def version() -> str:
    """Read once per process: importlib.metadata costs ~15 ms, so only what shows the version
    (``--version``, the build_info metric) asks for it."""
    global _cached
    if _cached is None:
        from importlib import metadata

        try:
            _cached = metadata.version("libvirt-netplug")
        except metadata.PackageNotFoundError:
            _cached = "unknown"
    return _cached
