"""Environments against the real engine: lifecycle, hardening, reconciliation, errors."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext, override_settings

from environments import runtime
from environments.models import Environment
from tests.conftest import api_client, docker_cli, wait_for_status

pytestmark = pytest.mark.usefixtures("engine", "catalog")


def create_via_api(client: Any, **payload: Any) -> dict[str, Any]:
    response = client.post("/api/v1/environments/", payload, format="json")
    assert response.status_code == 202, response.content
    return response.json()


@pytest.mark.django_db(transaction=True, serialized_rollback=True)
def test_lifecycle_keeps_workspace_until_purge(people: Any) -> None:
    client = api_client(people.owner)
    data = create_via_api(client, name="dev", template="busybox")
    assert data["status"] == "creating"
    env = wait_for_status(data["id"], "running")
    volume = env.workspace_volume

    result = runtime.local().exec_run(env.container_id, ["sh", "-c", "echo persisted > /workspace/note.txt"])
    assert result.exit_code == 0, result.output

    assert client.post(f"/api/v1/environments/{env.id}/stop/").json()["status"] == "stopped"
    assert runtime.local().container_state(env.container_id).running is False
    assert client.post(f"/api/v1/environments/{env.id}/start/").json()["status"] == "running"
    assert runtime.local().exec_run(env.container_id, ["cat", "/workspace/note.txt"]).output == b"persisted\n"

    assert client.delete(f"/api/v1/environments/{env.id}/").status_code == 204
    assert runtime.local().container_state(env.container_id) is None
    assert runtime.local().volume_exists(volume), "delete without purge must keep the workspace volume"
    assert not Environment.objects.filter(pk=env.id).exists()

    data = create_via_api(client, name="dev2", template="busybox")
    env2 = wait_for_status(data["id"], "running")
    assert client.delete(f"/api/v1/environments/{env2.id}/?purge=true").status_code == 204
    assert not runtime.local().volume_exists(env2.workspace_volume)
    runtime.local().remove_volume(volume)


@pytest.mark.django_db(transaction=True, serialized_rollback=True)
def test_container_is_hardened(people: Any, make_env: Any) -> None:
    env = make_env(people.owner, template="busybox")
    info = runtime.local().inspect_container(env.container_id)
    host = info["HostConfig"]
    assert host["CapDrop"] == ["ALL"]
    assert set(host["CapAdd"]) == set(runtime.DEV_SHELL_CAPABILITIES)
    assert "no-new-privileges:true" in host["SecurityOpt"]
    assert host["Init"] is True
    assert host["PidsLimit"] == env.pids
    assert host["Memory"] == env.memory_mb * 1024 * 1024
    assert host["NanoCpus"] == int(env.cpus * 1e9)
    assert host["NetworkMode"] == "bridge"
    assert host["Privileged"] is False
    sources = [m.get("Source", "") for m in info["Mounts"]] + [m.get("Name", "") for m in info["Mounts"]]
    assert not any("docker.sock" in s for s in sources)
    mounts = {m["Destination"]: m for m in info["Mounts"]}
    assert set(mounts) == {"/workspace", "/.lsl/bin", "/.lsl/run"}  # the workspace, the keeper and its socket
    assert mounts["/.lsl/bin"]["RW"] is False, "the keeper binary is read-only"
    assert mounts["/.lsl/run"]["Source"].endswith(str(env.id).replace("-", ""))
    labels = info["Config"]["Labels"]
    assert labels["lsl.environment"] == str(env.id)
    assert labels["lsl.owner"] == "alice"
    # The limits are really enforced inside, not just recorded.
    pids_max = runtime.local().exec_run(env.container_id, ["sh", "-c", "cat /sys/fs/cgroup/pids.max 2>/dev/null || cat /sys/fs/cgroup/pids/pids.max"])
    assert pids_max.output.strip() == str(env.pids).encode()


@pytest.mark.django_db(transaction=True, serialized_rollback=True)
def test_host_network_only_where_template_allows(people: Any, make_env: Any) -> None:
    from environments.models import Template

    Template.objects.filter(slug="busybox").update(network_modes=["bridge", "none"])
    client = api_client(people.owner)
    response = client.post("/api/v1/environments/", {"name": "h", "template": "busybox", "network_mode": "host"}, format="json")
    assert response.status_code == 400
    assert "network_mode" in response.json()["error"]["fields"]
    env = make_env(people.owner, template="busybox", network_mode="none")
    assert runtime.local().inspect_container(env.container_id)["HostConfig"]["NetworkMode"] == "none"


@pytest.mark.django_db(transaction=True, serialized_rollback=True)
def test_malformed_payload_gets_field_errors(people: Any) -> None:
    client = api_client(people.owner)
    response = client.post("/api/v1/environments/", {"name": "Not A Slug!", "template": "nope", "cpus": "lots",
                                                      "mounts": ["only-one-part"]}, format="json")
    assert response.status_code == 400
    body = response.json()["error"]
    assert body["code"] == "invalid"
    assert set(body["fields"]) == {"name", "template", "cpus", "mounts"}
    assert "SRC:DST" in str(body["fields"]["mounts"])
    assert Environment.objects.count() == 0


@pytest.mark.django_db(transaction=True, serialized_rollback=True)
def test_duplicate_name_is_a_clear_400(people: Any, make_env: Any) -> None:
    make_env(people.owner, name="same")
    response = api_client(people.owner).post("/api/v1/environments/", {"name": "same", "template": "busybox"}, format="json")
    assert response.status_code == 400
    assert "already have an environment named 'same'" in str(response.json()["error"]["fields"]["name"])


@pytest.mark.django_db(transaction=True, serialized_rollback=True)
def test_out_of_band_stop_and_remove_are_reconciled(people: Any, make_env: Any) -> None:
    client = api_client(people.owner)
    stopped = make_env(people.owner, name="stopped-behind-back")
    removed = make_env(people.owner, name="removed-behind-back")
    assert docker_cli("stop", "-t", "1", stopped.container_id).returncode == 0
    assert docker_cli("rm", "-f", removed.container_id).returncode == 0

    # The worker hears the engine's events: no request in between, and reads only read.
    assert wait_for_status(stopped.id, "stopped", timeout=2).stop_reason == "stopped"
    assert wait_for_status(removed.id, "missing", timeout=2).stop_reason == "removed"
    assert client.get(f"/api/v1/environments/{stopped.id}/").json()["status"] == "stopped"
    listed = {item["name"]: item["status"] for item in client.get("/api/v1/environments/").json()["results"]}
    assert listed["removed-behind-back"] == "missing"

    # Started behind LSL's back: running again, and the full reconcile agrees (nothing left to change).
    assert docker_cli("start", stopped.container_id).returncode == 0
    wait_for_status(stopped.id, "running", timeout=2)
    from io import StringIO

    from django.core.management import call_command

    out = StringIO()
    call_command("lsl_reconcile", stdout=out)
    assert "reconciled: 0 changed" in out.getvalue()

    # Starting a missing environment recreates its container on the same workspace volume.
    response = client.post(f"/api/v1/environments/{removed.id}/start/")
    assert response.status_code == 200 and response.json()["status"] == "running"
    assert response.json()["container_id"] != removed.container_id


@pytest.mark.django_db(transaction=True, serialized_rollback=True)
def test_engine_unreachable_is_503_not_500(people: Any, make_env: Any, tmp_path: Any) -> None:
    env = make_env(people.owner)
    client = api_client(people.owner)
    with override_settings(LSL_DOCKER_HOST=f"unix://{tmp_path}/no-engine.sock"):
        response = client.post(f"/api/v1/environments/{env.id}/stop/")
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "engine_unavailable"
        assert "not reachable" in response.json()["error"]["detail"]
        # Reads keep working from the database instead of failing.
        assert client.get(f"/api/v1/environments/{env.id}/").status_code == 200
    assert runtime.local().container_state(env.container_id).running


@pytest.mark.django_db(transaction=True, serialized_rollback=True)
def test_list_query_count_does_not_grow(people: Any) -> None:
    from environments.models import Role, Template
    from environments.services import grant_access

    template = Template.objects.get(slug="busybox")

    def add(n: int) -> None:
        for _ in range(n):
            env = Environment.objects.create(name=f"e{Environment.objects.count()}", owner=people.owner, template=template,
                                             image=template.image, status="missing", cpus=1, memory_mb=64, pids=64)
            grant_access(env, role=Role.MEMBER, user=people.viewer)

    client = api_client(people.viewer)

    def count() -> int:
        with CaptureQueriesContext(connection) as ctx:
            response = client.get("/api/v1/environments/")
            assert response.status_code == 200
        return len(ctx.captured_queries)

    add(2)
    few = count()
    add(20)
    many = count()
    assert many == few, f"{few} queries for 2 environments, {many} for 22"


@pytest.mark.django_db(transaction=True, serialized_rollback=True)
def test_exec_streams_output_and_exit_code(people: Any, make_env: Any) -> None:
    import base64
    import json

    env = make_env(people.owner)
    response = api_client(people.owner).post(f"/api/v1/environments/{env.id}/exec/",
                                              {"command": ["sh", "-c", "echo out; echo err >&2; exit 7"]}, format="json")
    assert response.status_code == 200
    from tests.conftest import read_streaming

    lines = [json.loads(line) for line in read_streaming(response).splitlines()]
    output = b"".join(base64.b64decode(line["o"]) for line in lines if "o" in line)
    assert b"out\n" in output and b"err\n" in output
    assert lines[-1] == {"exit_code": 7}


@pytest.mark.django_db(transaction=True, serialized_rollback=True)
def test_exec_output_streams_before_the_command_ends(people: Any, make_env: Any, live_server_proc: Any) -> None:
    import time

    import requests

    from tests.conftest import make_token

    env = make_env(people.owner)
    headers = {"Authorization": f"Token {make_token(people.owner)}"}
    started = time.monotonic()
    with requests.post(f"{live_server_proc.url}/api/v1/environments/{env.id}/exec/", headers=headers, stream=True,
                       json={"command": ["sh", "-c", "echo first; sleep 3; echo second"]}, timeout=30) as response:
        lines = response.iter_lines()
        first = next(lines)
        first_at = time.monotonic() - started
        rest = list(lines)
    assert b'"o"' in first and first_at < 2.5, f"first output only after {first_at:.1f}s"
    assert rest[-1] == b'{"exit_code": 0}'
