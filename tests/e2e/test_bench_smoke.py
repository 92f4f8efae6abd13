"""E2E: every benchmark scenario runs in --quick mode and measures every target.

Runs ``python -m bench <scenario> --quick --out DIR`` as a subprocess, like a user or CI
would, and checks the JSON it writes: a ``targets`` dict whose every value is measured
(not null). Speed is not asserted -- CI machines are shared and noisy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_binary

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = [
    "overload",
    "overhead",
    "bigbody",
    "queue",
    "replicas",
    "jobs",
    "checkpoints",
    "tenants",
    "autoscale",
]

pytestmark = pytest.mark.slow


def _run(args: list[str], *, timeout_s: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("BENCH_SIM_CMD", None)
    return subprocess.run(
        [sys.executable, "-m", "bench", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


@pytest.mark.timeout(150)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_quick_scenario_measures_every_target(scenario: str, tmp_path: Path) -> None:
    require_binary("haproxy", install="apt-get install haproxy nginx")
    require_binary("nginx", install="apt-get install haproxy nginx")
    out = tmp_path / "out"
    proc = _run([scenario, "--quick", "--out", str(out)], timeout_s=140)
    report = out / f"{scenario}.json"
    assert report.exists(), f"no {report.name}; stderr:\n{proc.stderr[-3000:]}"
    result = json.loads(report.read_text())
    targets = result.get("targets")
    assert targets, f"{scenario}: no targets in the JSON"
    missing = {name: t for name, t in targets.items() if t.get("value") is None}
    assert not missing, (
        f"{scenario}: targets not measured {missing}; stderr:\n{proc.stderr[-3000:]}"
    )
    broken = {
        name: row.get("error") or row.get("skipped")
        for name, row in (result.get("systems") or {}).items()
        if isinstance(row, dict) and (row.get("error") or row.get("skipped"))
    }
    assert not broken, f"{scenario}: systems not measured: {broken}"
    for name, t in targets.items():
        assert isinstance(t.get("met"), bool), f"{scenario}.{name}: 'met' is not a bool"
        assert t.get("target"), f"{scenario}.{name}: no target text"
    assert proc.returncode == 0, proc.stderr[-3000:]
    for plot in result.get("plots", []):
        assert (out / plot).stat().st_size > 0


def test_unknown_scenario_is_a_usage_error() -> None:
    proc = _run(["no-such-scenario"], timeout_s=60)
    assert proc.returncode == 2
    assert "invalid choice" in proc.stderr
