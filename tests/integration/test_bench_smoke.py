"""`python -m bench --quick` keeps working: every scenario yields numbers for every mirror."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = ("cold_pull", "warm_pull", "herd", "manifest_hits", "large_blob", "memory", "wan")
MIRRORS = ("ours", "distribution", "nginx")
WAN_SCENARIOS = ("prefetch", "wan_cuts", "wan_parallel")
WAN_MIRRORS = ("ours", "nginx")
QUICK_RUN_SECONDS = 150  # a hang bound, not a speed goal: the machine may be shared


def quick_run(output: Path, *args: str) -> dict[str, Any]:
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", *args, "--output", str(output)],
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=QUICK_RUN_SECONDS,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-5000:]
    result: dict[str, Any] = json.loads((output / "latest.json").read_text())
    return result


@pytest.mark.integration
@pytest.mark.timeout(QUICK_RUN_SECONDS + 30)
def test_quick_bench_reports_every_scenario_for_every_mirror(tmp_path: Path) -> None:
    result = quick_run(tmp_path, "--mirrors", ",".join(MIRRORS))
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
    # What the host took back during the runs, so a disturbed run can be told from a slow mirror.
    steal = result["scenarios"]["herd"]["ours"]["steal_pct"]["median"]
    assert 0 <= steal <= 100
    assert "host steal" in (tmp_path / "latest.md").read_text()
    assert result["goals"]
    assert (tmp_path / "latest.md").read_text().startswith("Run ")


@pytest.mark.integration
@pytest.mark.timeout(QUICK_RUN_SECONDS + 30)
def test_quick_bench_wan_fault_scenarios(tmp_path: Path) -> None:
    result = quick_run(
        tmp_path, "--scenarios", ",".join(WAN_SCENARIOS), "--mirrors", ",".join(WAN_MIRRORS)
    )
    for scenario in WAN_SCENARIOS:
        for mirror in WAN_MIRRORS:
            assert result["scenarios"][scenario][mirror], f"{scenario} has no metrics for {mirror}"
    cuts = result["scenarios"]["wan_cuts"]
    for mirror in WAN_MIRRORS:
        # The fault happened, and every client is accounted for, served or failed.
        assert cuts[mirror]["cuts"]["median"] >= 1
        clients = (
            cuts[mirror]["verified_clients"]["median"] + cuts[mirror]["failed_clients"]["median"]
        )
        assert clients == 6
    for scenario in ("prefetch", "wan_parallel"):
        assert result["scenarios"][scenario]["direct"]["cold_s"]["median"] > 0
    goals = {goal["goal"] for goal in result["goals"]}
    assert any(goal.startswith("WAN cuts") for goal in goals)
    assert any(goal.startswith("per-connection cap") for goal in goals)
    assert any(goal.startswith("prefetch") for goal in goals)
