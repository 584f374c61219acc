"""The browser harness of the browser tests: headless Debian chromium via Selenium, the live server's
browsers, and clean-up of what the live server and worker created. Import the fixtures into a test
module (`from tests.browser import browsers, cleanup_containers`) to use them.

A missing chromium/chromedriver is a failure, never a skip.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from environments import runtime
from environments.models import Environment

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
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # so tests can fail on the pages' script errors
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
            self.fail_evidence(what)
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; {self.driver.current_url} shows:\n"
                                 f"{self.body()[:3000]}") from None

    def css(self, selector: str) -> Any:
        return self.driver.find_element(By.CSS_SELECTOR, selector)

    def text(self, selector: str) -> str:
        return self.css(selector).text

    def body(self) -> str:
        return self.driver.find_element(By.TAG_NAME, "body").text

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

    def fail_evidence(self, what: str) -> None:
        """Leave evidence: what the page looked like when a wait gave up."""
        self.screenshot("failed-" + "".join(c if c.isalnum() else "-" for c in what)[:60])

    def csp_violations(self) -> list[str]:
        """Content-Security-Policy violations chromium logged since the last look (reading empties the log):
        a blocked script, style, connection or eval is a console error naming the policy."""
        return [entry["message"] for entry in self.driver.get_log("browser") if "Content Security Policy" in entry["message"]]

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
                runtime.local().remove_container(env.container_id)
            if env.workspace_volume:
                runtime.local().remove_volume(env.workspace_volume)
        except runtime.EngineError:
            pass


@pytest.fixture()
def browsers(live_server_proc: Any, request: Any) -> Iterator[Callable[[], Browser]]:
    """Open browsers on the live server, all closed afterwards. A module may set BROWSER_CLASS."""
    opened: list[Browser] = []
    cls = getattr(request.module, "BROWSER_CLASS", Browser)

    def open_browser() -> Browser:
        browser = cls(live_server_proc.url)
        opened.append(browser)
        return browser

    yield open_browser
    for browser in opened:
        browser.quit()
