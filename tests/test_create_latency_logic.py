"""The path from `POST /api/v1/environments/` to the worker starting the task, kept short without
changing what it does: the template check, the task committed with the row, wake-ups after the
commit (the worker's first), a woken worker claiming at once, and worker threads keeping their
database connections. No engine needed: provisioning a row that does not exist does nothing.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.db import connection, connections
from rest_framework.exceptions import ValidationError

from environments import services, tasks, worker
from environments.api import UsableTemplateField
from environments.models import Environment, Role, Template, usable_templates
from lsl_site import dbpool, wake
from tests.conftest import api_client


def private_template(slug: str) -> Template:
    busybox = Template.objects.get(slug="busybox")
    return Template.objects.create(slug=slug, image=busybox.image, shell=busybox.shell, cpus=0.5, memory_mb=128, pids=64,
                                   network_modes=["bridge"], public=False, managed_by_catalog=False)


# --- the template field -------------------------------------------------------------------------

@pytest.mark.django_db
def test_template_field_accepts_exactly_the_usable_templates(people: Any, catalog: None) -> None:
    from django.contrib.auth import get_user_model
    from guardian.shortcuts import assign_perm

    team_only = private_template("team-only")
    team_only.teams.add(people.team)
    granted = private_template("granted")
    assign_perm("environments.use_template", people.outsider, granted)
    hidden = private_template("hidden")
    root = get_user_model().objects.create_superuser("root", "root@example.com", "password-root")
    users = [people.owner, people.teammate, people.outsider, people.viewer, root]
    slugs = ["busybox", team_only.slug, granted.slug, hidden.slug, "no-such-template"]
    for user in users:
        usable = set(usable_templates(user).values_list("slug", flat=True))
        field = UsableTemplateField(user)
        for slug in slugs:
            if slug in usable:
                assert field.to_internal_value(slug).slug == slug, (user, slug)
            else:
                with pytest.raises(ValidationError) as caught:
                    field.to_internal_value(slug)
                assert caught.value.detail == [f"Object with slug={slug} does not exist."], (user, slug)
    assert {slug for slug in slugs if slug in set(usable_templates(people.outsider).values_list("slug", flat=True))} \
        == {"busybox", "granted"}


@pytest.mark.django_db
def test_creating_from_a_template_one_may_not_use_is_refused_on_the_template_field(people: Any, catalog: None) -> None:
    private_template("hidden")
    response = api_client(people.owner).post("/api/v1/environments/", {"name": "nope", "template": "hidden"},
                                             format="json")
    assert response.status_code == 400, response.content
    assert "Object with slug=hidden does not exist." in str(response.json())
    assert not Environment.objects.filter(name="nope").exists()


# --- the create: one transaction, then wake-ups -----------------------------------------------------

@pytest.fixture()
def woken(monkeypatch: Any) -> list[str]:
    topics: list[str] = []
    monkeypatch.setattr(wake, "notify", topics.append)
    return topics


def ready_tasks_for(env_id: Any) -> int:
    from django_tasks_db.models import DBTaskResult

    return sum(1 for row in DBTaskResult.objects.ready() if row.args_kwargs["args"] == [str(env_id)])


@pytest.mark.django_db
def test_create_queues_its_task_with_the_row_and_wakes_the_worker_first(
        people: Any, catalog: None, woken: list[str], django_capture_on_commit_callbacks: Any) -> None:
    busybox = Template.objects.get(slug="busybox")
    with django_capture_on_commit_callbacks(execute=True):
        env = services.create_environment(people.owner, services.CreateRequest(name="quick", template=busybox))
        assert ready_tasks_for(env.id) == 1, "the task is written in the row's transaction"
        assert woken == [], "nobody is woken before the commit"
    assert woken == ["tasks", "events"], "the worker first, then the event listeners"


@pytest.mark.django_db
def test_a_create_that_rolls_back_leaves_no_task_and_wakes_nobody(
        people: Any, catalog: None, woken: list[str], monkeypatch: Any, django_capture_on_commit_callbacks: Any) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("publishing failed")

    monkeypatch.setattr(services, "publish_environment", broken)
    busybox = Template.objects.get(slug="busybox")
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        with pytest.raises(RuntimeError):
            services.create_environment(people.owner, services.CreateRequest(name="doomed", template=busybox))
    assert not Environment.objects.filter(name="doomed").exists()
    from django_tasks_db.models import DBTaskResult

    assert not DBTaskResult.objects.exists()
    assert callbacks == [] and woken == []


@pytest.mark.django_db
def test_a_team_environment_gives_its_team_the_member_role(people: Any, catalog: None, woken: list[str]) -> None:
    from guardian.shortcuts import get_perms

    busybox = Template.objects.get(slug="busybox")
    env = services.create_environment(people.owner, services.CreateRequest(name="shared", template=busybox,
                                                                            team=people.team))
    assert set(get_perms(people.team.group, env)) == set(Role.MEMBER.codenames)
    assert set(get_perms(people.teammate, env)) == set(Role.MEMBER.codenames)
    assert get_perms(people.outsider, env) == []


# --- the worker ------------------------------------------------------------------------------------------

@pytest.mark.django_db(transaction=True, serialized_rollback=True)
def test_refresh_connections_keeps_a_healthy_connection_and_drops_a_bad_one(monkeypatch: Any) -> None:
    Environment.objects.exists()
    first = connection.connection
    dbpool.refresh_connections()
    Environment.objects.exists()
    assert connection.connection is first, "a healthy connection is kept across rounds"

    connection.errors_occurred = True
    dbpool.refresh_connections()
    assert connection.connection is first and not connection.errors_occurred, "an error it survived: still kept"

    connection.errors_occurred = True
    monkeypatch.setattr(type(connections["default"]), "is_usable", lambda self: False)
    dbpool.refresh_connections()
    assert connection.connection is None, "an error it did not survive: closed"
    monkeypatch.undo()

    Environment.objects.exists()
    second = connection.connection
    assert second is not None and second is not first
    connection.set_autocommit(False)
    dbpool.refresh_connections()
    assert connection.connection is None, "left outside autocommit: closed"
    Environment.objects.exists()
    assert connection.get_autocommit()


@pytest.fixture()
def short_var_dir(settings: Any) -> Iterator[Path]:
    """A var dir of its own (short: Unix socket paths are limited), so wake-ups reach only this test's worker."""
    path = Path(tempfile.mkdtemp(prefix="lslw"))
    settings.VAR_DIR = path
    yield path
    shutil.rmtree(path, ignore_errors=True)


def run_task_claimer(poll: float, settings: Any) -> tuple[worker.Worker, threading.Thread]:
    settings.LSL_WORKER_POLL_INTERVAL = poll
    w = worker.Worker(worker_id="latency-test", threads=1)
    thread = threading.Thread(target=w._guarded, args=(w._run_tasks,), daemon=True)
    thread.start()
    return w, thread


def stop_task_claimer(w: worker.Worker, thread: threading.Thread) -> None:
    w.stop(grace=2)
    wake.notify("tasks")  # out of its wait
    thread.join(timeout=10)
    assert not thread.is_alive()


def wait_listening(var_dir: Path) -> None:
    deadline = time.monotonic() + 10
    while not list((var_dir / "wake").glob("tasks-*.sock")):
        assert time.monotonic() < deadline, "the claimer never listened"
        time.sleep(0.01)
    time.sleep(0.1)  # past its first (empty) look: now it waits for a wake-up


def wait_finished(env_id: Any, timeout: float) -> float:
    from django_tasks_db.models import DBTaskResult

    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if any(row.args_kwargs["args"] == [str(env_id)] for row in DBTaskResult.objects.successful()):
            return time.monotonic() - started
        time.sleep(0.01)
    raise AssertionError(f"the task of {env_id} was not run within {timeout}s")


@pytest.mark.django_db(transaction=True, serialized_rollback=True)
def test_a_woken_worker_claims_the_task_at_once(short_var_dir: Path, settings: Any) -> None:
    w, thread = run_task_claimer(30.0, settings)  # a poll would come far too late
    try:
        wait_listening(short_var_dir)
        for _ in range(3):  # one after the other: each is claimed on its own wake-up
            env_id = uuid.uuid4()  # no such row: provisioning it does nothing
            tasks.enqueue_provisioning(env_id)  # outside a transaction: queued and woken at once
            assert wait_finished(env_id, timeout=5) < 5
    finally:
        stop_task_claimer(w, thread)


@pytest.mark.django_db(transaction=True, serialized_rollback=True)
def test_a_burst_queued_in_one_transaction_is_claimed_on_its_wake_ups(short_var_dir: Path, settings: Any) -> None:
    from django.db import transaction

    w, thread = run_task_claimer(30.0, settings)  # one runner: each task waits for the one before
    try:
        wait_listening(short_var_dir)
        env_ids = [uuid.uuid4() for _ in range(3)]
        with transaction.atomic():
            for env_id in env_ids:
                tasks.enqueue_provisioning(env_id)  # three wake-ups, sent on commit
        for env_id in env_ids:
            wait_finished(env_id, timeout=5)
    finally:
        stop_task_claimer(w, thread)


@pytest.mark.django_db(transaction=True, serialized_rollback=True)
def test_without_wake_ups_the_worker_still_finds_every_task_by_polling(short_var_dir: Path, settings: Any) -> None:
    w, thread = run_task_claimer(0.05, settings)
    try:
        env_ids = [uuid.uuid4() for _ in range(3)]
        for env_id in env_ids:
            tasks.provision_environment.enqueue(str(env_id))  # queued with no wake-up (lost ones)
        for env_id in env_ids:
            wait_finished(env_id, timeout=5)
    finally:
        stop_task_claimer(w, thread)
