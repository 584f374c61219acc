"""The web app in a real browser (Debian chromium, headless) against a real daphne and engine.

A missing chromium/chromedriver is a failure, never a skip. Screenshots go to
<LSL_VAR_DIR>/screenshots/ (var/screenshots/ by default).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import requests
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select

from environments.models import Environment, Role
from environments.services import grant_access

# serialized_rollback: the live daphne outlives each test's flush, and caches content-type ids
# (guardian's role checks use them); restoring the original rows keeps those ids valid.
pytestmark = [pytest.mark.django_db(transaction=True, serialized_rollback=True), pytest.mark.usefixtures("engine", "catalog")]

from tests.browser import Browser, browsers, cleanup_containers  # noqa: F401  (fixtures)


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
