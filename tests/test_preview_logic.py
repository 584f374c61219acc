"""Pure parts of the browser preview: addresses (environments.preview_urls), header and cookie
rewriting, tickets (environments.preview). No engine, no server."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from django.conf import settings

from environments import preview
from environments.preview import Target, rewrite_location, rewrite_set_cookie, upstream_request_headers
from environments.preview_urls import (BadPreviewPath, parse_preview_host, parse_preview_path, port_host, preview_url,
                                       public_link_url)

ENV = uuid.UUID("12345678-1234-5678-1234-567812345678")
TOKEN = "abcdefghijklmnopqrstuvwxyz234567"


def target(prefix: str = f"/preview/{ENV}/3000", sandbox: bool = False) -> Target:
    return Target(ENV, "cid", 3000, "preview", 1, prefix, "/", sandbox, "user-1")


def scope(headers: list[tuple[bytes, bytes]], kind: str = "http") -> dict[str, Any]:
    return {"type": kind, "scheme": "http", "headers": [(b"host", b"lsl.example:8000")] + headers,
            "client": ("10.0.0.9", 5555)}


def test_urls_in_both_modes() -> None:
    assert preview_url(ENV, 3000, "lsl.example:8000", "https", domain="") == f"https://lsl.example:8000/preview/{ENV}/3000/"
    assert preview_url(str(ENV), 3000, "lsl.example", "https", domain="p.example") == f"https://p3000-{ENV.hex}.p.example/"
    assert preview_url(ENV, 3000, "127.0.0.1:8123", "http", domain="p.localtest") == f"http://p3000-{ENV.hex}.p.localtest:8123/"
    assert public_link_url(TOKEN, "lsl.example", "https", domain="") == f"https://lsl.example/preview/link/{TOKEN}/"
    assert public_link_url(TOKEN, "[::1]:9000", "http", domain="p.example") == f"http://l-{TOKEN}.p.example:9000/"
    assert preview_url(ENV, 1, "h", "javascript", domain="") .startswith("http://")  # only http(s)
    assert len(port_host(ENV, 65535, "x").split(".")[0]) <= 63  # one DNS label


@pytest.mark.parametrize("host,expected", [
    (f"p3000-{ENV.hex}.p.example", ("port", ENV, 3000)),
    (f"P3000-{ENV.hex.upper()}.P.EXAMPLE:8000", ("port", ENV, 3000)),
    (f"l-{TOKEN}.p.example", ("link", TOKEN)),
    (f"p0-{ENV.hex}.p.example", None),
    (f"p65536-{ENV.hex}.p.example", None),
    (f"p03000-{ENV.hex}.p.example", None),
    (f"x.p3000-{ENV.hex}.p.example", None),  # one label only
    (f"p3000-{ENV.hex}.p.example.evil.com", None),
    ("p.example", None),
    ("lsl.example", None),
    (f"p3000-{ENV.hex[:-1]}.p.example", None),
])
def test_parse_preview_host(host: str, expected: Any) -> None:
    assert parse_preview_host(host, domain="p.example") == expected
    assert parse_preview_host(host, domain="") is None  # no domain configured: never a preview host


def test_parse_preview_path() -> None:
    parsed = parse_preview_path(f"/preview/{ENV}/3000/a/../b%2Fc")
    assert (parsed.kind, parsed.env_id, parsed.port, parsed.prefix, parsed.rest) == (
        "port", ENV, 3000, f"/preview/{ENV}/3000", "/a/../b%2Fc")
    assert parse_preview_path(f"/preview/{ENV}/3000").rest == ""
    assert parse_preview_path(f"/preview/link/{TOKEN}/x").token == TOKEN
    assert parse_preview_path("/preview/auth/").kind == "auth"
    assert parse_preview_path("/api/v1/") is None
    assert parse_preview_path("/previewer/") is None
    with pytest.raises(BadPreviewPath) as bad:
        parse_preview_path(f"/preview/{ENV}/0/")
    assert bad.value.status == 400
    with pytest.raises(BadPreviewPath):
        parse_preview_path(f"/preview/{ENV}/65536/")
    with pytest.raises(BadPreviewPath) as bad:
        parse_preview_path("/preview/../api/")
    assert bad.value.status == 404
    with pytest.raises(BadPreviewPath):
        parse_preview_path("/preview/x%2F..%2F/3000/")


def test_request_headers_lose_lsl_credentials_and_hop_by_hop() -> None:
    headers = upstream_request_headers(scope([
        (b"cookie", f"{settings.SESSION_COOKIE_NAME}=s3cret; theirs=1; {settings.CSRF_COOKIE_NAME}=c; __lsl_preview=x".encode()),
        (b"authorization", b"Token lsl-api-token"),
        (b"connection", b"keep-alive, x-secret-hop"), (b"x-secret-hop", b"1"), (b"te", b"trailers"),
        (b"x-forwarded-for", b"1.2.3.4"), (b"accept", b"text/html"),
    ]), target())
    names = [k for k, _ in headers]
    assert dict(headers)[b"host"] == b"localhost:3000"
    assert dict(headers)[b"cookie"] == b"theirs=1"
    assert b"authorization" not in names and b"x-secret-hop" not in names and b"te" not in names
    assert dict(headers)[b"x-forwarded-for"] == b"10.0.0.9"  # ours, not the client's claim
    assert dict(headers)[b"x-forwarded-prefix"] == f"/preview/{ENV}/3000".encode()
    assert dict(headers)[b"x-forwarded-host"] == b"lsl.example:8000"
    # The app's own Basic auth is the app's business.
    assert (b"authorization", b"Basic dTpw") in upstream_request_headers(scope([(b"authorization", b"Basic dTpw")]), target())


def test_set_cookie_rewriting() -> None:
    path_mode = target()
    assert rewrite_set_cookie("a=1; Path=/; HttpOnly", path_mode) == f"a=1; HttpOnly; Path=/preview/{ENV}/3000/"
    assert rewrite_set_cookie("a=1; Path=/api; Domain=example.com", path_mode) == f"a=1; Path=/preview/{ENV}/3000/api"
    assert rewrite_set_cookie("a=1", path_mode) == f"a=1; Path=/preview/{ENV}/3000/"
    assert rewrite_set_cookie(f"{settings.SESSION_COOKIE_NAME}=evil; Path=/", path_mode) is None
    assert rewrite_set_cookie(f"{settings.CSRF_COOKIE_NAME}=evil", path_mode) is None
    sub = target(prefix="")
    assert rewrite_set_cookie("a=1; Domain=.example.com; Path=/x", sub) == "a=1; Path=/x"  # host-only
    assert rewrite_set_cookie("__lsl_preview=forged; Path=/", sub) is None


def test_location_rewriting() -> None:
    s = scope([])
    assert rewrite_location("/login?next=/", s, target()) == f"/preview/{ENV}/3000/login?next=/"
    assert rewrite_location("http://localhost:3000/a?b=1", s, target()) == f"/preview/{ENV}/3000/a?b=1"
    assert rewrite_location("https://elsewhere.example/", s, target()) == "https://elsewhere.example/"
    assert rewrite_location("//evil.example/x", s, target()) == "//evil.example/x"  # not ours to prefix
    assert rewrite_location("relative", s, target()) == "relative"
    assert rewrite_location("http://localhost:3000/a", s, target(prefix="")) == "http://lsl.example:8000/a"


def test_response_headers_sandbox_and_forbidden() -> None:
    upstream = [(b"clear-site-data", b'"*"'), (b"service-worker-allowed", b"/"), (b"transfer-encoding", b"chunked"),
                (b"content-type", b"text/html"), (b"referrer-policy", b"unsafe-url")]
    sandboxed = dict(preview.response_headers(upstream, scope([]), target(sandbox=True)))
    assert b"clear-site-data" not in sandboxed and b"service-worker-allowed" not in sandboxed
    assert b"transfer-encoding" not in sandboxed
    assert sandboxed[b"content-security-policy"] == preview.SANDBOX_CSP.encode()
    assert b"allow-same-origin" not in sandboxed[b"content-security-policy"]
    assert sandboxed[b"referrer-policy"] == b"no-referrer"
    plain = dict(preview.response_headers(upstream, scope([]), target(sandbox=False)))
    assert b"content-security-policy" not in plain and plain[b"referrer-policy"] == b"unsafe-url"


def test_tickets_and_cookies_are_bound() -> None:
    ticket = preview.sign_path_ticket(7, ENV, 3000)
    assert preview.read_path_ticket(ticket) == (7, ENV, 3000)
    with pytest.raises(preview.PreviewError):
        preview.read_path_ticket(ticket[:-2] + "xx")
    handoff = preview.sign_handoff(7, "P1-x.p.example:80", "/a")
    assert preview.read_handoff(handoff, "p1-x.p.example:80") == (7, "/a")
    with pytest.raises(preview.PreviewError):
        preview.read_handoff(handoff, "p2-x.p.example:80")  # another preview host
    with pytest.raises(preview.PreviewError):
        preview.read_handoff(ticket, "p1-x.p.example:80")  # another kind of signature
    cookie = preview.sign_cookie(7, "p1-x.p.example")
    assert preview.read_cookie(cookie, "p1-x.p.example") == 7
    assert preview.read_cookie(cookie, "p2-x.p.example") is None
    assert preview.read_cookie(handoff, "p1-x.p.example") is None
    assert preview.read_cookie(None, "p1-x.p.example") is None


def test_error_pages() -> None:
    err = preview.PreviewError(502, "port_closed", "Nothing is listening on port 3000 <script>")
    ctype, body = preview.error_page(err, True)
    assert ctype.startswith(b"text/html") and b"&lt;script&gt;" in body
    ctype, body = preview.error_page(err, False)
    assert ctype == b"application/json" and b'"code": "port_closed"' in body


def test_close_codes() -> None:
    assert preview._close_code(4001) == 4001
    assert preview._close_code(1005) == 1000
    assert preview._close_code(1006) == 1011
    assert preview._close_code(None) == 1000
    assert preview._close_code(2999) == 1000
