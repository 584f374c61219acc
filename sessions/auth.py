"""Websocket handshake authentication.

Browsers authenticate with the Django session cookie and must come from an
allowed Origin (a cross-site page could otherwise ride the cookie); CLIs and
scripts send `Authorization: Token <key>` and no cookie. A token is never
accepted in the URL, where it would end up in logs.
"""

from __future__ import annotations

from typing import Any

from channels.auth import AuthMiddlewareStack
from channels.security.websocket import OriginValidator
from django.conf import settings

from lsl_site import dbpool
from django.contrib.auth.models import AnonymousUser


def _user_for_key(key: str) -> Any:
    from accounts.auth import user_for_key

    result = user_for_key(key)
    return result[0] if result else None


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class _TokenAuth:
    def __init__(self, inner: Any) -> None:
        self.inner = inner

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        header = _header(scope, b"authorization")
        if header is not None:
            from accounts.auth import parse_authorization

            key = parse_authorization(header)
            user = await dbpool.run(_user_for_key, key) if key else None
            scope = dict(scope, user=user or AnonymousUser(), auth_method="token")
            return await self.inner(scope, receive, send)
        return await self.inner(scope, receive, send)


class _OriginCheck:
    """Apply the Origin check only to cookie-authenticated (browser) handshakes."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.validated = OriginValidator(inner, self._allowed_origins())

    @staticmethod
    def _allowed_origins() -> list[str]:
        hosts = list(settings.ALLOWED_HOSTS)
        return hosts or ["localhost", "127.0.0.1"]

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        if scope.get("auth_method") == "token" and _header(scope, b"cookie") is None:
            return await self.inner(scope, receive, send)
        return await self.validated(scope, receive, send)


def WebsocketAuthMiddleware(inner: Any) -> Any:  # noqa: N802 - reads like the Channels stacks it wraps
    """Session-cookie auth, then token auth overriding it, then the Origin check."""
    return AuthMiddlewareStack(_TokenAuth(_OriginCheck(inner)))
