"""The monitor pages in a real browser: charts drawn by uPlot from live polls of /api/v1/monitor/.

Reuses tests/test_browser.py's Browser and fixtures. Screenshots: monitor.png
(staff page) and environment-monitor.png in <LSL_VAR_DIR>/screenshots/.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from environments.models import Role
from environments.services import grant_access
from tests.test_browser import Browser, browsers, cleanup_containers  # noqa: F401 - fixtures used by name

pytestmark = [pytest.mark.django_db(transaction=True, serialized_rollback=True), pytest.mark.usefixtures("engine", "catalog")]


def samples(browser: Browser) -> int:
    return browser.driver.execute_script("return window.lslMonitor ? window.lslMonitor.samples : 0")


def chart_drawn(browser: Browser, chart_id: str) -> bool:
    """uPlot mounted a canvas with a real size, and its data has at least two points (a line)."""
    return browser.driver.execute_script("""
        const canvas = document.querySelector(`#${arguments[0]} .uplot canvas`);
        return Boolean(canvas && canvas.width > 100 && canvas.height > 50);
    """, chart_id) and samples(browser) >= 2


def test_monitor_pages_draw_live_charts(people: Any, make_env: Any, browsers: Callable[[], Browser]) -> None:
    env = make_env(people.owner, name="watched")
    assert env.status == "running", env.last_error
    grant_access(env, role=Role.VIEWER, user=people.viewer)

    # Alice works in a terminal and keeps a CPU busy, so the charts and the session list have something to show.
    alice = browsers()
    alice.login("alice", "password-alice")
    alice.open_terminal(env.id)
    alice.wait(lambda d: d.find_element(By.ID, "role-badge").text == "admin", what="alice's terminal")
    alice.css("#terminal .xterm-helper-textarea").send_keys("timeout 60 yes > /dev/null &", Keys.ENTER)

    steve = browsers()
    steve.login("steve", "password-steve")
    assert steve.css("#nav-monitor").text == "Monitor"
    steve.css("#nav-monitor").click()
    steve.wait(lambda d: d.current_url.endswith("/monitor/"), what="the monitor page")
    row = f'#monitor-envs tr[data-env="{env.id}"]'
    steve.wait(lambda d: "%" in d.find_element(By.CSS_SELECTOR, f"{row} .cpu").text, what="the environment's CPU figure")
    assert "alice" in steve.text(f"{row} .sessions-cell")
    assert "iB" in steve.text(f"{row} .memory") and "↓" in steve.text(f"{row} .network")
    assert steve.text(f"{row} .pids").isdigit()
    assert "%" in steve.text("#host-cpu .value") and "iB" in steve.text("#host-disk .value")
    steve.wait(lambda d: all(chart_drawn(steve, c) for c in ("chart-host-cpu", "chart-host-memory", "chart-env-cpu", "chart-env-memory")),
               what="the host and environment charts")
    steve.wait(lambda d: samples(steve) >= 4, what="a few polls on the charts")
    assert "alice/watched" in steve.text("#chart-env-cpu .u-legend")
    steve.driver.set_window_size(1280, 1500)
    steve.screenshot("monitor")

    # The environment's own monitor page, reached from the staff table.
    steve.css(f"{row} a.env-link").click()
    steve.wait(lambda d: d.current_url.endswith(f"/environments/{env.id}/monitor/"), what="the environment monitor page")
    steve.wait(lambda d: "iB" in d.find_element(By.CSS_SELECTOR, "#env-memory .value").text, what="memory figure")
    steve.wait(lambda d: all(chart_drawn(steve, c) for c in ("chart-cpu", "chart-memory", "chart-network", "chart-pids")),
               what="the environment charts")
    steve.wait(lambda d: samples(steve) >= 4, what="a few polls on the charts")
    assert "alice · admin · web" in steve.text("#monitor-sessions")
    assert steve.text("#env-status") == "running"
    steve.screenshot("environment-monitor")

    # A viewer gets the environment's monitor page, not the staff one.
    victor = browsers()
    victor.login("victor", "password-victor")
    assert not victor.driver.find_elements(By.ID, "nav-monitor")
    victor.get(f"/environments/{env.id}/")
    victor.css("#env-monitor-link").click()
    victor.wait(lambda d: chart_drawn(victor, "chart-cpu"), what="victor's environment chart")
    assert not victor.driver.find_elements(By.ID, "host-cpu")


def test_dashboard_updates_without_reload(people: Any, make_env: Any, browsers: Callable[[], Browser]) -> None:
    from environments import services

    env = make_env(people.owner, name="lively")
    assert env.status == "running", env.last_error
    grant_access(env, role=Role.VIEWER, user=people.viewer)
    victor = browsers()
    victor.login("victor", "password-victor")
    row = f'#environments tr[data-env="{env.id}"]'
    assert victor.text(f"{row} .status") == "running"
    victor.driver.execute_script("window.lslNotReloaded = true;")

    # Alice opens a terminal: victor's dashboard lists the session and her in it.
    alice = browsers()
    alice.login("alice", "password-alice")
    alice.open_terminal(env.id)
    alice.wait(lambda d: d.find_element(By.ID, "role-badge").text == "admin", what="alice's terminal")
    victor.wait(lambda d: "alice" in d.find_element(By.CSS_SELECTOR, f"{row} .sessions-cell").text, timeout=15,
                what="alice's session on victor's dashboard")

    # Stopped elsewhere: the status changes in place.
    services.stop_environment(env)
    victor.wait(lambda d: d.find_element(By.CSS_SELECTOR, f"{row} .status").text == "stopped", timeout=15,
                what="the stopped status on victor's dashboard")
    assert victor.driver.execute_script("return window.lslNotReloaded === true")
