"""The worker owns background work: provisioning that survives kill -9, engine events, reads that only read.

Real processes throughout: the session's `lsl_worker` is killed with SIGKILL and restarted, containers
are killed with `docker kill`, and reads run with the engine client made unusable.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
from django.utils import timezone

from environments import runtime, services
from environments.models import Environment, SetupStatus, Template
from tests.conftest import api_client, docker_cli, wait_for_status

pytestmark = [pytest.mark.django_db(transaction=True, serialized_rollback=True), pytest.mark.usefixtures("engine", "catalog")]


def setup_template(slug: str, *commands: str) -> Template:
    busybox = Template.objects.get(slug="busybox")
    return Template.objects.create(slug=slug, image=busybox.image, shell=busybox.shell, cpus=0.5, memory_mb=128, pids=64,
                                   network_modes=["bridge"], setup=list(commands), managed_by_catalog=False)


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def containers_of(env: Environment) -> list[str]:
    out = docker_cli("ps", "-aq", "--no-trunc", "--filter", f"label=lsl.environment={env.id}")
    return out.stdout.split()


def test_worker_killed_mid_setup_never_leaves_the_row_creating(people: Any, worker_proc: Any) -> None:
    template = setup_template("slow-setup", "echo keep-me > /workspace/before-crash.txt; sleep 60")
    env = services.create_environment(people.owner, services.CreateRequest(name="crashy", template=template))
    wait_for(lambda: Environment.objects.get(pk=env.pk).setup_status == SetupStatus.RUNNING, 30, "setup to start")
    row = Environment.objects.get(pk=env.pk)
    wait_for(lambda: docker_cli("exec", row.container_id, "cat", "/workspace/before-crash.txt").stdout == "keep-me\n",
             10, "the setup hook's first write")
    worker_proc.kill()
    killed_at = time.monotonic()
    time.sleep(1)
    assert Environment.objects.get(pk=env.pk).status == "creating", "nothing else provisions while the worker is dead"

    worker_proc.restart()
    final = wait_for_status(env.pk, {"running", "error"}, timeout=60)
    took = time.monotonic() - killed_at
    assert final.status == "error", final.status
    assert "setup was interrupted" in final.last_error
    assert final.setup_status == SetupStatus.FAILED and took < 60
    assert not runtime.local().container_state(final.container_id).running, "the half-run hook was stopped with its container"

    # `start` recovers it as it is, workspace intact.
    response = api_client(people.owner).post(f"/api/v1/environments/{env.pk}/start/")
    assert response.status_code == 200, response.content
    assert response.json()["status"] == "running"
    assert docker_cli("exec", final.container_id, "cat", "/workspace/before-crash.txt").stdout == "keep-me\n"
    assert containers_of(final) == [final.container_id]


def test_task_queued_while_no_worker_runs_is_done_when_one_starts(people: Any, worker_proc: Any) -> None:
    worker_proc.kill()
    try:
        response = api_client(people.owner).post("/api/v1/environments/", {"name": "queued", "template": "busybox"},
                                                 format="json")
        assert response.status_code == 202
        time.sleep(1)
        assert Environment.objects.get(pk=response.json()["id"]).status == "creating"
    finally:
        worker_proc.restart()
    env = wait_for_status(response.json()["id"], "running", timeout=30)
    assert containers_of(env) == [env.container_id]


def test_setup_deadline_is_enforced_by_the_worker(people: Any) -> None:
    template = setup_template("hanging-setup", "sleep 600")
    env = services.create_environment(people.owner, services.CreateRequest(name="hangs", template=template))
    wait_for(lambda: Environment.objects.get(pk=env.pk).setup_status == SetupStatus.RUNNING, 30, "setup to start")
    # As if LSL_SETUP_TIMEOUT had passed: the deadline lives on the row, so any live worker enforces it.
    Environment.objects.filter(pk=env.pk).update(setup_deadline_at=timezone.now())
    final = wait_for_status(env.pk, {"error", "running"}, timeout=15)
    assert final.status == "error"
    assert "did not finish within" in final.last_error and "LSL_SETUP_TIMEOUT" in final.last_error
    # The reason is recorded first, then the container is stopped (which ends the hook).
    wait_for(lambda: not runtime.local().container_state(final.container_id).running, 10, "the container to stop")


@pytest.mark.parametrize(("command", "reason"), [("kill", "killed"), ("stop", "stopped")])
def test_container_stopped_behind_lsls_back_shows_with_its_reason_within_2s(people: Any, make_env: Any,
                                                                          command: str, reason: str) -> None:
    env = make_env(people.owner)
    args = [command, env.container_id] if command == "kill" else [command, "-t", "1", env.container_id]
    assert docker_cli(*args).returncode == 0
    done_at = time.monotonic()
    final = wait_for_status(env.pk, "stopped", timeout=2)
    assert final.stop_reason == reason, final.stop_reason
    assert time.monotonic() - done_at <= 2.0


def test_start_replaces_a_stale_container_left_by_a_dead_worker(people: Any, make_env: Any) -> None:
    env = make_env(people.owner)
    stale = env.container_id
    # As if the worker had created the container and died before recording it.
    Environment.objects.filter(pk=env.pk).update(status="error", container_id="", last_error="worker died")
    assert docker_cli("stop", "-t", "0", stale).returncode == 0
    response = api_client(people.owner).post(f"/api/v1/environments/{env.pk}/start/")
    assert response.status_code == 200, response.content
    fresh = Environment.objects.get(pk=env.pk)
    assert fresh.status == "running" and fresh.container_id != stale
    assert containers_of(fresh) == [fresh.container_id], "the stale container was removed, not left beside"
    assert docker_cli("exec", fresh.container_id, "true").returncode == 0


def test_reads_never_call_the_engine(people: Any, make_env: Any, monkeypatch: Any) -> None:
    """List, detail, monitor, /metrics and the pages answer from the database alone."""
    from django.test import Client

    env = make_env(people.owner)
    calls: list[str] = []

    def no_engine() -> Any:
        calls.append("engine")
        raise AssertionError("a read asked the engine")

    monkeypatch.setattr(runtime.Engine, "client", property(lambda self: no_engine()))
    client = api_client(people.owner)
    for url in ("/api/v1/environments/", f"/api/v1/environments/{env.pk}/", "/api/v1/monitor/",
                f"/api/v1/monitor/?environment={env.pk}", f"/api/v1/environments/{env.pk}/sessions/"):
        assert client.get(url).status_code == 200, url
    browser = Client()
    browser.force_login(people.owner)
    for url in ("/", f"/environments/{env.pk}/"):
        assert browser.get(url).status_code == 200, url
    staff = Client()
    staff.force_login(people.staff)  # /metrics trusts no address: a staff session (or the bearer token)
    assert staff.get("/metrics").status_code == 200
    assert calls == []


def test_engine_stopped_reads_still_answer(people: Any, make_env: Any, tmp_path: Any, settings: Any) -> None:
    env = make_env(people.owner)
    settings.LSL_DOCKER_HOST = f"unix://{tmp_path}/no-engine.sock"
    client = api_client(people.owner)
    listed = client.get("/api/v1/environments/")
    assert listed.status_code == 200 and listed.json()["results"][0]["status"] == "running"
    assert client.get(f"/api/v1/environments/{env.pk}/").status_code == 200
    assert client.post(f"/api/v1/environments/{env.pk}/stop/").status_code == 503


def test_a_team_keeps_its_last_owner_everywhere(people: Any) -> None:
    """The rule lives in the domain, so the API says it too (not only the web page)."""
    client = api_client(people.owner)
    response = client.delete(f"/api/v1/teams/{people.team.slug}/members/{people.owner.username}/")
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "last_owner"
    response = client.post(f"/api/v1/teams/{people.team.slug}/members/", {"user": people.owner.username, "role": "member"},
                           format="json")
    assert response.status_code == 409
    assert people.team.memberships.get(user=people.owner).role == "owner"


def test_event_rows_commit_with_their_change(people: Any) -> None:
    """An event exists exactly when its change does: a rolled-back write leaves no event."""
    from django.db import transaction

    from lsl_site.models import Event

    before = Event.objects.count()
    template = Template.objects.get(slug="busybox")
    with pytest.raises(RuntimeError):
        with transaction.atomic():
            services.create_environment(people.owner, services.CreateRequest(name=f"gone-{uuid.uuid4().hex[:4]}",
                                                                             template=template))
            raise RuntimeError("roll back")
    assert Event.objects.count() == before
    assert not Environment.objects.filter(name__startswith="gone-").exists()
