"""Serving HTTPS directly, with certificates reloaded without a restart.

A reload (SIGHUP, or the files changing on disk, checked every `interval` seconds) loads the new
pair into the same `SSLContext`, so new connections get the new certificate and open ones are
undisturbed. A bad pair is logged and the old one kept: a typo must not take the mirror down.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from proxy.tasks import in_background

log = logging.getLogger(__name__)


class CertificateReloader:
    def __init__(self, cert: Path, key: Path, interval: float = 30.0) -> None:
        self.cert = cert
        self.key = key
        self.interval = interval
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(cert, key)
        self._stamp = self._files_stamp()

    def _files_stamp(self) -> tuple[float, float]:
        try:
            return self.cert.stat().st_mtime, self.key.stat().st_mtime
        except OSError:
            return (0.0, 0.0)

    def reload(self) -> bool:
        self._stamp = self._files_stamp()
        try:
            self.context.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as exc:
            log.error("keeping the old TLS certificate: cannot load %s: %s", self.cert, exc)
            return False
        log.info("reloaded TLS certificate %s", self.cert)
        return True

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if self._files_stamp() != self._stamp:
                self.reload()

    async def lifecycle(self, app: web.Application) -> AsyncIterator[None]:
        """An aiohttp cleanup context: SIGHUP and file watching while the app runs."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        async with in_background(self.watch(), "TLS certificate watch"):
            yield
        loop.remove_signal_handler(signal.SIGHUP)
