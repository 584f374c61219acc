"""The idle-stop watcher: a daemon thread in each serving process that stops idle environments.

It runs `services.stop_idle_environments` every LSL_IDLE_CHECK_INTERVAL seconds
when LSL_IDLE_STOP_AFTER > 0. Several processes may run it: stopping is
idempotent (each re-reads the row before stopping). `manage.py lsl_idle_stop`
does one pass, for cron-style deployments.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

from django.conf import settings
from django.db import close_old_connections, connection

log = logging.getLogger(__name__)
_started = threading.Event()


def serving() -> bool:
    """True in a daphne process (or `runserver`'s serving child), where the watcher belongs."""
    if os.environ.get("LSL_IDLE_WATCHER", "").lower() in ("1", "true", "yes"):
        return True
    argv0 = os.path.basename(sys.argv[0]) if sys.argv else ""
    if argv0 == "daphne" or (argv0 == "__main__.py" and "daphne" in sys.argv[0]):
        return True
    return "runserver" in sys.argv[1:2] and os.environ.get("RUN_MAIN") == "true"


def _loop() -> None:
    from environments import services

    interval = settings.LSL_IDLE_CHECK_INTERVAL
    log.info("idle watcher: stopping environments idle for %gs (checking every %gs)", settings.LSL_IDLE_STOP_AFTER, interval)
    while True:
        threading.Event().wait(interval)
        close_old_connections()
        try:
            stopped = services.stop_idle_environments()
            for env in stopped:
                log.info("idle watcher: stopped %s", env)
        except Exception:  # never let the watcher die
            log.exception("idle watcher pass failed")
        finally:
            connection.close()


def start_watcher() -> bool:
    """Start the watcher once per process, if idle stop is on. Returns whether it runs."""
    if settings.LSL_IDLE_STOP_AFTER <= 0 or _started.is_set():
        return _started.is_set()
    _started.set()
    threading.Thread(target=_loop, name="lsl-idle-watcher", daemon=True).start()
    return True
