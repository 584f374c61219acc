"""Quotas at create and start, and stopping idle environments (against the real engine)."""

from __future__ import annotations

import threading
import time
from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command
from django.test.utils import override_settings

from accounts.models import Profile
from environments import runtime, services
from environments.models import Environment, TeamQuota
from tests.conftest import api_client, wait_for_status

pytestmark = [pytest.mark.django_db(transaction=True, serialized_rollback=True), pytest.mark.usefixtures("engine", "catalog")]


def create(client: Any, name: str, **payload: Any) -> Any:
    return client.post("/api/v1/environments/", {"name": name, "template": "busybox", **payload}, format="json")


def refused(response: Any, limit: str) -> str:
    assert response.status_code == 403, response.content
    [message] = response.json()["error"]["fields"]["quota"]
    assert f"quota exceeded: {limit}:" in message, message
    return message


def containers_of(user: Any) -> int:
    listed = runtime.list_managed_containers()
    return sum(1 for env_id in listed if Environment.objects.filter(pk=env_id, owner=user).exists())


def test_user_quotas_refuse_creation_naming_the_limit(people: Any, make_env: Any) -> None:
    client = api_client(people.owner)
    with override_settings(LSL_QUOTA_USER_ENVIRONMENTS=2, LSL_QUOTA_USER_CPUS=0.8):
        first = wait_for_status(create(client, "one").json()["id"], "running")  # 0.5 CPU
        message = refused(create(client, "two"), "cpus")  # 0.5 + 0.5 > 0.8
        assert "'alice' may run at most 0.8 CPUs at once; 0.5 in use, this needs 0.5" in message
        wait_for_status(create(client, "two", cpus=0.3).json()["id"], "running")
        message = refused(create(client, "three", cpus=0.1), "environments")
        assert "user 'alice' may have at most 2 environments and has 2" in message
    assert set(Environment.objects.filter(owner=people.owner).values_list("name", flat=True)) == {"one", "two"}
    assert containers_of(people.owner) == 2

    # A per-user override in the profile beats the server default (here: memory).
    profile = Profile.for_user(people.teammate)
    profile.quota_memory_mb = 300
    profile.save()
    bob = api_client(people.teammate)
    wait_for_status(create(bob, "b1", memory_mb=256).json()["id"], "running")
    assert "300 MiB" in refused(create(bob, "b2", memory_mb=64), "memory_mb")
    assert not Environment.objects.filter(name="b2").exists()
    del first


def test_quota_is_enforced_at_start(people: Any, make_env: Any) -> None:
    client = api_client(people.owner)
    with override_settings(LSL_QUOTA_USER_CPUS=0.5):
        first = make_env(people.owner, name="first")
        services.stop_environment(first)
        second = make_env(people.owner, name="second")  # the stopped one uses no CPU
        assert second.status == "running"
        message = refused(client.post(f"/api/v1/environments/{first.id}/start/"), "cpus")
        assert "0.5 in use" in message
        assert Environment.objects.get(pk=first.pk).status == "stopped"
        assert runtime.container_state(first.container_id).running is False
        services.stop_environment(second)
        assert client.post(f"/api/v1/environments/{first.id}/start/").json()["status"] == "running"


def test_team_quota(people: Any, make_env: Any) -> None:
    TeamQuota.objects.create(team=people.team, environments=1)
    assert make_env(people.owner, name="team-env", team=people.team).status == "running"
    message = refused(create(api_client(people.teammate), "mine-too", team="platform"), "environments")
    assert message.startswith("team quota exceeded: environments: team 'platform' may have at most 1 environments")
    # The same user outside the team is not limited by it.
    assert create(api_client(people.teammate), "personal").status_code == 202
    quotas = api_client(people.teammate).get("/api/v1/quotas/").json()
    assert quotas["teams"] == [{"team": "platform", "limits": {"environments": 1, "cpus": 0.0, "memory_mb": 0},
                                "usage": {"environments": 1, "cpus": 0.5, "memory_mb": 256}}]


def test_idle_environments_are_stopped_not_deleted(people: Any, make_env: Any) -> None:
    from sessions.services import join, leave, open_session

    busy = make_env(people.owner, name="busy")
    watched = make_env(people.owner, name="watched")
    idle = make_env(people.owner, name="idle")
    assert services.stop_idle_environments(idle_after=1) == []  # just started: not idle yet

    # "busy" runs a command; someone is attached to a terminal session of "watched".
    chunks, _ = runtime.exec_stream(busy.container_id, ["sleep", "3"])
    drain = threading.Thread(target=lambda: list(chunks))
    drain.start()
    session = open_session(watched, people.owner)
    participation = join(session.pk, people.owner, "admin", "cli", "127.0.0.1")
    time.sleep(1.5)

    stopped = services.stop_idle_environments(idle_after=1)
    assert [env.name for env in stopped] == ["idle"]
    idle.refresh_from_db()
    assert (idle.status, idle.stop_reason) == ("stopped", "idle")
    assert runtime.container_state(idle.container_id) is not None, "stopped, never deleted"
    assert runtime.volume_exists(idle.workspace_volume)

    # Idle time counts from when activity was last seen: "busy" was last seen running its command by the
    # check above (the engine does not say when an exec ended); "watched" from its participant leaving.
    drain.join()
    leave(participation.pk)
    assert [env.name for env in services.stop_idle_environments(idle_after=1)] == ["busy"]
    time.sleep(1.2)
    out = StringIO()
    call_command("lsl_idle_stop", "--after", "1", stdout=out)
    assert out.getvalue().splitlines() == ["alice/watched: stopped (idle)", "idle stop: 1 stopped"]
    assert set(Environment.objects.values_list("status", "stop_reason")) == {("stopped", "idle")}


def test_the_worker_stops_idle_environments_by_itself(people: Any, make_env: Any) -> None:
    from tests.conftest import start_worker, stop_worker

    # A second worker with idle stop on (the session's has it off): periodic jobs are claimed per run,
    # so exactly one worker runs each.
    worker = start_worker({"LSL_IDLE_STOP_AFTER": "2", "LSL_IDLE_CHECK_INTERVAL": "0.5"}, name="worker-idle")
    try:
        env = make_env(people.owner, name="sleepy")
        deadline = time.monotonic() + 20
        while Environment.objects.get(pk=env.pk).status != "stopped":
            assert time.monotonic() < deadline, worker.log_tail()
            time.sleep(0.3)
        env.refresh_from_db()
        assert env.stop_reason == "idle"
        assert "stopping alice/sleepy: idle for more than 2s" in worker.log_tail(20000)
    finally:
        stop_worker(worker)
