"""Several replicas: tags shared through Redis, blobs spread by digest behind nginx.

The topology is the one ``deploy/replicas/`` ships: three mirrors sharing one real Redis, behind
nginx started from ``deploy/replicas/nginx.conf`` (only its addresses and paths rewritten). Each
replica reaches the upstream (a real Distribution) through its own :class:`CountingRelay`, so
every upstream request is counted where the upstream sees it, and attributed to a replica.

- Tag resolutions and 404s resolved by one replica are answered by the others without asking
  the upstream about the tag again.
- A herd of concurrent cold pulls through nginx costs 1.00 x the image in upstream blob bytes.
- Losing a replica moves only its share of the digests; the others stay where they were.
- Killing a replica while clients stream from it (SIGKILL, when the first bytes have reached a
  client) still completes every pull: clients retry, as containerd and Docker do, and nginx
  moves the dead replica's digests to the next replica on the ring.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import shutil
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import aiohttp
import pytest
import yaml
from aiohttp import web
from harness.digests import sha256_digest
from harness.images import DOCKER_MANIFEST, LARGE_LAYERS, OCI_MANIFEST, Image, build_image
from harness.mirror import Mirror, upstream_tables
from harness.ports import free_port
from harness.processes import Distribution, Service, tail
from harness.push import push_blob, push_image
from multidict import CIMultiDict

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
NGINX_CONF = ROOT / "deploy" / "replicas" / "nginx.conf"
COMPOSE = ROOT / "deploy" / "replicas" / "compose.yaml"
REPLICAS = 3
HERD = 20
# How often a test client tries one request before giving up (containerd and Docker retry too).
ATTEMPTS = 5
# The name every replica knows the upstream by: tag resolutions in Redis are keyed by it.
UPSTREAM_NAME = "upstream.test"
MANIFEST_ACCEPT = (OCI_MANIFEST, DOCKER_MANIFEST)
# Headers a proxy must not forward (RFC 9110 section 7.6.1), plus those aiohttp sets itself.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
BLOB_PATH = re.compile(r"^/v2/.+/blobs/(sha256:[0-9a-f]{64})$")
MANIFEST_PATH = re.compile(r"^/v2/.+/manifests/(?P<reference>[^/]+)$")


# --------------------------------------------------------------------------------------------
# The upstream side: a counting relay per replica
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UpstreamRequest:
    """One request a replica made to the upstream, as the relay in front of it saw it."""

    replica: int
    method: str
    path: str
    status: int
    body_bytes: int  # response body bytes the relay passed on (fewer if the replica went away)

    @property
    def blob(self) -> str | None:
        match = BLOB_PATH.match(self.path)
        return match.group(1) if match else None

    @property
    def manifest_reference(self) -> str | None:
        match = MANIFEST_PATH.match(self.path)
        return match.group("reference") if match else None


@dataclass
class Gate:
    """Holds the first upstream download of one digest after its first chunk, until released.

    ``reached`` is set when a relay has passed that chunk on; ``holder`` is the replica that is
    downloading it. The gate applies once: later downloads of the digest flow freely.
    """

    digest: str
    reached: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    holder: int | None = None


class CountingRelay:
    """An HTTP relay in front of the upstream that records every request one replica makes."""

    def __init__(
        self, replica: int, target: str, log: list[UpstreamRequest], gate: Gate | None
    ) -> None:
        self.replica = replica
        self.target = target.rstrip("/")
        self.log = log
        self.gate = gate
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> Self:
        self._session = aiohttp.ClientSession(
            auto_decompress=False, timeout=aiohttp.ClientTimeout(total=60, sock_connect=5)
        )
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._relay)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        self.port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _relay(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        headers = CIMultiDict(
            (name, value)
            for name, value in request.headers.items()
            if name.lower() not in HOP_BY_HOP
        )
        url = self.target + request.path_qs
        sent = 0
        status = 502
        try:
            async with self._session.request(
                request.method, url, headers=headers, allow_redirects=False
            ) as upstream:
                status = upstream.status
                response = web.StreamResponse(status=upstream.status)
                for name, value in upstream.headers.items():
                    if name.lower() not in HOP_BY_HOP:
                        response.headers.add(name, value)
                if upstream.content_length is not None:
                    response.content_length = upstream.content_length
                await response.prepare(request)
                if request.method != "HEAD":
                    try:
                        async for chunk in upstream.content.iter_chunked(64 * 1024):
                            await response.write(chunk)
                            sent += len(chunk)
                            await self._maybe_hold(request.path)
                        await response.write_eof()
                    except ConnectionError:
                        pass  # the replica went away mid-body (it was killed)
                return response
        finally:
            self.log.append(
                UpstreamRequest(self.replica, request.method, request.path, status, sent)
            )

    async def _maybe_hold(self, path: str) -> None:
        gate = self.gate
        if gate is None or gate.holder is not None or not path.endswith("/blobs/" + gate.digest):
            return
        gate.holder = self.replica
        gate.reached.set()
        await gate.release.wait()


# --------------------------------------------------------------------------------------------
# The fleet: replicas, nginx, Redis
# --------------------------------------------------------------------------------------------


def replica_mirror(workdir: Path, relay_url: str, redis_url: str) -> Mirror:
    """A mirror configured from a TOML file: the upstream by name, and the shared Redis."""
    config = f'redis_url = "{redis_url}"\nnegative_ttl = "5m"\n' + upstream_tables(
        {UPSTREAM_NAME: relay_url}
    )
    return Mirror(workdir, None, config=config, log_level="info")


def render_nginx_conf(prefix: Path, listen_port: int, replicas: Sequence[str]) -> str:
    """The shipped config with only its listen address, servers and file paths rewritten."""
    text = NGINX_CONF.read_text()

    def substitute(pattern: str, replace: Callable[[re.Match[str]], str], expected: int) -> None:
        nonlocal text
        text, count = re.subn(pattern, replace, text, flags=re.M)
        assert count == expected, f"{NGINX_CONF}: {pattern!r} matched {count}, not {expected}"

    servers = iter(replicas)
    substitute(r"^(\s*server )mirror-\d+:5000 ", lambda m: f"{m[1]}{next(servers)} ", REPLICAS)
    substitute(r"^(\s*listen )5000;", lambda m: f"{m[1]}127.0.0.1:{listen_port};", 1)
    substitute(r"^(\s*error_log )stderr ", lambda m: f"{m[1]}{prefix / 'error.log'} ", 1)
    paths = r"pid|access_log|client_body_temp_path|proxy_temp_path|fastcgi_temp_path|" + (
        r"uwsgi_temp_path|scgi_temp_path"
    )
    substitute(
        rf"^(\s*(?:{paths}) )(/\S+?)(;| )",
        lambda m: f"{m[1]}{prefix / Path(m[2]).name}{m[3]}",
        7,
    )
    return text


class Nginx(Service):
    """``nginx -p PREFIX -c CONF -g 'daemon off;'`` with everything it writes under PREFIX."""

    name = "nginx"

    def __init__(self, prefix: Path, replicas: Sequence[str]) -> None:
        super().__init__(prefix / "nginx.out")
        self.prefix = prefix
        self.replicas = replicas

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Self:
        self.prefix.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        conf = self.prefix / "nginx.conf"
        conf.write_text(render_nginx_conf(self.prefix, self.port, self.replicas))
        self._spawn(["nginx", "-p", str(self.prefix), "-c", str(conf), "-g", "daemon off;"])
        return self

    def access_log(self) -> str:
        return tail(self.prefix / "access.log", limit=200_000)


class Fleet:
    """Relays, replicas and (optionally) nginx in front of one Distribution, sharing one Redis."""

    def __init__(
        self,
        workdir: Path,
        distribution: Distribution,
        redis_url: str,
        *,
        balancer: bool = True,
        gate: Gate | None = None,
    ) -> None:
        self.workdir = workdir
        self.upstream_log: list[UpstreamRequest] = []
        self.relays = [
            CountingRelay(i, distribution.url, self.upstream_log, gate) for i in range(REPLICAS)
        ]
        self.redis_url = redis_url
        self.balancer = balancer
        self.replicas: list[Mirror] = []
        self.nginx: Nginx | None = None

    @property
    def url(self) -> str:
        assert self.nginx is not None
        return self.nginx.url

    def replica_at(self, address: str) -> int:
        return next(i for i, r in enumerate(self.replicas) if r.host == address)

    async def __aenter__(self) -> Self:
        try:
            for relay in self.relays:
                await relay.start()
            self.replicas = [
                replica_mirror(self.workdir / f"replica-{i}", relay.url, self.redis_url)
                for i, relay in enumerate(self.relays)
            ]
            # Python start-up dominates: start the three at once.
            await asyncio.gather(*(asyncio.to_thread(r.start) for r in self.replicas))
            if self.balancer:
                nginx = Nginx(self.workdir / "nginx", [r.host for r in self.replicas])
                self.nginx = await asyncio.to_thread(nginx.start)
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self.nginx is not None:
            await asyncio.to_thread(self.nginx.stop)
        await asyncio.gather(*(asyncio.to_thread(r.stop) for r in self.replicas))
        for relay in self.relays:
            await relay.stop()

    def blob_fetches(self, since: int = 0) -> list[UpstreamRequest]:
        """Blob GETs the replicas made upstream (after the first ``since`` logged requests)."""
        return [
            r
            for r in self.upstream_log[since:]
            if r.method == "GET" and r.blob is not None and r.status in (200, 206)
        ]

    async def metric_total(self, name: str) -> float:
        """The sum of one counter over every live replica's ``/metrics``."""
        total = 0.0
        async with aiohttp.ClientSession() as session:
            for replica in self.replicas:
                if replica.returncode is not None:
                    continue
                async with session.get(replica.url + "/metrics") as response:
                    text = await response.text()
                for line in text.splitlines():
                    if line.startswith(name) and not line.startswith("#"):
                        total += float(line.rsplit(" ", 1)[1])
        return total

    def logs(self) -> str:
        parts = [f"--- replica {i}\n{tail(r.log_path, 6000)}" for i, r in enumerate(self.replicas)]
        if self.nginx is not None:
            parts.append(f"--- nginx access log\n{self.nginx.access_log()[-6000:]}")
        return "\n".join(parts)


@pytest.fixture(scope="module", autouse=True)
def _require_nginx() -> None:
    if shutil.which("nginx") is None:
        pytest.fail(
            "these tests need nginx (Debian package nginx): run scripts/install-system-deps"
        )


# --------------------------------------------------------------------------------------------
# Clients
# --------------------------------------------------------------------------------------------


class PullFailed(AssertionError):
    pass


@dataclass
class PullStats:
    retries: int = 0
    failures: list[str] = field(default_factory=list)


async def fetch_verified(
    session: aiohttp.ClientSession,
    url: str,
    digest: str,
    *,
    headers: Sequence[tuple[str, str]] = (),
    on_first_bytes: Callable[[], None] | None = None,
) -> bytes:
    """GET a body and check that it hashes to ``digest``; a short or wrong body raises."""
    async with session.get(url, headers=CIMultiDict(headers)) as response:
        if response.status != 200:
            raise PullFailed(f"GET {url}: {response.status} {await response.text()}")
        hasher = hashlib.sha256()
        parts: list[bytes] = []
        async for chunk in response.content.iter_chunked(64 * 1024):
            if on_first_bytes is not None and not parts:
                on_first_bytes()
            hasher.update(chunk)
            parts.append(chunk)
    if "sha256:" + hasher.hexdigest() != digest:
        raise PullFailed(f"GET {url}: body does not hash to {digest}")
    return b"".join(parts)


async def with_retries(stats: PullStats, attempt: Callable[[], Awaitable[bytes]]) -> bytes:
    """Up to ``ATTEMPTS`` tries at once, as a client retrying a broken transfer does."""
    for number in range(1, ATTEMPTS + 1):
        try:
            return await attempt()
        except (aiohttp.ClientError, TimeoutError, PullFailed) as exc:
            stats.failures.append(f"{type(exc).__name__}: {exc}")
            if number == ATTEMPTS:
                raise
            stats.retries += 1
    raise AssertionError("unreachable")


async def pull(
    base_url: str,
    repo: str,
    tag: str,
    image: Image,
    stats: PullStats,
    first_bytes: dict[str, asyncio.Event] | None = None,
) -> None:
    """A containerd-like pull: the manifest by tag, then every blob (3 at a time), verified."""
    timeout = aiohttp.ClientTimeout(total=30, sock_connect=5, sock_read=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        accept = [("Accept", media_type) for media_type in MANIFEST_ACCEPT]
        manifest_url = f"{base_url}/v2/{repo}/manifests/{tag}"
        body = await with_retries(
            stats,
            lambda: fetch_verified(session, manifest_url, image.digest, headers=accept),
        )
        document = json.loads(body)
        descriptors = [document["config"], *document["layers"]]
        limit = asyncio.Semaphore(3)

        async def fetch_blob(digest: str) -> None:
            event = (first_bytes or {}).get(digest)
            url = f"{base_url}/v2/{repo}/blobs/{digest}"
            async with limit:
                await with_retries(
                    stats,
                    lambda: fetch_verified(
                        session, url, digest, on_first_bytes=event.set if event else None
                    ),
                )

        await asyncio.gather(*(fetch_blob(str(d["digest"])) for d in descriptors))
        if {str(d["digest"]) for d in descriptors} != image.blob_digests:
            raise PullFailed("the manifest names other blobs than the image has")


def image_bytes(image: Image) -> int:
    return sum(len(blob.data) for blob in image.blobs)


@contextlib.asynccontextmanager
async def fleet_of(
    tmp_path: Path,
    distribution: Distribution,
    redis_url: str,
    *,
    balancer: bool = True,
    gate: Gate | None = None,
) -> AsyncIterator[Fleet]:
    async with Fleet(
        tmp_path / "fleet", distribution, redis_url, balancer=balancer, gate=gate
    ) as fleet:
        try:
            yield fleet
        except BaseException:
            print(fleet.logs())  # shown with the failure
            raise


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


def test_the_shipped_compose_stack_puts_every_replica_nginx_names_behind_it_with_redis() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services: dict[str, dict[str, object]] = compose["services"]
    servers = re.findall(r"^\s*server (\S+):5000 ", NGINX_CONF.read_text(), re.M)
    assert len(servers) == REPLICAS
    assert sorted(servers) == sorted(name for name in services if name.startswith("mirror-"))
    volumes = set()
    for name in servers:
        service = services[name]
        environment = service["environment"]
        assert isinstance(environment, dict)
        assert environment["REGISTRY_PROXY_REDIS_URL"] == "redis://redis:6379/0"
        assert isinstance(service["volumes"], list)
        volumes.update(service["volumes"])
    assert len(volumes) == REPLICAS  # each replica its own cache
    assert "redis" in services
    assert "./nginx.conf:/etc/nginx/nginx.conf:ro" in str(services["nginx"]["volumes"])


async def test_a_tag_resolved_by_one_replica_is_not_asked_upstream_again_by_the_others(
    distribution: Distribution,
    redis_url: str,
    http_session: aiohttp.ClientSession,
    repo: str,
    tmp_path: Path,
) -> None:
    image = build_image("oci")
    await push_image(http_session, distribution.url, repo, image, "1.0")
    accept = [("Accept", media_type) for media_type in MANIFEST_ACCEPT]
    async with fleet_of(tmp_path, distribution, redis_url, balancer=False) as fleet:
        a, b, c = fleet.replicas
        url = f"/v2/{repo}/manifests/1.0"
        async with http_session.get(a.url + url, headers=CIMultiDict(accept)) as response:
            assert response.status == 200
            assert await response.read() == image.manifest
        by_tag = [r for r in fleet.upstream_log if r.manifest_reference == "1.0"]
        assert [(r.replica, r.method) for r in by_tag] == [(0, "GET")]

        seen = len(fleet.upstream_log)
        for replica in (b, c):
            for method in ("HEAD", "GET"):
                async with http_session.request(
                    method, replica.url + url, headers=CIMultiDict(accept)
                ) as response:
                    assert response.status == 200
                    assert response.headers["Docker-Content-Digest"] == image.digest
                    assert response.headers["X-Cache"] == "HIT"
                    if method == "GET":
                        assert await response.read() == image.manifest
        later = fleet.upstream_log[seen:]
        # No revalidation of the tag (HEAD or GET) from B or C within the TTL.
        assert [r for r in later if r.manifest_reference == "1.0"] == []
        # What B and C did fetch of manifests: the bytes by digest, which never change. (Blobs
        # they may fetch too: serving the manifest starts a prefetch of its layers.)
        manifests = {(r.method, r.manifest_reference) for r in later if r.manifest_reference}
        assert manifests <= {("GET", image.digest)}


async def test_a_tag_pulled_through_one_replica_costs_no_upstream_manifest_request_on_others(
    distribution: Distribution,
    redis_url: str,
    http_session: aiohttp.ClientSession,
    repo: str,
    tmp_path: Path,
) -> None:
    image = build_image("oci")
    await push_image(http_session, distribution.url, repo, image, "1.0")
    accept = CIMultiDict(("Accept", media_type) for media_type in MANIFEST_ACCEPT)
    async with fleet_of(tmp_path, distribution, redis_url, balancer=False) as fleet:
        url = f"/v2/{repo}/manifests/1.0"
        async with http_session.get(fleet.replicas[0].url + url, headers=accept) as response:
            assert response.status == 200
        seen = len(fleet.upstream_log)
        for replica in fleet.replicas[1:]:
            async with http_session.get(replica.url + url, headers=accept) as response:
                assert response.status == 200
                assert await response.read() == image.manifest
        assert [r for r in fleet.upstream_log[seen:] if r.manifest_reference] == []


async def test_a_missing_tag_found_by_one_replica_is_missing_for_the_others_without_asking(
    distribution: Distribution,
    redis_url: str,
    http_session: aiohttp.ClientSession,
    repo: str,
    tmp_path: Path,
) -> None:
    await push_image(http_session, distribution.url, repo, build_image("oci"), "1.0")
    async with fleet_of(tmp_path, distribution, redis_url, balancer=False) as fleet:
        url = f"/v2/{repo}/manifests/no-such-tag"
        statuses = []
        for replica in fleet.replicas:
            async with http_session.get(replica.url + url) as response:
                statuses.append(response.status)
        assert statuses == [404, 404, 404]
        asked = [r.replica for r in fleet.upstream_log if r.manifest_reference == "no-such-tag"]
        assert asked == [0]


async def test_a_herd_through_the_balancer_fetches_each_blob_from_upstream_once(
    distribution: Distribution,
    redis_url: str,
    http_session: aiohttp.ClientSession,
    repo: str,
    tmp_path: Path,
) -> None:
    image = build_image("oci", layer_sizes=LARGE_LAYERS)
    await push_image(http_session, distribution.url, repo, image, "1.0")
    async with fleet_of(tmp_path, distribution, redis_url) as fleet:
        stats = [PullStats() for _ in range(HERD)]
        async with asyncio.timeout(30):
            await asyncio.gather(*(pull(fleet.url, repo, "1.0", image, s) for s in stats))

        fetches = fleet.blob_fetches()
        per_digest = Counter(r.blob for r in fetches)
        assert per_digest == Counter(dict.fromkeys(image.blob_digests, 1))
        fetched = sum(r.body_bytes for r in fetches)
        ratio = fetched / image_bytes(image)
        print(f"herd of {HERD}: upstream blob bytes / image blob bytes = {ratio:.3f}")
        assert ratio == 1.0
        owners = {r.blob: r.replica for r in fetches}
        print(f"blob owners: {sorted(Counter(owners.values()).items())}")
        # The replicas' own accounting agrees with what the upstream saw.
        metric = await fleet.metric_total("registry_proxy_upstream_fetched_bytes_total")
        assert metric == fetched
        assert sum(s.retries for s in stats) == 0


async def test_losing_a_replica_moves_only_its_share_of_the_digests(
    distribution: Distribution,
    redis_url: str,
    http_session: aiohttp.ClientSession,
    repo: str,
    tmp_path: Path,
) -> None:
    digests: dict[str, bytes] = {}
    for number in range(30):
        data = hashlib.sha256(repo.encode() + bytes([number])).digest() * (256 + number)
        digests[await push_blob(http_session, distribution.url, repo, data)] = data

    async def fetch_all() -> dict[str, str]:
        async def one(digest: str) -> tuple[str, str]:
            async with http_session.get(f"{fleet.url}/v2/{repo}/blobs/{digest}") as response:
                assert response.status == 200
                assert sha256_digest(await response.read()) == digest
                return digest, response.headers["X-Cache"]

        return dict(await asyncio.gather(*(one(d) for d in digests)))

    async with fleet_of(tmp_path, distribution, redis_url) as fleet:
        assert set((await fetch_all()).values()) <= {"MISS", "COALESCED"}
        owner = {str(r.blob): r.replica for r in fleet.blob_fetches()}
        assert sorted(owner) == sorted(digests)  # each fetched upstream exactly once...
        assert len(fleet.blob_fetches()) == len(digests)
        shares = Counter(owner.values())
        print(f"digests per replica: {[shares[i] for i in range(REPLICAS)]}")
        assert len(shares) == REPLICAS  # ...and every replica got a share

        assert set((await fetch_all()).values()) == {"HIT"}  # the ring is stable
        # Range goes through nginx unchanged (resumed and parallel layer fetches need it).
        digest, data = next(iter(digests.items()))
        ranged = CIMultiDict(Range="bytes=10-99")
        async with http_session.get(f"{fleet.url}/v2/{repo}/blobs/{digest}", headers=ranged) as r:
            assert r.status == 206
            assert r.headers["Content-Range"] == f"bytes 10-99/{len(data)}"
            assert await r.read() == data[10:100]
        victim = shares.most_common(1)[0][0]
        seen = len(fleet.upstream_log)
        await asyncio.to_thread(fleet.replicas[victim].kill)

        after = await fetch_all()
        moved = {d for d, result in after.items() if result != "HIT"}
        assert moved == {d for d, o in owner.items() if o == victim}
        refetched = fleet.blob_fetches(seen)
        assert sorted(str(r.blob) for r in refetched) == sorted(moved)
        assert victim not in {r.replica for r in refetched}
        print(
            f"killed replica {victim}: {len(moved)} of {len(digests)} digests moved, "
            f"{sum(r.body_bytes for r in refetched)} bytes fetched again"
        )
        assert set((await fetch_all()).values()) == {"HIT"}  # and they stay where they moved


async def test_killing_a_replica_mid_herd_still_completes_every_pull(
    distribution: Distribution,
    redis_url: str,
    http_session: aiohttp.ClientSession,
    repo: str,
    tmp_path: Path,
) -> None:
    image = build_image("oci", layer_sizes=LARGE_LAYERS)
    await push_image(http_session, distribution.url, repo, image, "1.0")
    largest = max(image.layers, key=lambda blob: len(blob.data))
    # The first download of the largest layer stops after its first chunk until the replica
    # downloading it is dead, so the kill lands mid-stream, with clients reading from it.
    gate = Gate(largest.digest)
    first_bytes = {largest.digest: asyncio.Event()}
    async with fleet_of(tmp_path, distribution, redis_url, gate=gate) as fleet:
        stats = [PullStats() for _ in range(HERD)]
        herd = [
            asyncio.create_task(pull(fleet.url, repo, "1.0", image, s, first_bytes)) for s in stats
        ]
        try:
            async with asyncio.timeout(20):
                await gate.reached.wait()
                await first_bytes[largest.digest].wait()
            assert gate.holder is not None
            victim = fleet.replicas[gate.holder]
            await asyncio.to_thread(victim.kill)
            gate.release.set()
            async with asyncio.timeout(30):
                await asyncio.gather(*herd)
        finally:
            gate.release.set()
            for task in herd:
                task.cancel()
            await asyncio.gather(*herd, return_exceptions=True)

        retries = sum(s.retries for s in stats)
        reasons = Counter(reason.split(":")[0] for s in stats for reason in s.failures)
        print(f"failed attempts by kind: {dict(reasons)}")
        assert retries >= 1, "the kill cut no transfer: it came too late to test anything"
        fetches = fleet.blob_fetches()
        live = [r for r in fetches if r.replica != gate.holder]
        # After the failover each digest is still downloaded once, by its new owner.
        assert max(Counter(r.blob for r in live).values()) == 1
        ratio = sum(r.body_bytes for r in fetches) / image_bytes(image)
        print(
            f"killed replica {gate.holder} mid-herd: {HERD} pulls complete, {retries} retried "
            f"requests, upstream blob bytes / image blob bytes = {ratio:.3f}"
        )
        assert ratio < 2.0
