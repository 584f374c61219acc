"""The live pages follow /ws/events/ alone, in a real browser (Debian chromium, headless).

Every page here is opened with `?nopoll=1`: the pages then make no REST request on a timer (not even
the 30 s fallback poll used while the event socket is down), so whatever changes on screen came
from the event stream. The budgets are the issue's: a change made through the API shows on an open
page within 1 s of the API call returning; a container killed behind LSL's back (`docker kill`)
shows as stopped, reason "killed", within 2 s. Latency is measured with time.monotonic() from the
moment the change returns to the moment the DOM shows it, reading the DOM every 50 ms.

The driver and fixtures are tests/browser.py's. Screenshots: <LSL_VAR_DIR>/screenshots/*_events_light.png.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import requests
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.common.by import By

from environments.models import Environment, Template
from tests.browser import Browser, browsers, cleanup_containers  # noqa: F401  (fixtures)
from tests.conftest import docker_cli, make_token

# serialized_rollback: the live daphne outlives each test's flush, and caches content-type ids
# (guardian's role checks use them); restoring the original rows keeps those ids valid.
pytestmark = [pytest.mark.django_db(transaction=True, serialized_rollback=True), pytest.mark.usefixtures("engine", "catalog")]


API_BUDGET = 1.0  # seconds from an API change returning to an open page showing it
KILL_BUDGET = 2.0  # seconds from `docker kill` returning to an open page showing "stopped (killed)"
DOM_POLL = 0.05

# Every fetch/XHR the page made (the Resource Timing buffer): the proof that nothing was polled.
REQUESTS_JS = """return performance.getEntriesByType("resource")
    .filter((e) => e.initiatorType === "fetch" || e.initiatorType === "xmlhttprequest").map((e) => e.name);"""

LATENCIES: dict[str, float] = {}


class LiveBrowser(Browser):
    """The shared harness (tests/browser.py) plus what the event-stream tests need."""

    # --- for the event stream ---------------------------------------------------------------

    def open_live(self, path: str) -> None:
        """Open a page with polling disabled and wait until its event stream said hello."""
        self.get(path + ("&" if "?" in path else "?") + "nopoll=1")
        self.wait(lambda d: d.execute_script("return window.lslEvents && window.lslEvents.state") == "live", timeout=15,
                  what=f"the event stream of {path}")
        assert self.driver.execute_script("return window.lslEvents.polling") is False, "?nopoll=1 did not disable polling"

    def before_scripts(self, source: str) -> None:
        """Run `source` in every page this browser opens from now on, before the page's own scripts."""
        self.driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": source})

    def script_errors(self) -> list[str]:
        return [entry["message"] for entry in self.driver.get_log("browser")
                if entry["level"] == "SEVERE" and "favicon.ico" not in entry["message"]]  # LSL serves no favicon

    def requests(self) -> list[str]:
        return self.driver.execute_script(REQUESTS_JS)

    def latency(self, script: str, *args: Any, since: float, budget: float, what: str, timeout: float = 15.0) -> float:
        """Seconds from `since` (time.monotonic()) until `script` returns true, reading the DOM every 50 ms.

        Waits past the budget (up to `timeout`) so that a miss reports by how much; the caller asserts the budget.
        """
        while True:
            try:
                done = bool(self.driver.execute_script(script, *args))
            except WebDriverException:
                done = False
            elapsed = time.monotonic() - since
            if done:
                LATENCIES[what] = elapsed
                print(f"latency: {what}: {elapsed * 1000:.0f} ms (budget {budget * 1000:.0f} ms)")
                return elapsed
            if elapsed > timeout:
                self.fail_evidence(what)
                raise AssertionError(f"{what}: not shown after {timeout}s; {self.driver.current_url} shows:\n{self.body()[:3000]}")
            time.sleep(DOM_POLL)


BROWSER_CLASS = LiveBrowser  # what the `browsers` fixture opens in this module


# DOM conditions (arguments: environment id, wanted status, wanted stop-reason text or "" for none).
DASHBOARD_SHOWS = """
    const row = document.querySelector(`#environments tr[data-env="${arguments[0]}"]`);
    if (!row) return false;
    const reason = row.querySelector(".status-cell .stop-reason");
    return row.querySelector(".status-cell .status").textContent === arguments[1]
        && (reason ? reason.textContent : "") === arguments[2];
"""
ENV_PAGE_SHOWS = """
    const reason = document.getElementById("env-stop-reason");
    return document.getElementById("env-status").textContent === arguments[1]
        && (reason.hidden ? "" : reason.textContent) === arguments[2];
"""
MONITOR_SHOWS = """
    const row = document.querySelector(`#monitor-envs tr[data-env="${arguments[0]}"]`);
    if (!row) return false;
    const reason = row.querySelector(".status-cell .stop-reason");
    return row.querySelector(".status-cell .status").textContent === arguments[1]
        && (reason ? reason.textContent : "") === arguments[2];
"""


def api(live_server_proc: Any, token: str, method: str, path: str, **kwargs: Any) -> requests.Response:
    return requests.request(method, f"{live_server_proc.url}{path}", headers={"Authorization": f"Token {token}"},
                            timeout=60, **kwargs)


def test_status_changes_reach_open_pages_through_events_alone(people: Any, make_env: Any, browsers: Callable[[], LiveBrowser],
                                                               live_server_proc: Any) -> None:
    env = make_env(people.owner, name="evented")
    assert env.status == "running", env.last_error
    env_id = str(env.id)
    token = make_token(people.owner)

    # Three open pages, none of them polling: alice's dashboard and environment page, steve's monitor.
    dashboard = browsers()
    dashboard.login("alice", "password-alice")
    dashboard.open_live("/")
    env_page = browsers()
    env_page.login("alice", "password-alice")
    env_page.open_live(f"/environments/{env_id}/")
    env_page.wait(lambda d: d.find_elements(By.CSS_SELECTOR, "#sessions tbody td"), what="the sessions table loaded once")
    monitor = browsers()
    monitor.login("steve", "password-steve")
    monitor.open_live("/monitor/")
    monitor.wait(lambda d: d.execute_script("return window.lslMonitor.samples") >= 1, what="the monitor's one sample")
    assert dashboard.text(f'tr[data-env="{env_id}"] .status') == "running"
    dashboard.screenshot("dashboard_events_light")
    pages = {"dashboard": dashboard, "environment page": env_page, "monitor": monitor}
    before = {name: page.requests() for name, page in pages.items()}

    # 1. Stopped through the API: every open page shows it within 1 s.
    issued = time.monotonic()
    stopped = api(live_server_proc, token, "POST", f"/api/v1/environments/{env_id}/stop/")
    t0 = time.monotonic()
    assert stopped.status_code == 200 and stopped.json()["status"] == "stopped", stopped.text
    print(f"the stop API call itself took {(t0 - issued) * 1000:.0f} ms")
    for name, page, script in (("dashboard", dashboard, DASHBOARD_SHOWS), ("environment page", env_page, ENV_PAGE_SHOWS),
                               ("monitor", monitor, MONITOR_SHOWS)):
        took = page.latency(script, env_id, "stopped", "", since=t0, budget=API_BUDGET, what=f"API stop → {name}")
        assert took <= API_BUDGET, f"{name} showed the stop after {took:.3f}s (budget {API_BUDGET}s)"
    # The environment page redrew its controls for the new status (no reload).
    env_page.wait(lambda d: d.find_elements(By.ID, "btn-start") and not d.find_elements(By.ID, "btn-stop"), timeout=2,
                  what="the start button on the environment page")

    # 2. Started again through the API: running within 1 s.
    started = api(live_server_proc, token, "POST", f"/api/v1/environments/{env_id}/start/")
    t0 = time.monotonic()
    assert started.status_code == 200 and started.json()["status"] == "running", started.text
    took = dashboard.latency(DASHBOARD_SHOWS, env_id, "running", "", since=t0, budget=API_BUDGET, what="API start → dashboard")
    assert took <= API_BUDGET, f"the dashboard showed the start after {took:.3f}s (budget {API_BUDGET}s)"
    env_page.wait(lambda d: d.find_element(By.ID, "open-terminal").is_enabled(), timeout=2, what="open-terminal enabled again")

    # 3. Killed behind LSL's back: the worker hears the engine, and the pages show "stopped", reason "killed", within 2 s.
    container_id = Environment.objects.get(pk=env_id).container_id
    issued = time.monotonic()
    killed = docker_cli("kill", container_id)
    t0 = time.monotonic()
    assert killed.returncode == 0, killed.stderr
    # The budget counts from `docker kill` returning (the rule); the CLI's own time is reported beside it.
    print(f"docker kill itself took {(t0 - issued) * 1000:.0f} ms")
    for name, page, script in (("dashboard", dashboard, DASHBOARD_SHOWS), ("environment page", env_page, ENV_PAGE_SHOWS),
                               ("monitor", monitor, MONITOR_SHOWS)):
        took = page.latency(script, env_id, "stopped", "killed", since=t0, budget=KILL_BUDGET, what=f"docker kill → {name}")
        assert took <= KILL_BUDGET, f"{name} showed the kill after {took:.3f}s (budget {KILL_BUDGET}s)"
    assert Environment.objects.get(pk=env_id).stop_reason == "killed"
    assert "killed" in dashboard.text(f'tr[data-env="{env_id}"] .stop-reason')
    dashboard.screenshot("dashboard_events_killed_light")
    env_page.screenshot("environment_events_killed_light")
    monitor.driver.set_window_size(1280, 1300)
    monitor.screenshot("monitor_events_killed_light")

    # Not one REST request from any page in between, and no refetch: the events did it all.
    for name, page in pages.items():
        extra = page.requests()[len(before[name]):]
        assert extra == [], f"the {name} made requests while polling was disabled: {extra}"
        assert page.driver.execute_script("return window.lslEvents.refetches") == 0, name
        assert page.script_errors() == [], name
    print("latencies (ms):", {what: round(took * 1000) for what, took in LATENCIES.items()})


def make_template(slug: str, setup: list[str]) -> Template:
    """A template the catalog does not have (tests/test_catalog.py counts the catalog's two)."""
    busybox = Template.objects.get(slug="busybox")
    return Template.objects.create(slug=slug, image=busybox.image, shell=busybox.shell, cpus=0.5, memory_mb=128,
                                   pids=64, network_modes=["none"], setup=setup, managed_by_catalog=False)


def test_dashboard_rows_come_and_go_and_failures_look_like_failures(people: Any, browsers: Callable[[], LiveBrowser],
                                                                     live_server_proc: Any, worker_proc: Any) -> None:
    make_template("bad-setup", ["echo about to fail", "exit 3"])
    token = make_token(people.owner)
    dashboard = browsers()
    dashboard.login("alice", "password-alice")
    dashboard.open_live("/")
    assert "You have no environments yet" in dashboard.text("#environments")

    # Created elsewhere (the API): a row appears (its one REST read fetches alice's role on it).
    created = api(live_server_proc, token, "POST", "/api/v1/environments/", json={"name": "doomed", "template": "bad-setup"})
    t0 = time.monotonic()
    assert created.status_code == 202, created.text
    env_id = created.json()["id"]
    row = f'#environments tr[data-env="{env_id}"]'
    took = dashboard.latency(f"return Boolean(document.querySelector('{row}'))", since=t0, budget=API_BUDGET,
                             what="API create → dashboard row")
    assert took <= API_BUDGET, f"the new row appeared after {took:.3f}s (budget {API_BUDGET}s)"
    assert dashboard.text(f"{row} .env-link") == "doomed" and dashboard.text(f"{row} .role-cell") == "admin"
    assert not dashboard.driver.find_elements(By.CSS_SELECTOR, "#environments tr.empty-row")

    # Its setup fails: the row turns into an error, in the error colour, with the reason readable.
    dashboard.wait(lambda d: d.find_element(By.CSS_SELECTOR, f"{row} .status").text == "error", timeout=60,
                   what="the failed environment's error status")
    pill = dashboard.css(f"{row} .status")
    assert "status-error" in pill.get_attribute("class")
    assert pill.value_of_css_property("color") == "rgba(201, 59, 59, 1)"  # var(--danger), not a grey "stopped"
    error = dashboard.text(f"{row} .env-error")
    assert "setup step 2 ('exit 3') failed with exit status 3" in error, error
    assert error == Environment.objects.get(pk=env_id).last_error
    dashboard.screenshot("dashboard_events_error_light")

    # Its environment page says so too (server-rendered, then live).
    env_page = browsers()
    env_page.login("alice", "password-alice")
    env_page.open_live(f"/environments/{env_id}/")
    assert env_page.text("#env-status") == "error" and "exit status 3" in env_page.text("#env-error")
    env_page.screenshot("environment_events_error_light")

    # Deleted elsewhere: the row goes, and the environment page says it is gone.
    deleted = api(live_server_proc, token, "DELETE", f"/api/v1/environments/{env_id}/?purge=true")
    t0 = time.monotonic()
    assert deleted.status_code == 204, deleted.text
    took = dashboard.latency(f"return !document.querySelector('{row}')", since=t0, budget=API_BUDGET,
                             what="API delete → dashboard row gone")
    assert took <= API_BUDGET, f"the deleted row went after {took:.3f}s (budget {API_BUDGET}s)"
    assert "You have no environments yet" in dashboard.text("#environments")
    took = env_page.latency("return document.getElementById('env-status').textContent === 'gone'", since=t0,
                            budget=API_BUDGET, what="API delete → environment page")
    assert took <= API_BUDGET
    assert "deleted" in env_page.text("#env-error")
    assert dashboard.script_errors() == [] and env_page.script_errors() == []
    print("latencies (ms):", {what: round(took * 1000) for what, took in LATENCIES.items()})


# Stands in for a network or proxy that refuses WebSockets: the constructor fails, as it would on a bad URL.
BLOCK_WEBSOCKETS = """
    window.RealWebSocket = window.WebSocket;
    window.WebSocket = function () { throw new Error("WebSockets blocked by the test"); };
"""
UNBLOCK_WEBSOCKETS = "window.WebSocket = window.RealWebSocket; window.lslEvents.reconnectNow();"


def test_a_dropped_stream_resumes_where_it_left_off(people: Any, make_env: Any, browsers: Callable[[], LiveBrowser],
                                                    live_server_proc: Any) -> None:
    env = make_env(people.owner, name="resumed")
    assert env.status == "running", env.last_error
    env_id = str(env.id)
    token = make_token(people.owner)
    dashboard = browsers()
    dashboard.login("alice", "password-alice")
    dashboard.open_live("/")

    # The socket drops and cannot come back for now; with polling disabled nothing else updates the page.
    dashboard.driver.execute_script(BLOCK_WEBSOCKETS + "window.lslEvents.socket.close();")
    dashboard.wait(lambda d: d.execute_script("return window.lslEvents.state") == "down", timeout=5, what="the stream down")
    assert dashboard.text("#dashboard-updated") == "reconnecting…"
    stopped = api(live_server_proc, token, "POST", f"/api/v1/environments/{env_id}/stop/")
    assert stopped.status_code == 200, stopped.text
    time.sleep(0.5)
    assert dashboard.text(f'tr[data-env="{env_id}"] .status') == "running"  # nobody told it yet
    dashboard.screenshot("dashboard_events_reconnecting_light")

    # Back: it resumes from the last id it handled (the stop is replayed) and refetches once over REST.
    before = dashboard.requests()
    dashboard.driver.execute_script(UNBLOCK_WEBSOCKETS)
    t0 = time.monotonic()
    took = dashboard.latency(DASHBOARD_SHOWS, env_id, "stopped", "", since=t0, budget=API_BUDGET, what="reconnect → dashboard")
    assert took <= API_BUDGET
    dashboard.wait(lambda d: d.execute_script("return window.lslEvents.state") == "live", timeout=5, what="live again")
    dashboard.wait(lambda d: d.execute_script("return window.lslEvents.refetches") == 1, timeout=5, what="one refetch")

    def refetched_both(_driver: Any) -> bool:
        # A request shows in the resource timing buffer once its response is complete: wait for both.
        refetched = dashboard.requests()[len(before):]
        return any("/api/v1/environments/" in url for url in refetched) and any("/api/v1/monitor/" in url for url in refetched)

    dashboard.wait(refetched_both, timeout=5, what="the refetch of environments and live sessions")
    assert dashboard.text("#dashboard-updated") == "live"
    assert dashboard.script_errors() == []


def test_the_slow_poll_is_only_a_fallback_while_the_stream_is_down(people: Any, make_env: Any,
                                                                    browsers: Callable[[], LiveBrowser],
                                                                    live_server_proc: Any) -> None:
    env = make_env(people.owner, name="fallback")
    assert env.status == "running", env.last_error
    env_id = str(env.id)
    token = make_token(people.owner)
    dashboard = browsers()
    dashboard.login("alice", "password-alice")
    # WebSockets refused from the start, and a fallback poll of 0.5 s instead of 30 s, so the test is quick.
    dashboard.before_scripts(BLOCK_WEBSOCKETS + "window.LSL_FALLBACK_POLL_MS = 500;")
    dashboard.get("/")
    dashboard.wait(lambda d: d.execute_script("return window.lslEvents && window.lslEvents.state") == "down", timeout=5,
                   what="the stream down")
    assert "refreshing every" in dashboard.text("#dashboard-updated")

    # The fallback poll alone notices the stop.
    stopped = api(live_server_proc, token, "POST", f"/api/v1/environments/{env_id}/stop/")
    assert stopped.status_code == 200, stopped.text
    dashboard.wait(lambda d: d.find_element(By.CSS_SELECTOR, f'tr[data-env="{env_id}"] .status').text == "stopped", timeout=5,
                   what="the fallback poll showing the stop")
    assert dashboard.driver.execute_script("return window.lslEvents.refetches") >= 1
    # … and an environment created meanwhile, which gets its row on top (newest first, like the server's list).
    created = api(live_server_proc, token, "POST", "/api/v1/environments/", json={"name": "newcomer", "template": "busybox"})
    assert created.status_code == 202, created.text
    dashboard.wait(lambda d: d.find_element(By.CSS_SELECTOR, "#environments tbody tr:first-child .env-link").text == "newcomer",
                   timeout=5, what="the new environment's row from the fallback poll")
    assert [row.get_attribute("data-env") for row in dashboard.driver.find_elements(By.CSS_SELECTOR, "#environments tr[data-env]")] \
        == [created.json()["id"], env_id]

    # Once the stream is up, the polling stops.
    dashboard.driver.execute_script(UNBLOCK_WEBSOCKETS)
    dashboard.wait(lambda d: d.execute_script("return window.lslEvents.state") == "live", timeout=5, what="live")
    time.sleep(0.3)  # the reconnect's one refetch
    before = dashboard.requests()
    time.sleep(2.0)  # four fallback periods
    assert dashboard.requests() == before, "the fallback poll kept running with the stream up"
    assert dashboard.script_errors() == []
