"""The last result of each hook run, kept in the state dir for ``netplug status`` and doctor.

Hook side and operator side: written and read through StateDir (its trust checks), imported
by the hook only at the end of a run it handled.

Layout (under the state dir, e.g. /run/libvirt-netplug)::

    hooks/qemu/DOMAIN.json       the last qemu hook run the hook handled for that domain
    hooks/network/NETWORK.json   the last network hook run for that network

(names quoted as the state dir quotes them: state.quote(name) + ".json").
One document per file, written atomically (temporary file + rename) WITHOUT the state lock:
there is no read-modify-write, the last run wins. Writing is best effort: a failure to write
never changes the hook's outcome (and is not even logged: the hook's own log says what
happened). Fields::

    {"format": 1,
     "object": "qemu" | "network",
     "name": "vm1",                   # domain or network (argv[1], or the XML's name)
     "operation": "start",            # argv[2]
     "subop": "begin",                # argv[3]
     "at": 1764512345.123,            # time.time() when the run ended
     "ok": true,                      # no error was logged
     "errors": 0,                     # how many errors were logged
     "error": null | "first error message, one line",
     "exit_status": 0,                # what the hook returned to libvirtd
     "pid": 12345}

Ignored operations (prepare, migrate, restore, attach...) write nothing: they cost no more
than starting Python.
"""

from __future__ import annotations

import os
import time

from .errors import StateError
from .state import StateDir, unquote
from .values import frozen

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~2 ms a hook)
if TYPE_CHECKING:
    from typing import Any

FORMAT = 1
KINDS = ("qemu", "network")


@frozen
class HookResult:
    object: str
    name: str
    operation: str
    subop: str
    at: float
    ok: bool
    errors: int = 0
    error: str | None = None
    exit_status: int = 0
    pid: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "object": self.object, "name": self.name,
                "operation": self.operation, "subop": self.subop, "at": self.at,
                "ok": self.ok, "errors": self.errors, "error": self.error,
                "exit_status": self.exit_status, "pid": self.pid}

    def outcome(self) -> str:
        """"ok" / "1 error: error text" (a table cell)."""
        if self.ok:
            return "ok"
        return (f"{self.errors} error{'s' * (self.errors != 1)}: "
                f"{self.error or '(see the log)'}")

    def summary(self) -> str:
        """"start ok" / "started 1 error: error text" (a line)."""
        return f"{self.operation} {self.outcome()}"


def record(state_dir: str, kind: str, name: str, operation: str, subop: str, *,
           errors: int = 0, error: str | None = None, exit_status: int = 0,
           now: float | None = None) -> None:
    """Write the result of one hook run (best effort: never raises)."""
    if kind not in KINDS or not name:
        return
    if error is not None:
        error = " ".join(str(error).split())[:500]
    result = HookResult(kind, name, operation, subop, time.time() if now is None else now,
                        errors == 0, errors, error, exit_status, os.getpid())
    # Through StateDir: the same trust checks (a dir that is ours, no symlink followed, an
    # exclusive temporary file) as every other file netplug writes there.
    try:
        StateDir(state_dir).put_file(f"hooks/{kind}", name, result.to_json())
    except (StateError, OSError):
        pass


def read(state_dir: str, kind: str, name: str) -> HookResult | None:
    """The last result for one domain or network; None when none (or unreadable)."""
    try:
        doc = StateDir(state_dir).get_file(f"hooks/{kind}", name)
    except (StateError, OSError):
        return None
    return _from_json(doc, kind, name)


def read_all(state_dir: str, kind: str) -> dict[str, HookResult]:
    """Every recorded result of one kind, by name; unreadable files are skipped."""
    d = os.path.join(state_dir, "hooks", kind)
    try:
        files = os.listdir(d)
    except OSError:
        return {}
    out = {}
    for f in sorted(files):
        if not f.endswith(".json"):
            continue  # a writer's temporary file
        name = unquote(f[:-5])
        result = read(state_dir, kind, name)
        if result is not None:
            out[name] = result
    return out


def _from_json(doc: Any, kind: str, name: str) -> HookResult | None:
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        return None
    try:
        at = float(doc["at"])
        errors = int(doc.get("errors") or 0)
        exit_status = int(doc.get("exit_status") or 0)
    except (KeyError, TypeError, ValueError):
        return None
    error = doc.get("error")
    pid = doc.get("pid")
    return HookResult(kind, name, str(doc.get("operation") or "?"), str(doc.get("subop") or "-"),
                      at, bool(doc.get("ok")) and errors == 0, errors,
                      error if isinstance(error, str) else None, exit_status,
                      pid if isinstance(pid, int) else None)
