"""The browser preview: an ASGI app in front of Django/Channels that proxies HTTP and websockets
to a port inside an environment.

Routing (environments.preview_urls spells the addresses):
* path mode, on LSL's own host: `/preview/<env>/<port>/...` (the user's session or API token),
  `/preview/t/<ticket>/...` (a personal sandboxed address, below), `/preview/link/<token>/...`
  (a public link), `/preview/auth/` (the subdomain hand-off);
* subdomain mode, any Host under LSL_PREVIEW_DOMAIN: `p<port>-<env hex>.<domain>` (a signed
  host-only cookie set by the hand-off) and `l-<token>.<domain>` (a public link).
Everything else goes to the inner application untouched.

The only destination is the environment's keeper tunnel to 127.0.0.1:<port> inside that
environment's own container (keeper.open_tunnel): whatever the path, Host or request target says,
nothing else can be reached. Every request re-checks the user's role (or the public link's row),
so a revoked grant or link stops working at the next request.

Origins. Subdomain mode gives each preview its own origin: LSL's session cookie (host-only on
LSL's host) never reaches it and its scripts cannot touch LSL. Path mode shares LSL's origin, so a
page from the environment could script LSL as whoever opens it. Hence:
* the one person who can run code in the environment (no one else holds member or admin on it;
  superusers aside) is served their own preview as it is, on LSL's origin: it is their own code,
  as trusted as their terminal, and every dev server works;
* anyone else (an environment shared with teammates) is redirected to a personal address
  `/preview/t/<ticket>/` served with `Content-Security-Policy: sandbox ...` (no allow-same-origin):
  the page runs in an opaque origin that cannot read LSL's cookies or call its API with them. An
  opaque-origin page's sub-requests carry no SameSite cookies, so the address itself (a signed
  ticket bound to user, environment and port, 12 h, role re-checked on every request) is the
  credential; `Referrer-Policy: no-referrer` keeps it from leaking to other sites;
* public links in path mode are sandboxed the same way (the token in the path is the credential).
When LSL_PREVIEW_DOMAIN is set, browser (cookie) requests in path mode are redirected to the
subdomain, so LSL's origin never serves preview content to a browser. In every mode LSL's own
cookies and API token never reach the app, and the app can never set a cookie for LSL's path.

Threading: everything runs on daphne's event loop; database work goes through lsl_site.dbpool,
blocking docker calls through this module's executor (keeper.open_tunnel's `docker_call`).
"""

from __future__ import annotations

import asyncio
import hashlib
import html
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable
from urllib.parse import quote, urlsplit

import h11
from django.conf import settings
from django.core import signing
from django.core.cache import cache
from rest_framework.exceptions import NotFound, PermissionDenied

from environments import preview_urls as urls
from environments.preview_urls import BadPreviewPath, PreviewPath
from lsl_site import dbpool
from lsl_site.errors import DomainError

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

PREVIEW_COOKIE = "__lsl_preview"  # subdomain mode: signed {user, host}; host-only, HttpOnly, SameSite=Lax
COOKIE_MAX_AGE = 12 * 3600
HANDOFF_MAX_AGE = 60  # the ticket in /__lsl_preview_auth?ticket=
PATH_TICKET_MAX_AGE = 12 * 3600  # /preview/t/<ticket>/
AUDIT_EVERY = 600  # PREVIEW_OPENED at most once per (user, env, port) per 10 minutes
FLUSH_EVERY = 5.0  # traffic counters while bytes flow
TUNNEL_TIMEOUT = 20.0
RESPONSE_TIMEOUT = 300.0  # a dev server's first compile can take minutes
READ_CHUNK = 64 * 1024
SEND_BUFFER_LIMIT = 1024 * 1024  # pause reading the upstream while daphne holds this much unsent
WS_MAX_MESSAGE = 16 * 1024 * 1024
SANDBOX_CSP = "sandbox allow-scripts allow-forms allow-popups allow-modals allow-downloads"

_SALT_PATH_TICKET = "lsl.preview.path-ticket"
_SALT_HANDOFF = "lsl.preview.handoff"
_SALT_COOKIE = "lsl.preview.cookie"

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te",
              "trailer", "transfer-encoding", "upgrade"}
# Request headers LSL sets itself (or that would misdirect the upstream).
DROP_REQUEST = HOP_BY_HOP | {"host", "content-length", "expect", "forwarded", "x-forwarded-for", "x-forwarded-host",
                             "x-forwarded-proto", "x-forwarded-prefix", "x-real-ip"}
# Response headers a preview may not send: Clear-Site-Data would wipe LSL's own cookies and storage
# in path mode; Service-Worker-Allowed would let a worker claim LSL's whole origin.
DROP_RESPONSE = HOP_BY_HOP | {"clear-site-data", "service-worker-allowed"}

_docker_executor = ThreadPoolExecutor(max_workers=16, thread_name_prefix="lsl-preview-docker")


async def docker_call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Blocking docker calls off the event loop (a dedicated executor, not Django's thread-sensitive one)."""
    return await asyncio.get_running_loop().run_in_executor(_docker_executor, lambda: fn(*args, **kwargs))


# --- errors ----------------------------------------------------------------------------------

class PreviewError(Exception):
    def __init__(self, status: int, code: str, detail: str, title: str = "") -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail
        self.title = title or {400: "Bad request", 401: "Sign in to see this preview", 403: "Not allowed",
                               404: "No such preview", 409: "The preview is not available",
                               502: "The app did not answer", 504: "The app took too long"}.get(status, "Preview error")


def _domain_error(exc: BaseException) -> PreviewError:
    if isinstance(exc, PreviewError):
        return exc
    if isinstance(exc, NotFound):
        return PreviewError(404, "not_found", str(exc.detail))
    if isinstance(exc, PermissionDenied):
        return PreviewError(403, "permission_denied", str(exc.detail))
    from environments.ports import PortClosed
    if isinstance(exc, PortClosed):
        return PreviewError(502, "port_closed", str(exc))
    if isinstance(exc, DomainError):
        return PreviewError(getattr(exc, "status", 409), getattr(exc, "code", "unavailable"), str(exc))
    return PreviewError(502, "upstream_error", str(exc) or exc.__class__.__name__)


def wants_html(scope: Scope) -> bool:
    accept = header(scope, b"accept") or ""
    return "text/html" in accept


def error_page(err: PreviewError, html_body: bool) -> tuple[bytes, bytes]:
    """(content type, body) of an error: a small page for browsers, the API's JSON shape otherwise."""
    if html_body:
        page = (f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(err.title)}</title></head>"
                f"<body style=\"font-family:system-ui,sans-serif;max-width:40em;margin:3em auto;line-height:1.5\">"
                f"<h1>{html.escape(err.title)}</h1><p>{html.escape(err.detail)}</p>"
                f"<p style=\"color:#666\">LSL browser preview &middot; {err.status} {html.escape(err.code)}</p>"
                f"</body></html>")
        return b"text/html; charset=utf-8", page.encode()
    return b"application/json", json.dumps({"error": {"code": err.code, "detail": err.detail}}).encode()


async def send_simple(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes = b"") -> None:
    base = [(b"content-length", str(len(body)).encode()), (b"cache-control", b"no-store"),
            (b"x-content-type-options", b"nosniff")]
    await send({"type": "http.response.start", "status": status, "headers": base + headers})
    await send({"type": "http.response.body", "body": body})


async def send_error(scope: Scope, send: Send, err: PreviewError) -> None:
    ctype, body = error_page(err, wants_html(scope))
    await send_simple(send, err.status, [(b"content-type", ctype)], body)


async def redirect(send: Send, location: str, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    await send_simple(send, 302, [(b"location", location.encode("latin-1", "replace"))] + (extra or []))


# --- small helpers ----------------------------------------------------------------------------

def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def request_host(scope: Scope) -> str:
    return header(scope, b"host") or ""


def http_scheme(scope: Scope) -> str:
    scheme = str(scope.get("scheme") or "http")
    return {"ws": "http", "wss": "https"}.get(scheme, scheme if scheme in ("http", "https") else "http")


def raw_path(scope: Scope) -> str:
    raw = scope.get("raw_path")
    if raw:
        return raw.decode("latin-1").split("?", 1)[0]
    return quote(scope.get("path", ""), safe="/%:@!$&'()*+,;=-._~")


def query_string(scope: Scope) -> str:
    qs = scope.get("query_string") or b""
    return qs.decode("latin-1")


def cookies(scope: Scope) -> dict[str, str]:
    jar: dict[str, str] = {}
    for key, value in scope.get("headers", []):
        if key.lower() == b"cookie":
            for part in value.decode("latin-1").split(";"):
                name, sep, val = part.strip().partition("=")
                if sep and name and name not in jar:
                    jar[name] = val
    return jar


def lsl_cookie_names() -> set[str]:
    return {settings.SESSION_COOKIE_NAME, settings.CSRF_COOKIE_NAME, PREVIEW_COOKIE}


def filtered_cookie_header(scope: Scope) -> str | None:
    """The request's cookies minus LSL's own (session, CSRF, preview): the app never sees them."""
    names = lsl_cookie_names()
    kept = []
    for key, value in scope.get("headers", []):
        if key.lower() == b"cookie":
            for part in value.decode("latin-1").split(";"):
                name = part.strip().partition("=")[0]
                if part.strip() and name not in names:
                    kept.append(part.strip())
    return "; ".join(kept) if kept else None


def main_origin(scope: Scope) -> str:
    """LSL's own site, for the subdomain hand-off: the first LSL_CSRF_TRUSTED_ORIGINS entry (the
    public origin of a deployment behind a proxy), else the first LSL_ALLOWED_HOSTS name with the
    preview request's scheme and port (one listener serves both)."""
    for origin in settings.CSRF_TRUSTED_ORIGINS:
        if "*" not in origin:
            return origin.rstrip("/")
    port = urls.split_host(request_host(scope))[1]
    for host in settings.ALLOWED_HOSTS:
        if host not in ("*",) and not host.startswith("."):
            return f"{http_scheme(scope)}://{host}{port}"
    return f"{http_scheme(scope)}://127.0.0.1{port}"


# --- targets and who may reach them -------------------------------------------------------------

@dataclass
class Target:
    """A request resolved to one port of one environment, with what the response needs."""

    env_id: uuid.UUID
    container_id: str
    port: int
    via: str  # PortVia
    user_id: int | None
    prefix: str  # path mode: the prefix to strip and put back; "" in subdomain mode
    rest: str  # the upstream's request target path
    sandbox: bool  # serve with the sandbox CSP (path mode, shared environment or public link)
    audit_key: str
    link_id: Any = None
    extra_headers: list[tuple[bytes, bytes]] = field(default_factory=list)


@dataclass
class Access:
    container_id: str
    shared: bool  # someone other than the user can run code in the environment


def _user_from_session(session_key: str | None) -> Any:
    from importlib import import_module

    from django.contrib.auth import get_user
    from django.contrib.auth.models import AnonymousUser
    from django.http import HttpRequest

    if not session_key:
        return AnonymousUser()
    request = HttpRequest()
    request.session = import_module(settings.SESSION_ENGINE).SessionStore(session_key)
    return get_user(request)


def _user_from_token(authorization: str, meta: dict[str, str]) -> Any:

    from accounts.auth import TooManyFailures, parse_authorization, user_for_key_throttled

    try:
        found = user_for_key_throttled(parse_authorization(authorization), meta)
    except TooManyFailures as exc:
        raise PreviewError(429, "throttled", str(exc), "Too many attempts") from None
    if found is None:
        raise PreviewError(401, "not_authenticated", "Invalid API token.")
    return found[0]


def _user_by_id(user_id: int) -> Any:
    from django.contrib.auth import get_user_model
    from django.contrib.auth.models import AnonymousUser

    user = get_user_model().objects.filter(pk=user_id, is_active=True).first()
    return user or AnonymousUser()


def _others_can_run(env: Any, user: Any) -> bool:
    """Whether anyone but `user` (superusers aside: they can do anything anyway) holds member or admin
    on the environment, directly or through a team: then its pages are not the user's own code."""
    from guardian.shortcuts import get_users_with_perms

    from environments.models import ROLE_CODENAMES

    if env.owner_id != user.pk:
        return True
    holders = get_users_with_perms(env, with_superusers=False, with_group_users=True,
                                   only_with_perms_in=ROLE_CODENAMES[1:])
    return holders.exclude(pk=user.pk).filter(is_active=True, is_superuser=False).exists()


def _check_port_access(user: Any, env_id: uuid.UUID, port: int) -> Access:
    """The environment's container if `user` may reach its ports (ports.require_port_access raises
    the model's 404/403/409 otherwise). A database thread."""
    from environments.models import Environment
    from environments.ports import require_port_access

    env = Environment.objects.filter(pk=env_id).first()
    if env is None:
        raise NotFound("No such environment.")
    require_port_access(user, env)
    return Access(env.container_id, _others_can_run(env, user))


def _audit_opened(env_id: uuid.UUID, user_id: int | None, port: int, key: str, **data: Any) -> None:
    """PREVIEW_OPENED at most once per (who, environment, port) per AUDIT_EVERY (keeps the log readable)."""
    from environments.models import PortAuditKind
    from environments.ports import audit

    if cache.add(f"lsl-preview-audit:{key}:{env_id}:{port}", 1, AUDIT_EVERY):
        audit(env_id, user_id, PortAuditKind.PREVIEW_OPENED, port, **data)


def _check_link(token: str) -> tuple[Any, str]:
    from environments.ports import check_reachable, find_public_link

    link = find_public_link(token)
    if link is None:
        raise PreviewError(404, "not_found", "No such preview link: it is unknown, expired or revoked.")
    check_reachable(link.environment)
    return link, link.environment.container_id


def sign_path_ticket(user_id: int, env_id: uuid.UUID, port: int) -> str:
    return signing.TimestampSigner(salt=_SALT_PATH_TICKET).sign_object({"u": user_id, "e": env_id.hex, "p": port})


def read_path_ticket(ticket: str) -> tuple[int, uuid.UUID, int]:
    try:
        data = signing.TimestampSigner(salt=_SALT_PATH_TICKET).unsign_object(ticket, max_age=PATH_TICKET_MAX_AGE)
        return int(data["u"]), uuid.UUID(hex=data["e"]), int(data["p"])
    except (signing.BadSignature, KeyError, TypeError, ValueError):
        raise PreviewError(404, "not_found", "This preview address is unknown or has expired: open the preview "
                                              "again from the environment's page.") from None


def sign_handoff(user_id: int, host: str, next_path: str) -> str:
    return signing.TimestampSigner(salt=_SALT_HANDOFF).sign_object({"u": user_id, "h": host.lower(), "n": next_path})


def read_handoff(ticket: str, host: str) -> tuple[int, str]:
    try:
        data = signing.TimestampSigner(salt=_SALT_HANDOFF).unsign_object(ticket, max_age=HANDOFF_MAX_AGE)
        if data["h"] != host.lower():
            raise ValueError("another host")
        return int(data["u"]), str(data["n"])
    except (signing.BadSignature, KeyError, TypeError, ValueError):
        raise PreviewError(403, "bad_ticket", "This sign-in link is invalid or has expired; open the preview again.",
                           "Sign-in link expired") from None


def sign_cookie(user_id: int, host: str) -> str:
    return signing.TimestampSigner(salt=_SALT_COOKIE).sign_object({"u": user_id, "h": host.lower()})


def read_cookie(value: str | None, host: str) -> int | None:
    if not value:
        return None
    try:
        data = signing.TimestampSigner(salt=_SALT_COOKIE).unsign_object(value, max_age=COOKIE_MAX_AGE)
        return int(data["u"]) if data.get("h") == host.lower() else None
    except (signing.BadSignature, KeyError, TypeError, ValueError):
        return None


# --- the ASGI app ---------------------------------------------------------------------------------

class PreviewRouter:
    """Preview requests here, everything else to `inner` (Django for HTTP, Channels for websockets)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.inner(scope, receive, send)
        host = request_host(scope)
        path = raw_path(scope)
        if urls.is_preview_host(host):
            return await self.handle(scope, receive, send, subdomain=True)
        if urls.is_preview_path(path):
            return await self.handle(scope, receive, send, subdomain=False)
        return await self.inner(scope, receive, send)

    async def handle(self, scope: Scope, receive: Receive, send: Send, *, subdomain: bool) -> None:
        websocket = scope["type"] == "websocket"
        if websocket:
            message = await receive()
            if message["type"] != "websocket.connect":
                return
        try:
            target = await (self.resolve_subdomain(scope, receive, send) if subdomain
                            else self.resolve_path(scope, receive, send))
        except BaseException as exc:  # noqa: BLE001 - every refusal becomes an answer, never a crash
            if isinstance(exc, asyncio.CancelledError):
                raise
            err = _domain_error(exc)
            if err.status >= 500 and not isinstance(exc, PreviewError):
                log.exception("preview: resolving %s failed", raw_path(scope))
            if websocket:
                await ws_refuse(send, err)
            else:
                await send_error(scope, send, err)
            return
        if target is None:
            return  # answered already (a redirect, the hand-off)
        if websocket:
            await proxy_websocket(scope, receive, send, target)
        else:
            await proxy_http(scope, receive, send, target)

    # --- path mode -------------------------------------------------------------------------------

    async def resolve_path(self, scope: Scope, receive: Receive, send: Send) -> Target | None:
        try:
            parsed = urls.parse_preview_path(raw_path(scope))
        except BadPreviewPath as exc:
            raise PreviewError(exc.status, "not_found" if exc.status == 404 else "invalid", str(exc)) from None
        if parsed is None:
            raise PreviewError(404, "not_found", "No such preview.")
        if parsed.kind == "auth":
            if scope["type"] != "http":
                raise PreviewError(404, "not_found", "No such preview.")
            await self.handoff_start(scope, send)
            return None
        if parsed.rest == "" or not parsed.rest.startswith("/"):
            if scope["type"] == "http":  # relative links need the trailing slash
                qs = query_string(scope)
                await redirect(send, parsed.prefix + "/" + (f"?{qs}" if qs else ""))
                return None
            raise PreviewError(404, "not_found", "No such preview.")
        from environments.models import PortVia

        if parsed.kind == "link":
            if urls.preview_domain() and scope["type"] == "http":
                return await self._to_subdomain(scope, send, urls.link_host(parsed.token or ""), parsed)
            link, container_id = await dbpool.run(_check_link, parsed.token or "")
            return Target(link.environment_id, container_id, link.port, PortVia.PUBLIC, None, parsed.prefix,
                          parsed.rest, True, f"link-{link.pk}", link_id=link.pk)
        if parsed.kind == "ticket":
            user_id, env_id, port = read_path_ticket(parsed.token or "")
            user = await dbpool.run(_user_by_id, user_id)
            access = await dbpool.run(_check_port_access, user, env_id, port)
            return Target(env_id, access.container_id, port, PortVia.PREVIEW, user_id, parsed.prefix, parsed.rest,
                          True, f"user-{user_id}")
        # /preview/<env>/<port>/: the session (browsers) or an API token (scripts).
        assert parsed.env_id is not None and parsed.port is not None
        authorization = header(scope, b"authorization")
        by_token = authorization is not None and authorization.split(" ", 1)[0].lower() == "token"
        if by_token:
            client = scope.get("client") or ("", 0)
            user = await dbpool.run(_user_from_token, authorization, {"REMOTE_ADDR": str(client[0] or "")})
        else:
            user = await dbpool.run(_user_from_session, cookies(scope).get(settings.SESSION_COOKIE_NAME))
            if user.is_authenticated and scope["type"] == "websocket" and not same_origin(scope):
                # A cookie-authenticated handshake from another site would ride the user's session.
                raise PreviewError(403, "bad_origin", "This websocket comes from another site.")
        if not user.is_authenticated:
            if scope["type"] == "http" and scope.get("method") in ("GET", "HEAD") and wants_html(scope):
                from django.shortcuts import resolve_url

                await redirect(send, f"{resolve_url(settings.LOGIN_URL)}?next={quote(raw_path(scope), safe='/')}")
                return None
            raise PreviewError(401, "not_authenticated", "Sign in to LSL (or send an API token) to open this preview.")
        access = await dbpool.run(_check_port_access, user, parsed.env_id, parsed.port)
        if not by_token and urls.preview_domain() and scope["type"] == "http":
            # A browser: give it the preview's own origin rather than LSL's.
            return await self._to_subdomain(scope, send, urls.port_host(parsed.env_id, parsed.port), parsed)
        if access.shared and not by_token:
            if scope["type"] == "http" and scope.get("method") in ("GET", "HEAD"):
                ticket = sign_path_ticket(user.pk, parsed.env_id, parsed.port)
                qs = query_string(scope)
                await redirect(send, f"{urls.PREFIX}t/{ticket}{parsed.rest}" + (f"?{qs}" if qs else ""),
                               [(b"referrer-policy", b"no-referrer")])
                return None
        return Target(parsed.env_id, access.container_id, parsed.port, PortVia.PREVIEW, user.pk, parsed.prefix,
                      parsed.rest, access.shared or by_token, f"user-{user.pk}")

    async def _to_subdomain(self, scope: Scope, send: Send, host: str, parsed: PreviewPath) -> None:
        qs = query_string(scope)
        port = urls.split_host(request_host(scope))[1]
        await redirect(send, f"{http_scheme(scope)}://{host}{port}{parsed.rest}" + (f"?{qs}" if qs else ""))
        return None

    async def handoff_start(self, scope: Scope, send: Send) -> None:
        """Main site, `/preview/auth/?next=<preview URL>`: a signed-in user with access is sent back to
        the preview host with a 60-second ticket; anyone else to the login page."""
        from urllib.parse import parse_qs

        next_url = (parse_qs(query_string(scope)).get("next") or [""])[0]
        parts = urlsplit(next_url)
        target = urls.parse_preview_host(parts.netloc) if parts.scheme in ("http", "https") else None
        if target is None or target[0] != "port":
            raise PreviewError(400, "invalid", "`next` must be the address of a preview on this server.")
        _, env_id, port = target
        user = await dbpool.run(_user_from_session, cookies(scope).get(settings.SESSION_COOKIE_NAME))
        if not user.is_authenticated:
            from django.shortcuts import resolve_url

            here = f"{urls.AUTH_PATH}?next={quote(next_url, safe='')}"
            await redirect(send, f"{resolve_url(settings.LOGIN_URL)}?next={quote(here, safe='')}")
            return
        await dbpool.run(_check_port_access, user, env_id, port)
        back = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        ticket = sign_handoff(user.pk, parts.netloc, back)
        await redirect(send, f"{parts.scheme}://{parts.netloc}{urls.TICKET_PATH}?ticket={quote(ticket, safe='')}",
                       [(b"referrer-policy", b"no-referrer")])

    # --- subdomain mode ----------------------------------------------------------------------------

    async def resolve_subdomain(self, scope: Scope, receive: Receive, send: Send) -> Target | None:
        from environments.models import PortVia

        host = request_host(scope)
        target = urls.parse_preview_host(host)
        if target is None:
            raise PreviewError(404, "not_found", "No such preview.")
        path = raw_path(scope)
        if not path.startswith("/"):
            raise PreviewError(400, "invalid", "The request target must be a path.")
        if target[0] == "link":
            link, container_id = await dbpool.run(_check_link, target[1])
            return Target(link.environment_id, container_id, link.port, PortVia.PUBLIC, None, "", path, False,
                          f"link-{link.pk}", link_id=link.pk)
        _, env_id, port = target
        if path == urls.TICKET_PATH and scope["type"] == "http":
            await self.handoff_finish(scope, send, host)
            return None
        user_id = read_cookie(cookies(scope).get(PREVIEW_COOKIE), host)
        if user_id is None:
            if scope["type"] == "http" and scope.get("method") in ("GET", "HEAD"):
                qs = query_string(scope)
                here = f"{http_scheme(scope)}://{host}{path}" + (f"?{qs}" if qs else "")
                await redirect(send, f"{main_origin(scope)}{urls.AUTH_PATH}?next={quote(here, safe='')}")
                return None
            raise PreviewError(401, "not_authenticated", "Open this preview from LSL first (sign-in needed).")
        if scope["type"] == "websocket" and not same_origin(scope):
            raise PreviewError(403, "bad_origin", "This websocket comes from another site.")
        user = await dbpool.run(_user_by_id, user_id)
        access = await dbpool.run(_check_port_access, user, env_id, port)
        return Target(env_id, access.container_id, port, PortVia.PREVIEW, user_id, "", path, False, f"user-{user_id}")

    async def handoff_finish(self, scope: Scope, send: Send, host: str) -> None:
        from urllib.parse import parse_qs

        ticket = (parse_qs(query_string(scope)).get("ticket") or [""])[0]
        user_id, next_path = read_handoff(ticket, host)
        # Single use: a ticket seen in a log or a Referer cannot be replayed for a second cookie.
        if not await dbpool.run(cache.add, f"lsl-preview-ticket:{hashlib.sha256(ticket.encode()).hexdigest()}", 1,
                                HANDOFF_MAX_AGE * 2):
            raise PreviewError(403, "bad_ticket", "This sign-in link was used already; open the preview again.",
                               "Sign-in link used")
        if not next_path.startswith("/") or next_path.startswith("//"):
            next_path = "/"
        secure = "; Secure" if http_scheme(scope) == "https" else ""
        cookie = (f"{PREVIEW_COOKIE}={sign_cookie(user_id, host)}; Path=/; Max-Age={COOKIE_MAX_AGE}; HttpOnly; "
                  f"SameSite=Lax{secure}")
        await redirect(send, next_path, [(b"set-cookie", cookie.encode()), (b"referrer-policy", b"no-referrer")])


def same_origin(scope: Scope) -> bool:
    """Whether a browser's websocket Origin is the host it connects to (scheme ws→http, wss→https)."""
    origin = header(scope, b"origin")
    if not origin:
        return False
    parts = urlsplit(origin)
    return parts.scheme == http_scheme(scope) and parts.netloc.lower() == request_host(scope).lower()


# --- traffic ----------------------------------------------------------------------------------------

_background: set[asyncio.Task[None]] = set()


class Meter:
    """Bytes each way for ports.record_traffic: flushed on open, every FLUSH_EVERY s, and on close."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.to_env = 0
        self.from_env = 0
        self.connections = 1
        self.flushed_at = time.monotonic()

    def add(self, to_env: int = 0, from_env: int = 0) -> None:
        self.to_env += to_env
        self.from_env += from_env
        if time.monotonic() - self.flushed_at >= FLUSH_EVERY:
            self.flushed_at = time.monotonic()
            task = asyncio.ensure_future(self.flush())
            _background.add(task)  # referenced until done (the loop keeps only weak references)
            task.add_done_callback(_background.discard)

    async def flush(self) -> None:
        from environments.ports import record_traffic

        counts = dict(connections=self.connections, to_environment=self.to_env, from_environment=self.from_env)
        self.connections = self.to_env = self.from_env = 0
        self.flushed_at = time.monotonic()
        try:
            await dbpool.run(record_traffic, self.target.env_id, self.target.port, self.target.via, **counts)
        except Exception:  # noqa: BLE001 - counters must never break a preview
            log.exception("preview: recording traffic failed")


async def opened(target: Target, meter: Meter) -> None:
    data = {"link": str(target.link_id)} if target.link_id else {}
    try:
        await dbpool.run(_audit_opened, target.env_id, target.user_id, target.port, target.audit_key, **data)
    except Exception:  # noqa: BLE001
        log.exception("preview: audit failed")
    await meter.flush()


# --- the tunnel ---------------------------------------------------------------------------------------

async def open_tunnel(target: Target) -> Any:
    from environments import keeper

    from environments import nodes, runtime

    try:
        engine = await dbpool.run(nodes.engine_for_environment_id, target.env_id)
    except runtime.NodeUnavailableError as exc:
        raise PreviewError(503, "node_unavailable", str(exc)) from None
    try:
        return await asyncio.wait_for(keeper.open_tunnel(engine, target.container_id, target.env_id, docker_call,
                                                         target.port), TUNNEL_TIMEOUT)
    except asyncio.TimeoutError:
        raise PreviewError(504, "timeout", f"The environment did not open port {target.port} within "
                                           f"{TUNNEL_TIMEOUT:.0f} s.") from None
    except Exception as exc:  # noqa: BLE001
        from environments.ports import PortClosed
        if isinstance(exc, PortClosed):
            raise PreviewError(502, "port_closed", f"Nothing is listening on port {target.port} in this environment "
                                                   f"(yet?). Start your app, then reload.",
                               f"Nothing is listening on port {target.port}") from None
        if isinstance(exc, DomainError):
            raise _domain_error(exc) from None
        raise PreviewError(502, "tunnel_failed", f"Could not reach port {target.port}: {exc}") from None


def _transport(send: Send) -> Any:
    """daphne's Twisted transport behind `send` (a functools.partial of Server.handle_reply(protocol)):
    daphne's send() writes at once and never waits, so the proxy looks at the transport's unsent
    bytes itself to keep memory bounded when the browser reads slower than the app writes."""
    protocol = (getattr(send, "args", None) or (None,))[0]
    channel = getattr(protocol, "channel", None)
    return getattr(channel, "transport", None) or getattr(protocol, "transport", None)


def _unsent(transport: Any) -> int:
    try:
        return (len(transport.dataBuffer) - transport.offset) + transport._tempDataLen
    except (AttributeError, TypeError):
        return 0


async def paced(transport: Any) -> None:
    while transport is not None and _unsent(transport) > SEND_BUFFER_LIMIT:
        if getattr(transport, "disconnected", False):
            return
        await asyncio.sleep(0.005)


# --- HTTP ---------------------------------------------------------------------------------------------

def forwarded_headers(scope: Scope, target: Target) -> list[tuple[bytes, bytes]]:
    out = [(b"x-forwarded-proto", http_scheme(scope).encode()), (b"x-forwarded-host", request_host(scope).encode("latin-1"))]
    if target.prefix:
        out.append((b"x-forwarded-prefix", target.prefix.encode("latin-1")))
    client = scope.get("client")
    if client:
        out.append((b"x-forwarded-for", str(client[0]).encode()))
    return out


def upstream_request_headers(scope: Scope, target: Target) -> list[tuple[bytes, bytes]]:
    """The browser's headers for the app: hop-by-hop, LSL's cookies and LSL API tokens removed, Host
    rewritten to localhost:<port> (dev servers often check it), X-Forwarded-* added."""
    connection_named = {token.strip().lower().encode() for value in [header(scope, b"connection") or ""]
                        for token in value.split(",") if token.strip()}
    out: list[tuple[bytes, bytes]] = [(b"host", f"localhost:{target.port}".encode())]
    for key, value in scope.get("headers", []):
        name = key.lower()
        if name.decode("latin-1") in DROP_REQUEST or name in connection_named or name == b"cookie":
            continue
        if name == b"authorization" and value.split(b" ", 1)[0].lower() == b"token":
            continue  # LSL's own API token
        if name.startswith(b"sec-websocket-") or name == b"origin" and scope["type"] == "websocket":
            continue
        out.append((name, value))
    jar = filtered_cookie_header(scope)
    if jar:
        out.append((b"cookie", jar.encode("latin-1")))
    return out + forwarded_headers(scope, target)


def rewrite_set_cookie(value: str, target: Target) -> str | None:
    """An upstream Set-Cookie as the browser may store it: never one of LSL's names, never a Domain
    (host-only), and in path mode confined to the preview's prefix (so never LSL's `/`)."""
    parts = [p.strip() for p in value.split(";")]
    name = parts[0].partition("=")[0].strip()
    if not name or name in lsl_cookie_names():
        return None
    attrs = []
    for attr in parts[1:]:
        key, _, val = attr.partition("=")
        key_l = key.strip().lower()
        if key_l == "domain":
            continue
        if key_l == "path":
            if target.prefix:
                continue
        attrs.append(attr)
    if target.prefix:
        path = next((p.partition("=")[2].strip() for p in parts[1:] if p.partition("=")[0].strip().lower() == "path"), "/")
        attrs.append(f"Path={target.prefix}{path if path.startswith('/') else '/'}")
    return "; ".join([parts[0]] + [a for a in attrs if a])


def rewrite_location(value: str, scope: Scope, target: Target) -> str:
    """Redirects the app makes: to its own paths (or to localhost:<port>) stay inside the preview."""
    parts = urlsplit(value)
    if parts.scheme in ("http", "https") and parts.netloc.lower() in (
            f"localhost:{target.port}", f"127.0.0.1:{target.port}", request_host(scope).lower()):
        value = (parts.path or "/") + (f"?{parts.query}" if parts.query else "") + (f"#{parts.fragment}" if parts.fragment else "")
        if not target.prefix:
            return f"{http_scheme(scope)}://{request_host(scope)}{value}"
    if target.prefix and value.startswith("/") and not value.startswith("//"):
        return target.prefix + value
    return value


def response_headers(upstream: list[tuple[bytes, bytes]], scope: Scope, target: Target) -> list[tuple[bytes, bytes]]:
    out: list[tuple[bytes, bytes]] = []
    for key, value in upstream:
        name = key.lower()
        text = value.decode("latin-1")
        if name.decode("latin-1") in DROP_RESPONSE:
            continue
        if name == b"set-cookie":
            cookie = rewrite_set_cookie(text, target)
            if cookie is not None:
                out.append((b"set-cookie", cookie.encode("latin-1")))
            continue
        if name == b"location":
            out.append((b"location", rewrite_location(text, scope, target).encode("latin-1")))
            continue
        if target.sandbox and name in (b"referrer-policy", b"access-control-allow-origin",
                                       b"access-control-allow-credentials"):
            continue
        out.append((name, value))
    if target.sandbox:
        # An opaque origin: its sub-requests are cross-origin (module scripts, fetch) and need CORS;
        # the credential is in the URL, never a cookie, so `*` exposes nothing the URL does not.
        out += [(b"content-security-policy", SANDBOX_CSP.encode()), (b"access-control-allow-origin", b"*"),
                (b"referrer-policy", b"no-referrer")]
    out.append((b"x-lsl-preview", f"{target.env_id}/{target.port}".encode()))
    return out


async def proxy_http(scope: Scope, receive: Receive, send: Send, target: Target) -> None:
    meter = Meter(target)
    try:
        tunnel = await open_tunnel(target)
    except PreviewError as err:
        await drain_request(receive)
        await send_error(scope, send, err)
        return
    await opened(target, meter)
    upload: asyncio.Task[None] | None = None
    watcher: asyncio.Task[None] | None = None
    try:
        reader, writer = await tunnel.streams()
        conn = h11.Connection(h11.CLIENT)
        headers = upstream_request_headers(scope, target)
        length = header(scope, b"content-length")
        first = await receive()
        body = first.get("body", b"") if first["type"] == "http.request" else b""
        more = bool(first.get("more_body")) if first["type"] == "http.request" else False
        if length is not None and length.isdigit():
            headers.append((b"content-length", length.encode()))
        elif more:
            headers.append((b"transfer-encoding", b"chunked"))
        elif body or scope["method"] not in ("GET", "HEAD", "DELETE", "OPTIONS"):
            headers.append((b"content-length", str(len(body)).encode()))
        headers.append((b"connection", b"close"))
        target_bytes = (target.rest + (f"?{query_string(scope)}" if query_string(scope) else "")).encode("latin-1")
        writer.write(conn.send(h11.Request(method=scope["method"], target=target_bytes, headers=headers)))
        disconnected = asyncio.Event()

        async def send_body() -> None:
            nonlocal body, more
            while True:
                if body:
                    writer.write(conn.send(h11.Data(data=body)))
                    meter.add(to_env=len(body))
                    await writer.drain()
                if not more:
                    break
                message = await receive()
                if message["type"] == "http.disconnect":
                    disconnected.set()
                    return
                body, more = message.get("body", b""), bool(message.get("more_body"))
            writer.write(conn.send(h11.EndOfMessage()))
            await writer.drain()

        async def watch_disconnect() -> None:
            await upload
            while not disconnected.is_set():
                message = await receive()
                if message["type"] == "http.disconnect":
                    disconnected.set()

        upload = asyncio.ensure_future(send_body())
        watcher = asyncio.ensure_future(watch_disconnect())
        await relay_response(scope, send, target, conn, reader, meter, disconnected)
    except PreviewError as err:
        await send_error(scope, send, err)
    except (h11.ProtocolError, ConnectionError, OSError) as exc:
        await send_error(scope, send, PreviewError(502, "upstream_error",
                                                   f"The app on port {target.port} sent a response LSL could not read "
                                                   f"({exc.__class__.__name__}: {exc}).", "Bad response from the app"))
    finally:
        for task in (upload, watcher):
            if task is not None and not task.done():
                task.cancel()
        tunnel.close()
        await meter.flush()


async def relay_response(scope: Scope, send: Send, target: Target, conn: h11.Connection, reader: asyncio.StreamReader,
                         meter: Meter, disconnected: asyncio.Event) -> None:
    transport = _transport(send)
    started = False
    deadline = time.monotonic() + RESPONSE_TIMEOUT
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            if disconnected.is_set():
                return
            timeout = max(0.1, deadline - time.monotonic()) if not started else None
            try:
                data = await asyncio.wait_for(reader.read(READ_CHUNK), timeout)
            except asyncio.TimeoutError:
                raise PreviewError(504, "timeout", f"The app on port {target.port} did not answer within "
                                                   f"{RESPONSE_TIMEOUT:.0f} s.") from None
            if not data and not started and conn.their_state is h11.SEND_RESPONSE:
                raise PreviewError(502, "upstream_error", f"The app on port {target.port} closed the connection "
                                                          f"without answering.", "The app did not answer")
            meter.add(from_env=len(data))
            conn.receive_data(data)
            continue
        if isinstance(event, h11.InformationalResponse):
            continue
        if isinstance(event, h11.Response):
            started = True
            await send({"type": "http.response.start", "status": event.status_code,
                        "headers": response_headers(list(event.headers), scope, target)})
            continue
        if isinstance(event, h11.Data):
            await send({"type": "http.response.body", "body": bytes(event.data), "more_body": True})
            await paced(transport)
            continue
        if isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        if event is h11.PAUSED:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return


async def drain_request(receive: Receive) -> None:
    """Consume the request body we will not forward (daphne has it spooled already; bounded)."""
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body"):
            return


# --- websockets --------------------------------------------------------------------------------------

async def ws_refuse(send: Send, err: PreviewError) -> None:
    """A refused preview websocket: accepted, told why (one JSON text frame), closed with 4000 + status."""
    await send({"type": "websocket.accept"})
    await send({"type": "websocket.send", "text": json.dumps({"error": {"code": err.code, "detail": err.detail}})})
    await send({"type": "websocket.close", "code": 4000 + err.status if err.status < 1000 else 4500,
                "reason": err.detail[:120]})


def _close_code(code: int | None) -> int:
    if code is None or code in (1005, 1006, 1015):
        return 1000 if code == 1005 or code is None else 1011
    return code if code == 1000 or 1001 <= code <= 1014 or 3000 <= code <= 4999 else 1000


async def proxy_websocket(scope: Scope, receive: Receive, send: Send, target: Target) -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

    meter = Meter(target)
    try:
        tunnel = await open_tunnel(target)
    except PreviewError as err:
        await ws_refuse(send, err)
        return
    await opened(target, meter)
    subprotocols = list(scope.get("subprotocols") or [])
    extra = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in upstream_request_headers(scope, target)
             if k not in (b"host",)]
    qs = query_string(scope)
    uri = f"ws://localhost:{target.port}{target.rest}" + (f"?{qs}" if qs else "")
    try:
        upstream = await asyncio.wait_for(connect(
            uri, sock=tunnel.sock, subprotocols=subprotocols or None, additional_headers=extra,
            origin=f"http://localhost:{target.port}", user_agent_header=None, compression=None,
            ping_interval=None, max_size=WS_MAX_MESSAGE, open_timeout=None, close_timeout=5), TUNNEL_TIMEOUT)
    except (InvalidStatus, InvalidHandshake, OSError, asyncio.TimeoutError, ValueError) as exc:
        tunnel.close()
        status = getattr(getattr(exc, "response", None), "status_code", None)
        detail = (f"The app on port {target.port} refused the websocket ({status})." if status
                  else f"The app on port {target.port} did not open the websocket: {exc.__class__.__name__}.")
        await ws_refuse(send, PreviewError(502, "upstream_error", detail))
        await meter.flush()
        return
    await send({"type": "websocket.accept", "subprotocol": upstream.subprotocol})
    closed_by_browser: int | None = None

    async def browser_to_app() -> None:
        nonlocal closed_by_browser
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                closed_by_browser = int(message.get("code") or 1000)
                await upstream.close(_close_code(closed_by_browser))
                return
            if message.get("text") is not None:
                meter.add(to_env=len(message["text"]))
                await upstream.send(message["text"])
            elif message.get("bytes") is not None:
                meter.add(to_env=len(message["bytes"]))
                await upstream.send(message["bytes"])

    async def app_to_browser() -> None:
        transport = _transport(send)
        try:
            async for data in upstream:
                meter.add(from_env=len(data))
                await send({"type": "websocket.send", "text": data} if isinstance(data, str)
                           else {"type": "websocket.send", "bytes": data})
                await paced(transport)
        except ConnectionClosed:
            pass

    inbound = asyncio.ensure_future(browser_to_app())
    outbound = asyncio.ensure_future(app_to_browser())
    try:
        await asyncio.wait({inbound, outbound}, return_when=asyncio.FIRST_COMPLETED)
        if outbound.done() and closed_by_browser is None:
            rcvd = upstream.protocol.close_rcvd
            await send({"type": "websocket.close", "code": _close_code(rcvd.code if rcvd else 1011),
                        "reason": (rcvd.reason if rcvd else "")[:120]})
    except ConnectionClosed:
        pass
    finally:
        for task in (inbound, outbound):
            task.cancel()
        await asyncio.gather(inbound, outbound, return_exceptions=True)
        try:
            await asyncio.wait_for(upstream.close(), 5)
        except Exception:  # noqa: BLE001
            pass
        tunnel.close()
        await meter.flush()


__all__ = ["PreviewRouter", "rewrite_location", "rewrite_set_cookie", "upstream_request_headers"]
