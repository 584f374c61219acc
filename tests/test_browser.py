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
    # Dashboard, environment, tokens (and the new key's page), sharing: all within the Content-Security-Policy.
    assert alice.csp_violations() == [] and bob.csp_violations() == []


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
    # xterm.js (its injected <style> elements included), the terminal's websocket and its input: nothing
    # the page did was refused by the Content-Security-Policy.
    assert alice.csp_violations() == [] and victor.csp_violations() == []

    # The dashboard lists the live session and who is in it; coming back restores the screen (snapshot).
    victor.get("/")
    assert "alice" in victor.text(f'tr[data-env="{env.id}"] .sessions-cell')
    victor.screenshot("dashboard-live-session")
    victor.get(session_path)
    victor.wait(lambda d: "seq-2-done" in victor.terminal_text(), timeout=15, what="the screen restored on rejoin")

    # The session ends for everyone when the shell exits; the recording replays from the environment page.
    typing.send_keys("exit 3", Keys.ENTER)
    victor.wait(lambda d: "exit code 3" in d.find_element(By.ID, "session-ended").text, timeout=15,
                what="victor sees the end")
    assert "Session ended: the shell exited" in victor.text("#end-reason")
    # Nobody is shown as still here, and a viewer is not offered a terminal they could not open.
    assert "alice" not in victor.text("#participants") and "victor" not in victor.text("#participants")
    assert not victor.driver.find_elements(By.ID, "new-terminal")
    alice.wait(lambda d: d.find_element(By.ID, "new-terminal").is_displayed(), timeout=15, what="alice is offered a new terminal")
    victor.get(f"/environments/{env.id}/")
    victor.wait(lambda d: d.find_element(By.CSS_SELECTOR, "#sessions a.replay"), what="a replay link")
    assert not victor.driver.find_elements(By.ID, "open-terminal")  # viewers cannot open terminals
    victor.css("#sessions a.replay").click()
    victor.wait(lambda d: "seq-2-done" in d.find_element(By.ID, "player").text, timeout=20,
                what="the recording playing in the asciinema player")
    assert not victor.css("#player-error").is_displayed()
    victor.screenshot("replay")
    assert victor.csp_violations() == []  # the replay page's player compiles WebAssembly: allowed there alone


def test_api_docs_and_admin_work_under_the_policy(people: Any, browsers: Callable[[], Browser]) -> None:
    """Swagger UI (served by this server, initialised by a script file) and Django admin, in a browser:
    they render and work, and nothing they do is refused by the Content-Security-Policy."""
    from django.contrib.auth import get_user_model

    get_user_model().objects.create_superuser("root", "root@example.com", "password-root")
    root = browsers()
    root.login("root", "password-root")
    root.get("/api/docs/")
    root.wait(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#swagger-ui .opblock")) > 5, what="Swagger UI's operations")
    operation = root.css("#swagger-ui .opblock-summary")
    operation.click()  # expands, rendering the operation's parameters and responses
    root.wait(lambda d: d.find_elements(By.CSS_SELECTOR, "#swagger-ui .opblock.is-open .responses-wrapper"),
              what="an expanded operation")
    root.screenshot("api-docs")
    assert root.csp_violations() == []

    root.get("/admin/auth/user/add/")
    root.css("#id_username").send_keys("made-in-admin")
    for field in ("#id_password1", "#id_password2"):
        root.css(field).send_keys("a-long-password-1")
    root.css("input[name=_save]").click()
    root.wait(lambda d: "/change/" in d.current_url, what="the new user's change page")
    root.get("/admin/auth/user/")
    root.wait(lambda d: "made-in-admin" in d.find_element(By.ID, "result_list").text, what="the admin's user list")
    root.css("#action-toggle").click()  # admin's actions.js: select all
    assert root.css("#result_list input.action-select").is_selected()
    assert root.csp_violations() == []


def test_revoked_terminal_clears_presence_and_says_why(people: Any, make_env: Any, browsers: Callable[[], Browser]) -> None:
    env = make_env(people.owner, name="revoke-term")
    assert env.status == "running", env.last_error
    grant_access(env, role=Role.MEMBER, user=people.member)
    meg = browsers()
    meg.login("meg", "password-meg")
    meg.open_terminal(env.id)
    meg.wait(lambda d: d.find_element(By.ID, "role-badge").text == "member", what="meg's hello")
    meg.wait(lambda d: "meg" in d.find_element(By.ID, "participants").text, what="meg in her own presence list")

    from environments.services import revoke_access
    assert revoke_access(env, f"user-{people.member.pk}")
    meg.wait(lambda d: "access to this environment was revoked" in d.find_element(By.ID, "session-ended").text,
             timeout=20, what="meg is told her access was revoked")
    assert "meg" not in meg.text("#participants")  # no stale presence
    assert not meg.driver.find_elements(By.ID, "new-terminal")  # she may not open one any more
    assert meg.text("#conn-status") == "no access"
    assert meg.csp_violations() == []
