"""The state directory: what netplug knows between hook runs, and what it added.

Layout (default /run/libvirt-netplug, env NETPLUG_STATE_DIR):
  lock                  flock(2) lock shared by hooks, the agent and reconcile
  networks/NAME.json    a network's bridge and policy, recorded by the network hook
  domains/NAME.json     per domain: the FDB entries and port flags netplug set, per tap, and
                        the RX-filter state it programmed on macvtaps
  once/KEY              markers for "log this once" messages

Every write is atomic (temp file + rename) and every read-modify-write happens under the
lock, so hooks for different domains on one bridge running at once never lose each other's
records.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import tempfile
import time
import urllib.parse
from typing import Any, Iterator

from .errors import StateError

DEFAULT_STATE_DIR = "/run/libvirt-netplug"
LOCK_TIMEOUT = 10.0


def state_dir_path(explicit: str | None = None) -> str:
    return explicit or os.environ.get("NETPLUG_STATE_DIR") or DEFAULT_STATE_DIR


def _fname(name: str) -> str:
    return urllib.parse.quote(name, safe="") + ".json"


class StateDir:
    def __init__(self, path: str | None = None):
        self.path = state_dir_path(path)

    # -- locking ---------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
        """Exclusive lock; bounded wait so a stuck holder can never hang libvirtd."""
        self._ensure(self.path)
        lock_path = os.path.join(self.path, "lock")
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise StateError(f"state dir {self.path}: cannot open lock file: {e.strerror}") \
                from None
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise StateError(f"state dir {self.path}: lock held by another netplug "
                                         f"process for over {timeout:.0f} s") from None
                    time.sleep(0.005)
            yield
        finally:
            os.close(fd)

    # -- files -------------------------------------------------------------------------

    def _ensure(self, path: str) -> None:
        try:
            os.makedirs(path, mode=0o755, exist_ok=True)
        except OSError as e:
            raise StateError(f"state dir {path}: cannot create: {e.strerror}") from None

    def _read(self, sub: str, name: str) -> dict[str, Any] | None:
        path = os.path.join(self.path, sub, _fname(name))
        try:
            with open(path, "rb") as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise StateError(f"state file {path}: unreadable ({e}); delete it and run "
                             f"'netplug reconcile'") from None

    def _write(self, sub: str, name: str, data: dict[str, Any]) -> None:
        d = os.path.join(self.path, sub)
        self._ensure(d)
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, os.path.join(d, _fname(name)))
        except OSError as e:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            raise StateError(f"state dir {d}: cannot write {name}: {e.strerror}") from None

    def _delete(self, sub: str, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.path, sub, _fname(name)))

    def _names(self, sub: str) -> list[str]:
        try:
            files = os.listdir(os.path.join(self.path, sub))
        except FileNotFoundError:
            return []
        # Temp files (".tmp-XXXX") have no .json suffix; a domain may be called ".tmp-x".
        return sorted(urllib.parse.unquote(f[:-5]) for f in files if f.endswith(".json"))

    # -- networks ----------------------------------------------------------------------

    def network(self, name: str) -> dict[str, Any] | None:
        return self._read("networks", name)

    def networks(self) -> dict[str, dict[str, Any]]:
        return {n: rec for n in self._names("networks") if (rec := self._read("networks", n))}

    def put_network(self, name: str, record: dict[str, Any]) -> None:
        self._write("networks", name, record)

    def delete_network(self, name: str) -> None:
        self._delete("networks", name)

    # -- domains -----------------------------------------------------------------------

    def domain(self, name: str) -> dict[str, Any]:
        return self._read("domains", name) or {"domain": name, "ports": {}, "rx": {}}

    def domain_mtime(self, name: str) -> float | None:
        """When the record of ``name`` was last written (None: there is none)."""
        try:
            return os.stat(os.path.join(self.path, "domains", _fname(name))).st_mtime
        except OSError:
            return None

    def domain_changed_since(self, name: str, when: float | None) -> bool:
        """Whether the record of ``name`` was written after ``when`` (a time.time())."""
        mtime = self.domain_mtime(name) if when is not None else None
        return mtime is not None and mtime > when

    def domains(self) -> dict[str, dict[str, Any]]:
        return {n: rec for n in self._names("domains") if (rec := self._read("domains", n))}

    def put_domain(self, name: str, record: dict[str, Any]) -> None:
        if not record.get("ports") and not record.get("rx"):
            self._delete("domains", name)
        else:
            self._write("domains", name, record)

    # -- once markers ------------------------------------------------------------------

    def first_time(self, key: str) -> bool:
        """True the first time ``key`` is seen (until the state dir is cleared)."""
        d = os.path.join(self.path, "once")
        self._ensure(d)
        try:
            os.close(os.open(os.path.join(d, urllib.parse.quote(key, safe="")),
                             os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            return True
        except FileExistsError:
            return False
        except OSError as e:
            if e.errno == errno.EROFS:
                return True
            raise StateError(f"state dir {d}: {e.strerror}") from None

    def forget(self, prefix: str) -> None:
        d = os.path.join(self.path, "once")
        q = urllib.parse.quote(prefix, safe="")
        with contextlib.suppress(FileNotFoundError):
            for f in os.listdir(d):
                if f.startswith(q):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(d, f))
