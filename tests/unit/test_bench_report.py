"""The bench's report: what two workers can add on the machine it ran on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.report import FLOOR, FLOOR_2W, Samples, build, goals, markdown
from bench.report import main as report_main


def hits(
    rps: float, cpu_us: float | None = None, client_us: float | None = None
) -> dict[str, float]:
    row = {"tag_rps": rps, "digest_rps": rps, "tag_p99_ms": 10.0, "digest_p99_ms": 10.0}
    if cpu_us is not None and client_us is not None:
        row |= {"tag_cpu_us": cpu_us, "tag_client_cpu_us": client_us}
    return row


def two_worker_goal(table: dict[str, dict[str, dict[str, float]]], cores: int) -> dict[str, object]:
    found = [g for g in goals(table, [], cores) if g["goal"].startswith("--workers 2")]
    assert len(found) == 1
    return found[0]


def test_the_two_worker_goal_names_the_floors_ratio_and_the_cpu_ceiling() -> None:
    table = {
        "manifest_hits": {
            "ours": hits(10_000, cpu_us=90, client_us=30),
            "ours-2w": hits(13_000),
            FLOOR: hits(7_000),
            FLOOR_2W: hits(10_500),
        }
    }
    goal = two_worker_goal(table, cores=2)
    # 2 cores shared with wrk: 2 x 90 / (90 + 30) = 1.5.
    assert goal["measured"] == (
        "1.30 x; the floor: 1.50 x in two processes; "
        "at most 1.50 x on 2 cores (90 us of CPU a hit, wrk 30 us)"
    )
    assert goal["met"] is False


def test_the_ceiling_never_passes_two_and_is_left_out_without_cpu_figures() -> None:
    table = {
        "manifest_hits": {"ours": hits(10_000, cpu_us=90, client_us=30), "ours-2w": hits(17_000)}
    }
    goal = two_worker_goal(table, cores=8)
    assert goal["measured"] == "1.70 x; at most 2.00 x on 8 cores (90 us of CPU a hit, wrk 30 us)"
    assert goal["met"] is True
    table = {"manifest_hits": {"ours": hits(10_000), "ours-2w": hits(12_000)}}
    assert two_worker_goal(table, cores=2)["measured"] == "1.20 x"


def test_the_access_log_goal_gives_the_cpu_per_hit_beside_the_throughput() -> None:
    logged = hits(9_000, cpu_us=110, client_us=30)
    quiet = hits(10_000, cpu_us=99, client_us=30)
    table = {"manifest_hits": {"ours": logged, "ours-tuned": quiet}}
    [goal] = [g for g in goals(table, []) if g["goal"].startswith("the access log")]
    assert goal["measured"] == "10% (9000 vs 10000 req/s); CPU per hit 10% (110 vs 99 us)"
    assert goal["met"] is True


def test_a_saved_run_is_rendered_again_from_its_samples(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    samples: Samples = {
        "ours": {"manifest_hits": {"tag_rps": [9_000, 10_000, 11_000], "digest_rps": [1.0]}},
        "ours-2w": {"manifest_hits": {"tag_rps": [14_000, 12_000, 13_000]}},
    }
    meta = {
        "date": "2026-12-08 01:00 UTC",
        "machine": {"cpu": "AMD EPYC", "nproc": 2, "kernel": "6"},
        "quick": False,
        "repeat": 3,
        "mirrors": ["ours", "ours-2w"],
        "image_bytes": {"small": 1},
        "herd_clients": 32,
        "wan": "50 ms RTT",
        "ours_version": "abc",
    }
    result = build(samples, meta, [])
    saved = tmp_path / "latest.json"
    saved.write_text(json.dumps(result))
    report_main([str(saved)])
    printed = capsys.readouterr().out
    assert printed == markdown(result)
    assert "| --workers 2 >= 1.6 x one worker on hits (by tag) | 1.30 x | **no** |" in printed
