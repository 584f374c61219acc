"""Every page of the web app in a real browser, at a laptop's and a phone's size, light and dark.

Each page is shot at 1366×768 and 390×844 (device metrics emulated through the DevTools protocol), with
`prefers-color-scheme` emulated light and dark (CDP Emulation.setEmulatedMedia), into
<LSL_VAR_DIR>/screenshots/pages/<page>-<size>-<scheme>.png for a person to look at. On each, the test
asserts that nothing was refused by the Content-Security-Policy and that the page does not scroll
sideways (document.documentElement.scrollWidth <= innerWidth): wide tables scroll inside themselves.

Along the way it checks what only a browser shows: dark mode really changes the page, the theme toggle
is remembered, the phone menu opens, the favicon loads, a terminal says whose window sizes it, and an
ended terminal clears its presence and offers a new terminal. A replay keeps its player and controls in the
window whatever the recording's size (test_the_replay_fits_the_window_whatever_the_recording_size).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import requests
from django.utils import timezone
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from environments.models import Environment, Role, Template
from environments.services import grant_access
from sessions.models import TerminalSession
from sessions.recording import recording_path
from tests.browser import SCREENSHOTS, Browser

pytestmark = [pytest.mark.django_db(transaction=True, serialized_rollback=True), pytest.mark.usefixtures("engine", "catalog")]

from tests.browser import browsers, cleanup_containers  # noqa: F401,E402  (fixtures)

SIZES = {"desktop": (1366, 768, False), "phone": (390, 844, True)}
SCHEMES = ("light", "dark")
SHOTS = SCREENSHOTS / "pages"


def emulate(browser: Browser, size: str, scheme: str) -> None:
    width, height, mobile = SIZES[size]
    browser.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile})
    browser.driver.execute_cdp_cmd("Emulation.setEmulatedMedia", {
        "features": [{"name": "prefers-color-scheme", "value": scheme}]})
    browser.wait(lambda d: d.execute_script("return window.innerWidth") == width
                 and d.execute_script(f"return matchMedia('(prefers-color-scheme: {scheme})').matches"),
                 what=f"the {size} {scheme} emulation")


def background(browser: Browser) -> str:
    return browser.driver.execute_script("return getComputedStyle(document.documentElement).backgroundColor")


def shoot(browser: Browser, name: str, ready: Callable[[Any], Any] | None = None, themed: bool = True) -> None:
    """The current page in all four variants: screenshots, no CSP violation, no sideways scrolling."""
    browser.wait(lambda d: d.execute_script("return document.readyState") == "complete", what=f"{name} loaded")
    if ready is not None:
        browser.wait(ready, what=f"{name} ready")
    SHOTS.mkdir(parents=True, exist_ok=True)
    backgrounds = {}
    for size in SIZES:
        for scheme in SCHEMES:
            emulate(browser, size, scheme)
            overflow = browser.driver.execute_script(
                "return [document.documentElement.scrollWidth, window.innerWidth]")
            browser.driver.save_screenshot(str(SHOTS / f"{name}-{size}-{scheme}.png"))
            assert overflow[0] <= overflow[1], f"{name} at {size}/{scheme} scrolls sideways: {overflow}"
            backgrounds[scheme] = background(browser)
    if themed:  # the app's pages (the docs site and Swagger UI bring their own styles)
        assert backgrounds["light"] != backgrounds["dark"], f"{name} ignores prefers-color-scheme: {backgrounds}"
    assert browser.csp_violations() == [], f"{name}: CSP violations"
    emulate(browser, "desktop", "light")


def test_every_page_at_two_sizes_light_and_dark(people: Any, make_env: Any, browsers: Callable[[], Browser],
                                                live_server_proc: Any) -> None:
    template = Template.objects.get(slug="busybox")
    running = make_env(people.owner, name="web-running")
    assert running.status == "running", running.last_error

    def row(name: str, **fields: Any) -> Environment:
        return Environment.objects.create(name=name, owner=people.owner, template=template, image=template.image,
                                          cpus=0.5, memory_mb=256, pids=128,
                                          workspace_volume=f"lsl-ws-shot-{uuid.uuid4().hex[:8]}", **fields)

    failed = row("web-failed", status="error",
                 last_error="container could not start: OCI runtime create failed: exec: \"/bin/lsl-init\": no such file")
    disk = row("web-disk-full", status="stopped", stop_reason="disk", last_error="disk limit exceeded (1100 MB of 1024 MB)")
    row("web-stopped", status="stopped", stop_reason="stopped")
    grant_access(running, role=Role.MEMBER, user=people.member)

    # --- anonymous: the sign-in page, the documentation, the favicon --------------------------------
    anon = browsers()
    anon.get("/login/")
    emulate(anon, "desktop", "light")
    shoot(anon, "login")
    icon = anon.css('link[rel="icon"]').get_attribute("href")
    assert requests.get(icon, timeout=10).status_code == 200
    assert requests.get(live_server_proc.url + "/favicon.ico", timeout=10).status_code == 200
    # The phone menu: collapsed at first, opened by its button.
    emulate(anon, "phone", "light")
    assert not anon.css("#mainnav").is_displayed()
    anon.css("#nav-toggle").click()
    anon.wait(lambda d: d.find_element(By.ID, "mainnav").is_displayed(), what="the phone menu opens")
    emulate(anon, "desktop", "light")
    anon.get("/docs/")
    shoot(anon, "docs-index", themed=False)

    alice = browsers()
    alice.login("alice", "password-alice")
    emulate(alice, "desktop", "light")

    # --- the dashboard shows failures as failures ----------------------------------------------------
    alice.get("/")
    failed_row = f'tr[data-env="{failed.id}"]'
    disk_row = f'tr[data-env="{disk.id}"]'
    shoot(alice, "dashboard")
    assert "error" in alice.css(failed_row).get_attribute("class").split()
    assert "could not start" in alice.text(f"{failed_row} .status-cell")
    assert "status-failed" in alice.css(f"{disk_row} .status").get_attribute("class")
    assert "disk limit" in alice.text(f"{disk_row} .status-cell")
    assert "status-failed" not in alice.driver.find_element(
        By.CSS_SELECTOR, f'tr[data-env="{running.id}"] .status').get_attribute("class")
    # The theme toggle wins over the system's preference, and is remembered.
    alice.css("#theme-toggle").click()
    chosen = alice.driver.execute_script("return document.documentElement.dataset.theme")
    assert chosen in ("light", "dark")
    alice.driver.refresh()
    alice.wait(lambda d: d.execute_script("return document.documentElement.dataset.theme") == chosen,
               what="the chosen theme after a reload")
    alice.driver.execute_script("localStorage.removeItem('lsl-theme')")
    alice.driver.refresh()

    alice.get(f"/environments/{disk.id}/")
    shoot(alice, "environment-failed")
    assert "status-failed" in alice.css("#env-status").get_attribute("class")
    alice.get(f"/environments/{failed.id}/")
    assert "could not start" in alice.text("#env-error")
    alice.get(f"/environments/{running.id}/")
    shoot(alice, "environment", lambda d: d.find_elements(By.CSS_SELECTOR, "#sessions tbody tr td:not([colspan])")
          or "No " in d.find_element(By.CSS_SELECTOR, "#sessions tbody").text)
    # Dates are <time> elements in the browser's local time, with UTC in the title.
    created = alice.css(".facts time")
    assert created.get_attribute("datetime") and created.get_attribute("title").endswith("UTC")
    alice.get(f"/environments/{running.id}/monitor/")
    shoot(alice, "environment-monitor")

    # --- a shared terminal: meg's smaller window sizes alice's terminal ----------------------------
    alice.open_terminal(running.id)
    session_path = alice.driver.current_url[len(alice.base_url):]
    alice.wait(lambda d: d.find_element(By.ID, "role-badge").text == "admin", what="alice's hello")
    meg = browsers()
    meg.login("meg", "password-meg")
    emulate(meg, "phone", "light")
    meg.get(session_path)
    meg.wait(lambda d: d.find_element(By.ID, "role-badge").text == "member", what="meg's hello")
    alice.wait(lambda d: "sized to meg's window" in d.find_element(By.ID, "size-cue").text, timeout=15,
               what="alice is told meg's window sizes the session")
    typing = alice.css("#terminal .xterm-helper-textarea")
    typing.send_keys("echo screenshot-$((6*7))", Keys.ENTER)
    alice.wait(lambda d: "screenshot-42" in alice.terminal_text(), timeout=15, what="output in the terminal")
    shoot(alice, "terminal")
    emulate(meg, "desktop", "light")  # meg's window grows as large as alice's: the session is sized to both again
    alice.wait(lambda d: not d.find_element(By.ID, "size-cue").is_displayed(), timeout=15, what="the size cue goes away")
    meg.get("/")

    # The session ends: presence is cleared, the reason is said, a new terminal is offered.
    alice.css("#terminal .xterm-helper-textarea").send_keys("exit 3", Keys.ENTER)
    alice.wait(lambda d: "exit code 3" in d.find_element(By.ID, "session-ended").text, timeout=15, what="the end")
    assert "the shell exited" in alice.text("#end-reason")
    assert "alice" not in alice.text("#participants")
    shoot(alice, "terminal-ended")
    replay_path = session_path + "replay/"
    alice.css("#new-terminal").click()
    alice.wait(lambda d: d.current_url.rstrip("/") != (alice.base_url + session_path).rstrip("/")
               and "/sessions/" in d.current_url, what="a new terminal")
    alice.wait(lambda d: d.find_element(By.ID, "role-badge").text == "admin", what="the new terminal's hello")

    alice.get(replay_path)
    shoot(alice, "replay", lambda d: "screenshot-42" in d.find_element(By.ID, "player").text)
    # The player's controls are inside the viewport at 1366x768.
    bottom = alice.driver.execute_script(
        "const c = document.querySelector('#player .ap-control-bar') || document.querySelector('#player');"
        "return c.getBoundingClientRect().bottom")
    assert bottom <= 768, f"the replay's controls end at {bottom}px, below the fold"

    # --- teams, tokens, a created token, refusals ---------------------------------------------------
    alice.get("/teams/")
    shoot(alice, "teams")
    alice.get("/tokens/")
    alice.css("#id_name").send_keys("screenshots")
    alice.css("#create-token").click()
    alice.wait(lambda d: d.find_element(By.ID, "token-key").text, what="the new key")
    key_box, copy = alice.css(".keybox"), alice.css("#copy-key")
    assert copy.size["height"] < 40 and copy.location["y"] < key_box.location["y"] + key_box.size["height"]
    shoot(alice, "token-created")
    alice.get("/tokens/")
    shoot(alice, "tokens")
    alice.get("/monitor/")
    shoot(alice, "403")
    alice.get(f"/environments/{uuid.uuid4()}/")
    shoot(alice, "404")
    alice.get("/api/docs/")
    shoot(alice, "api-docs", lambda d: len(d.find_elements(By.CSS_SELECTOR, "#swagger-ui .opblock")) > 5, themed=False)

    # --- staff: the monitor, and the Admin link --------------------------------------------------------
    steve = browsers()
    steve.login("steve", "password-steve")
    emulate(steve, "desktop", "light")
    assert steve.css("#nav-admin").get_attribute("href").endswith("/admin/")
    steve.get("/monitor/")
    shoot(steve, "monitor")
    assert not alice.driver.find_elements(By.ID, "nav-admin")


def _recorded_session(owner: Any, env: Environment, cols: int, rows: int, resizes: tuple[tuple[int, int], ...] = ()) -> str:
    """An ended session with a recording of `cols`x`rows` (then resized to each of `resizes`): its id."""
    session = TerminalSession.objects.create(environment=env, environment_name=env.name, creator=owner,
                                             cols=cols, rows=rows, ended_at=timezone.now(), end_reason="exited",
                                             exit_code=0)
    lines = [{"version": 2, "width": cols, "height": rows, "timestamp": 1700000000}]
    at = 0.0
    for size in ((cols, rows), *resizes):
        if size != (cols, rows):
            at += 0.05
            lines.append([at, "r", f"{size[0]}x{size[1]}"])
        for n in range(size[1] + 5):
            at += 0.001
            lines.append([at, "o", f"line-{n} {'#' * (size[0] - 12)}\r\n"])
    lines.append([at + 0.05, "o", "replay-end-marker\r\n"])
    path = recording_path(str(session.pk))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(session.pk)


PLACED = """
const bar = document.querySelector('#player .ap-control-bar');
const player = document.querySelector('#player .ap-player');
const box = document.querySelector('#player');
const at = (el) => el ? el.getBoundingClientRect() : null;
return {bar: at(bar) && at(bar).bottom, right: at(player) && at(player).right, height: at(player) && at(player).height,
        box: at(box).bottom, view: [innerWidth, innerHeight], scrollWidth: document.documentElement.scrollWidth};
"""
# The player's box shrinks (here: 200px more header above it) and, in the same instant, before the player
# has re-fitted (it does on a debounced ResizeObserver), its controls must already be inside the box.
SHRUNK = ("const head = document.querySelector('.term-head');"
          "head.style.paddingTop = '200px';"
          "const placed = (() => {" + PLACED + "})();"
          "head.style.paddingTop = '';"
          "return placed;")


def _fits(where: dict[str, Any]) -> bool:
    width, height = where["view"]
    return (where["bar"] is not None and where["bar"] <= min(height, where["box"] + 0.5) and where["box"] <= height
            and where["right"] <= width and where["scrollWidth"] <= width and where["height"] >= 100)


def test_the_replay_fits_the_window_whatever_the_recording_size(people: Any, browsers: Callable[[], Browser]) -> None:
    """The player keeps its controls on screen and never scrolls sideways, at a laptop's and a phone's size,
    for a big recording, a tall narrow one (a phone sized the session), a small one, and one resized
    from narrow to wide while recording: once it has fitted itself, and at the very moment the window
    (or its box) gets smaller, before it re-fits. The page test measured a tall recording's player right
    after going from phone to laptop size, and found it still as tall as the phone's window."""
    template = Template.objects.get(slug="busybox")
    env = Environment.objects.create(name="web-replays", owner=people.owner, template=template, image=template.image,
                                     cpus=0.5, memory_mb=256, pids=128, status="stopped", stop_reason="stopped",
                                     workspace_volume=f"lsl-ws-shot-{uuid.uuid4().hex[:8]}")
    casts = {
        "200x60": _recorded_session(people.owner, env, 200, 60),
        "40x50": _recorded_session(people.owner, env, 40, 50),
        "80x24": _recorded_session(people.owner, env, 80, 24),
        "40x50-then-160x48": _recorded_session(people.owner, env, 40, 50, resizes=((160, 48),)),
    }
    alice = browsers()
    alice.login("alice", "password-alice")
    SHOTS.mkdir(parents=True, exist_ok=True)

    def settled(what: str) -> dict[str, Any]:
        deadline = time.monotonic() + 5  # the player re-fits a moment after its box changes
        while not _fits(where := alice.driver.execute_script(PLACED)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _fits(where), f"{what}: the player does not fit the window: {where}"
        return where

    for name, session_id in casts.items():
        for size, other in (("phone", "desktop"), ("desktop", "phone")):
            emulate(alice, size, "light")
            alice.get(f"/sessions/{session_id}/replay/")
            alice.wait(lambda d: "replay-end-marker" in d.find_element(By.ID, "player").text, timeout=20,
                       what=f"the {name} replay played to its end")
            settled(f"{name} at {size}")
            alice.driver.save_screenshot(str(SHOTS / f"replay-{name}-{size}.png"))
            shrunk = alice.driver.execute_script(SHRUNK)
            assert _fits(shrunk), f"{name} at {size}: the controls leave the player's box when it shrinks: {shrunk}"
            # As the page test does: another size, measured at once (the player may not have re-fitted yet).
            emulate(alice, other, "light")
            at_once = alice.driver.execute_script(PLACED)
            assert _fits(at_once), f"{name} from {size} to {other}: the controls are off screen: {at_once}"
            settled(f"{name} from {size} to {other}")
