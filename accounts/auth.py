"""`Authorization: Token <key>` for the REST API and the websocket handshake, and the gate that
throttles callers without valid credentials.

DRF authenticates before it checks permissions and throttles, so an anonymous or wrongly
authenticated caller would get its 401 before any throttle counted it. The counting therefore
happens here, per client address (lsl_site/throttling.py): a request with a wrong token counts
against the `auth_failures` rate, and once the address is over it its tokens are refused unchecked
with a 429 (Retry-After, the API's JSON error shape) until the window ends; a request with no valid
credentials at all (none, an unknown scheme, an expired or forged session cookie) counts against the
`anon` rate. A caller with a valid session or token is never counted here.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.contrib.auth.models import AbstractBaseUser
from django.utils import timezone
from rest_framework import authentication, exceptions

from accounts.models import APIToken
from accounts.tokens import secret_matches, split_key
from lsl_site.throttling import AuthFailures, anonymous_request_wait, client_ident

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


class TooManyFailures(Exception):
    """An address used up its wrong credentials for now: try again in `wait` seconds."""

    def __init__(self, wait: float) -> None:
        super().__init__(f"too many failed authentications; retry in {wait:.0f} s")
        self.wait = wait


def user_for_key_throttled(key: str | None, meta: dict[str, Any]) -> tuple[AbstractBaseUser, APIToken] | None:
    """user_for_key() for a caller at `meta`'s address (REMOTE_ADDR etc.), counting a wrong key
    (None: a malformed one) against that address. Raises TooManyFailures, without looking at the key,
    while the address is over the `auth_failures` rate."""
    failures = AuthFailures(client_ident(meta))
    wait = failures.wait()
    if wait is not None:
        raise TooManyFailures(wait)
    result = user_for_key(key) if key else None
    if result is None:
        failures.record()
    return result


class APITokenAuthentication(authentication.BaseAuthentication):
    """The API's first authenticator: tokens, and the throttle gate for everything that is not
    authenticated by the session either (SessionAuthentication comes next in
    REST_FRAMEWORK["DEFAULT_AUTHENTICATION_CLASSES"])."""

    keyword = "Token"

    def authenticate(self, request: Any) -> tuple[AbstractBaseUser, APIToken] | None:
        header = request.META.get("HTTP_AUTHORIZATION", "")
        key = parse_authorization(header) if header else None
        if key is None and header.split(" ", 1)[0].lower() != "token":
            # No token: the session decides (SessionAuthentication, next). Django resolved the session's
            # user already; without one, this is an anonymous caller, counted before any 401.
            if not getattr(getattr(request._request, "user", None), "is_authenticated", False):
                self._throttle_anonymous(request)
            return None
        try:
            result = user_for_key_throttled(key, request.META)
        except TooManyFailures as exc:
            raise exceptions.Throttled(wait=exc.wait, detail="Too many failed authentications from this address.") from None
        if result is not None:
            return result
        if key is None:
            raise exceptions.AuthenticationFailed("Malformed Authorization header; expected 'Token <key>'.")
        raise exceptions.AuthenticationFailed("Invalid, expired or revoked API token.")

    @staticmethod
    def _throttle_anonymous(request: Any) -> None:
        wait = anonymous_request_wait(request._request)
        if wait is not None:
            raise exceptions.Throttled(wait=wait)

    def authenticate_header(self, request: Any) -> str:
        return self.keyword
