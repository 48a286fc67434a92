"""The tier as a whole: which inner tests exist, one VM run of all of them, their results.

Host side only. Used by test_tier.py (the outer pytest tests) and the command line.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from . import vm

INNER = vm.INNER_TESTS


@dataclasses.dataclass(frozen=True)
class InnerResult:
    nodeid: str
    outcome: str        # passed | failed | error | skipped
    seconds: float
    message: str = ""   # the one-line reason (failure message, skip reason)
    text: str = ""      # the full report (traceback, captured output)


@dataclasses.dataclass
class TierRun:
    vm: vm.Result
    collected: list[str]
    results: dict[str, InnerResult]

    def problem(self) -> str | None:
        """Why the run as a whole is not trustworthy (VM or pytest trouble), or None."""
        r = self.vm
        if r.timed_out:
            return f"the VM did not finish within its time limit ({r.seconds:.0f} s)"
        if r.rc is None:
            return "the VM stopped before the job finished (no exit status came back)"
        if r.rc not in (0, 1):
            return f"pytest in the VM exited {r.rc} (0 or 1 expected)"
        missing = [n for n in self.collected if n not in self.results]
        if missing:
            return f"{len(missing)} inner tests have no result, e.g. {missing[0]}"
        return None


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "NETPLUG_IN_VLANKERNEL_VM": "1", **extra}


def collect() -> list[str]:
    """Node ids of the inner tests, as pytest itself collects them (on the host: collecting only
    imports). As a side effect pytest leaves the assertion-rewritten bytecode of the test
    modules on the host, which the guest (read-only root) then reuses instead of rewriting."""
    p = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                        "-p", "no:cacheprovider", INNER], cwd=vm.REPO, env=_env(),
                       capture_output=True, text=True, timeout=300)
    ids = [ln.strip() for ln in p.stdout.splitlines() if "::" in ln]  # the rest: a summary
    if p.returncode != 0 or not ids:
        raise RuntimeError(f"collecting {INNER} failed (exit {p.returncode}):\n"
                           f"{p.stdout[-3000:]}{p.stderr[-3000:]}")
    return ids


def junit_key(nodeid: str) -> tuple[str, str]:
    """(classname, name) that pytest's junit xml gives the test ``nodeid``."""
    path, *names = nodeid.split("::")
    return ".".join([path.removesuffix(".py").replace("/", "."), *names[:-1]]), names[-1]


def parse_junit(path: Path, collected: list[str]) -> dict[str, InnerResult]:
    by_key = {junit_key(n): n for n in collected}
    out: dict[str, InnerResult] = {}
    try:
        root = ET.parse(path).getroot()
    except (FileNotFoundError, ET.ParseError):
        return out
    for case in root.iter("testcase"):
        key = (case.get("classname", ""), case.get("name", ""))
        nodeid = by_key.get(key, "::".join(key))
        seconds = float(case.get("time") or 0)
        outcome, message, text = "passed", "", ""
        for kind in ("failure", "error", "skipped"):
            el = case.find(kind)
            if el is not None:
                outcome = {"failure": "failed"}.get(kind, kind)
                message = el.get("message", "")
                text = el.text or ""
                break
        extra = [f"--- captured {tag[7:]} ---\n{el.text}" for tag in ("system-out", "system-err")
                 for el in case.findall(tag) if el.text and outcome != "passed"]
        prev = out.get(nodeid)
        if prev is not None and prev.outcome != "passed":
            outcome, message, text = prev.outcome, prev.message, prev.text  # call + teardown
        out[nodeid] = InnerResult(nodeid, outcome, seconds + (prev.seconds if prev else 0),
                                  message, "\n".join([text, *extra]).strip())
    return out


def run(pytest_args: list[str] | None = None, *, collected: list[str] | None = None,
        timeout: float | None = None) -> TierRun:
    """Boot the VM once and run the inner tests in it (``pytest_args`` select among them)."""
    collected = collected if collected is not None else collect()
    timeout = timeout or float(os.environ.get("NETPLUG_VLANKERNEL_TIMEOUT", "1200"))
    env = {"NETPLUG_REQUIRE_ALL": os.environ.get("NETPLUG_REQUIRE_ALL", "0")}
    args = ["-q", "-rfEs", "--color=no", "-o", "junit_family=xunit2", *(pytest_args or [INNER])]
    result = vm.run_pytest(args, timeout=timeout, env=env)
    return TierRun(result, collected, parse_junit(result.run_dir / "junit.xml", collected))
