"""Worker 0's admin API acting in every worker: `Siblings` runs an admin operation in each
other worker over its Unix socket, on a route (`ROUTE`) that only a sibling can reach
(`is_relayed`: the socket is 0600, and over TCP the route answers 404 like any unknown path).

Each worker owns its share of the blobs and keeps its own memory (hot manifests, prepared
answers, tag resolutions without Redis), so an evict, verify or invalidate done in worker 0
alone would miss the rest; `proxy.ops.admin.HERE` is what each worker does.
"""

from __future__ import annotations

import asyncio
from typing import Any, Final

import aiohttp
from aiohttp import web
from yarl import URL

from proxy.errors import SiblingUnreachable
from proxy.ops.admin import HERE
from proxy.workers.sharding import RELAY_HEADER, OwnerRelay, is_relayed
from proxy.workers.supervisor import Worker

ROUTE: Final = "/_worker/{operation}"
# A stopped worker's socket still accepts: give up on it after this long. Verifying re-hashes
# a whole share of the cache, which takes as long as it takes.
ANSWER_SECONDS: Final = 30.0
UNBOUNDED: Final = frozenset({"verify"})


class Siblings:
    """The workers other than this one, as its admin API reaches them."""

    def __init__(self, worker: Worker, relay: OwnerRelay) -> None:
        self.worker = worker
        self.relay = relay

    async def run(self, operation: str, payload: dict[str, Any]) -> list[dict[str, Any]]:
        """`operation`'s answer from every other worker, all asked at once."""
        others = [index for index in range(self.worker.count) if index != self.worker.index]
        return list(await asyncio.gather(*(self._ask(i, operation, payload) for i in others)))

    async def _ask(self, index: int, operation: str, payload: dict[str, Any]) -> dict[str, Any]:
        url = URL(f"{self.relay.scheme}://worker/_worker/{operation}")
        session = self.relay.session(index)
        seconds = None if operation in UNBOUNDED else ANSWER_SECONDS
        try:
            async with session.post(
                url,
                json=payload,
                headers={RELAY_HEADER: "1"},
                ssl=False,
                timeout=aiohttp.ClientTimeout(total=seconds),
            ) as answer:
                if answer.status != 200:
                    raise SiblingUnreachable(f"worker {index} answered {answer.status}")
                found: dict[str, Any] = await answer.json()
                return found
        except (aiohttp.ClientError, TimeoutError) as exc:
            why = str(exc) or type(exc).__name__
            raise SiblingUnreachable(f"worker {index} is unreachable ({why})") from None


async def sibling_operation(request: web.Request) -> web.Response:
    """An admin operation worker 0 asks this worker to do; any other caller finds nothing."""
    operation = HERE.get(request.match_info["operation"])
    if operation is None or not is_relayed(request):
        raise web.HTTPNotFound()
    return web.json_response(await operation(request.app, await request.json()))
