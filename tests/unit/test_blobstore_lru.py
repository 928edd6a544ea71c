"""The LRU under generated workloads: the budget always holds and eviction follows recency.

Deterministic, so that Hypothesis can replay and shrink what it finds: every choice is drawn
from Hypothesis, blob contents are a function of the step that puts them (not os.urandom), and
the model never reads the clock. Each example gets its own directory and event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from blobsources import numbered_blob
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from proxy.cache.store import BlobStore
from proxy.oci import Digest

BUDGET = 10_000
T = TypeVar("T")


class LruMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.root = Path(tempfile.mkdtemp())
        self.store = self._open_store()
        # The model: digests from least to most recently used, with their sizes.
        self.order: list[Digest] = []
        self.sizes: dict[Digest, int] = {}
        self.leases: dict[Digest, contextlib.ExitStack] = {}
        self.puts = 0

    def in_loop(self, action: Callable[[], T]) -> T:
        """Run a synchronous store call inside the loop, where eviction schedules its work."""

        async def call() -> T:
            return action()

        return self.loop.run_until_complete(call())

    def _open_store(self) -> BlobStore:
        store = BlobStore(self.root, BUDGET)
        self.loop.run_until_complete(store.open())
        return store

    @rule(size=st.integers(min_value=1, max_value=BUDGET + 100))
    def put(self, size: int) -> None:
        self.puts += 1
        digest, data = numbered_blob(self.puts, size)
        leased = sum(self.sizes[d] for d in self.leases)
        self.in_loop(lambda: self.store.put_small(digest, data))
        # When it needed room, it lands once its victims are off the disk.
        self.loop.run_until_complete(self.store.idle())
        if size > BUDGET or size + leased > BUDGET:
            assert digest not in self.store
            return
        # Expected victims: the least recent unleased blobs, until the new one fits.
        excess = sum(self.sizes.values()) + size - BUDGET
        for victim in list(self.order):
            if excess <= 0:
                break
            if victim in self.leases:
                continue
            self.order.remove(victim)
            excess -= self.sizes.pop(victim)
            assert victim not in self.store
        assert digest in self.store
        self.order.append(digest)
        self.sizes[digest] = size

    @precondition(lambda self: bool(self.order))
    @rule(data=st.data())
    def hit(self, data: st.DataObject) -> None:
        digest = data.draw(st.sampled_from(self.order))
        with self.store.open_blob(digest) as opened:
            assert opened is not None
            assert opened[1] == self.sizes[digest]
        self.order.remove(digest)
        self.order.append(digest)

    @precondition(lambda self: bool(self.order))
    @rule(data=st.data())
    def lease(self, data: st.DataObject) -> None:
        digest = data.draw(st.sampled_from(self.order))
        if digest not in self.leases:
            stack = contextlib.ExitStack()
            stack.enter_context(self.store.lease(digest))
            self.leases[digest] = stack

    @precondition(lambda self: bool(self.leases))
    @rule(data=st.data())
    def unlease(self, data: st.DataObject) -> None:
        digest = data.draw(st.sampled_from(sorted(self.leases, key=str)))
        self.leases.pop(digest).close()

    @precondition(lambda self: not self.leases)
    @rule()
    def restart(self) -> None:
        self.loop.run_until_complete(self.store.close())
        # Recency survives a restart as file mtimes record it, refreshed at most once a minute
        # of use; as if each use in the model's order had been a minute apart (the model never
        # reads the clock, so equal mtimes never leave the order to chance).
        for minute, digest in enumerate(self.order):
            stamp = 1_000_000_000 + 60.0 * minute
            os.utime(self.store.blob_path(digest), (stamp, stamp))
        self.store = self._open_store()
        assert [digest for digest, _, _ in self.store.entries()] == self.order

    @invariant()
    def budget_holds_and_index_matches_disk(self) -> None:
        stats = self.store.stats()
        assert stats.size <= BUDGET
        assert stats.size == sum(self.sizes.values())
        assert stats.entries == len(self.sizes)
        assert stats.size + stats.reserved + stats.deleting <= BUDGET
        self.loop.run_until_complete(self.store.idle())  # let pending deletions finish
        on_disk = {
            p.name: p.stat().st_size for p in (self.root / "blobs").rglob("*") if p.is_file()
        }
        assert on_disk == {d.encoded: s for d, s in self.sizes.items()}

    def teardown(self) -> None:
        for stack in self.leases.values():
            stack.close()
        self.loop.run_until_complete(self.store.close())
        self.loop.close()
        shutil.rmtree(self.root, ignore_errors=True)


LruMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=25, deadline=None)
test_lru = LruMachine.TestCase
