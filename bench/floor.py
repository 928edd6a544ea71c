"""The framework's floor: a bare aiohttp app that answers every request with one fixed manifest.

``python -m bench.floor --port N`` serves a 949-byte manifest body with the headers our mirror
sends on a manifest hit, and nothing else: no middleware, no access log, no routing beyond one
catch-all route. What it answers per second on a machine is what aiohttp itself allows there, so
the bench reports our manifest hits as a fraction of it.

``--processes N`` serves from N processes, each on a socket of its own bound with SO_REUSEPORT
as the mirror's workers are: what a second process adds on this machine when the load generator
shares its cores, the reference for ``--workers 2``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import signal

from aiohttp import web

from proxy.server import listener

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
BODY_SIZE = 949


def manifest_body(size: int = BODY_SIZE) -> bytes:
    """A syntactically real image manifest padded (in an annotation) to exactly ``size`` bytes."""
    layer = {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "size": 1}
    document = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "size": 1},
        "layers": [layer],
        "annotations": {"pad": ""},
    }
    unpadded = len(json.dumps(document, separators=(",", ":")).encode())
    document["annotations"] = {"pad": "x" * (size - unpadded)}
    body = json.dumps(document, separators=(",", ":")).encode()
    assert len(body) == size
    return body


def create_app() -> web.Application:
    body = manifest_body()
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    headers = {
        "Content-Type": MANIFEST_TYPE,
        "Docker-Content-Digest": digest,
        "ETag": f'"{digest}"',
        "X-Cache": "HIT",
        "Docker-Distribution-API-Version": "registry/2.0",
    }

    async def answer(request: web.Request) -> web.Response:
        return web.Response(body=body, headers=headers)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.floor")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--processes", type=int, default=1)
    args = parser.parse_args()
    # Every socket listens before any process serves, so the kernel spreads connections over all
    # of them from the first one on.
    sockets = [found for [found] in listener.bind_shared("127.0.0.1", args.port, args.processes)]
    children: list[int] = []
    for sock in sockets[1:]:
        if (pid := os.fork()) == 0:
            for other in sockets:
                if other is not sock:
                    other.close()
            web.run_app(create_app(), sock=sock, print=None, access_log=None)
            os._exit(0)
        children.append(pid)
    try:
        web.run_app(create_app(), sock=sockets[0], print=None, access_log=None)
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            os.waitpid(pid, 0)


if __name__ == "__main__":
    main()
