"""Websocket handshake authentication.

Browsers authenticate with the Django session cookie and must come from an
allowed Origin (a cross-site page could otherwise ride the cookie); CLIs and
scripts send `Authorization: Token <key>` and no cookie. A token is never
accepted in the URL, where it would end up in logs.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from channels.auth import AuthMiddlewareStack
from channels.security.websocket import WebsocketDenier
from django.conf import settings
from django.http.request import is_same_domain, split_domain_port, validate_host

from lsl_site import dbpool
from django.contrib.auth.models import AnonymousUser


def _user_for_key(key: str | None, meta: dict[str, str]) -> Any:
    """The key's user, or None; a wrong key counts against the caller's address (accounts/auth.py),
    and TooManyFailures is raised, the key unchecked, while that address is over its rate."""
    from accounts.auth import user_for_key_throttled

    result = user_for_key_throttled(key, meta)
    return result[0] if result else None


def _client_meta(scope: dict[str, Any]) -> dict[str, str]:
    """What the HTTP side's throttles read (REMOTE_ADDR, X-Forwarded-For), from a websocket scope."""
    client = scope.get("client") or ("", 0)
    meta = {"REMOTE_ADDR": str(client[0] or "")}
    forwarded = _header(scope, b"x-forwarded-for")
    if forwarded is not None:
        meta["HTTP_X_FORWARDED_FOR"] = forwarded
    return meta


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _headers(scope: dict[str, Any], name: bytes) -> list[str]:
    return [value.decode("latin-1") for key, value in scope.get("headers", []) if key.lower() == name]


class _TokenAuth:
    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.denier = WebsocketDenier.as_asgi()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        header = _header(scope, b"authorization")
        if header is not None:
            from accounts.auth import TooManyFailures, parse_authorization

            key = parse_authorization(header)
            user = None
            if key or header.split(" ", 1)[0].lower() == "token":
                try:
                    user = await dbpool.run(_user_for_key, key, _client_meta(scope))
                except TooManyFailures:
                    # The address is over its failed-authentication rate: refused before the handshake
                    # (HTTP 403; a websocket handshake cannot answer 429 through the ASGI server).
                    return await self.denier(scope, receive, send)
            scope = dict(scope, user=user or AnonymousUser(), auth_method="token")
            return await self.inner(scope, receive, send)
        return await self.inner(scope, receive, send)


# An origin is compared as (scheme, host, port), with the scheme's default port filled in: a page
# on another port or scheme of the same host is another origin, and must not ride the cookie.
_DEFAULT_PORTS = {"http": 80, "https": 443}
_WS_TO_HTTP = {"ws": "http", "wss": "https", "http": "http", "https": "https"}
Origin = tuple[str, str, int]


def _host_key(host: str) -> str:
    """A host name compared case-insensitively, without a trailing dot; IPv6 literals in brackets."""
    host = host.lower().rstrip(".")
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _parse_origin(value: str) -> Origin | None:
    """`scheme://host[:port]` as (scheme, host, port), or None when it is anything else (`null`,
    a path, credentials, an unknown scheme, a bad port)."""
    try:
        parts = urlsplit(value.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if (scheme not in _DEFAULT_PORTS or not parts.hostname or parts.username is not None
            or parts.password is not None or parts.path not in ("", "/") or parts.query or parts.fragment):
        return None
    return scheme, _host_key(parts.hostname), port if port is not None else _DEFAULT_PORTS[scheme]


def _allowed_hosts() -> list[str]:
    return list(settings.ALLOWED_HOSTS) or ["localhost", "127.0.0.1", "[::1]"]


class _OriginCheck:
    """Apply the Origin check only to cookie-authenticated (browser) handshakes.

    The Origin must be, as scheme+host+port, either an entry of CSRF_TRUSTED_ORIGINS (Django's
    `https://*.example.com` form included) or the origin the request itself addresses: the
    websocket's scheme (ws -> http, wss -> https) with the Host header's host and port, that host
    being one of ALLOWED_HOSTS. A missing, repeated or malformed Origin is refused (HTTP 403).
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.denier = WebsocketDenier.as_asgi()

    @staticmethod
    def _request_origin(scope: dict[str, Any]) -> Origin | None:
        """The origin this request addresses, if its Host header names an allowed host."""
        scheme = _WS_TO_HTTP.get(str(scope.get("scheme") or "ws").lower())
        hosts = _headers(scope, b"host")
        if scheme is None or len(hosts) != 1:
            return None
        domain, port = split_domain_port(hosts[0])
        if not domain or not validate_host(domain, _allowed_hosts()):
            return None
        if port and not (port.isascii() and port.isdigit()):
            return None
        return scheme, _host_key(domain), int(port) if port else _DEFAULT_PORTS[scheme]

    @classmethod
    def _allowed_origins(cls, scope: dict[str, Any]) -> list[Origin]:
        """(scheme, host, port) triples; a host starting with "." also matches its subdomains."""
        allowed: list[Origin] = []
        for entry in settings.CSRF_TRUSTED_ORIGINS:
            wildcard = "://*." in entry
            parsed = _parse_origin(entry.replace("://*.", "://", 1) if wildcard else entry)
            if parsed is not None:
                scheme, host, port = parsed
                allowed.append((scheme, "." + host if wildcard else host, port))
        own = cls._request_origin(scope)
        if own is not None:
            allowed.append(own)
        return allowed

    @classmethod
    def origin_allowed(cls, scope: dict[str, Any]) -> bool:
        values = _headers(scope, b"origin")
        origin = _parse_origin(values[0]) if len(values) == 1 else None
        if origin is None:
            return False
        scheme, host, port = origin
        return any(scheme == a_scheme and port == a_port
                   and (host == a_host or (a_host.startswith(".") and is_same_domain(host, a_host)))
                   for a_scheme, a_host, a_port in cls._allowed_origins(scope))

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        if scope.get("auth_method") == "token" and _header(scope, b"cookie") is None:
            return await self.inner(scope, receive, send)  # no cookie to ride: no Origin needed
        if self.origin_allowed(scope):
            return await self.inner(scope, receive, send)
        return await self.denier(scope, receive, send)  # closed before accept: HTTP 403


def WebsocketAuthMiddleware(inner: Any) -> Any:  # noqa: N802 - reads like the Channels stacks it wraps
    """Session-cookie auth, then token auth overriding it, then the Origin check."""
    return AuthMiddlewareStack(_TokenAuth(_OriginCheck(inner)))
