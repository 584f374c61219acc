"""Throttling written as an attacker (issue 12): callers without valid credentials are counted before
their 401, per client address, and get 429 + Retry-After in the API's JSON error shape once over.

- wrong API tokens (HTTP and websocket handshakes) and the sign-in form's wrong passwords share the
  `auth_failures` rate; past it an address's credentials are refused unchecked until the window ends;
- requests without credentials (none, an unknown scheme, a forged session cookie) count against `anon`;
- a good token from another address, or after the window, is unaffected; a valid session never counts;
- with the cache unreachable all of it fails open: never a 429, never a 500.

Rates are set per test (tests/pytest_env.py makes them huge for the rest of the suite).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterator
from typing import Any
from unittest import mock

import pytest
from channels.generic.websocket import AsyncWebsocketConsumer
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.core.cache import cache
from django.test import Client, override_settings
from rest_framework.test import APIClient

from accounts.models import APIToken
from lsl_site import throttling
from sessions.auth import WebsocketAuthMiddleware
from tests.conftest import make_token

ENVIRONMENTS = "/api/v1/environments/"


def rates(**overrides: str) -> Any:
    """override_settings for REST_FRAMEWORK with some throttle rates replaced (and X-Forwarded-For not trusted)."""
    config = {**settings.REST_FRAMEWORK, "NUM_PROXIES": 0}
    config["DEFAULT_THROTTLE_RATES"] = {**config["DEFAULT_THROTTLE_RATES"], **overrides}
    return override_settings(REST_FRAMEWORK=config)


@pytest.fixture(autouse=True)
def clean_cache() -> Iterator[None]:
    cache.clear()
    yield
    cache.clear()


def client_from(address: str, **headers: str) -> APIClient:
    return APIClient(REMOTE_ADDR=address, **headers)


def assert_throttled(response: Any, *, period: int = 60) -> None:
    assert response.status_code == 429, (response.status_code, response.content[:300])
    assert 1 <= int(response["Retry-After"]) <= period
    error = json.loads(response.content)["error"]  # (the schema view renders JSON as application/vnd.oai.openapi+json)
    assert error["code"] == "throttled" and "Expected available in" in error["detail"]


# --- wrong tokens ---------------------------------------------------------------------------------

@pytest.mark.django_db
def test_a_loop_of_bad_tokens_gets_429_and_then_even_a_good_token_from_there_is_refused_unchecked(people: Any) -> None:
    good = make_token(people.owner)
    with rates(auth_failures="5/min"):
        attacker = client_from("203.0.113.7")
        # Forged keys of every shape: well-formed but unknown, garbage, the scheme with no key.
        for key in ("lsl_abcdefgh_" + "x" * 40, "nonsense", "lsl_" + good.split("_")[1] + "_wrongsecret", "", "again"):
            response = attacker.get(ENVIRONMENTS, HTTP_AUTHORIZATION=f"Token {key}".rstrip())
            assert response.status_code == 401, response.content
            assert response.json()["error"]["code"] == "authentication_failed"
        for _ in range(3):
            assert_throttled(attacker.get(ENVIRONMENTS, HTTP_AUTHORIZATION="Token lsl_abcdefgh_" + "y" * 40))

        # Past the rate the address's credentials are not even looked at: a right key fails too, unused.
        token = APIToken.objects.get(user=people.owner)
        APIToken.objects.filter(pk=token.pk).update(last_used_at=None)
        assert_throttled(client_from("203.0.113.7").get(ENVIRONMENTS, HTTP_AUTHORIZATION=f"Token {good}"))
        assert APIToken.objects.get(pk=token.pk).last_used_at is None

        # Another address is unaffected, and so is this one once the window is over.
        assert client_from("198.51.100.20").get(ENVIRONMENTS, HTTP_AUTHORIZATION=f"Token {good}").status_code == 200
        later = time.time() + 61
        with mock.patch("lsl_site.throttling.time.time", return_value=later):
            assert client_from("203.0.113.7").get(ENVIRONMENTS, HTTP_AUTHORIZATION=f"Token {good}").status_code == 200


@pytest.mark.django_db
def test_x_forwarded_for_does_not_buy_a_fresh_allowance(people: Any) -> None:
    with rates(auth_failures="3/min"):
        attacker = client_from("203.0.113.8")
        for n in range(3):
            response = attacker.get(ENVIRONMENTS, HTTP_AUTHORIZATION="Token bad", HTTP_X_FORWARDED_FOR=f"10.9.9.{n}")
            assert response.status_code == 401
        assert_throttled(attacker.get(ENVIRONMENTS, HTTP_AUTHORIZATION="Token bad", HTTP_X_FORWARDED_FOR="10.9.9.99"))


@pytest.mark.django_db
def test_an_ipv6_client_is_counted_by_its_64(people: Any) -> None:
    with rates(auth_failures="2/min"):
        for n in (1, 2):
            assert client_from(f"2001:db8:1:2::{n}").get(ENVIRONMENTS, HTTP_AUTHORIZATION="Token bad").status_code == 401
        assert_throttled(client_from("2001:db8:1:2::ffff").get(ENVIRONMENTS, HTTP_AUTHORIZATION="Token bad"))
        assert client_from("2001:db8:1:3::1").get(ENVIRONMENTS, HTTP_AUTHORIZATION="Token bad").status_code == 401


# --- no credentials -------------------------------------------------------------------------------

@pytest.mark.django_db
def test_anonymous_and_forged_session_requests_are_counted_before_their_401(people: Any) -> None:
    with rates(anon="4/min"):
        probe = client_from("203.0.113.9")
        assert probe.get(ENVIRONMENTS).status_code == 401
        assert probe.get(ENVIRONMENTS, HTTP_AUTHORIZATION="Bearer whatever").status_code == 401  # unknown scheme
        forged = client_from("203.0.113.9")
        forged.cookies[settings.SESSION_COOKIE_NAME] = "0123456789abcdefghijklmnopqrstuv"
        assert forged.get(ENVIRONMENTS).status_code == 401
        assert forged.post(ENVIRONMENTS, {}, format="json").status_code == 401
        assert_throttled(probe.get(ENVIRONMENTS))
        assert_throttled(forged.get("/api/v1/me/"))

        # A logged-in browser at the same address is not counted, nor is another address.
        browser = client_from("203.0.113.9")
        browser.force_login(people.owner)
        assert browser.get(ENVIRONMENTS).status_code == 200
        assert client_from("198.51.100.21").get(ENVIRONMENTS).status_code == 401


@pytest.mark.django_db
def test_allow_any_views_count_an_anonymous_request_once() -> None:
    # The schema is AllowAny: the view's own anon throttle must not count what authentication counted.
    with rates(anon="3/min"):
        reader = client_from("203.0.113.10")
        for _ in range(3):
            assert reader.get("/api/schema/?format=json").status_code == 200
        assert_throttled(reader.get("/api/schema/?format=json"))


# --- the sign-in form -----------------------------------------------------------------------------

@pytest.mark.django_db
def test_the_sign_in_form_counts_wrong_passwords_per_address(people: Any) -> None:
    with rates(auth_failures="4/min"):
        sprayer = Client(REMOTE_ADDR="203.0.113.11")
        # Password spraying: one guess per username stays under the per-username lockout (frontend/forms.py)...
        for username in ("alice", "bob", "mallory"):
            response = sprayer.post("/login/", {"username": username, "password": "Winter2026!"})
            assert response.status_code == 200 and "correct username and password" in response.content.decode()
        # ...and wrong API tokens from the same address count too.
        assert APIClient(REMOTE_ADDR="203.0.113.11").get(ENVIRONMENTS, HTTP_AUTHORIZATION="Token bad").status_code == 401
        locked = sprayer.post("/login/", {"username": "victor", "password": "password-victor"})  # right, but too late
        assert locked.status_code == 429 and 1 <= int(locked["Retry-After"]) <= 60
        assert "Too many failed sign-in attempts from your address" in locked.content.decode()
        assert "_auth_user_id" not in sprayer.session
        assert Client(REMOTE_ADDR="198.51.100.22").post("/login/", {"username": "victor", "password": "password-victor"}).status_code == 302


# --- the websocket handshake ----------------------------------------------------------------------

class WhoAmI(AsyncWebsocketConsumer):
    """Accepts anyone and says who the handshake authenticated (the real consumers refuse anonymous users)."""

    async def connect(self) -> None:
        await self.accept()
        user = self.scope["user"]
        await self.send(text_data=user.get_username() if user.is_authenticated else "anonymous")


async def handshake(key: str, address: str) -> str:
    """What a websocket handshake with `Authorization: Token key` from `address` gets: a user name,
    "anonymous", or "refused" (denied before the handshake)."""
    app = WebsocketAuthMiddleware(WhoAmI.as_asgi())
    communicator = WebsocketCommunicator(app, "/ws/whoami/", headers=[(b"authorization", f"Token {key}".encode()),
                                                                    (b"host", b"testserver")])
    communicator.scope["client"] = (address, 50000)
    connected, _ = await communicator.connect(timeout=10)
    if not connected:
        return "refused"
    try:
        return await communicator.receive_from(timeout=10)
    finally:
        await communicator.disconnect()


@pytest.mark.django_db(transaction=True, serialized_rollback=True)  # the handshake reads tokens on a pool thread
def test_websocket_handshakes_with_bad_tokens_count_too(people: Any) -> None:
    good = make_token(people.owner)
    with rates(auth_failures="3/min"):
        async def scenario() -> list[str]:
            return [await handshake("lsl_abcdefgh_" + "z" * 40, "203.0.113.12") for _ in range(3)] + [
                await handshake(good, "203.0.113.12"),   # over the rate: refused unchecked
                await handshake(good, "198.51.100.23"),  # another address
            ]

        assert asyncio.run(scenario()) == ["anonymous"] * 3 + ["refused", "alice"]


# --- a cache outage -------------------------------------------------------------------------------

UNREACHABLE_CACHE = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache",
                                 "LOCATION": "redis://127.0.0.1:9/0",  # discard port: nothing listens
                                 "OPTIONS": {"socket_connect_timeout": 0.5, "socket_timeout": 0.5}}}


@pytest.mark.django_db
def test_with_the_cache_unreachable_everything_fails_open(people: Any, caplog: pytest.LogCaptureFixture) -> None:
    good = make_token(people.owner)
    caplog.set_level(logging.WARNING)
    throttling._last_warning = 0.0  # the warning is rate-limited across the process
    with rates(auth_failures="1/min", anon="1/min"), override_settings(CACHES=UNREACHABLE_CACHE):
        attacker = client_from("203.0.113.13")
        for _ in range(4):
            response = attacker.get(ENVIRONMENTS, HTTP_AUTHORIZATION="Token bad")
            assert response.status_code == 401 and response.json()["error"]["code"] == "authentication_failed"
        for _ in range(3):
            assert attacker.get(ENVIRONMENTS).status_code == 401
        assert attacker.get("/api/schema/").status_code == 200
        assert client_from("203.0.113.13").get(ENVIRONMENTS, HTTP_AUTHORIZATION=f"Token {good}").status_code == 200
        browser = Client(REMOTE_ADDR="203.0.113.13")
        for _ in range(2):
            assert browser.post("/login/", {"username": "alice", "password": "wrong"}).status_code == 200
        assert browser.post("/login/", {"username": "alice", "password": "password-alice"}).status_code == 302
    assert "throttling is off: its cache is unavailable" in caplog.text
