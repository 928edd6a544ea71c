"""Benchmarks: our mirror against Distribution (proxy mode) and nginx, behind a measured upstream.

Run ``python -m bench --help``. The pieces, in the order a run uses them:

- ``images``:    generate images and push them into a real upstream registry (Distribution);
- ``relay``:     a TCP relay in front of the upstream that counts bytes and can act as a WAN;
- ``peers``:     start and stop each mirror (ours, Distribution proxy, nginx) and sample memory;
- ``client``:    the pulling client, run as separate processes (``python -m bench.client``);
- ``scenarios``: one function per scenario, each returning its metrics;
- ``report``:    medians, ratios to the best peer, goals, JSON and Markdown;
- ``run``:       the command line and the run loop.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

# The test harness (Distribution, the mirror as a process, image builders, pushers) lives in
# tests/harness and is imported as `harness.*`, the name pytest gives it, so there is one copy.
if str(REPO_ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(REPO_ROOT / "tests"))
