"""The browser preview in a real Chromium (headless Debian chromium, as tests/test_browser.py):
the page loads through LSL and its websocket (a relative URL) echoes, in path mode (the owner
alone: LSL's origin, unsandboxed; a teammate: the sandboxed personal address) and in subdomain
mode (a second daphne with LSL_PREVIEW_DOMAIN, the wildcard resolved with --host-resolver-rules).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from environments.models import Role
from environments.preview_urls import preview_url
from environments.services import grant_access
from tests.browser import CHROMEDRIVER, CHROMIUM, Browser, browsers, cleanup_containers  # noqa: F401  (fixtures)
from tests.conftest import start_daphne, stop_daphne
from tests.test_preview import APP_PORT, DOMAIN, start_app

pytestmark = [pytest.mark.django_db(transaction=True, serialized_rollback=True), pytest.mark.usefixtures("engine", "catalog")]

ECHO = "echo: ping from the page via echo.v1"


def out(browser: Browser) -> str:
    return browser.driver.find_element(By.ID, "out").text


def wait_echo(browser: Browser) -> None:
    browser.wait(lambda d: out(browser) == ECHO, timeout=30, what="the page's websocket echo")
    browser.wait(lambda d: d.find_element(By.ID, "title").get_attribute("data-js") == "loaded", what="app.js ran")


@pytest.fixture()
def app_env(people: Any, make_env: Any) -> Any:
    env = make_env(people.owner, template="debian")
    assert env.status == "running", env.last_error
    start_app(env)
    return env


def test_path_mode_page_and_websocket(people: Any, app_env: Any, browsers: Callable[[], Browser]) -> None:
    alice = browsers()
    alice.login("alice", "password-alice")
    alice.get(f"/preview/{app_env.id}/{APP_PORT}/")
    wait_echo(alice)
    # Her own environment, nobody else may run code in it: LSL's origin, storage works.
    assert alice.driver.find_element(By.ID, "storage").text == "storage ok"
    alice.screenshot("preview-path-owner")

    # Shared with her team: a teammate gets the sandboxed personal address; the page and its
    # websocket still work, but it is an opaque origin (no storage, no LSL cookies).
    grant_access(app_env, role=Role.MEMBER, team=people.team)
    bob = browsers()
    bob.login("bob", "password-bob")
    bob.get(f"/preview/{app_env.id}/{APP_PORT}/")
    wait_echo(bob)
    assert "/preview/t/" in bob.driver.current_url
    assert bob.driver.find_element(By.ID, "storage").text == "storage blocked"
    assert bob.driver.execute_script("try { return document.cookie; } catch (e) { return 'opaque'; }") == "opaque"
    bob.screenshot("preview-path-teammate-sandboxed")


class DomainBrowser(Browser):
    """A Browser that resolves every name under the preview domain to 127.0.0.1."""

    def __init__(self, base_url: str) -> None:
        import shutil
        import tempfile
        from pathlib import Path

        for binary in (CHROMIUM, CHROMEDRIVER):
            if not Path(binary).exists():
                pytest.fail(f"{binary} is required for the browser tests", pytrace=False)
        self.base_url = base_url
        self.profile = tempfile.mkdtemp(prefix="lsl-chromium-")
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--no-first-run", f"--user-data-dir={self.profile}", "--window-size=1280,900",
                    f"--host-resolver-rules=MAP *.{DOMAIN} 127.0.0.1"):
            options.add_argument(arg)
        self.driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        self._cleanup = shutil.rmtree


@pytest.fixture()
def domain_server(transactional_db: Any) -> Iterator[Any]:
    server = start_daphne({"LSL_PREVIEW_DOMAIN": DOMAIN}, name="daphne-preview-browser")
    yield server
    stop_daphne(server)


def test_subdomain_mode_page_and_websocket(people: Any, app_env: Any, domain_server: Any) -> None:
    alice = DomainBrowser(domain_server.url)
    try:
        alice.login("alice", "password-alice")
        address = preview_url(app_env.id, APP_PORT, urlsplit(domain_server.url).netloc, "http", domain=DOMAIN)
        alice.driver.get(address)  # no cookie there yet: the hand-off through LSL's site, and back
        wait_echo(alice)
        assert alice.driver.current_url == address
        assert alice.driver.find_element(By.ID, "storage").text == "storage ok"  # its own origin
        alice.screenshot("preview-subdomain")
    finally:
        alice.quit()
