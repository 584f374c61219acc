"""Database calls from async code (websocket consumers, session hubs) on threads that keep their connections.

channels' `database_sync_to_async` runs a consumer's calls in that consumer's own thread-sensitive
context -- with daphne, a thread per websocket -- and closes the connection around each call
(CONN_MAX_AGE=0, right for daphne's HTTP requests, which also get a thread each). So every query
of every participant opened a new database connection: a join storm of 500 participants spent
14% of its time in `get_new_connection` alone. `run` instead hands the call to a small pool of
long-lived threads, each keeping its connection across calls and checking it before use
(`refresh_connections`, as the worker's threads do).

Threading contract: `run` is awaited on the event loop; the function runs in one of the pool's
LSL_DB_THREADS threads, so it must be safe to run concurrently with itself (every `services`
function is: each is one transaction).
"""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

from django.conf import settings
from django.db import connections

T = TypeVar("T")

_pool: ThreadPoolExecutor | None = None


def _executor() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=int(settings.LSL_DB_THREADS), thread_name_prefix="lsl-db")
    return _pool


async def run(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)` on a pool thread with a kept database connection."""
    return await asyncio.get_running_loop().run_in_executor(_executor(), functools.partial(_call, fn, args, kwargs))


def _call(fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]) -> T:
    refresh_connections()
    try:
        return fn(*args, **kwargs)
    finally:
        for conn in connections.all(initialized_only=True):
            if conn.connection is not None and not conn.get_autocommit():
                conn.close()  # a call that left a transaction open does not leak it into the next


def refresh_connections() -> None:
    """close_old_connections() for threads that live long: keeps the thread's connection open
    instead of closing it.

    With CONN_MAX_AGE=0, close_old_connections() closes every connection, so each call opened a
    new one: about a millisecond on SQLite, more on PostgreSQL. Long-lived threads (this pool, the
    worker's) each keep one. As with close_old_connections(), a connection left outside autocommit
    or that saw an error and no longer answers is closed (the next query opens a new one); and a
    kept one is checked (is_usable: free on SQLite, `SELECT 1` on PostgreSQL) before its next use,
    as CONN_HEALTH_CHECKS does, so a restarted database server costs a reconnect, not a failure.
    """
    for conn in connections.all(initialized_only=True):
        if conn.connection is None:
            continue
        try:
            keep = conn.get_autocommit() == conn.settings_dict["AUTOCOMMIT"] and (
                not conn.errors_occurred or conn.is_usable())
        except Exception:
            keep = False
        if not keep:
            try:
                conn.close()  # leaves conn.connection None even when closing fails
            except Exception:
                pass
            continue
        conn.errors_occurred = False
        conn.health_check_enabled = True  # reset from the settings on every connect
        conn.health_check_done = False
