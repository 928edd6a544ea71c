"""A repeated manifest hit answered at the connection, before aiohttp routes the request.

`proxy.server.prepared` keeps a hit's response for repeats; answered through the app, a repeat
still pays for routing, both middlewares, a response object, its headers' serialisation and the
response signal, which together cost more than the answer itself. The connection handler
(`proxy.server.runner.MirrorRequestHandler`) asks `answer` first: when the request is a plain
HTTP/1.1 keep-alive GET or HEAD without a body that a prepared answer fits, the prepared bytes
(the same bytes aiohttp would send, with the current Date) go to the socket, and the request is
counted, logged and prefetched for as the app would (`middleware.account`). Anything else, or
a client whose socket has not taken earlier answers, goes through the app unchanged, as do
relays between workers (their connections get no `Repeats`).
"""

from __future__ import annotations

import asyncio
import time
from typing import Final

from aiohttp import web
from aiohttp.http import HttpVersion11

from proxy.server import keys
from proxy.server.middleware import account
from proxy.server.prepared import HttpDate, PreparedAnswers

# A client that does not read what it asked for gets its next answers through aiohttp, which
# waits for the socket to drain.
MAX_UNSENT: Final = 64 * 1024


class Repeats:
    """What a connection handler needs to answer repeats of one app."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.answers: PreparedAnswers = app[keys.PREPARED]
        self.prefetch = app[keys.PREFETCH]
        self.counted = app[keys.METRICS].prepared_answers.labels("connection")
        self.date = HttpDate()

    def answer(self, request: web.BaseRequest, transport: asyncio.Transport) -> bool:
        """Answer `request` if it repeats a prepared hit; False: the app answers it."""
        if (
            request.version != HttpVersion11
            or not request.keep_alive
            or request.body_exists
            or transport.is_closing()
            or transport.get_write_buffer_size() > MAX_UNSENT
        ):
            return False
        prepared = self.answers.get(request)
        if prepared is None:
            return False
        started = time.monotonic()
        transport.write(prepared.wire(self.date()))
        noted = keys.Notes()
        prepared.replay(noted, self.prefetch)
        self.counted.inc()
        body = prepared.answer.body
        account(self.app, request, noted, 200, 0 if body is None else len(body), started)
        return True
