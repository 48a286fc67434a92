"""The state directory: what netplug knows between hook runs, and what it added.

Layout (default /run/libvirt-netplug, env NETPLUG_STATE_DIR):
  lock                  flock(2) lock shared by hooks, the agent and reconcile
  networks/NAME.json    a network's bridge and policy, recorded by the network hook
  domains/NAME.json     per domain: the FDB entries and port flags netplug set, per tap, and
                        the RX-filter state it programmed on macvtaps
  ports/TAP.json        which domain's record holds a tap (an index: a hook checks one file,
                        not every domain's record, before it touches a port)
  once/KEY              markers for "log this once" messages
  cache/config.json     the config file as last parsed, keyed by its inode and timestamps
                        (policy.load_config: a hook parses TOML only when the file changed)

Every write is atomic (temp file + rename) and every read-modify-write happens under the
lock, so hooks for different domains on one bridge running at once never lose each other's
records.

Trust: whoever can write here decides what netplug deletes and which ports it leaves alone,
so the directory must be ours (owned by the user netplug runs as, root on a host, and not
writable by anyone else), and nothing in it is followed through a symlink. A record that is
unreadable or of the wrong shape is reported for its own domain only (``record_errors``):
it never stops netplug from serving the others.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
import time

from .errors import StateError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~2 ms a hook)
if TYPE_CHECKING:
    from typing import Any

DEFAULT_STATE_DIR = "/run/libvirt-netplug"
LOCK_TIMEOUT = 10.0
MAX_RECORD_BYTES = 4 * 1024 * 1024  # far above any real record (a 64-NIC domain is ~40 KB)
RECORD_VERSION = 2


def state_dir_path(explicit: str | None = None) -> str:
    return explicit or os.environ.get("NETPLUG_STATE_DIR") or DEFAULT_STATE_DIR


# File names are names percent-encoded as urllib.parse.quote(name, safe="") would (RFC 3986
# unreserved characters kept), so any domain name — "a/b", "..", unicode — stays one file in
# its directory. Our own few lines: urllib.parse costs every hook 2 ms to import.
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-~")


def quote(name: str) -> str:
    return "".join(chr(b) if b in _UNRESERVED else f"%{b:02X}"
                   for b in name.encode("utf-8", "surrogateescape"))


def unquote(text: str) -> str:
    out = bytearray()
    i = 0
    while i < len(text):
        if text[i] == "%" and _is_hex(text[i + 1:i + 3]):
            out.append(int(text[i + 1:i + 3], 16))
            i += 3
        else:
            out += text[i].encode("utf-8", "surrogateescape")
            i += 1
    return out.decode("utf-8", "surrogateescape")


def _is_hex(s: str) -> bool:
    return len(s) == 2 and all(c in "0123456789abcdefABCDEF" for c in s)


def _fname(name: str) -> str:
    return quote(name) + ".json"


def copy_record(value: Any) -> Any:
    """A deep copy of a record: what copy.deepcopy gives for JSON's dicts, lists and scalars
    (anything else goes to copy.deepcopy). The copy module costs every hook ~0.7 ms."""
    kind = type(value)
    if kind is dict:
        return {k: copy_record(v) for k, v in value.items()}
    if kind is list:
        return [copy_record(v) for v in value]
    if kind in _IMMUTABLE or value is None:
        return value
    if kind is tuple:
        return tuple(copy_record(v) for v in value)
    import copy

    return copy.deepcopy(value)


_IMMUTABLE = frozenset((str, int, float, bool))


# -- record shapes ----------------------------------------------------------------------------


_MAC_CHARS = frozenset("0123456789abcdef:")


def _is_mac(v: Any) -> bool:
    # Five colons, each where it belongs, and nothing but lower-case hex around them: set
    # operations in C (reconcile checks every record of the host on each run).
    return (isinstance(v, str) and len(v) == 17 and v.count(":") == 5 and
            v[2] == v[5] == v[8] == v[11] == v[14] == ":" and _MAC_CHARS.issuperset(v))


def _is_vid(v: Any) -> bool:
    return v is None or (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 4094)


def _is_name(v: Any) -> bool:
    if not isinstance(v, str) or "/" in v:
        return False
    try:
        size = len(v.encode())
    except UnicodeEncodeError:  # a lone surrogate, which JSON's "\ud800" can carry
        return False
    return 0 < size < 16


def port_record_problem(tap: Any, rec: Any) -> str | None:
    """Why a port record cannot be trusted, or None. Cleanup deletes the entries and restores
    the flags a record names, so every field it acts on is checked."""
    if not _is_name(tap):
        return f"port {tap!r}: not an interface name"
    if not isinstance(rec, dict):
        return f"port {tap}: not an object"
    if not _is_mac(rec.get("mac")):
        return f"port {tap}: invalid mac {rec.get('mac')!r}"
    if not _is_name(rec.get("bridge")):
        return f"port {tap}: invalid bridge {rec.get('bridge')!r}"
    ifindex = rec.get("ifindex")
    if not isinstance(ifindex, int) or isinstance(ifindex, bool) or ifindex <= 0:
        return f"port {tap}: invalid ifindex {ifindex!r}"
    fdb = rec.get("fdb", [])
    if not isinstance(fdb, list) or not all(
            isinstance(e, list) and len(e) == 2 and _is_mac(e[0]) and _is_vid(e[1]) for e in fdb):
        return f"port {tap}: invalid fdb list"
    if not isinstance(rec.get("flags", False), bool):
        return f"port {tap}: invalid flags"
    saved = rec.get("saved")
    if saved is not None and not (isinstance(saved, list) and len(saved) == 2 and
                                  all(isinstance(x, bool) for x in saved)):
        return f"port {tap}: invalid saved flags"
    extra = rec.get("extra", [])
    if not isinstance(extra, list) or not all(_is_mac(m) for m in extra):
        return f"port {tap}: invalid extra MAC list"
    for key in ("domain", "interface", "network"):
        if rec.get(key) is not None and not isinstance(rec.get(key), str):
            return f"port {tap}: invalid {key}"
    if not isinstance(rec.get("policy", {}), dict):
        return f"port {tap}: invalid policy"
    return None


def domain_record_problem(rec: Any) -> str | None:
    if not isinstance(rec, dict):
        return f"a {type(rec).__name__}, not an object"
    ports = rec.get("ports", {})
    if not isinstance(ports, dict):
        return f"'ports' is a {type(ports).__name__}, not an object"
    for tap, prec in ports.items():
        problem = port_record_problem(tap, prec)
        if problem:
            return problem
    rx = rec.get("rx", {})
    if not isinstance(rx, dict) or not all(_is_name(k) and isinstance(v, dict)
                                           for k, v in rx.items()):
        return "'rx' is not an object of macvtap records"
    return None


def _network_record_problem(rec: Any) -> str | None:
    if not isinstance(rec, dict) or not isinstance(rec.get("name"), str):
        return "not a network record"
    if rec.get("bridge") is not None and not _is_name(rec.get("bridge")):
        return f"invalid bridge {rec.get('bridge')!r}"
    if not isinstance(rec.get("policy") or {}, dict):
        return "invalid policy"
    return None


class StateDir:
    def __init__(self, path: str | None = None):
        self.path = state_dir_path(path)
        self._errors: dict[str, str] = {}
        self._domains_listed = False  # record_errors() then has the last listing's
        self._checked: set[str] = set()

    # -- trust -------------------------------------------------------------------------

    def _ensure(self, path: str) -> None:
        """Create ``path`` (ours, 0755) if missing; refuse one that is not ours."""
        if path in self._checked:
            return
        try:
            os.mkdir(path, 0o755)
        except FileExistsError:
            pass
        except FileNotFoundError:
            if path == self.path:
                try:
                    os.makedirs(path, mode=0o755, exist_ok=True)
                except OSError as e:
                    raise StateError(f"state dir {path}: cannot create: {e.strerror}") from None
            else:
                raise StateError(f"state dir {self.path}: vanished") from None
        except OSError as e:
            raise StateError(f"state dir {path}: cannot create: {e.strerror}") from None
        self._check_dir(path)
        self._checked.add(path)

    @staticmethod
    def _check_dir(path: str) -> None:
        try:
            st = os.lstat(path)
        except OSError as e:
            raise StateError(f"state dir {path}: {e.strerror}") from None
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
            raise StateError(f"state dir {path} is not a directory (a symlink?); remove it "
                             f"and let netplug recreate it")
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise StateError(f"state dir {path} is owned by uid {st.st_uid} with mode "
                             f"{stat.S_IMODE(st.st_mode):04o}; it must belong to uid "
                             f"{os.geteuid()} and not be writable by others (chown/chmod it, "
                             f"or remove it and let netplug recreate it)")

    def _open_trusted(self, path: str, flags: int, mode: int = 0o600) -> int:
        """Open without following a symlink, and only a regular file that is ours and that
        nobody else can write."""
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise StateError(f"{path} is not a regular file")
            if st.st_uid != os.geteuid() or st.st_mode & 0o022:
                raise StateError(f"{path} is owned by uid {st.st_uid} with mode "
                                 f"{stat.S_IMODE(st.st_mode):04o}; not trusted (remove it)")
        except BaseException:
            os.close(fd)
            raise
        return fd

    # -- locking ---------------------------------------------------------------------

    def lock(self, timeout: float = LOCK_TIMEOUT) -> _Lock:
        """Exclusive lock (``with state.lock(): …``); bounded wait so a stuck holder can
        never hang libvirtd."""
        return _Lock(self, timeout)

    def _acquire(self, timeout: float) -> int:
        self._ensure(self.path)
        lock_path = os.path.join(self.path, "lock")
        try:
            fd = self._open_trusted(lock_path, os.O_RDWR | os.O_CREAT)
        except OSError as e:
            why = ("it is a symlink" if e.errno == errno.ELOOP else e.strerror)
            raise StateError(f"state dir {self.path}: cannot open lock file: {why}") from None
        except StateError as e:
            raise StateError(f"state dir {self.path}: lock file refused: {e}") from None
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return fd
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise StateError(f"state dir {self.path}: lock held by another netplug "
                                         f"process for over {timeout:.0f} s") from None
                    time.sleep(0.005)
        except BaseException:
            os.close(fd)
            raise

    # -- files -------------------------------------------------------------------------

    def _load(self, path: str) -> Any:
        """A JSON file, or None if absent; StateError if it cannot be trusted or read."""
        try:
            fd = self._open_trusted(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        except OSError as e:
            why = "it is a symlink" if e.errno == errno.ELOOP else e.strerror
            raise StateError(f"state file {path}: unreadable ({why}); delete it and run "
                             f"'netplug reconcile'") from None
        except StateError as e:
            raise StateError(f"state file {e}; delete it and run 'netplug reconcile'") from None
        try:
            # Read what fstat says is there (plus one byte, to see a file that grew past the
            # cap): a buffered read of MAX_RECORD_BYTES would allocate that much per record.
            size = os.fstat(fd).st_size
            chunks, got = [], 0
            while got <= min(size, MAX_RECORD_BYTES):
                chunk = os.read(fd, min(size, MAX_RECORD_BYTES) + 1 - got)
                if not chunk:
                    break
                chunks.append(chunk)
                got += len(chunk)
            data = b"".join(chunks)
        except OSError as e:
            raise StateError(f"state file {path}: unreadable ({e.strerror})") from None
        finally:
            os.close(fd)
        if len(data) > MAX_RECORD_BYTES:
            raise StateError(f"state file {path}: over {MAX_RECORD_BYTES} bytes; delete it "
                             f"and run 'netplug reconcile'")
        try:
            return json.loads(data)
        except (ValueError, RecursionError) as e:
            raise StateError(f"state file {path}: unreadable ({str(e)[:100]}); delete it and "
                             f"run 'netplug reconcile'") from None

    def _trusted_dir(self, sub: str) -> bool:
        """Whether records may be read from ``sub``: False if it does not exist; StateError if
        the state dir or ``sub`` is not ours (whoever can write there decides what netplug
        deletes)."""
        for path in (self.path, os.path.join(self.path, sub)):
            if path in self._checked:
                continue
            try:
                os.lstat(path)
            except FileNotFoundError:
                return False
            except NotADirectoryError:
                raise StateError(f"state dir {self.path} is not a directory; remove it and "
                                 f"let netplug recreate it") from None
            self._check_dir(path)
            self._checked.add(path)
        return True

    def _read(self, sub: str, name: str) -> dict[str, Any] | None:
        if not self._trusted_dir(sub):
            return None
        path = os.path.join(self.path, sub, _fname(name))
        rec = self._load(path)
        if rec is None:
            return None
        check = domain_record_problem if sub == "domains" else (
            _network_record_problem if sub == "networks" else None)
        problem = check(rec) if check else None
        if problem:
            raise StateError(f"state file {path}: wrong shape ({problem}); delete it and run "
                             f"'netplug reconcile'")
        return rec

    def put_file(self, sub: str, name: str, data: dict[str, Any]) -> None:
        """Write another JSON document (e.g. hooks/qemu/NAME, hookresult.py) with the same
        guarantees as the records: ours, atomic, never through a symlink."""
        self._write(sub, name, data)

    def get_file(self, sub: str, name: str) -> Any:
        """Read back a document ``put_file`` wrote, with the records' checks (None: absent)."""
        return self._load(os.path.join(self.path, sub, _fname(name)))

    # -- caches ------------------------------------------------------------------------

    def read_cache(self, name: str) -> Any:
        """A document of cache/, or None: absent, unreadable or not trusted (whoever can
        write it would decide for netplug), all meaning "recompute"."""
        try:
            if not self._trusted_dir("cache"):
                return None
            return self._load(os.path.join(self.path, "cache", _fname(name)))
        except StateError:
            return None

    def write_cache(self, name: str, doc: dict[str, Any]) -> None:
        """Write a document of cache/ (atomically, as the records); best effort."""
        try:
            json.dumps(doc)  # what JSON cannot hold is not cached (and leaves no temp file)
            self._write("cache", name, doc, sort_keys=False)
        except (StateError, TypeError, ValueError, RecursionError):
            pass

    def _write(self, sub: str, name: str, data: dict[str, Any], sort_keys: bool = True
               ) -> None:
        self._ensure(self.path)
        d = self.path
        for part in sub.split("/"):
            d = os.path.join(d, part)
            self._ensure(d)
        tmp = None
        try:
            # A fresh name, created exclusively and never through a symlink (what mkstemp
            # does; the tempfile module costs every hook 4 ms to import).
            tmp = os.path.join(d, f".tmp-{os.getpid()}-{os.urandom(6).hex()}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW |
                         os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=sort_keys)
            os.replace(tmp, os.path.join(d, _fname(name)))
        except OSError as e:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
            raise StateError(f"state dir {d}: cannot write {name}: {e.strerror}") from None

    def _delete(self, sub: str, name: str) -> None:
        try:
            os.unlink(os.path.join(self.path, sub, _fname(name)))
        except FileNotFoundError:
            pass
        except OSError as e:
            raise StateError(f"state dir {self.path}: cannot delete {sub}/{name}: "
                             f"{e.strerror}") from None

    def _names(self, sub: str) -> list[str]:
        if not self._trusted_dir(sub):
            return []
        try:
            files = os.listdir(os.path.join(self.path, sub))
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as e:
            raise StateError(f"state dir {self.path}: cannot list {sub}: {e.strerror}") \
                from None
        # Temp files (".tmp-XXXX") have no .json suffix; a domain may be called ".tmp-x".
        return sorted(unquote(f[:-5]) for f in files if f.endswith(".json"))

    def _all(self, sub: str) -> dict[str, dict[str, Any]]:
        """Every readable record of ``sub``; the others are reported by ``record_errors``."""
        out = {}
        for n in self._names(sub):
            try:
                rec = self._read(sub, n)
            except StateError as e:
                self._errors[f"{sub}/{n}"] = str(e)
                continue
            if rec:
                out[n] = rec
        return out

    def record_errors(self) -> dict[str, str]:
        """Domain records that cannot be used: name -> one-line error (``domains()`` leaves
        them out), as of the last listing of every record (made now if there was none)."""
        if not self._domains_listed:
            self.domains()
        return {k.split("/", 1)[1]: v for k, v in self._errors.items()
                if k.startswith("domains/")}

    # -- networks ----------------------------------------------------------------------

    def network(self, name: str) -> dict[str, Any] | None:
        return self._read("networks", name)

    def networks(self) -> dict[str, dict[str, Any]]:
        return self._all("networks")

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
        for k in [k for k in self._errors if k.startswith("domains/")]:
            del self._errors[k]
        self._domains_listed = True
        return self._all("domains")

    def put_domain(self, name: str, record: dict[str, Any],
                   previous: dict[str, Any] | None = None) -> None:
        """Write (or, when it holds nothing, delete) a domain's record, keeping the port
        index in step: taps it gains are claimed before the record names them, taps it lost
        are released after. ``previous``: the record as read (saves reading it again)."""
        if previous is None:
            try:
                previous = self._read("domains", name) or {}
            except StateError:
                previous = {}
        old = set(previous.get("ports") or {})
        new = record.get("ports") or {}
        for tap in sorted(set(new) - old):
            self._write("ports", tap, {"domain": name, "ifindex": new[tap].get("ifindex")})
        if not record.get("ports") and not record.get("rx"):
            self._delete("domains", name)
        else:
            record.setdefault("version", RECORD_VERSION)
            self._write("domains", name, record)
        for tap in sorted(old - set(new)):
            claim = self.port_claim(tap)
            if claim is not None and claim.get("domain") == name:
                self._delete("ports", tap)

    def delete_domain(self, name: str) -> None:
        """Forget a domain whose record cannot be read (after its cleanup was attempted)."""
        self._delete("domains", name)

    # -- the port index ----------------------------------------------------------------

    def port_claim(self, tap: str) -> dict[str, Any] | None:
        """{"domain", "ifindex"} of the record that holds ``tap``, or None."""
        if not self._trusted_dir("ports"):
            return None
        try:
            rec = self._load(os.path.join(self.path, "ports", _fname(tap)))
        except StateError:
            return None
        return rec if isinstance(rec, dict) and isinstance(rec.get("domain"), str) else None

    def port_owner(self, tap: str, ifindex: int, me: str | None = None) -> str | None:
        """The domain whose record holds this very tap (same ifindex), or None. A claim whose
        record no longer names the tap, or names an older tap of that name, is stale. A claim
        by ``me`` (the asking domain) is taken at its word: it is only ever compared with
        ``me``, and reading the record again would cost every hook a parse per tap."""
        claim = self.port_claim(tap)
        if claim is None or claim.get("ifindex") != ifindex:
            return None
        if me is not None and claim["domain"] == me:
            return me
        try:
            rec = self._read("domains", claim["domain"])
        except StateError:
            return claim["domain"]  # an unreadable record still owns what it claims
        port = (rec or {}).get("ports", {}).get(tap)
        if port is None or port.get("ifindex") != ifindex:
            return None
        return claim["domain"]

    # -- once markers ------------------------------------------------------------------

    def first_time(self, key: str) -> bool:
        """True the first time ``key`` is seen (until the state dir is cleared)."""
        d = os.path.join(self.path, "once")
        try:
            self._ensure(self.path)
            self._ensure(d)
            os.close(os.open(os.path.join(d, quote(key)[:200]),
                             os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW, 0o644))
            return True
        except FileExistsError:
            return False
        except StateError:
            return True  # cannot remember: say it again rather than never
        except OSError as e:
            if e.errno in (errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ELOOP):
                return True
            raise StateError(f"state dir {d}: {e.strerror}") from None

    def forget(self, prefix: str) -> None:
        d = os.path.join(self.path, "once")
        q = quote(prefix)
        try:
            files = os.listdir(d)
        except (FileNotFoundError, NotADirectoryError):
            return
        for f in files:
            if f.startswith(q):
                try:
                    os.unlink(os.path.join(d, f))
                except FileNotFoundError:
                    pass


class _Lock:
    """StateDir.lock()'s context manager (a class, not contextlib's decorator: contextlib
    costs every hook ~0.4 ms to import)."""

    def __init__(self, state: StateDir, timeout: float):
        self._state, self._timeout = state, timeout
        self._fd: int | None = None

    def __enter__(self) -> None:
        self._fd = self._state._acquire(self._timeout)

    def __exit__(self, *exc) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
