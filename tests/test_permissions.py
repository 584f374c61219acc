"""The permission matrix: every API endpoint × every kind of caller (NetBox style).

Outsiders get 404 for an environment (never 403: its existence must not leak);
anonymous callers get 401; roles decide 403 vs success.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import pytest

from environments.models import Environment, Role, Template
from environments.services import grant_access, revoke_access
from tests.conftest import api_client

CALLERS = ["anonymous", "outsider", "viewer", "member", "admin", "owner", "team_member", "staff"]
READ = {"anonymous": 401, "outsider": 404, "viewer": 200, "member": 200, "admin": 200, "owner": 200, "team_member": 200, "staff": 200}


def needs(role: str, ok: int) -> dict[str, int]:
    """Expected statuses for an endpoint needing `role` that answers `ok` on success."""
    rank = {"viewer": 1, "member": 2, "admin": 3}
    have = {"viewer": 1, "member": 2, "admin": 3, "owner": 3, "team_member": 2, "staff": 1}
    expected = {"anonymous": 401, "outsider": 404}
    for caller, level in have.items():
        expected[caller] = ok if level >= rank[role] else 403
    return expected


@dataclass
class Endpoint:
    name: str
    method: str
    path: Callable[["World"], str]
    expected: dict[str, int]
    body: Callable[["World"], dict[str, Any]] | None = None
    fresh_env: bool = False  # the call consumes its environment (delete)


class World:
    def __init__(self, people: Any, env: Environment) -> None:
        self.people, self.env = people, env
        self.extra = type(people.owner).objects.create_user("extra", "", "x" * 12)


ENV = lambda w: f"/api/v1/environments/{w.env.id}/"  # noqa: E731

ENDPOINTS = [
    Endpoint("templates list", "get", lambda w: "/api/v1/templates/", {**READ, "outsider": 200}),
    Endpoint("template detail", "get", lambda w: "/api/v1/templates/busybox/", {**READ, "outsider": 200}),
    Endpoint("template schema", "get", lambda w: "/api/v1/templates/schema/", {**READ, "outsider": 200}),
    Endpoint("environments list", "get", lambda w: "/api/v1/environments/", {**READ, "outsider": 200}),
    Endpoint("environment detail", "get", ENV, READ),
    Endpoint("environment patch", "patch", ENV, needs("admin", 200), lambda w: {"name": w.env.name}),
    Endpoint("environment delete", "delete", ENV, needs("admin", 204), fresh_env=True),
    Endpoint("start", "post", lambda w: ENV(w) + "start/", needs("member", 200)),
    Endpoint("restart", "post", lambda w: ENV(w) + "restart/", needs("member", 200)),
    Endpoint("stop", "post", lambda w: ENV(w) + "stop/", needs("member", 200)),
    Endpoint("access list", "get", lambda w: ENV(w) + "access/", READ),
    Endpoint("access grant", "post", lambda w: ENV(w) + "access/", needs("admin", 201), lambda w: {"user": "extra", "role": "viewer"}),
    Endpoint("access revoke", "delete", lambda w: ENV(w) + f"access/user-{w.extra.pk}/", needs("admin", 204)),
    Endpoint("teams", "get", lambda w: "/api/v1/teams/", {**READ, "outsider": 200}),
    Endpoint("tokens", "get", lambda w: "/api/v1/tokens/", {**READ, "outsider": 200}),
    Endpoint("me", "get", lambda w: "/api/v1/me/", {**READ, "outsider": 200}),
    Endpoint("config", "get", lambda w: "/api/v1/config/", {**READ, "outsider": 200}),
    Endpoint("ping", "post", lambda w: "/api/v1/ping/", {**READ, "outsider": 200},
             lambda w: {"client_id": "0b8f5e0e-8d0c-4a7e-9c61-1d2f1f0e2a11", "hostname": "laptop", "version": "0.1.0"}),
    Endpoint("monitor", "get", lambda w: "/api/v1/monitor/", {**READ, "outsider": 200}),
]


def caller_user(world: World, caller: str) -> Any:
    p = world.people
    return {"anonymous": None, "outsider": p.outsider, "viewer": p.viewer, "member": p.member, "admin": p.admin,
            "owner": p.owner, "team_member": p.teammate, "staff": p.staff}[caller]


def grant_roles(env: Environment, people: Any) -> None:
    grant_access(env, role=Role.VIEWER, user=people.viewer)
    grant_access(env, role=Role.MEMBER, user=people.member)
    grant_access(env, role=Role.ADMIN, user=people.admin)
    grant_access(env, role=Role.MEMBER, team=people.team)  # bob is in the team


@pytest.mark.django_db(transaction=True, serialized_rollback=True)
def test_permission_matrix(people: Any, make_env: Any) -> None:
    env = make_env(people.owner, name="matrix")
    grant_roles(env, people)
    world = World(people, env)
    template = Template.objects.get(slug="busybox")
    mismatches: list[str] = []
    for endpoint in ENDPOINTS:
        for caller in CALLERS:
            if endpoint.fresh_env:
                world.env = Environment.objects.create(name=f"doomed-{caller}", owner=people.owner, template=template,
                                                       image=template.image, status="missing", cpus=1, memory_mb=64, pids=64)
                grant_roles(world.env, people)
            grant_access(env, role=Role.VIEWER, user=world.extra)  # what "access revoke" removes
            body = endpoint.body(world) if endpoint.body else None
            client = api_client(caller_user(world, caller))
            response = getattr(client, endpoint.method)(endpoint.path(world), body, format="json")
            want = endpoint.expected[caller]
            if response.status_code != want:
                mismatches.append(f"{endpoint.name} as {caller}: got {response.status_code}, want {want}: {response.content[:200]!r}")
            elif response.status_code >= 400:
                assert "error" in response.json(), f"{endpoint.name} as {caller}: error body not JSON"
            world.env = env
    assert not mismatches, "\n".join(mismatches)


@pytest.mark.django_db(transaction=True, serialized_rollback=True)
def test_it_rejects_outsider_without_leaking(people: Any, make_env: Any) -> None:
    env = make_env(people.owner)
    client = api_client(people.outsider)
    assert client.get("/api/v1/environments/").json()["count"] == 0
    missing = client.get("/api/v1/environments/00000000-0000-0000-0000-000000000000/")
    hidden = client.get(f"/api/v1/environments/{env.id}/")
    assert hidden.status_code == missing.status_code == 404
    assert hidden.json() == missing.json()
    monitor = client.get("/api/v1/monitor/").json()
    assert monitor["environments"] == []


@pytest.mark.django_db(transaction=True, serialized_rollback=True)
def test_revoking_takes_effect_on_next_request(people: Any, make_env: Any) -> None:
    env = make_env(people.owner)
    grant = grant_access(env, role=Role.MEMBER, user=people.teammate)
    client = api_client(people.teammate)
    assert client.get(f"/api/v1/environments/{env.id}/").status_code == 200
    owner = api_client(people.owner)
    assert owner.delete(f"/api/v1/environments/{env.id}/access/{grant.id}/").status_code == 204
    assert client.get(f"/api/v1/environments/{env.id}/").status_code == 404
    assert client.post(f"/api/v1/environments/{env.id}/stop/").status_code == 404


@pytest.mark.django_db(transaction=True, serialized_rollback=True)
def test_team_grant_follows_membership(people: Any, make_env: Any) -> None:
    from accounts.services import remove_member

    env = make_env(people.owner)
    grant_access(env, role=Role.MEMBER, team=people.team)
    client = api_client(people.teammate)
    assert client.get(f"/api/v1/environments/{env.id}/").json()["role"] == "member"
    remove_member(people.team, people.teammate)
    assert client.get(f"/api/v1/environments/{env.id}/").status_code == 404


@pytest.mark.django_db(transaction=True, serialized_rollback=True)
def test_access_list_shows_roles_and_regrant_replaces(people: Any, make_env: Any) -> None:
    env = make_env(people.owner)
    owner = api_client(people.owner)
    assert owner.post(f"/api/v1/environments/{env.id}/access/", {"user": "victor", "role": "admin"}, format="json").status_code == 201
    assert owner.post(f"/api/v1/environments/{env.id}/access/", {"user": "victor", "role": "viewer"}, format="json").status_code == 201
    assert owner.post(f"/api/v1/environments/{env.id}/access/", {"team": "platform", "role": "member"}, format="json").status_code == 201
    listed = {(g["kind"], g["name"]): g["role"] for g in owner.get(f"/api/v1/environments/{env.id}/access/").json()}
    assert listed == {("user", "victor"): "viewer", ("team", "platform"): "member"}
    bad = owner.post(f"/api/v1/environments/{env.id}/access/", {"user": "victor", "team": "platform", "role": "boss"}, format="json")
    assert bad.status_code == 400 and "role" in bad.json()["error"]["fields"]
    revoke_access(env, f"user-{people.viewer.pk}")
