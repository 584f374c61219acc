"""The Content-Security-Policy of every response (django-csp), plus this host's websocket origins.

The policy itself is settings.CONTENT_SECURITY_POLICY. It can name only fixed sources, but the pages'
websockets go to the host the page came from (frontend/src/events.js, terminal.js), which is one of
several allowed names (LSL_ALLOWED_HOSTS). CSP Level 3 lets `'self'` match ws:/wss: on the page's own
host and port, and current Chromium and Firefox do so; older engines (Safari before 15.4) match only
http(s) with 'self'. So the response also names `ws://<host>` and `wss://<host>` explicitly, the host
being the request's own (validated against ALLOWED_HOSTS by request.get_host(), so nothing a client
sends can add a source or a directive).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from csp.middleware import CSPMiddleware, PolicyParts
from django.core.exceptions import DisallowedHost

if TYPE_CHECKING:
    from django.http import HttpRequest, HttpResponseBase


class ContentSecurityPolicyMiddleware(CSPMiddleware):
    def get_policy_parts(self, request: HttpRequest, response: HttpResponseBase,
                         report_only: bool = False) -> PolicyParts:
        parts = super().get_policy_parts(request, response, report_only)
        try:
            host = request.get_host()
        except DisallowedHost:
            return parts  # a 400 for a bad Host header: no websocket sources for it
        update = dict(parts.update or {})
        sources = list(update.get("connect-src") or [])
        update["connect-src"] = [*sources, f"ws://{host}", f"wss://{host}"]
        parts.update = update
        return parts
