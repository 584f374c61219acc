"""Disk limits per environment, written as an attacker: fill the workspace and see the real worker stop
the environment with a reason people can read; stop and start again to buy room and be refused it.

Against the real engine and the session's real worker (restarted with a short check interval).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.utils import timezone

from environments import policy, runtime, services
from environments.catalog import apply_catalog
from environments.models import Environment, Template
from lsl_site.models import PeriodicJob
from tests.conftest import WorkerProcess, api_client

pytestmark = [pytest.mark.django_db(transaction=True, serialized_rollback=True), pytest.mark.usefixtures("engine", "catalog")]

CHECK_INTERVAL = "0.5"
GRACE = 8.0


@pytest.fixture()
def fast_disk_worker(worker_proc: WorkerProcess, settings: Any) -> Iterator[WorkerProcess]:
    """The session's worker, measuring disk every half second (and put back as it was afterwards).
    The grace period is set by whoever starts the environment (here, this process): short in both."""
    settings.LSL_DISK_GRACE = GRACE
    saved = worker_proc.extra_env
    worker_proc.extra_env = {**(saved or {}), "LSL_DISK_CHECK_INTERVAL": CHECK_INTERVAL, "LSL_DISK_GRACE": str(GRACE)}
    worker_proc.restart()
    # The previous worker claimed this job for its own (long) interval: due now for the new one.
    PeriodicJob.objects.filter(name="enforce_disk_limits").update(due_at=timezone.now())
    try:
        yield worker_proc
    finally:
        worker_proc.extra_env = saved
        worker_proc.restart()


def write_mb(env: Environment, path: str, mb: int) -> None:
    """Write `mb` MiB of real (non-sparse) data as the environment user, as anyone in a terminal could.
    The worker may stop the environment mid-write: that is the point, so the exit code is not asked."""
    try:
        runtime.local().exec_run(env.container_id, ["sh", "-c", f"dd if=/dev/zero of={path} bs=1048576 count={mb} 2>&1"],
                         user=services.shell_user(env))
    except runtime.EngineError:
        pass  # stopped under it


def used_in(message: str) -> float:
    """The MB figure of "disk limit exceeded: 41 MB used of 20 MB; ..."."""
    match = re.match(r"disk limit exceeded: ([0-9.]+) (MB|GB) used of ", message)
    assert match, message
    return float(match[1]) * (1024 if match[2] == "GB" else 1)


def wait_for(predicate: Any, what: str, worker: WorkerProcess, timeout: float = 30.0) -> Environment:
    deadline = time.monotonic() + timeout
    while True:
        env = Environment.objects.get(pk=predicate.env_id)
        if predicate(env):
            return env
        assert time.monotonic() < deadline, f"{what}: {env.status} {env.stop_reason} {env.last_error!r}\n{worker.log_tail()}"
        time.sleep(0.2)


class Stopped:
    def __init__(self, env_id: Any) -> None:
        self.env_id = env_id

    def __call__(self, env: Environment) -> bool:
        return env.status == "stopped"


class Measured:
    """Checked by the worker after `after` (a moment), still running."""

    def __init__(self, env_id: Any, after: Any) -> None:
        self.env_id, self.after = env_id, after

    def __call__(self, env: Environment) -> bool:
        return env.status != "running" or (env.disk_checked_at is not None and env.disk_checked_at > self.after)


def test_a_full_workspace_is_stopped_by_the_worker_with_the_reason(people: Any, make_env: Any,
                                                                   fast_disk_worker: WorkerProcess) -> None:
    client = api_client(people.owner)
    env = make_env(people.owner, name="filler", disk_mb=20)
    assert (env.status, env.disk_mb) == ("running", 20)
    measured = wait_for(Measured(env.pk, timezone.now()), "first measurement", fast_disk_worker)
    assert measured.status == "running" and measured.disk_used_mb is not None and measured.disk_used_mb < 20

    write_mb(env, "/workspace/big", 40)
    stopped = wait_for(Stopped(env.pk), "stopped for disk", fast_disk_worker)
    assert stopped.stop_reason == "disk"
    assert stopped.last_error.endswith(" MB used of 20 MB; delete files and start again"), stopped.last_error
    assert used_in(stopped.last_error) > 20  # it may be caught mid-write: anything over the limit
    assert stopped.disk_used_mb > 20
    # What people see: the API (and so `lsl info` / `lsl list`) says why.
    shown = client.get(f"/api/v1/environments/{env.pk}/").json()
    assert (shown["status"], shown["stop_reason"], shown["disk_mb"]) == ("stopped", "disk", 20)
    assert shown["last_error"] == stopped.last_error and shown["disk_used_mb"] > 20
    # Stopped, never deleted: the container and the data are still there.
    assert runtime.local().container_state(env.container_id) is not None
    assert runtime.local().volume_exists(env.workspace_volume)

    # Starting again is allowed (to delete files), with a grace period and a notice...
    started = client.post(f"/api/v1/environments/{env.pk}/start/").json()
    assert started["status"] == "running" and started["disk_grace_until"], started
    assert started["last_error"].startswith(f"over its disk limit ({stopped.disk_used_mb} MB used of 20 MB): delete "
                                            "files before "), started["last_error"]
    env.refresh_from_db()
    kept = runtime.local().exec_run(env.container_id, ["du", "-sm", "/workspace/big"]).output.decode()
    assert int(kept.split()[0]) > 15, kept  # nothing was deleted for the user
    # ...but not to write more: growing during the grace period stops it at once.
    write_mb(env, "/workspace/more", 8)
    again = wait_for(Stopped(env.pk), "stopped again for growing", fast_disk_worker)
    assert again.stop_reason == "disk"
    assert "growing while it was being cleaned up" in again.last_error, again.last_error
    assert not runtime.local().container_state(env.container_id).running

    # Start once more, clean up within the grace period: it keeps running past it.
    services.start_environment(Environment.objects.get(pk=env.pk))
    env.refresh_from_db()
    assert runtime.local().exec_run(env.container_id, ["rm", "-f", "/workspace/big", "/workspace/more"],
                            user=services.shell_user(env)).exit_code == 0
    grace_over = env.disk_grace_until
    assert grace_over is not None
    after = wait_for(Measured(env.pk, grace_over), "measured after the grace period", fast_disk_worker, timeout=GRACE + 30)
    assert after.status == "running", after.last_error
    assert after.disk_used_mb < 20
    assert "stopping alice/filler: disk limit exceeded" in fast_disk_worker.log_tail(20000)


def test_the_container_layer_counts_too(people: Any, make_env: Any, fast_disk_worker: WorkerProcess) -> None:
    """Writing outside the workspace (the container's own layer: /tmp, the home directory) is no way around it."""
    env = make_env(people.owner, name="layered", disk_mb=20)
    write_mb(env, "/tmp/big", 30)
    stopped = wait_for(Stopped(env.pk), "stopped for its container layer", fast_disk_worker)
    assert stopped.stop_reason == "disk" and "used of 20 MB" in stopped.last_error


def test_disk_limits_are_checked_at_creation(people: Any, make_env: Any) -> None:
    client = api_client(people.owner)
    busybox = Template.objects.get(slug="busybox")
    assert busybox.disk_mb is None  # the test catalog sets none: the server default applies
    template_limit = policy.effective_disk_mb(busybox)
    assert template_limit > 0

    over = client.post("/api/v1/environments/", {"name": "greedy", "template": "busybox", "disk_mb": template_limit + 1},
                       format="json")
    assert over.status_code == 400
    assert over.json()["error"]["fields"]["disk_mb"] == [f"at most {template_limit} (MiB) for template 'busybox'"]
    tiny = client.post("/api/v1/environments/", {"name": "tiny", "template": "busybox", "disk_mb": 1}, format="json")
    assert tiny.status_code == 400 and "disk_mb" in tiny.json()["error"]["fields"]
    assert not Environment.objects.filter(name__in=["greedy", "tiny"]).exists()

    env = make_env(people.owner, name="defaulted")
    assert env.disk_mb == template_limit
    listed = client.get("/api/v1/templates/").json()
    rows = listed["results"] if isinstance(listed, dict) else listed
    assert {t["slug"]: t["disk_mb"] for t in rows}["busybox"] == template_limit


def test_the_catalog_takes_a_disk_limit_and_says_what_is_wrong(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("version: 1\ntemplates:\n"
                    "  - {slug: small, image: 'lsl-test/busybox:latest', resources: {disk: 2g}}\n"
                    "  - {slug: unlimited, image: 'lsl-test/busybox:latest', resources: {disk: 0}}\n")
    assert not apply_catalog(good).problems
    assert Template.objects.get(slug="small").disk_mb == 2048
    assert Template.objects.get(slug="unlimited").disk_mb == 0

    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\ntemplates:\n"
                   "  - slug: a\n    image: 'lsl-test/busybox:latest'\n    resources: {disk: 5}\n"
                   "  - slug: b\n    image: 'lsl-test/busybox:latest'\n    resources: {disk: lots}\n"
                   "  - slug: c\n    image: 'lsl-test/busybox:latest'\n    resources: {disk: 20000g}\n")
    problems = [str(p).split(": ", 1)[1] for p in apply_catalog(bad).problems]
    assert problems == [
        "templates[0].resources.disk: must be 0 (no limit) or at least 16 (MiB)",
        "templates[1].resources.disk: 'lots' is not a valid disk size (use e.g. 512m, 20g, or an integer number of MiB)",
        "templates[2].resources.disk: '20000g' is out of range (16m to 16384g, or 0 for no limit)",
    ]
    assert not Template.objects.filter(slug__in=["a", "b", "c"]).exists()


def test_disk_verdict_rules() -> None:
    """The rule itself (pure): over the limit is stopped; during a grace period only growth past the
    use at the stop is."""
    now = timezone.now()
    env = Environment(disk_mb=100)
    assert policy.disk_verdict(env, 100, now) is None
    assert policy.disk_verdict(env, 5427.2, now) is not None
    assert policy.disk_verdict(Environment(disk_mb=5120), 5427.2, now) == (
        "disk limit exceeded: 5.3 GB used of 5 GB; delete files and start again")
    assert policy.disk_verdict(Environment(disk_mb=0), 10**9, now) is None  # no limit
    graced = Environment(disk_mb=100, disk_grace_until=now + timedelta(seconds=60), disk_grace_mb=150)
    assert policy.disk_verdict(graced, 150, now) is None
    assert "growing" in (policy.disk_verdict(graced, 151, now) or "")
    expired = Environment(disk_mb=100, disk_grace_until=now - timedelta(seconds=1), disk_grace_mb=150)
    assert policy.disk_verdict(expired, 120, now) is not None


def test_hard_limits_are_used_where_the_engine_has_them() -> None:
    """This engine (overlay2 on ext4) has none, so the worker's measurements are the limit; overlay2 on xfs
    (with pquota) and btrfs/zfs take `storage_opt size` on the container layer."""
    ext4 = {"Driver": "overlay2", "DriverStatus": [["Backing Filesystem", "extfs"], ["Supports d_type", "true"]]}
    xfs = {"Driver": "overlay2", "DriverStatus": [["Backing Filesystem", "xfs"]]}
    assert not runtime.hard_disk_limit_in(ext4)
    assert runtime.hard_disk_limit_in(xfs) and runtime.hard_disk_limit_in({"Driver": "zfs"})
    engine = runtime.local().supports_hard_disk_limit()
    from tests.conftest import docker_cli

    driver = docker_cli("info", "--format", "{{.Driver}} {{json .DriverStatus}}").stdout
    assert engine == ("xfs" in driver or driver.startswith(("btrfs", "zfs")))


def test_lsl_shows_the_limit_and_why_it_stopped(people: Any, live_server_proc: Any, tmp_path: Path,
                                                fast_disk_worker: WorkerProcess) -> None:
    from tests.test_cli import Cli

    alice = Cli(live_server_proc.url, tmp_path / "alice")
    alice.ok("init", "-u", "alice", "--password-stdin", input="password-alice\n")
    created = alice.json("create", "small", "--template", "busybox", "--disk", "20m")
    assert (created["status"], created["disk_mb"]) == ("running", 20)
    env = Environment.objects.get(pk=created["id"])
    write_mb(env, "/workspace/big", 40)
    wait_for(Stopped(env.pk), "stopped for disk", fast_disk_worker)
    info = alice.ok("info", "small").stdout
    assert re.search(r"^\s*stop reason\s+disk$", info, re.M), info
    assert re.search(r"^\s*last error\s+disk limit exceeded: \d+ MB used of 20 MB; delete files and start again$", info, re.M), info
    assert re.search(r"^\s*disk\s+20m \(\d+m used\)$", info, re.M), info
    assert re.search(r"^small\s+stopped\s+busybox", alice.ok("list").stdout, re.M)
    templates = alice.ok("images").stdout
    assert re.search(r"^busybox\s+\S+\s+0.5\s+256m\s+10240m\s", templates, re.M), templates
    refused = alice("create", "big", "--template", "busybox", "--disk", "20g")
    assert refused.returncode != 0 and "at most 10240 (MiB) for template 'busybox'" in refused.stderr, refused.stderr
