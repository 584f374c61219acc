"""The worker's listening-port scan against a real container (the Debian test image has python3).

A server started inside the environment shows in GET .../ports/ within a couple of scan intervals
(LSL_PORT_SCAN_INTERVAL, 5 s), with an `environment.ports` event; stopping it, or stopping the
environment, takes it away again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from django.conf import settings

from environments.models import Environment
from tests.conftest import api_client, docker_cli

pytestmark = pytest.mark.django_db(transaction=True, serialized_rollback=True)

WITHIN = 3 * settings.LSL_PORT_SCAN_INTERVAL + 10  # two scan intervals, and slack for a busy machine


def wait_until(check: Callable[[], Any], what: str, timeout: float = WITHIN) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f} s: {what}")
        time.sleep(0.25)


# The test image's python3-minimal has no http.server: a bare listening socket is what the scan looks for.
LISTEN = "import socket, sys, time; s = socket.socket(); s.bind((sys.argv[2], int(sys.argv[1]))); s.listen(); time.sleep(3600)"


def start_server(env: Environment, port: int, address: str = "0.0.0.0") -> None:
    """A process listening on PORT inside the environment, in the background; its pid in /tmp/srv-PORT."""
    script = f"python3 -c '{LISTEN}' {port} {address} >/dev/null 2>&1 & echo $! > /tmp/srv-{port}"
    result = docker_cli("exec", env.container_id, "sh", "-c", script)
    assert result.returncode == 0, result.stderr


def stop_server(env: Environment, port: int) -> None:
    result = docker_cli("exec", env.container_id, "sh", "-c", f"kill $(cat /tmp/srv-{port})")
    assert result.returncode == 0, result.stderr


def listed(client: Any, env: Environment) -> dict[int, dict[str, Any]]:
    answer = client.get(f"/api/v1/environments/{env.pk}/ports/")
    assert answer.status_code == 200, answer.content
    return {p["port"]: p for p in answer.json()["listening"]}


def port_events(env: Environment) -> list[dict[str, Any]]:
    from lsl_site.models import Event

    return list(Event.objects.filter(kind="environment.ports", environment_id=env.pk).order_by("id")
                .values_list("payload", flat=True))


def test_a_server_started_in_the_environment_is_found_and_lost(people: Any, make_env: Any) -> None:
    env = make_env(people.owner, name="served", template="debian")
    assert env.status == "running", env.last_error
    client = api_client(people.owner)
    # The first scan of the fresh environment: checked, nothing of ours listening yet.
    wait_until(lambda: Environment.objects.get(pk=env.pk).ports_checked_at, "a first scan")
    assert 8123 not in listed(client, env)

    start_server(env, 8123)
    start_server(env, 8124, "127.0.0.1")
    ports = wait_until(lambda: (found := listed(client, env)) and {8123, 8124} <= set(found) and found,
                       "8123 and 8124 listed")
    assert ports[8123]["loopback_only"] is False and ports[8124]["loopback_only"] is True
    assert ports[8123]["preview_url"].endswith(f"/preview/{env.pk}/8123/")
    assert any({8123, 8124} <= {p["port"] for p in event.get("listening_ports", [])} for event in port_events(env))
    # A viewer sees it too, without a preview URL; an outsider sees nothing.
    from environments.models import Role
    from environments.services import grant_access

    grant_access(env, role=Role.VIEWER, user=people.viewer)
    assert listed(api_client(people.viewer), env)[8123]["preview_url"] is None
    assert api_client(people.outsider).get(f"/api/v1/environments/{env.pk}/ports/").status_code == 404

    stop_server(env, 8123)
    wait_until(lambda: 8123 not in listed(client, env), "8123 gone after its server stopped")
    assert 8124 in listed(client, env)
    assert {p["port"] for p in port_events(env)[-1]["listening_ports"]} >= {8124}

    # Stopping the environment clears the list (and says so), whatever stopped it.
    from environments import services

    events_before = len(port_events(env))
    services.stop_environment(Environment.objects.get(pk=env.pk))
    wait_until(lambda: listed(client, env) == {}, "the list cleared after a stop")
    assert len(port_events(env)) > events_before and port_events(env)[-1]["listening_ports"] == []
    assert client.get(f"/api/v1/environments/{env.pk}/ports/").json()["checked_at"] is None


def test_a_scan_skips_an_environment_it_cannot_reach(people: Any, make_env: Any) -> None:
    """One environment whose keeper cannot be reached (its container is gone) does not stop the others."""
    from environments.worker import scan_listening_ports

    env = make_env(people.owner, name="reachable", template="debian")
    assert env.status == "running", env.last_error
    broken = Environment.objects.create(name="unreachable", owner=people.owner, template=env.template, image=env.image,
                                        status="running", container_id="0" * 64, cpus=0.5, memory_mb=64, pids=64)
    start_server(env, 8125)
    result = wait_until(lambda: (r := scan_listening_ports()) and 8125 in {
        p["port"] for p in Environment.objects.get(pk=env.pk).listening_ports} and r, "8125 found by a scan")
    assert result["environments"] >= 2 and result["scanned"] < result["environments"]
    broken.refresh_from_db()
    assert broken.listening_ports == [] and broken.ports_checked_at is None
    Environment.objects.filter(pk=broken.pk).delete()
