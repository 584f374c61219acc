"""`Authorization: Token <key>` for the REST API and the websocket handshake."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.contrib.auth.models import AbstractBaseUser
from django.utils import timezone
from rest_framework import authentication, exceptions

from accounts.models import APIToken
from accounts.tokens import secret_matches, split_key

# Writing last_used_at on every request would turn reads into writes; a minute is precise enough.
LAST_USED_RESOLUTION = timedelta(seconds=60)


def user_for_key(key: str) -> tuple[AbstractBaseUser, APIToken] | None:
    """Resolve a raw key to (user, token), or None if it is unknown, revoked or expired."""
    parts = split_key(key.strip())
    if parts is None:
        return None
    prefix, secret = parts
    token = APIToken.objects.select_related("user").filter(prefix=prefix).first()
    if token is None or not secret_matches(secret, token.digest):
        return None
    if not token.is_live or not token.user.is_active:
        return None
    now = timezone.now()
    if token.last_used_at is None or now - token.last_used_at > LAST_USED_RESOLUTION:
        APIToken.objects.filter(pk=token.pk).update(last_used_at=now)
        token.last_used_at = now
    return token.user, token


def parse_authorization(header: str) -> str | None:
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "token" or not key.strip():
        return None
    return key.strip()


class APITokenAuthentication(authentication.BaseAuthentication):
    keyword = "Token"

    def authenticate(self, request: Any) -> tuple[AbstractBaseUser, APIToken] | None:
        header = request.META.get("HTTP_AUTHORIZATION", "")
        if not header:
            return None
        key = parse_authorization(header)
        if key is None:
            if header.split(" ", 1)[0].lower() == "token":
                raise exceptions.AuthenticationFailed("Malformed Authorization header; expected 'Token <key>'.")
            return None
        result = user_for_key(key)
        if result is None:
            raise exceptions.AuthenticationFailed("Invalid, expired or revoked API token.")
        return result

    def authenticate_header(self, request: Any) -> str:
        return self.keyword
