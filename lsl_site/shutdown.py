"""Graceful shutdown of a web process (SIGTERM, Ctrl-C): apps register what to do before it exits.

daphne stops its Twisted reactor on SIGTERM; "before shutdown" triggers run first and the reactor
waits for the Deferreds they return. `install()` (called from lsl_site/asgi.py) adds one trigger
that runs every registered coroutine, bounded by GRACE seconds so a stuck one cannot hold up
the exit. Registered from AppConfig.ready, so the web process only.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)

GRACE = 5.0
_handlers: list[Callable[[], Awaitable[Any]]] = []


def register(handler: Callable[[], Awaitable[Any]]) -> None:
    _handlers.append(handler)


async def run_handlers() -> None:
    if not _handlers:
        return
    log.info("shutting down: %d handler(s)", len(_handlers))
    try:
        await asyncio.wait_for(asyncio.gather(*(h() for h in _handlers), return_exceptions=True), timeout=GRACE)
    except asyncio.TimeoutError:
        log.warning("shutdown handlers did not finish within %gs", GRACE)


def install() -> None:
    """Hook into daphne's reactor, if this process runs one (not under tests' in-process servers)."""
    try:
        from twisted.internet import defer, reactor
    except ImportError:
        return

    def trigger() -> Any:
        return defer.Deferred.fromFuture(asyncio.ensure_future(run_handlers()))

    reactor.addSystemEventTrigger("before", "shutdown", trigger)  # type: ignore[attr-defined]
