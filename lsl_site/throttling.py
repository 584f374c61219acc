"""DRF throttles that fail open when their cache (Redis) is down.

A throttle protects the service; it must not take it down. With LSL_REDIS_URL set, the cache is
Redis, and an outage would otherwise turn every API call into an HTML 500. Failing open is logged
(at most every few seconds) so an operator sees why nothing is being throttled.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from rest_framework import throttling

log = logging.getLogger(__name__)
_last_warning = 0.0


class _FailOpen:
    def allow_request(self, request: Any, view: Any) -> bool:
        global _last_warning
        try:
            return super().allow_request(request, view)  # type: ignore[misc]
        except Exception as exc:  # redis.ConnectionError, timeouts: the cache is unavailable
            if time.monotonic() - _last_warning > 10:
                _last_warning = time.monotonic()
                log.warning("throttling is off: its cache is unavailable (%s: %s)", exc.__class__.__name__, exc)
            return True


class AnonRateThrottle(_FailOpen, throttling.AnonRateThrottle):
    pass


class UserRateThrottle(_FailOpen, throttling.UserRateThrottle):
    pass


class ScopedRateThrottle(_FailOpen, throttling.ScopedRateThrottle):
    pass
