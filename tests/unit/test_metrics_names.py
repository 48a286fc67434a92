"""Metric names, documentation and the agent's first write.

Proves: every family netplug writes (reconcile's file and the agent's) is documented in
docs/metrics.md and every documented one is written; names follow Prometheus' conventions
(prefix, snake case, `_total` only on counters, no family name shared by a gauge and a
counter, `_seconds` for times, `_info` of value 1); netplug_build_info names the version; an
agent that just connected counts no run and no failed run; an invalid config shows as
netplug_config_valid 0 in reconcile's file.
"""

from __future__ import annotations

import re

import pytest

from conftest import REPO
from libvirt_netplug import cli
from libvirt_netplug.agent import AgentMetrics, WorkQueue
from libvirt_netplug.metrics import write_metrics
from libvirt_netplug.state import StateDir
from tests.unit.test_metrics import report

parser = pytest.importorskip("prometheus_client.parser")

DOC = (REPO / "docs" / "metrics.md").read_text()


def families(path) -> dict[str, str]:
    """family name -> type, as Prometheus' parser reads the file."""
    return {f.name: f.type for f in parser.text_string_to_metric_families(path.read_text())}


def sample_names(path) -> set[str]:
    return {s.name for f in parser.text_string_to_metric_families(path.read_text())
            for s in f.samples}


@pytest.fixture
def written(tmp_path, world_agent_file):
    rec = tmp_path / "reconcile.prom"
    write_metrics(str(rec), report(), source="reconcile", state=StateDir(str(tmp_path / "s")),
                  duration=0.1)
    return rec, world_agent_file


@pytest.fixture
def world_agent_file(tmp_path):
    path = tmp_path / "agent.prom"
    m = AgentMetrics(str(path), WorkQueue())
    m.connected, m.connects = True, 1
    m.queue.mark("vm1", "rx-filter net0")
    m.update(report(), full=True)
    m.write(force=True)
    return path


def test_every_metric_is_documented_and_every_documented_one_written(written):
    rec, agent = written
    names = set(families(rec)) | set(families(agent))
    documented = set(re.findall(r"^\| `(netplug_[a-z0-9_]+)`", DOC, re.M))
    # Counters are families without _total in the parser; the doc names their samples.
    as_written = {n + "_total" if t == "counter" else n
                  for f in (rec, agent) for n, t in families(f).items()}
    assert as_written == documented, (as_written ^ documented)
    assert names


def test_names_follow_prometheus_conventions(written):
    for path in written:
        fams = families(path)
        text = path.read_text()
        for name, kind in fams.items():
            assert re.fullmatch(r"netplug_[a-z][a-z0-9_]*[a-z0-9]", name), name
            assert kind in ("gauge", "counter"), (name, kind)
            if kind == "gauge":
                assert not name.endswith("_total"), name
            if "timestamp" in name or "duration" in name:
                assert name.endswith("_seconds"), name
        # One TYPE line per family: no gauge and counter under one name.
        types = re.findall(r"^# TYPE (\S+) ", text, re.M)
        assert len(types) == len(set(types)), types
        for s in sample_names(path):
            if s.endswith("_total"):
                assert fams.get(s[:-len("_total")]) == "counter", s
        labels = {k for f in parser.text_string_to_metric_families(text)
                  for s in f.samples for k in s.labels}
        assert all(re.fullmatch(r"[a-z][a-z0-9_]*", k) for k in labels), labels


def test_build_info(written):
    rec, _ = written
    [s] = [s for f in parser.text_string_to_metric_families(rec.read_text())
           for s in f.samples if s.name == "netplug_build_info"]
    assert s.value == 1 and s.labels["version"] == cli.version() != "unknown"
    assert re.fullmatch(r"3\.\d+\.\d+", s.labels["python"])


def test_a_clean_agent_start_counts_no_failed_run(tmp_path):
    """Seen: netplug_failed_runs_total 1 after one clean start (alerts on every restart)."""
    path = tmp_path / "agent.prom"
    m = AgentMetrics(str(path), WorkQueue())
    m.connected, m.connects = True, 1
    m.write(force=True)  # what the agent writes as it connects, before its first sync
    values = {s.name: s.value for f in parser.text_string_to_metric_families(path.read_text())
              for s in f.samples}
    assert values["netplug_failed_runs_total"] == 0 and values["netplug_runs_total"] == 0
    assert "netplug_last_run_success" not in values
    assert "netplug_last_success_timestamp_seconds" not in values
    assert values["netplug_agent_connected"] == 1
    m.update(report(), full=True)  # the first full resync, without errors
    m.write(force=True)
    m.connected = False
    m.write(force=True)  # stopping: the same run again
    values = {s.name: s.value for f in parser.text_string_to_metric_families(path.read_text())
              for s in f.samples}
    assert (values["netplug_runs_total"], values["netplug_failed_runs_total"]) == (1, 0)
    assert values["netplug_last_run_success"] == 1


def test_invalid_config_shows_in_reconciles_metrics(tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text('[bridge.br0]\npromiscLinks = "maybe"\n')
    node = tmp_path / "node.xml"
    node.write_text("<node/>")
    prom = tmp_path / "r.prom"
    rc = cli.main(["reconcile", "--connect", f"test://{node}", "--config", str(config),
                   "--state-dir", str(tmp_path / "s"), "--metrics-file", str(prom)])
    err = capsys.readouterr().err
    assert rc == 1 and "reconcile does not run with an invalid config" in err
    values = {s.name: s.value for f in parser.text_string_to_metric_families(prom.read_text())
              for s in f.samples}
    assert values["netplug_config_valid"] == 0 and values["netplug_failed_runs_total"] == 1
