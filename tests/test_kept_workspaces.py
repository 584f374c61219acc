"""Kept workspaces (issue 13): a delete without purge keeps the data, and LSL lists it, counts it,
attaches it to a new environment, or purges it — against the real engine."""

from __future__ import annotations

from typing import Any

import pytest

from environments import runtime, services
from environments.models import Environment, KeptWorkspace
from tests.conftest import api_client
from tests.test_host_integration import run

pytestmark = [pytest.mark.django_db(transaction=True, serialized_rollback=True), pytest.mark.usefixtures("engine", "catalog")]


def kept_names(user: Any) -> list[str]:
    response = api_client(user).get("/api/v1/workspaces/")
    assert response.status_code == 200, response.content
    return [w["environment_name"] for w in response.json()["results"]]


def test_a_kept_workspace_is_listed_attached_and_purged(people: Any, make_env: Any) -> None:
    env = make_env(people.owner, name="first")
    assert env.status == "running", env.last_error
    assert run(env, "sh", "-c", "echo precious > /workspace/notes.txt")[0] == 0
    volume = env.workspace_volume

    response = api_client(people.owner).delete(f"/api/v1/environments/{env.id}/")
    assert response.status_code == 204, response.content
    kept = KeptWorkspace.objects.get(volume_name=volume)
    assert (kept.owner, kept.environment_name, kept.disk_mb) == (people.owner, "first", env.disk_mb)
    assert runtime.local().volume_exists(volume)
    assert "first" in kept_names(people.owner)
    assert "first" not in kept_names(people.teammate)  # someone else's kept data is not even listed
    # Another user can neither attach nor purge it: the same answer as for no such workspace.
    assert api_client(people.teammate).delete(f"/api/v1/workspaces/{kept.pk}/").status_code == 404
    refused = api_client(people.teammate).post("/api/v1/environments/", {"name": "steal", "template": "busybox",
                                                                          "workspace": str(kept.pk)}, format="json")
    assert refused.status_code == 400 and "workspace" in refused.json()["error"]["fields"], refused.content

    # Attached to a new environment: the data is there, and it is no longer "kept".
    response = api_client(people.owner).post("/api/v1/environments/", {"name": "second", "template": "busybox",
                                                                        "workspace": str(kept.pk)}, format="json")
    assert response.status_code == 202, response.content
    from tests.conftest import wait_for_status

    second = wait_for_status(response.json()["id"], {"running", "error"})
    assert second.status == "running", second.last_error
    assert second.workspace_volume == volume
    assert run(second, "cat", "/workspace/notes.txt") == (0, "precious\n")
    assert not KeptWorkspace.objects.filter(volume_name=volume).exists()

    # Deleted again and purged from the list: the volume is gone, explicitly.
    services.delete_environment(Environment.objects.get(pk=second.pk))
    kept = KeptWorkspace.objects.get(volume_name=volume)
    response = api_client(people.owner).delete(f"/api/v1/workspaces/{kept.pk}/")
    assert response.status_code == 204, response.content
    assert not runtime.local().volume_exists(volume)
    assert not KeptWorkspace.objects.filter(pk=kept.pk).exists()


def test_kept_workspaces_count_in_the_disk_quota(people: Any, make_env: Any) -> None:
    from accounts.models import Profile

    env = make_env(people.owner, name="big", disk_mb=80)
    services.delete_environment(env)
    profile = Profile.for_user(people.owner)
    profile.quota_disk_mb = 100
    profile.save()
    response = api_client(people.owner).post("/api/v1/environments/", {"name": "more", "template": "busybox", "disk_mb": 40},
                                             format="json")
    assert response.status_code == 403, response.content
    assert "80 MiB allotted" in response.json()["error"]["detail"] and "kept workspace" in response.json()["error"]["detail"]


def test_orphan_workspace_volumes_are_adopted(people: Any) -> None:
    """A workspace volume nothing records (kept before this existed, or a delete that died half-way)."""
    import uuid

    name = f"lsl-ws-{uuid.uuid4().hex[:12]}"
    runtime.local().ensure_volume(name, {runtime.LABEL_ENVIRONMENT: str(uuid.uuid4()), runtime.LABEL_OWNER: people.owner.username})
    try:
        adopted = services.adopt_orphan_workspaces()
        assert name in [k.volume_name for k in adopted]
        assert KeptWorkspace.objects.get(volume_name=name).owner == people.owner
        assert name not in [k.volume_name for k in services.adopt_orphan_workspaces()]  # once
    finally:
        runtime.local().remove_volume(name)


def test_an_environment_that_never_made_its_volume_keeps_nothing(people: Any) -> None:
    from environments.models import Template

    template = Template.objects.get(slug="busybox")
    env = Environment.objects.create(name="never", owner=people.owner, template=template, image=template.image,
                                     status="error", cpus=0.5, memory_mb=64, pids=64, workspace_volume="lsl-ws-neverexisted0")
    services.delete_environment(env)
    assert not KeptWorkspace.objects.filter(volume_name="lsl-ws-neverexisted0").exists()


def test_the_cli_lists_attaches_and_deletes_kept_workspaces(people: Any, live_server_proc: Any, tmp_path: Any) -> None:
    from tests.test_cli import Cli, assert_error, create

    cli = Cli(live_server_proc.url, tmp_path / "alice")
    cli.ok("init", "-u", "alice", "--password-stdin", input="password-alice\n")
    create(cli, "proj")
    cli.ok("exec", "proj", "--", "sh", "-c", "echo kept-data > /workspace/f")
    removed = cli.ok("rm", "proj")
    assert "lsl workspace ls" in removed.stderr, removed.stderr
    listed = cli.json("workspace", "ls")
    assert [w["environment_name"] for w in listed if w["environment_name"] == "proj"] == ["proj"]
    assert "proj" in cli.ok("workspace", "ls").stdout

    create(cli, "proj2", "--workspace", "proj")
    assert cli.ok("exec", "proj2", "--", "cat", "/workspace/f").stdout == "kept-data\n"
    assert not [w for w in cli.json("workspace", "ls") if w["environment_name"] == "proj"]

    cli.ok("rm", "proj2")
    assert_error(cli("workspace", "rm", "proj2"), 2, "add --yes")  # no terminal to confirm on: data stays
    cli.ok("workspace", "rm", "--yes", "proj2")
    assert not [w for w in cli.json("workspace", "ls") if w["environment_name"] == "proj2"]
    assert_error(cli("workspace", "rm", "--yes", "proj2"), 4, "no kept workspace named 'proj2'")
