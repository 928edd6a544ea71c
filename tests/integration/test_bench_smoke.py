"""`python -m bench --quick` keeps working: every scenario yields numbers for every mirror."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = ("cold_pull", "warm_pull", "herd", "manifest_hits", "large_blob", "memory", "wan")
MIRRORS = ("ours", "distribution", "nginx")
QUICK_RUN_SECONDS = 150  # a hang bound, not a speed goal: the machine may be shared


@pytest.mark.integration
@pytest.mark.timeout(QUICK_RUN_SECONDS + 30)
def test_quick_bench_reports_every_scenario_for_every_mirror(tmp_path: Path) -> None:
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--quick",
            "--mirrors",
            ",".join(MIRRORS),
            "--output",
            str(tmp_path),
        ],
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=QUICK_RUN_SECONDS,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-5000:]

    result = json.loads((tmp_path / "latest.json").read_text())
    for scenario in SCENARIOS:
        for mirror in MIRRORS:
            metrics = result["scenarios"][scenario][mirror]
            assert metrics, f"{scenario} has no metrics for {mirror}"
            for name, value in metrics.items():
                assert value["median"] >= 0, f"{scenario}.{mirror}.{name}"
    for scenario in ("cold_pull", "wan"):
        assert result["scenarios"][scenario]["direct"]
    # The bare-aiohttp floor answers the same wrk runs, so hits are reported as a fraction of it.
    assert result["scenarios"]["manifest_hits"]["floor"]["tag_rps"]["median"] > 0
    assert result["goals"]
    assert (tmp_path / "latest.md").read_text().startswith("Run ")
