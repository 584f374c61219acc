"""Django admin: every LSL model's pages render for a superuser, with guardian's object-permission pages."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib import admin
from django.test import Client
from django.urls import reverse

from environments.models import Environment, Template
from sessions.models import AuditEvent, Participation, TerminalSession


@pytest.fixture()
def superuser_client(people: Any) -> Client:
    root = type(people.owner).objects.create_superuser("root", "", "root-password-123")
    client = Client()
    client.force_login(root)
    return client


@pytest.mark.django_db
def test_every_registered_model_lists_and_shows(superuser_client: Client, people: Any, catalog: None) -> None:
    template = Template.objects.get(slug="busybox")
    env = Environment.objects.create(name="adm", owner=people.owner, template=template, image=template.image,
                                     status="stopped", cpus=1, memory_mb=64, pids=64)
    session = TerminalSession.objects.create(environment=env, environment_name=env.name, creator=people.owner)
    Participation.objects.create(session=session, user=people.teammate, role="member", client_kind="web")
    AuditEvent.objects.create(session=session, user=people.teammate, kind="join")
    for model, model_admin in admin.site._registry.items():
        meta = model._meta
        url = reverse(f"admin:{meta.app_label}_{meta.model_name}_changelist")
        assert superuser_client.get(url).status_code == 200, url
    for obj in (env, template, session):
        meta = obj._meta
        change = superuser_client.get(reverse(f"admin:{meta.app_label}_{meta.model_name}_change", args=[obj.pk]))
        assert change.status_code == 200
    perms = superuser_client.get(reverse("admin:environments_environment_permissions", args=[env.pk]))
    assert perms.status_code == 200 and b"Object permissions" in perms.content
    session_page = superuser_client.get(reverse("admin:terminals_terminalsession_change", args=[session.pk]))
    assert b"asciicast" in session_page.content and b"bob" in session_page.content


@pytest.mark.django_db
def test_token_digest_is_never_shown(superuser_client: Client, people: Any) -> None:
    from accounts.services import create_token

    token, key = create_token(people.owner, "laptop")
    page = superuser_client.get(reverse("admin:accounts_apitoken_change", args=[token.pk]))
    assert page.status_code == 200
    assert token.digest.encode() not in page.content and key.encode() not in page.content


@pytest.mark.django_db
def test_it_rejects_outsider(people: Any) -> None:
    client = Client()
    client.force_login(people.outsider)
    response = client.get(reverse("admin:environments_environment_changelist"))
    assert response.status_code == 302 and "/admin/login/" in response["Location"]


# --- what an admin edit does (issue 13): applied, or not editable at all ----------------------

def _change_form(client: Client, env: Environment) -> dict[str, Any]:
    """The environment's change form as the browser would post it back."""
    return {"name": env.name, "team": env.team_id or "", "cpus": env.cpus, "memory_mb": env.memory_mb, "pids": env.pids}


@pytest.mark.django_db(transaction=True, serialized_rollback=True)
def test_an_admin_edit_of_limits_reaches_the_running_container(superuser_client: Client, people: Any,
                                                                make_env: Any) -> None:
    from environments import runtime

    env = make_env(people.owner, template="busybox")
    assert env.status == "running", env.last_error
    url = reverse("admin:environments_environment_change", args=[env.pk])
    form = {**_change_form(superuser_client, env), "cpus": 0.25, "memory_mb": 200, "pids": 100,
            "network_mode": "host", "mounts": "[]", "image": "evil:latest"}  # read-only fields: ignored
    response = superuser_client.post(url, form)
    assert response.status_code == 302, response.content.decode()[:3000]
    host = runtime.local().inspect_container(env.container_id)["HostConfig"]
    assert (host["NanoCpus"], host["Memory"], host["PidsLimit"]) == (250_000_000, 200 * 1024 * 1024, 100)
    env.refresh_from_db()
    assert (env.cpus, env.memory_mb, env.pids, env.network_mode, env.image) == (0.25, 200, 100, "bridge",
                                                                                 "lsl-test/busybox:latest")


@pytest.mark.django_db
def test_an_admin_edit_over_the_quota_is_a_form_error(superuser_client: Client, people: Any, catalog: None) -> None:
    from accounts.models import Profile

    profile = Profile.for_user(people.owner)
    profile.quota_cpus = 1
    profile.save()
    template = Template.objects.get(slug="busybox")
    env = Environment.objects.create(name="adm", owner=people.owner, template=template, image=template.image,
                                     status="running", cpus=0.5, memory_mb=64, pids=64)
    url = reverse("admin:environments_environment_change", args=[env.pk])
    response = superuser_client.post(url, {**_change_form(superuser_client, env), "cpus": 4})
    assert response.status_code == 200 and b"quota exceeded: cpus" in response.content
    env.refresh_from_db()
    assert env.cpus == 0.5


@pytest.mark.django_db
def test_the_admin_offers_roles_not_django_permissions(superuser_client: Client, people: Any, catalog: None) -> None:
    template = Template.objects.get(slug="busybox")
    env = Environment.objects.create(name="adm", owner=people.owner, template=template, image=template.image,
                                     status="stopped", cpus=1, memory_mb=64, pids=64)
    page = superuser_client.get(reverse("admin:environments_environment_permissions_manage_user",
                                        args=[env.pk, people.teammate.pk])).content.decode()
    assert "use_environment" in page and "admin_environment" in page
    assert "add_environment" not in page and "delete_environment" not in page and "change_environment" not in page
    # Nothing to add by hand: environments are provisioned, sessions run by hubs, audit events written by LSL.
    for name in ("environments_environment", "terminals_terminalsession", "terminals_auditevent"):
        assert superuser_client.get(reverse(f"admin:{name}_add")).status_code == 403, name
