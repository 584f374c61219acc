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
