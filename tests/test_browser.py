"""The web app in a real browser (Debian chromium, headless) against a real daphne and engine.

A missing chromium/chromedriver is a failure, never a skip. Screenshots go to
<LSL_VAR_DIR>/screenshots/ (var/screenshots/ by default).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from django.conf import settings
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import Select, WebDriverWait

from environments import runtime
from environments.models import Environment, Role
from environments.services import grant_access

# serialized_rollback: the live daphne outlives each test's flush, and caches content-type ids
# (guardian's role checks use them); restoring the original rows keeps those ids valid.
pytestmark = [pytest.mark.django_db(transaction=True, serialized_rollback=True), pytest.mark.usefixtures("engine", "catalog")]

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SCREENSHOTS = Path(settings.VAR_DIR) / "screenshots"


class Browser:
    """One headless chromium with its own profile, pointed at the live server."""

    def __init__(self, base_url: str) -> None:
        for binary in (CHROMIUM, CHROMEDRIVER):
            if not Path(binary).exists():
                pytest.fail(f"{binary} is required for the browser tests (apt-get install chromium chromium-driver)", pytrace=False)
        self.base_url = base_url
        self.profile = tempfile.mkdtemp(prefix="lsl-chromium-")
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--no-first-run", f"--user-data-dir={self.profile}", "--window-size=1280,900"):
            options.add_argument(arg)
        self.driver: WebDriver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)

    def quit(self) -> None:
        try:
            self.driver.quit()
        finally:
            shutil.rmtree(self.profile, ignore_errors=True)

    # --- helpers ------------------------------------------------------------------

    def get(self, path: str) -> None:
        self.driver.get(self.base_url + path)

    def wait(self, condition: Callable[[WebDriver], Any], timeout: float = 30, what: str = "") -> Any:
        def safe(driver: WebDriver) -> Any:
            try:
                return condition(driver)
            except (StaleElementReferenceException, WebDriverException):
                return False  # the page reloaded under us (the status poll does that): try again
        try:
            return WebDriverWait(self.driver, timeout, poll_frequency=0.1).until(safe, message=what)
        except TimeoutException:
            # Leave evidence: what the page looked like when the wait gave up.
            self.screenshot("failed-" + "".join(c if c.isalnum() else "-" for c in what)[:60])
            body = self.driver.find_element(By.TAG_NAME, "body").text
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; {self.driver.current_url} shows:\n{body[:3000]}") from None

    def css(self, selector: str) -> Any:
        return self.driver.find_element(By.CSS_SELECTOR, selector)

    def text(self, selector: str) -> str:
        return self.css(selector).text

    def login(self, username: str, password: str) -> None:
        self.get("/login/")
        self.css("#id_username").send_keys(username)
        self.css("#id_password").send_keys(password)
        self.css("form.stacked button[type=submit]").click()
        self.wait(lambda d: d.current_url.rstrip("/") == self.base_url, what=f"{username} lands on the dashboard")

    def wait_status(self, status: str, timeout: float = 60) -> None:
        self.wait(lambda d: d.find_element(By.ID, "env-status").text == status, timeout, what=f"status {status}")

    def open_terminal(self, env_id: Any) -> None:
        """From the environment page, open a new terminal and wait for this user's hello."""
        self.get(f"/environments/{env_id}/")
        self.wait(lambda d: d.find_element(By.ID, "open-terminal").is_enabled(), what="open-terminal button")
        self.css("#open-terminal").click()
        self.wait(lambda d: "/sessions/" in d.current_url, what="the terminal page")

    def screenshot(self, name: str) -> None:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        self.driver.save_screenshot(str(SCREENSHOTS / f"{name}.png"))

    def terminal_text(self) -> str:
        return self.driver.execute_script("""
            const buffer = window.lslTerm.buffer.active, lines = [];
            for (let i = 0; i < buffer.length; i++) lines.push(buffer.getLine(i).translateToString(true));
            return lines.join("\\n");
        """)


@pytest.fixture(autouse=True)
def cleanup_containers(transactional_db: Any) -> Iterator[None]:
    """Remove this test's containers and volumes afterwards (browsers create environments in the live server)."""
    yield
    for env in Environment.objects.all():  # the transactional test database holds only this test's rows
        try:
            if env.container_id:
                runtime.remove_container(env.container_id)
            if env.workspace_volume:
                runtime.remove_volume(env.workspace_volume)
        except runtime.EngineError:
            pass


@pytest.fixture()
def browsers(live_server_proc: Any) -> Iterator[Callable[[], Browser]]:
    opened: list[Browser] = []

    def open_browser() -> Browser:
        browser = Browser(live_server_proc.url)
        opened.append(browser)
        return browser

    yield open_browser
    for browser in opened:
        browser.quit()


def test_create_start_token_share_and_revoke(people: Any, browsers: Callable[[], Browser], live_server_proc: Any) -> None:
    alice = browsers()
    alice.login("alice", "password-alice")

    # Create from the busybox template; the environment page shows progress, then "running" by itself.
    Select(alice.css("#id_template")).select_by_value("busybox")
    alice.css("#id_name").send_keys("browser-env")
    alice.css("#create-environment").click()
    alice.wait(lambda d: "/environments/" in d.current_url, what="redirect to the environment page")
    env = Environment.objects.get(owner=people.owner, name="browser-env")
    assert alice.driver.current_url == f"{alice.base_url}/environments/{env.id}/"
    alice.wait_status("running")

    alice.css("#btn-stop").click()
    alice.wait_status("stopped")
    alice.css("#btn-start").click()
    alice.wait_status("running")
    assert "browser-env started" in alice.text(".messages")
    alice.screenshot("environment")

    # A token made on the tokens page works against the API, and its use shows up.
    alice.get("/tokens/")
    alice.css("#id_name").send_keys("from-the-browser")
    alice.css("#create-token").click()
    key = alice.wait(lambda d: d.find_element(By.ID, "token-key").text, what="the new key")
    listed = requests.get(f"{live_server_proc.url}/api/v1/environments/", headers={"Authorization": f"Token {key}"}, timeout=10)
    assert listed.status_code == 200 and [e["name"] for e in listed.json()["results"]] == ["browser-env"]
    alice.get("/tokens/")
    assert alice.text("#tokens .last-used") != "never"
    assert key not in alice.driver.page_source

    # Share with bob (member); bob, in his own browser, sees it.
    alice.get(f"/environments/{env.id}/")
    alice.css("#share-name").send_keys("bob")
    Select(alice.css("#share-form select[name=role]")).select_by_value("member")
    alice.css("#share-submit").click()
    alice.wait(lambda d: "bob is now member" in d.find_element(By.CSS_SELECTOR, ".messages").text, what="grant message")

    bob = browsers()
    bob.login("bob", "password-bob")
    assert f"/environments/{env.id}/" in bob.driver.page_source
    bob.get(f"/environments/{env.id}/")
    assert "you are member" in bob.driver.page_source
    assert bob.driver.find_elements(By.ID, "btn-stop") and not bob.driver.find_elements(By.ID, "btn-delete")

    # Revoke: bob loses it at once, and his open page says so.
    alice.get(f"/environments/{env.id}/")
    alice.css(f'tr[data-grant="user-{people.teammate.pk}"] button.revoke').click()
    alice.wait(lambda d: "Access revoked" in d.find_element(By.CSS_SELECTOR, ".messages").text, what="revoke message")
    bob.wait(lambda d: "access to it was revoked" in d.find_element(By.ID, "env-error").text, timeout=10,
             what="bob's page notices the revocation")
    bob.get("/")
    assert "browser-env" not in bob.driver.page_source
    bob.get(f"/environments/{env.id}/")
    assert "browser-env" not in bob.driver.page_source  # a 404 page

    alice.get("/")
    assert alice.text(f'tr[data-env="{env.id}"] .status') == "running"
    alice.screenshot("dashboard")


def test_two_browsers_share_one_terminal(people: Any, make_env: Any, browsers: Callable[[], Browser]) -> None:
    env = make_env(people.owner, name="pair")
    assert env.status == "running", env.last_error
    grant_access(env, role=Role.VIEWER, user=people.viewer)

    alice = browsers()
    alice.login("alice", "password-alice")
    alice.open_terminal(env.id)
    session_path = alice.driver.current_url[len(alice.base_url):]
    alice.wait(lambda d: d.find_element(By.ID, "role-badge").text == "admin", what="alice's hello")

    victor = browsers()
    victor.login("victor", "password-victor")
    victor.get(session_path)
    victor.wait(lambda d: d.find_element(By.ID, "role-badge").text == "read-only", what="victor is read-only")
    alice.wait(lambda d: "victor" in d.find_element(By.ID, "participants").text, what="victor in alice's participants")
    assert "viewer" in alice.css('#participants li[data-user="victor"]').text

    # What alice types appears in victor's terminal (the shell computes 6*7, so it is output, not echo).
    typing = alice.css("#terminal .xterm-helper-textarea")
    typing.send_keys("echo from-alice-$((6*7)) héllo-✓")
    typing.send_keys(Keys.ENTER)
    victor.wait(lambda d: "from-alice-42 héllo-✓" in victor.terminal_text(), timeout=15, what="alice's output in victor's xterm")
    assert "from-alice-42 héllo-✓" in alice.terminal_text()

    # More output than the flow-control window (1 MiB): both pages must keep acking to see the end of it.
    typing.send_keys("seq 1 200000; echo seq-$((1+1))-done", Keys.ENTER)
    for browser in (alice, victor):
        browser.wait(lambda d: "seq-2-done" in browser.terminal_text(), timeout=30, what="the end of a 1.3 MB burst")

    # The viewer's keystrokes go nowhere.
    victor.css("#terminal .xterm-helper-textarea").send_keys("echo victor-$((1+1))", Keys.ENTER)
    time.sleep(0.5)
    assert "victor-2" not in alice.terminal_text() and "victor-2" not in victor.terminal_text()
    assert "read-only" in victor.text("#role-badge")
    alice.screenshot("terminal")
    victor.screenshot("terminal-viewer")

    # The dashboard lists the live session and who is in it; coming back restores the screen (snapshot).
    victor.get("/")
    assert "alice" in victor.text(f'tr[data-env="{env.id}"] .sessions-cell')
    victor.screenshot("dashboard-live-session")
    victor.get(session_path)
    victor.wait(lambda d: "seq-2-done" in victor.terminal_text(), timeout=15, what="the screen restored on rejoin")

    # The session ends for everyone when the shell exits; the recording replays from the environment page.
    typing.send_keys("exit 3", Keys.ENTER)
    victor.wait(lambda d: "session ended (code 3)" in d.find_element(By.ID, "session-ended").text, timeout=15,
                what="victor sees the end")
    victor.get(f"/environments/{env.id}/")
    victor.wait(lambda d: d.find_element(By.CSS_SELECTOR, "#sessions a.replay"), what="a replay link")
    assert not victor.driver.find_elements(By.ID, "open-terminal")  # viewers cannot open terminals
    victor.css("#sessions a.replay").click()
    victor.wait(lambda d: "seq-2-done" in d.find_element(By.ID, "player").text, timeout=20,
                what="the recording playing in the asciinema player")
    assert not victor.css("#player-error").is_displayed()
    victor.screenshot("replay")
