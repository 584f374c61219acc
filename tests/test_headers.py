"""Response headers against hostile pages (issue 12): a strict Content-Security-Policy and the usual
headers on every HTML page (web app, terminal, replay, Django admin, API docs), no inline script in
what the pages render, and the API docs served entirely by this server (drf-spectacular-sidecar).

The browser side (no CSP violation in chromium's console while the pages work) is in
tests/test_browser.py.
"""

from __future__ import annotations

import re
import uuid
from html.parser import HTMLParser
from typing import Any
from urllib.parse import urlsplit

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from tests.test_web import World

pytestmark = pytest.mark.usefixtures("catalog")

HTML_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
}


@pytest.fixture()
def world(people: Any) -> World:
    return World(people)


def policy(response: Any) -> dict[str, list[str]]:
    """The Content-Security-Policy header as {directive: [sources]}."""
    header = response.get("Content-Security-Policy")
    assert header, f"no Content-Security-Policy on {response.request['PATH_INFO']}"
    directives: dict[str, list[str]] = {}
    for part in header.split(";"):
        name, *sources = part.split()
        assert name not in directives, f"{name} twice in {header}"
        directives[name] = sources
    return directives


class Markup(HTMLParser):
    """What a page's markup could run: script elements, on* handlers, javascript: URLs."""

    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[dict[str, str | None]] = []
        self.inline_code: list[str] = []
        self.problems: list[str] = []
        self.assets: list[str] = []
        self._in_script: dict[str, str | None] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        for name, value in attrs:
            if name.startswith("on"):
                self.problems.append(f"<{tag} {name}=…> event handler")
            if name in ("href", "src", "action", "formaction") and (value or "").strip().lower().startswith("javascript:"):
                self.problems.append(f"<{tag} {name}={value!r}>")
        if tag == "script":
            self.scripts.append(attributes)
            self._in_script = attributes
            if attributes.get("src"):
                self.assets.append(attributes["src"] or "")
        if tag == "link" and attributes.get("href") and attributes.get("rel") in ("stylesheet", "icon"):
            self.assets.append(attributes["href"] or "")
        if tag == "img" and attributes.get("src"):
            self.assets.append(attributes["src"] or "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = None

    def handle_data(self, data: str) -> None:
        # Code inside <script> without src and not a JSON data block (json_script) would be blocked.
        script = self._in_script
        if script is not None and not script.get("src") and script.get("type") != "application/json" and data.strip():
            self.inline_code.append(data.strip()[:80])


def check_page(response: Any, *, script_src: tuple[str, ...] = ("'self'",), host: str = "testserver") -> Markup:
    """The headers and policy every HTML page must carry, and markup that needs nothing more."""
    path = response.request["PATH_INFO"]
    assert response["Content-Type"].startswith("text/html"), path
    for name, value in HTML_HEADERS.items():
        assert response.get(name) == value, (path, name, response.get(name))
    csp = policy(response)
    assert csp["default-src"] == ["'self'"], path
    assert tuple(csp["script-src"]) == script_src, (path, csp["script-src"])
    assert csp["object-src"] == ["'none'"] and csp["frame-ancestors"] == ["'none'"], path
    assert csp["base-uri"] == ["'self'"] and csp["form-action"] == ["'self'"], path
    # Websockets go only to this host (the page's own, whichever allowed name it was reached by).
    assert csp["connect-src"] == ["'self'", f"ws://{host}", f"wss://{host}"], (path, csp["connect-src"])
    for directive, sources in csp.items():
        assert "'unsafe-eval'" not in sources, (path, directive)
        assert directive == "style-src" or "'unsafe-inline'" not in sources, (path, directive)
        # No CDN or other host anywhere: every source is a keyword, data:, or this host's ws:/wss:.
        assert all(s.startswith("'") or s == "data:" or s in (f"ws://{host}", f"wss://{host}") for s in sources), (path, directive)
    markup = Markup()
    markup.feed(response.content.decode())
    assert not markup.inline_code, (path, markup.inline_code)
    assert not markup.problems, (path, markup.problems)
    return markup


@pytest.mark.django_db
def test_every_web_page_carries_the_policy_and_runs_no_inline_script(world: World) -> None:
    owner = world.client("owner")
    env_url = world.env_url
    pages = {
        "login": Client().get("/login/"),
        "dashboard": owner.get("/"),
        "environment": owner.get(env_url),
        "delete": owner.get(f"{env_url}delete/"),
        "environment monitor": owner.get(f"{env_url}monitor/"),
        "teams": owner.get("/teams/"),
        "tokens": owner.get("/tokens/"),
        "token created": owner.post("/tokens/", {"name": "headers-test"}),
        "terminal": owner.get(f"/sessions/{world.session.id}/"),
        "404": owner.get(f"/environments/{uuid.uuid4()}/"),
        "403": world.client("viewer").post(f"{env_url}stop/"),
    }
    staff = Client()
    staff.force_login(get_user_model().objects.create_superuser("root", "root@example.com", "password-root"))
    pages["monitor"] = staff.get("/monitor/")
    expected_status = {"404": 404, "403": 403}
    for name, response in pages.items():
        assert response.status_code == expected_status.get(name, 200), (name, response.status_code)
        markup = check_page(response)
        if name not in ("404", "403", "login"):
            # Every page's scripts: its bundle (if any), then page.js, which starts it.
            assert markup.scripts and markup.scripts[-1].get("src", "").endswith("frontend/dist/page.js"), name
    assert 'data-page="terminal"' in pages["terminal"].content.decode()
    assert "data-autosubmit" in pages["dashboard"].content.decode()

    # The replay page alone may compile WebAssembly (asciinema-player's parser): never JavaScript eval.
    check_page(owner.get(f"/sessions/{world.session.id}/replay/"), script_src=("'self'", "'wasm-unsafe-eval'"))


@pytest.mark.django_db
def test_admin_and_api_docs_carry_the_policy(world: World) -> None:
    check_page(Client().get("/admin/login/"))
    check_page(Client().get("/api/docs/"))
    root = Client()
    root.force_login(get_user_model().objects.create_superuser("root", "root@example.com", "password-root"))
    for path in ("/admin/", "/admin/auth/user/", "/admin/auth/user/add/", f"/admin/auth/user/{world.people.owner.pk}/change/",
                 "/admin/environments/environment/"):
        response = root.get(path)
        assert response.status_code == 200, path
        check_page(response)


@pytest.mark.django_db
def test_websocket_sources_follow_the_host_and_a_bad_host_is_still_a_plain_400() -> None:
    check_page(Client().get("/login/", HTTP_HOST="localhost"), host="localhost")
    check_page(Client().get("/login/", HTTP_HOST="127.0.0.1:8000"), host="127.0.0.1:8000")
    # A Host header outside LSL_ALLOWED_HOSTS can name no source: 400, without websocket sources.
    refused = Client().get("/login/", HTTP_HOST="evil.example;script-src *")
    assert refused.status_code == 400
    assert "evil" not in refused.get("Content-Security-Policy", "")


@pytest.mark.django_db
def test_api_docs_load_only_from_this_server() -> None:
    client = Client()
    page = client.get("/api/docs/")
    assert page.status_code == 200
    markup = check_page(page)
    body = page.content.decode()
    # Nothing from elsewhere: no absolute or protocol-relative URL to another host in the page.
    for url in re.findall(r"""(?:src|href)=["']([^"']+)""", body):
        parts = urlsplit(url)
        assert parts.scheme in ("", "http", "https") and parts.netloc in ("", "testserver"), url
    assert not re.search(r"https?://(?!testserver)", body), re.findall(r"https?://\S+", body)

    # Every script, stylesheet and icon it names is served here.
    assert any("swagger-ui-bundle.js" in a for a in markup.assets) and any("swagger-ui.css" in a for a in markup.assets)
    for asset in markup.assets:
        response = client.get(asset)
        assert response.status_code == 200, asset
        content = b"".join(response.streaming_content) if response.streaming else response.content
        assert content, asset
        if asset.split("?")[0].endswith(".js") or "script=" in asset:
            assert "javascript" in response["Content-Type"], (asset, response["Content-Type"])  # nosniff needs it
    # The init script (a separate request instead of an inline one) points Swagger UI at our schema,
    # with no validator badge (it would load an image from swagger.io).
    init = client.get("/api/docs/?script=").content.decode()
    assert "SwaggerUIBundle" in init and '"validatorUrl": null' in init
    schema_url = re.search(r'url: "([^"]+)"', init)
    assert schema_url and client.get(schema_url.group(1)).status_code == 200
