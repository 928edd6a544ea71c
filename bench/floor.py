"""The framework's floor: a bare aiohttp app that answers every request with one fixed manifest.

``python -m bench.floor --port N`` serves a 949-byte manifest body with the headers our mirror
sends on a manifest hit, and nothing else: no middleware, no access log, no routing beyond one
catch-all route. What it answers per second on a machine is what aiohttp itself allows there, so
the bench reports our manifest hits as a fraction of it.
"""

from __future__ import annotations

import argparse
import hashlib
import json

from aiohttp import web

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
    args = parser.parse_args()
    web.run_app(create_app(), host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
