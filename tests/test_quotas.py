"""Quotas at create and start (environments, CPUs, memory, disk; teams and team volumes a user creates),
and stopping idle environments (against the real engine)."""

from __future__ import annotations

import threading
import time
from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command
from django.test.utils import override_settings

from accounts.models import Profile, Team
from environments import runtime, services
from environments.models import Environment, TeamQuota, TeamVolume
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
    listed = runtime.local().list_managed_containers()
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
        assert runtime.local().container_state(first.container_id).running is False
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
    assert quotas["teams"] == [{"team": "platform", "limits": {"environments": 1, "cpus": 0.0, "memory_mb": 0, "disk_mb": 0},
                                "usage": {"environments": 1, "cpus": 0.5, "memory_mb": 256, "disk_mb": 10240}}]


@pytest.mark.django_db
def test_moving_an_environment_into_a_full_team_is_refused(people: Any) -> None:
    """Moving is creating as far as the team is concerned: a way round its quota otherwise."""
    from environments.models import Template

    TeamQuota.objects.create(team=people.team, environments=1)
    busybox = Template.objects.get(slug="busybox")
    size = {"template": busybox, "image": busybox.image, "cpus": 0.5, "memory_mb": 256, "pids": 128, "status": "stopped"}
    Environment.objects.create(owner=people.teammate, team=people.team, name="theirs", **size)
    mine = Environment.objects.create(owner=people.owner, name="mine", **size)
    response = api_client(people.owner).patch(f"/api/v1/environments/{mine.id}/", {"team": "platform"}, format="json")
    message = refused(response, "environments")
    assert message.startswith("team quota exceeded: environments: team 'platform' may have at most 1"), message
    mine.refresh_from_db()
    assert mine.team is None


def test_a_user_creating_teams_in_a_loop_is_stopped_at_the_limit(people: Any) -> None:
    from django.contrib.auth.models import Group

    client = api_client(people.outsider)
    with override_settings(LSL_QUOTA_USER_TEAMS=3):
        answers = [client.post("/api/v1/teams/", {"name": f"Spam {i}"}, format="json") for i in range(6)]
        assert [a.status_code for a in answers] == [201, 201, 201, 403, 403, 403]
        message = refused(answers[3], "teams")
        assert message.startswith("user quota exceeded: teams: user 'mallory' may create at most 3 teams and has 3")
        # Nothing half-written: no team, group or membership for the refused ones.
        assert Team.objects.filter(created_by=people.outsider).count() == 3
        assert not Group.objects.filter(name__in=["team:spam-3", "team:spam-4", "team:spam-5"]).exists()
        assert people.outsider.memberships.count() == 3
        # Handing a team on does not free a slot (the creator counts it).
        spam0 = Team.objects.get(slug="spam-0")
        from accounts.services import add_member, remove_member

        add_member(spam0, people.viewer, "owner")
        remove_member(spam0, people.outsider)
        refused(client.post("/api/v1/teams/", {"name": "Spam 6"}, format="json"), "teams")
        # The web page says so too, and creates nothing.
        from django.test import Client

        browser = Client()
        browser.force_login(people.outsider)
        page = browser.post("/teams/new/", {"name": "Spam 7", "slug": ""})
        assert page.status_code == 400 and b"may create at most 3 teams" in page.content
        assert not Team.objects.filter(slug="spam-7").exists()
        # Staff are not limited; a profile override beats the server default (0 = unlimited).
        staff = api_client(people.staff)
        assert [staff.post("/api/v1/teams/", {"name": f"Ops {i}"}, format="json").status_code for i in range(4)] == [201] * 4
        profile = Profile.for_user(people.outsider)
        profile.quota_teams = 0
        profile.save()
        assert client.post("/api/v1/teams/", {"name": "Spam 8"}, format="json").status_code == 201
    usage = client.get("/api/v1/quotas/").json()["user"]
    assert (usage["limits"]["teams"], usage["usage"]["teams"]) == (0, 4)  # spam-0..2 and spam-8


def test_a_user_creating_team_volumes_in_a_loop_is_stopped_at_the_limit(people: Any) -> None:
    bob = api_client(people.teammate)
    labelled = lambda: [v for v in runtime_volumes() if v.startswith("lsl-team-platform-")]  # noqa: E731
    before = labelled()
    with override_settings(LSL_QUOTA_USER_TEAM_VOLUMES=2):
        answers = [bob.post("/api/v1/volumes/", {"team": "platform", "name": f"v{i}"}, format="json") for i in range(4)]
        assert [a.status_code for a in answers] == [201, 201, 403, 403]
        assert refused(answers[2], "team_volumes").startswith(
            "user quota exceeded: team_volumes: user 'bob' may create at most 2 team volumes and has 2")
        # Nothing half-written: no row and no engine volume for the refused ones.
        assert sorted(TeamVolume.objects.values_list("name", flat=True)) == ["v0", "v1"]
        assert len(labelled()) == len(before) + 2
        # The limit is per user: another member of the team still may.
        assert api_client(people.owner).post("/api/v1/volumes/", {"team": "platform", "name": "alices"},
                                             format="json").status_code == 201
        # Deleting one frees a slot.
        assert bob.delete(f"/api/v1/volumes/{answers[0].json()['id']}/").status_code == 204
        assert bob.post("/api/v1/volumes/", {"team": "platform", "name": "v9"}, format="json").status_code == 201
    quotas = bob.get("/api/v1/quotas/").json()["user"]
    assert (quotas["limits"]["team_volumes"], quotas["usage"]["team_volumes"]) == (20, 2)


def runtime_volumes() -> list[str]:
    from tests.conftest import docker_cli

    return docker_cli("volume", "ls", "-q", "--filter", "label=lsl.team=platform").stdout.split()


def test_the_disk_quota_refuses_creation_with_a_clear_message(people: Any, make_env: Any) -> None:
    client = api_client(people.owner)
    with override_settings(LSL_QUOTA_USER_DISK_MB=100):
        first = make_env(people.owner, name="d1", disk_mb=60)
        assert (first.status, first.disk_mb) == ("running", 60)
        services.stop_environment(first)  # a stopped environment keeps its disk: it still counts
        message = refused(create(client, "d2", disk_mb=60), "disk_mb")
        assert message == ("user quota exceeded: disk_mb: user 'alice' may have at most 100 MiB of disk across its "
                           "environments; 60 MiB allotted, this needs 60 MiB (delete an environment or a kept workspace, or ask for less disk)")
        # Without disk_mb it would take the template's (the server default, 10 GiB): refused as well.
        refused(create(client, "d3"), "disk_mb")
        assert create(client, "d4", disk_mb=40).status_code == 202
        assert set(Environment.objects.filter(owner=people.owner).values_list("name", flat=True)) == {"d1", "d4"}
    # A team's disk quota counts the team's environments.
    TeamQuota.objects.create(team=people.team, disk_mb=50)
    assert "team 'platform' may have at most 50 MiB of disk" in refused(create(api_client(people.teammate), "t1",
                                                                               team="platform", disk_mb=60), "disk_mb")


def test_idle_environments_are_stopped_not_deleted(people: Any, make_env: Any) -> None:
    from sessions.services import join, leave, open_session

    busy = make_env(people.owner, name="busy")
    watched = make_env(people.owner, name="watched")
    idle = make_env(people.owner, name="idle")
    # Just started: not idle yet. (Started "now" here: on a loaded machine the three creations alone can take
    # longer than the one second of idleness this test uses.)
    from django.utils import timezone

    Environment.objects.filter(owner=people.owner).update(started_at=timezone.now())
    assert services.stop_idle_environments(idle_after=1) == []

    # "busy" runs a command; someone is attached to a terminal session of "watched".
    chunks, _ = runtime.local().exec_stream(busy.container_id, ["sleep", "3"])
    drain = threading.Thread(target=lambda: list(chunks))
    drain.start()
    session = open_session(watched, people.owner)
    participation = join(session.pk, people.owner, "admin", "cli", "127.0.0.1")
    time.sleep(1.5)

    stopped = services.stop_idle_environments(idle_after=1)
    assert [env.name for env in stopped] == ["idle"]
    idle.refresh_from_db()
    assert (idle.status, idle.stop_reason) == ("stopped", "idle")
    assert runtime.local().container_state(idle.container_id) is not None, "stopped, never deleted"
    assert runtime.local().volume_exists(idle.workspace_volume)

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
