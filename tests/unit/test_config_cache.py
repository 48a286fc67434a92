"""The parsed config, cached in the state dir (policy.load_config(path, cache=StateDir)): a
hook parses TOML only when the file changed.

Proves: a cached config is the same Config as a parsed one (policies, their sources, table
order, strict); the second load reads no TOML; any change to the file (content, size,
replaced by a new inode, a rewrite of the same size) is parsed again; an invalid config
raises as before and is never cached; a file changed in the last CACHE_SETTLE_NS is not
cached yet (its timestamps may not change again on the next edit); a cache for another
path, of another format, of the wrong shape or that no longer parses is ignored; a state
dir or cache dir that is not trusted (writable by others) is neither read nor written, a
cache file that is not (writable by others, a symlink) is replaced; a state dir that cannot
be created still loads the config; the hook uses the cache.
"""

from __future__ import annotations

import json
import os
import sys
import time
import tomllib as REAL_TOMLLIB  # the toml_parses fixture swaps sys.modules' one
import types

import pytest

from libvirt_netplug.errors import PolicyError
from libvirt_netplug.policy import CACHE_SETTLE_NS, Policy, load_config
from libvirt_netplug.state import StateDir

CONFIG = ('strict = true\n[bridge.br1]\nsticky = "yes"\npromiscLinks = "no"\n'
          '[bridge.br0]\npromiscLinks = "no"\nrxFilters = ["multicast", "allmulti"]\n'
          '[direct.eth0]\nrxFilters = "multicast"\nmaxMulticast = 8\n')


@pytest.fixture
def toml_parses(monkeypatch) -> list[str]:
    """Every tomllib.loads() call (the real one runs)."""
    calls: list[str] = []
    fake = types.ModuleType("tomllib")
    fake.loads = lambda text: (calls.append(text), REAL_TOMLLIB.loads(text))[1]
    fake.TOMLDecodeError = REAL_TOMLLIB.TOMLDecodeError
    monkeypatch.setitem(sys.modules, "tomllib", fake)
    return calls


@pytest.fixture
def later(monkeypatch):
    """The clock the cache compares a file's timestamps with, moved forward past
    CACHE_SETTLE_NS (a file's ctime cannot be set back)."""
    real = time.time_ns
    monkeypatch.setattr(time, "time_ns", lambda: real() + 2 * CACHE_SETTLE_NS)


def write(path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def cache_file(state) -> str:
    return os.path.join(state.path, "cache", "config.json")


def test_a_cached_config_is_the_parsed_one_and_reads_no_toml(tmp_path, toml_parses, later):
    cfg = tmp_path / "config.toml"
    write(cfg, CONFIG)
    state = StateDir(str(tmp_path / "state"))
    first = load_config(str(cfg), cache=state)
    assert len(toml_parses) == 1 and os.path.exists(cache_file(state))
    second = load_config(str(cfg), cache=StateDir(state.path))
    assert len(toml_parses) == 1  # from the cache
    plain = load_config(str(cfg))
    assert first == second == plain
    assert list(second.bridges) == list(plain.bridges) == ["br1", "br0"]
    for name in ("br0", "br1"):
        assert second.bridges[name].sources == plain.bridges[name].sources
    assert second.strict is True and second.path == str(cfg)
    assert second.direct["eth0"] == Policy(rx_filters=frozenset({"multicast"}),
                                           max_multicast=8)


@pytest.mark.parametrize("change", ["content", "size", "new inode", "same size, same mtime"])
def test_any_change_to_the_file_is_parsed_again(tmp_path, toml_parses, later, change):
    cfg = tmp_path / "config.toml"
    write(cfg, CONFIG)
    state = StateDir(str(tmp_path / "state"))
    load_config(str(cfg), cache=state)
    st = os.stat(cfg)
    if change == "content":
        write(cfg, CONFIG.replace('sticky = "yes"', 'sticky = "no" '))
    elif change == "size":
        write(cfg, CONFIG + "\n")
    elif change == "new inode":
        write(tmp_path / "new.toml", CONFIG.replace("br1", "br2"))
        os.replace(tmp_path / "new.toml", cfg)
    else:  # an edit in place within the same mtime tick: ctime still moves
        write(cfg, CONFIG.replace("br1", "br3"))
        os.utime(cfg, ns=(st.st_atime_ns, st.st_mtime_ns))
    got = load_config(str(cfg), cache=state)
    assert len(toml_parses) == 2
    assert got == load_config(str(cfg))


def test_an_invalid_config_raises_as_before_and_is_never_cached(tmp_path, toml_parses, later):
    cfg = tmp_path / "config.toml"
    state = StateDir(str(tmp_path / "state"))
    for text in ('[bridge.br0]\npromiscLinks = "perhaps"\n', "[bridge.br0\n"):
        write(cfg, text)
        with pytest.raises(PolicyError) as cached:
            load_config(str(cfg), cache=state)
        with pytest.raises(PolicyError) as plain:
            load_config(str(cfg))
        assert str(cached.value) == str(plain.value)
        assert not os.path.exists(cache_file(state))


def test_a_file_changed_just_now_is_not_cached_yet(tmp_path, toml_parses):
    cfg = tmp_path / "config.toml"
    write(cfg, CONFIG)
    state = StateDir(str(tmp_path / "state"))
    load_config(str(cfg), cache=state)
    load_config(str(cfg), cache=state)
    assert len(toml_parses) == 2 and not os.path.exists(cache_file(state))


@pytest.mark.parametrize("tamper", ["other path", "other format", "not an object",
                                    "data not a table", "data invalid", "not JSON"])
def test_a_cache_that_does_not_fit_is_ignored(tmp_path, toml_parses, later, tamper):
    cfg = tmp_path / "config.toml"
    write(cfg, CONFIG)
    state = StateDir(str(tmp_path / "state"))
    load_config(str(cfg), cache=state)
    with open(cache_file(state)) as f:
        doc = json.load(f)
    if tamper == "other path":
        doc["path"] = str(tmp_path / "other.toml")
    elif tamper == "other format":
        doc["format"] = 99
    elif tamper == "not an object":
        doc = [doc]
    elif tamper == "data not a table":
        doc["data"] = "strict = true"
    elif tamper == "data invalid":
        doc["data"]["bridge"]["br0"]["promiscLinks"] = "perhaps"
    with open(cache_file(state), "w") as f:
        f.write("{" if tamper == "not JSON" else json.dumps(doc))
    assert load_config(str(cfg), cache=state) == load_config(str(cfg))
    assert len(toml_parses) == 3  # first load, the ignored cache, the plain load


@pytest.mark.parametrize("where", ["state dir", "cache dir", "cache file", "symlink"])
def test_a_cache_that_is_not_trusted_is_not_used(tmp_path, toml_parses, later, where):
    cfg = tmp_path / "config.toml"
    write(cfg, CONFIG)
    state = StateDir(str(tmp_path / "state"))
    load_config(str(cfg), cache=state)
    lie = {"format": 1, "path": str(cfg), "key": None, "data": {"strict": True}}
    with open(cache_file(state)) as f:
        lie["key"] = json.load(f)["key"]
    with open(cache_file(state), "w") as f:
        json.dump(lie, f)  # what a writer of an untrusted dir or file would leave
    if where == "state dir":
        os.chmod(state.path, 0o777)
    elif where == "cache dir":
        os.chmod(os.path.dirname(cache_file(state)), 0o777)
    elif where == "cache file":
        os.chmod(cache_file(state), 0o666)
    else:
        os.rename(cache_file(state), tmp_path / "elsewhere.json")
        os.symlink(tmp_path / "elsewhere.json", cache_file(state))
    before = os.lstat(cache_file(state))
    got = load_config(str(cfg), cache=StateDir(state.path))
    assert got == load_config(str(cfg)) and got.bridges  # not the lie
    assert len(toml_parses) == 3
    after = os.lstat(cache_file(state))
    if where in ("state dir", "cache dir"):  # nothing written where others can write
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    else:  # our dir: the file is replaced by a trusted one (never written through a link)
        assert after.st_ino != before.st_ino and (after.st_mode & 0o777) == 0o600
        with open(tmp_path / "elsewhere.json" if where == "symlink" else cache_file(state)) \
                as f:
            assert json.load(f)["data"] == ({"strict": True} if where == "symlink" else
                                            json.loads(json.dumps(_data(cfg))))


def _data(cfg) -> dict:
    return REAL_TOMLLIB.loads(cfg.read_text())


def test_a_state_dir_that_cannot_be_created_still_loads_the_config(tmp_path, toml_parses,
                                                                   later):
    cfg = tmp_path / "config.toml"
    write(cfg, CONFIG)
    write(tmp_path / "file", "")
    state = StateDir(str(tmp_path / "file" / "state"))  # under a regular file
    assert load_config(str(cfg), cache=state) == load_config(str(cfg))
    assert len(toml_parses) == 2


def test_the_hook_reads_the_config_through_the_cache(run_hook, fake, config_path,
                                                     state_path, toml_parses, later):
    from fakes import bridge_iface, domain_xml

    fake.add_bridge("br0")
    fake.add_tap("vnet0", "br0", guest="52:54:00:00:00:01")
    xml = domain_xml("vm1", [bridge_iface("br0", "vnet0", "52:54:00:00:00:01", "net0")])
    managed = '[bridge.br0]\npromiscLinks = "no"\n'
    assert run_hook("qemu", "vm1", "start", xml, config=managed).rc == 0
    assert run_hook("qemu", "vm1", "reconnect", xml).rc == 0
    assert len(toml_parses) == 1
    assert (state_path / "cache" / "config.json").exists()
    assert fake.links()["vnet0"].learning is False
    # The operator lets br0 go: the next hook parses the new file and undoes netplug's work.
    r = run_hook("qemu", "vm1", "reconnect", xml, config='[bridge.br0]\npromiscLinks = "yes"\n')
    assert r.rc == 0 and len(toml_parses) == 2
    assert fake.links()["vnet0"].learning is True
