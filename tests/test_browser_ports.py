"""The environment page's Ports panel in real Chromium: declared and listening ports with their preview
links, live updates from `environment.ports` events alone, and (for admins) making a public link, whose
URL is shown once, and revoking it.

The page reads the database only, so the environment here is a row (no container): what the worker
would have found is written with ports.do_update_listening_ports, as the worker does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from selenium.webdriver.common.by import By

from environments.models import Environment, PreviewLink, Role, Template
from environments.ports import ListeningPort, do_update_listening_ports
from environments.services import grant_access
from tests.browser import Browser, browsers, cleanup_containers  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.django_db(transaction=True, serialized_rollback=True), pytest.mark.usefixtures("engine", "catalog")]


def port_row(browser: Browser, port: int) -> Any:
    rows = browser.driver.find_elements(By.CSS_SELECTOR, f'#ports tbody tr[data-port="{port}"]')
    return rows[0] if rows else None


def script_errors(browser: Browser) -> list[str]:
    return [entry["message"] for entry in browser.driver.get_log("browser") if entry["level"] == "SEVERE"]


def test_the_ports_panel(people: Any, browsers: Callable[[], Browser], live_server_proc: Any) -> None:
    template = Template.objects.get(slug="busybox")
    template.ports = [{"port": 3000, "name": "web"}]
    template.save()
    env = Environment.objects.create(name="paneled", owner=people.owner, template=template, image=template.image,
                                     status="running", container_id="c" * 64, cpus=0.5, memory_mb=64, pids=64)
    grant_access(env, role=Role.MEMBER, user=people.member)
    grant_access(env, role=Role.VIEWER, user=people.viewer)

    alice = browsers()
    alice.login("alice", "password-alice")
    alice.get(f"/environments/{env.pk}/")
    alice.wait(lambda d: port_row(alice, 3000), what="the declared port listed")
    assert "declared, not listening" in port_row(alice, 3000).text and "web" in port_row(alice, 3000).text
    assert not port_row(alice, 3000).find_elements(By.CSS_SELECTOR, "a.open-preview")

    # The worker finds a server: the open page shows it from the event alone (no request to the API).
    fetches = """return performance.getEntriesByType("resource").filter((e) => e.initiatorType === "fetch"
        || e.initiatorType === "xmlhttprequest").map((e) => e.name).filter((n) => n.includes("/ports/"));"""
    before = alice.driver.execute_script(fetches)
    do_update_listening_ports(env, [ListeningPort(3000, False), ListeningPort(8123, True)])
    alice.wait(lambda d: port_row(alice, 8123) and "listening" in port_row(alice, 3000).text
               and port_row(alice, 3000).find_elements(By.CSS_SELECTOR, "a.open-preview"), what="the listening ports")
    assert alice.driver.execute_script(fetches) == before, "the ports panel asked the API again instead of using the event"
    preview = port_row(alice, 3000).find_element(By.CSS_SELECTOR, "a.open-preview")
    assert preview.get_attribute("href") == f"{live_server_proc.url}/preview/{env.pk}/3000/"
    assert "localhost only" in port_row(alice, 8123).text

    # An admin shares port 3000 publicly for an hour: the URL is shown once.
    row = port_row(alice, 3000)
    row.find_element(By.CSS_SELECTOR, "select option[value='3600']").click()
    row.find_element(By.CSS_SELECTOR, "button.share-port").click()
    alice.wait(lambda d: d.find_elements(By.ID, "created-link-url"), what="the new link's URL")
    url = alice.css("#created-link-url").get_attribute("value")
    link = PreviewLink.objects.get()
    assert url.startswith(f"{live_server_proc.url}/preview/link/") and link.port == 3000
    assert round((link.expires_at - link.created_at).total_seconds()) == 3600
    assert alice.css("#copy-link").is_displayed()
    alice.wait(lambda d: d.find_elements(By.CSS_SELECTOR, f'#preview-links tr[data-link="{link.pk}"].link-active'),
               what="the link listed as active")
    alice.css(f'#preview-links tr[data-link="{link.pk}"] button.revoke-link').click()
    alice.wait(lambda d: d.find_elements(By.CSS_SELECTOR, f'#preview-links tr[data-link="{link.pk}"].link-revoked'),
               what="the link listed as revoked")
    link.refresh_from_db()
    assert link.revoked_at is not None and link.revoked_by == people.owner

    # A member may open previews but not share; a viewer sees the ports only.
    meg = browsers()
    meg.login("meg", "password-meg")
    meg.get(f"/environments/{env.pk}/")
    meg.wait(lambda d: port_row(meg, 3000) and port_row(meg, 3000).find_elements(By.CSS_SELECTOR, "a.open-preview"),
             what="a member's preview link")
    assert not meg.driver.find_elements(By.CSS_SELECTOR, "button.share-port, #preview-links")
    victor = browsers()
    victor.login("victor", "password-victor")
    victor.get(f"/environments/{env.pk}/")
    victor.wait(lambda d: port_row(victor, 3000), what="a viewer's port list")
    assert not victor.driver.find_elements(By.CSS_SELECTOR, "a.open-preview, button.share-port")
    assert "members only" in port_row(victor, 3000).text

    # Nothing listens any more: the preview link goes, the declared port stays.
    do_update_listening_ports(env, [])
    alice.wait(lambda d: port_row(alice, 8123) is None and "declared, not listening" in port_row(alice, 3000).text,
               what="the ports gone")
    alice.screenshot("ports_panel")
    for browser in (alice, meg, victor):
        assert not script_errors(browser), script_errors(browser)
        assert not browser.csp_violations()
