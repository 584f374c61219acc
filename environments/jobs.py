"""Background work that must not hold a request open (image pulls, provisioning).

A small thread pool in the serving process: LSL's jobs are I/O-bound waits on
the Docker engine, and their progress is written to the database, so any
process can report it. Jobs are submitted `on_commit` so they never see a row
that might still roll back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from django.db import close_old_connections, connection, transaction

log = logging.getLogger(__name__)
_executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="lsl-job")
_pending: set[Future[Any]] = set()


def _run(fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    close_old_connections()
    try:
        fn(*args)
    except Exception:  # a job's failure is recorded by the job itself; this is the last resort
        log.exception("background job %s failed", getattr(fn, "__name__", fn))
    finally:
        connection.close()


def submit_on_commit(fn: Callable[..., Any], *args: Any) -> None:
    def submit() -> None:
        future = _executor.submit(_run, fn, args)
        _pending.add(future)
        future.add_done_callback(_pending.discard)

    transaction.on_commit(submit)


def wait_idle(timeout: float = 120.0) -> None:
    """Block until submitted jobs finish (used by management commands and tests)."""
    for future in list(_pending):
        future.result(timeout=timeout)
