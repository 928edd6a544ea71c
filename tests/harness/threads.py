"""Servers on an event loop in a thread of their own, for tests whose own code blocks
(Hypothesis drives synchronous tests; real clients run as processes the test waits for)."""

from __future__ import annotations

import asyncio
import threading
from typing import Self

from harness.processes import StartStop


class LoopThread(StartStop):
    """Runs :meth:`_start` on a fresh event loop in a daemon thread, and :meth:`_stop` on it
    before the loop ends; each step may take ``timeout`` seconds."""

    timeout = 30.0

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    async def _start(self) -> None:
        raise NotImplementedError

    async def _stop(self) -> None:
        raise NotImplementedError

    def start(self) -> Self:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(self.timeout)
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(self.timeout)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(self.timeout)
        self._loop.close()
