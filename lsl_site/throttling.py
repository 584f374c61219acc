"""Throttles that fail open when their cache (Redis) is down.

A throttle protects the service; it must not take it down. With LSL_REDIS_URL set, the cache is
Redis, and an outage would otherwise turn every API call into an HTML 500. Failing open is logged
(at most every few seconds) so an operator sees why nothing is being throttled.

Two throttles run before DRF's own (which come after authentication and permissions, so a 401 would
always win over them): accounts/auth.py counts API requests without credentials against the `anon`
rate, and wrong credentials (API tokens over HTTP and websockets, the sign-in form's passwords)
against the `auth_failures` rate (AuthFailures below), both per client address.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import time
from typing import Any

from django.core.cache import cache
from rest_framework import throttling
from rest_framework.settings import api_settings

log = logging.getLogger(__name__)
_last_warning = 0.0

# Set on a request that accounts/auth.py already counted against the anon rate, so that the view's
# AnonRateThrottle (AllowAny views: the schema, the docs) does not count it a second time.
ANON_COUNTED = "_lsl_anon_counted"


def _warn_unavailable(exc: Exception) -> None:
    global _last_warning
    if time.monotonic() - _last_warning > 10:
        _last_warning = time.monotonic()
        log.warning("throttling is off: its cache is unavailable (%s: %s)", exc.__class__.__name__, exc)


def client_ident(meta: dict[str, Any]) -> str:
    """The client address a per-address throttle counts: REMOTE_ADDR, or with LSL_NUM_PROXIES = N
    trusted proxies the address the N-th of them appended to X-Forwarded-For (DRF's rule; anything
    a client wrote further left is its own claim). An IPv6 address is widened to its /64, the block one
    subscriber gets (else each of its addresses would be a fresh allowance)."""
    ident = meta.get("REMOTE_ADDR") or ""
    num_proxies = api_settings.NUM_PROXIES
    forwarded = meta.get("HTTP_X_FORWARDED_FOR")
    if num_proxies and forwarded:
        addresses = [part.strip() for part in forwarded.split(",")]
        ident = addresses[-min(num_proxies, len(addresses))]
    try:
        address = ipaddress.ip_address(ident)
    except ValueError:
        return ident or "unknown"
    if address.version == 6 and address.ipv4_mapped is None:
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(getattr(address, "ipv4_mapped", None) or address)


def parse_rate(rate: str | None) -> tuple[int, int] | None:
    """`N/period` (period s, m, h or d, as DRF reads it: `20/min`, `100/hour`) -> (N, seconds)."""
    if not rate:
        return None
    num, period = rate.split("/")
    return int(num), {"s": 1, "m": 60, "h": 3600, "d": 86400}[period[0]]


def _rate(scope: str) -> str | None:
    # Read at call time, not import time (DRF's THROTTLE_RATES is frozen at import), so that a
    # settings override (tests, a reload) takes effect.
    return api_settings.DEFAULT_THROTTLE_RATES.get(scope)


class _FailOpen:
    def get_rate(self) -> str | None:
        return _rate(self.scope)  # type: ignore[attr-defined]

    def get_ident(self, request: Any) -> str:
        return client_ident(request.META)

    def allow_request(self, request: Any, view: Any) -> bool:
        try:
            return super().allow_request(request, view)  # type: ignore[misc]
        except Exception as exc:  # redis.ConnectionError, timeouts: the cache is unavailable
            _warn_unavailable(exc)
            return True


class AnonRateThrottle(_FailOpen, throttling.AnonRateThrottle):
    def allow_request(self, request: Any, view: Any) -> bool:
        if getattr(request, ANON_COUNTED, False):
            return True  # accounts/auth.py counted (and allowed) this request already
        return super().allow_request(request, view)


class UserRateThrottle(_FailOpen, throttling.UserRateThrottle):
    pass


class ScopedRateThrottle(_FailOpen, throttling.ScopedRateThrottle):
    pass


def anonymous_request_wait(request: Any) -> float | None:
    """Count an API request that carries no valid credentials against the `anon` rate; the seconds to
    wait when it is over the rate, else None. `request` is Django's HttpRequest (its `user` is the
    session's, already resolved: DRF's Request.user cannot be read while it is being authenticated)."""
    throttle = AnonRateThrottle()
    if throttle.allow_request(request, None):
        setattr(request, ANON_COUNTED, True)
        return None
    return throttle.wait() or 1.0


class AuthFailures:
    """Wrong credentials per client address, in fixed windows of the `auth_failures` rate's period.

    `wait()` is asked *before* a credential is checked: once an address has used up its failures for
    the window, its credentials are refused unchecked (so they cannot be probed further, nor cost a
    lookup) until the window ends; `record()` counts one failure. Counting is cache.incr: atomic in
    Redis and the local cache, so concurrent guesses cannot overrun the count. Both fail open.
    """

    scope = "auth_failures"

    def __init__(self, ident: str) -> None:
        self.ident = ident
        self.rate = parse_rate(_rate(self.scope))

    def _key(self, now: float) -> tuple[str, float]:
        assert self.rate is not None
        period = self.rate[1]
        window = int(now // period)
        return f"lsl:auth-failures:{self.ident}:{window}", (window + 1) * period - now

    def wait(self) -> float | None:
        """Seconds until this address may try credentials again, or None if it may now."""
        if self.rate is None:
            return None
        key, remaining = self._key(time.time())
        try:
            failures = cache.get(key, 0)
        except Exception as exc:
            _warn_unavailable(exc)
            return None
        return max(1.0, math.ceil(remaining)) if failures >= self.rate[0] else None

    def record(self) -> None:
        if self.rate is None:
            return
        key, remaining = self._key(time.time())
        try:
            cache.add(key, 0, timeout=math.ceil(remaining) + 1)
            try:
                cache.incr(key)
            except ValueError:  # expired between add and incr
                cache.set(key, 1, timeout=math.ceil(remaining) + 1)
        except Exception as exc:
            _warn_unavailable(exc)
