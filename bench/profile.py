"""Summarise a py-spy ``--format raw`` profile: ``python -m bench.profile FILE [--top N]``.

Prints the share of samples spent in the event loop's poll (idle), then the functions with the
most samples on the stack (inclusive) and at the top of it (self), project and library frames
alike, so a missed goal can be traced to the code that costs the time.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

IDLE_FRAMES = ("EpollSelector.select", "select (selectors.py")
# Frames on (nearly) every stack: the interpreter, the loop's dispatch and the entry point.
OUTER_FRAMES = (
    "<frozen runpy>",
    "BaseEventLoop.run_",
    "BaseEventLoop._run_once",
    "asyncio/events.py",
    "aiohttp/web.py",
    "proxy/cli.py",
    "proxy/__main__.py",
    "threading.py",
)


def summarise(path: Path, top: int) -> str:
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = idle = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        # "func (file:line)" -> "func (file)": a function's lines add up to one entry.
        frames = [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")]
        total += count
        if any(frames[-1].startswith(f) for f in IDLE_FRAMES):
            idle += count
            continue
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        return f"{path}: no samples"
    busy = total - idle
    lines = [f"{path}: {total} samples, {idle / total:.0%} idle in the event loop's poll"]
    for title, counter in (("inclusive", inclusive), ("self", own)):
        lines.append(f"top {top} by {title} share of busy samples:")
        shown = [
            (frame, count)
            for frame, count in counter.most_common()
            if title == "self" or not any(outer in frame for outer in OUTER_FRAMES)
        ]
        lines += [f"  {count / max(busy, 1):6.1%}  {frame}" for frame, count in shown[:top]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    for path in args.files:
        print(summarise(path, args.top))


if __name__ == "__main__":
    main()
