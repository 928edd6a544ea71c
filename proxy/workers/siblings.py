"""What one worker asks the others to do: `Siblings` runs an operation in each other worker
over its Unix socket, on a route (`ROUTE`) that only a sibling can reach (`is_relayed`: the
socket is 0600, and over TCP the route answers 404 like any unknown path).

Each worker owns its share of the blobs and keeps its own memory (hot manifests, prepared
answers, tag resolutions without Redis), so an evict, verify or invalidate done in worker 0
alone would miss the rest; `proxy.ops.admin.HERE` is what each worker does.

Prefetch too: a worker prefetches the blobs it owns, so an image served by one worker has its
other blobs prefetched by their owners, told by `pass_on_prefetch` (without waiting for them).
"""

from __future__ import annotations

import asyncio
import base64
import logging
from typing import Any, Final

import aiohttp
from aiohttp import web
from yarl import URL

from proxy.errors import RegistryError, SiblingUnreachable
from proxy.oci import Digest, Repository
from proxy.ops.admin import HERE, Operation
from proxy.server import keys
from proxy.upstream.client import Upstream
from proxy.workers.sharding import RELAY_HEADER, OwnerRelay, is_relayed
from proxy.workers.supervisor import Worker

log = logging.getLogger(__name__)

ROUTE: Final = "/_worker/{operation}"
# A stopped worker's socket still accepts: give up on it after this long. Verifying re-hashes
# a whole share of the cache, which takes as long as it takes.
ANSWER_SECONDS: Final = 30.0
UNBOUNDED: Final = frozenset({"verify"})


class Siblings:
    """The workers other than this one, as its admin API and its prefetch reach them."""

    def __init__(self, worker: Worker, relay: OwnerRelay) -> None:
        self.worker = worker
        self.relay = relay
        self.others = [index for index in range(worker.count) if index != worker.index]
        self._told: set[asyncio.Task[None]] = set()

    async def run(self, operation: str, payload: dict[str, Any]) -> list[dict[str, Any]]:
        """`operation`'s answer from every other worker, all asked at once; once all of them
        answered or failed, raises `SiblingUnreachable` naming those that did not answer."""
        asked = (self._ask(index, operation, payload) for index in self.others)
        found: list[dict[str, Any]] = []
        failed: list[str] = []
        for answer in await asyncio.gather(*asked, return_exceptions=True):
            if isinstance(answer, SiblingUnreachable):
                failed.append(str(answer))
            elif isinstance(answer, BaseException):
                raise answer
            else:
                found.append(answer)
        if failed:
            raise SiblingUnreachable("; ".join(failed))
        return found

    def pass_on_prefetch(
        self, upstream: Upstream, repository: Repository, manifest: Digest, body: bytes
    ) -> None:
        """Tell the other workers an image was served: each prefetches the blobs it owns."""
        if upstream.settings.pass_client_credentials:
            return  # fetched with this client's credentials, which the others do not have
        payload = {
            "upstream": upstream.name,
            "repository": repository.name,
            "manifest": str(manifest),
            "body": base64.b64encode(body).decode(),
        }
        for index in self.others:
            task = asyncio.create_task(self._tell(index, "prefetch", payload))
            self._told.add(task)
            task.add_done_callback(self._told.discard)

    async def _tell(self, index: int, operation: str, payload: dict[str, Any]) -> None:
        try:
            await self._ask(index, operation, payload)
        except SiblingUnreachable as exc:
            log.debug("%s not passed on: %s", operation, exc)

    async def close(self) -> None:
        for task in self._told:
            task.cancel()
        await asyncio.gather(*self._told, return_exceptions=True)

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


async def prefetch_here(mirror: web.Application, payload: dict[str, Any]) -> dict[str, Any]:
    """Prefetch the blobs this worker owns of an image another worker served."""
    upstream = mirror[keys.UPSTREAMS].get(payload["upstream"])
    body = base64.b64decode(payload["body"])
    try:
        manifest = Digest.parse(payload["manifest"])
        repository = Repository.parse(payload["repository"])
    except RegistryError:
        return {"queued": 0}
    if upstream is None or Digest.of(body, manifest.algorithm) != manifest:
        return {"queued": 0}
    prefetch = mirror[keys.PREFETCH]
    return {"queued": prefetch.image_served(upstream, repository, manifest, body, passed_on=True)}


OPERATIONS: Final[dict[str, Operation]] = {**HERE, "prefetch": prefetch_here}


async def sibling_operation(request: web.Request) -> web.Response:
    """An operation another worker asks this one to do; any other caller finds nothing."""
    operation = OPERATIONS.get(request.match_info["operation"])
    if operation is None or not is_relayed(request):
        raise web.HTTPNotFound()
    return web.json_response(await operation(request.app, await request.json()))
