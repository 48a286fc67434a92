"""Reading the state dir for the read-only commands (status, doctor, metrics).

One corrupt or wrong-shaped domain record must affect only its own domain: it is reported
(``record_errors``: domain name -> one line) and the other records are read as usual. The
state dir does this itself once it has ``StateDir.record_errors()`` (``domains()`` then
returns only the valid records); until then ``reading_state`` wraps it with the same
behaviour, for reading only (a command that writes records uses StateDir as it is).
"""

from __future__ import annotations

from typing import Any

from .errors import StateError
from .state import StateDir


def _shape_error(record: Any) -> str | None:
    if not isinstance(record, dict):
        return f"a {type(record).__name__}, not an object"
    for key in ("ports", "rx"):
        section = record.get(key, {})
        if not isinstance(section, dict):
            return f"'{key}' is a {type(section).__name__}, not an object"
        for dev, r in section.items():
            if not isinstance(r, dict):
                return f"'{key}' entry {dev!r} is a {type(r).__name__}, not an object"
    return None


class _TolerantStateDir(StateDir):
    """StateDir whose domains() skips (and records) records it cannot use."""

    def __init__(self, path: str | None = None):
        super().__init__(path)
        self._errors: dict[str, str] = {}

    def domains(self) -> dict[str, dict[str, Any]]:
        out, self._errors = {}, {}
        for name in self._names("domains"):
            try:
                rec = self._read("domains", name)
            except StateError as e:
                self._errors[name] = str(e)
                continue
            if not rec:
                continue
            why = _shape_error(rec)
            if why:
                self._errors[name] = (f"state record of domain {name} is not what netplug "
                                      f"writes ({why}); delete it and run 'netplug reconcile'")
                continue
            out[name] = rec
        return out

    def record_errors(self) -> dict[str, str]:
        if not self._errors:
            self.domains()
        return dict(self._errors)


def reading_state(path: str | None) -> StateDir:
    """A StateDir for a read-only command: corrupt records are reported, not fatal."""
    if hasattr(StateDir, "record_errors"):
        return StateDir(path)
    return _TolerantStateDir(path)


def record_errors(state: StateDir) -> dict[str, str]:
    """Domain name -> why its record cannot be used (empty when all are fine)."""
    return getattr(state, "record_errors", lambda: {})()
