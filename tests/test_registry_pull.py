"""A missing image is pulled from a real registry (Debian's docker-registry) with observable progress."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from environments import runtime
from environments.models import Template
from tests.conftest import api_client, docker_cli, free_port

REPO = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.django_db(transaction=True, serialized_rollback=True), pytest.mark.usefixtures("engine", "catalog")]


@pytest.fixture()
def pushed_image() -> Iterator[str]:
    """An image that exists only in the local registry: a unique 24 MB layer on top of busybox."""
    # A private registry on a free port (stopped afterwards), so nothing else on :5000 interferes.
    addr = f"127.0.0.1:{free_port()}"
    script = ["bash", str(REPO / "scripts" / "registry.sh")]
    registry_env = {**os.environ, "LSL_REGISTRY_ADDR": addr}
    subprocess.run([*script, "stop"], capture_output=True, text=True, timeout=60, env=registry_env)
    started = subprocess.run([*script, "start"], capture_output=True, text=True, timeout=120, env=registry_env)
    assert started.returncode == 0, f"local registry did not start: {started.stdout}{started.stderr}"
    ref = f"{addr}/lsl-test/pull-{uuid.uuid4().hex[:8]}:latest"
    builder = docker_cli("run", "-d", "lsl-test/busybox:latest", "tail", "-f", "/dev/null").stdout.strip()
    try:
        assert docker_cli("exec", builder, "sh", "-c", "head -c 25165824 /dev/urandom > /payload").returncode == 0
        assert docker_cli("commit", builder, ref).returncode == 0
    finally:
        docker_cli("rm", "-f", builder)
    pushed = docker_cli("push", ref)
    assert pushed.returncode == 0, pushed.stderr
    assert docker_cli("rmi", ref).returncode == 0
    assert not runtime.local().image_exists(ref)
    yield ref
    runtime.local().remove_image(ref)
    subprocess.run([*script, "stop"], capture_output=True, text=True, timeout=60, env=registry_env)


def test_create_pulls_missing_image_with_progress(people: Any, pushed_image: str) -> None:
    template = Template.objects.get(slug="busybox")
    template.pk, template.slug, template.image = None, "pulled", pushed_image
    template.save()
    client = api_client(people.owner)
    response = client.post("/api/v1/environments/", {"name": "pulled", "template": "pulled"}, format="json")
    assert response.status_code == 202  # the request does not wait for the pull
    env_id = response.json()["id"]
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + 120
    while True:
        data = client.get(f"/api/v1/environments/{env_id}/").json()
        if not seen or data["progress"] != seen[-1]:
            seen.append(data["progress"])
        if data["status"] in ("running", "error"):
            break
        assert time.monotonic() < deadline, f"still {data['status']} after 120 s: {seen[-3:]}"
        time.sleep(0.02)
    assert data["status"] == "running", data["last_error"]
    assert any(p.get("phase") == "pulling" for p in seen), f"no pull progress observed: {seen}"
    assert seen[-1]["phase"] == "ready"
    assert seen[-1]["pulled"]["bytes"] > 20_000_000, seen[-1]
    assert runtime.local().image_exists(pushed_image)
    assert runtime.local().exec_run(data["container_id"], ["ls", "-l", "/payload"]).exit_code == 0


def test_pull_reports_byte_progress_per_event(pushed_image: str) -> None:
    events: list[dict[str, Any]] = []
    runtime.local().pull_image(pushed_image, events.append)
    downloading = [e for e in events if e["status"] == "Downloading"]
    assert downloading, [e["status"] for e in events]
    currents = [e["current"] for e in events]
    assert currents == sorted(currents), "progress went backwards"
    assert events[-1]["current"] == events[-1]["total"] > 20_000_000


def test_unpullable_image_ends_in_error_with_reason(people: Any) -> None:
    template = Template.objects.get(slug="busybox")
    template.pk, template.slug, template.image = None, "nowhere", "127.0.0.1:9/lsl-test/nothing:latest"
    template.save()
    client = api_client(people.owner)
    env_id = client.post("/api/v1/environments/", {"name": "nowhere", "template": "nowhere"}, format="json").json()["id"]
    deadline = time.monotonic() + 60
    while (data := client.get(f"/api/v1/environments/{env_id}/").json())["status"] == "creating":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert data["status"] == "error"
    assert "cannot pull 127.0.0.1:9/lsl-test/nothing:latest" in data["last_error"]
    assert data["progress"]["phase"] == "failed"
