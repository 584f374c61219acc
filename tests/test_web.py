"""The server-rendered web app, through Django's test client (no browser).

Each page is rendered as an outsider, a viewer, a member and an admin of one
environment, and the tests check what is shown and what is hidden: a control
that a role may not use must not be rendered, and an environment the user
cannot view is a 404, never a 403.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from django.core.cache import cache
from django.test import Client

from accounts.models import APIToken, Membership, TeamRole
from environments import runtime
from environments.models import Environment, Role, Template
from environments.services import grant_access, list_access
from sessions.models import Participation, TerminalSession
from tests.conftest import api_client, wait_for_status

pytestmark = pytest.mark.usefixtures("catalog")


class World:
    """alice owns `web-env`; victor views, meg is a member, ada is admin; mallory sees nothing."""

    def __init__(self, people: Any) -> None:
        self.people = people
        template = Template.objects.get(slug="busybox")
        self.env = Environment.objects.create(
            name="web-env", owner=people.owner, template=template, image=template.image, status="stopped",
            cpus=0.5, memory_mb=256, pids=128, workspace_volume="lsl-ws-webtest",
        )
        grant_access(self.env, role=Role.VIEWER, user=people.viewer)
        grant_access(self.env, role=Role.MEMBER, user=people.member)
        grant_access(self.env, role=Role.ADMIN, user=people.admin)
        self.session = TerminalSession.objects.create(environment=self.env, environment_name=self.env.name,
                                                      name="pairing", creator=people.owner, command=["/bin/sh"])
        Participation.objects.create(session=self.session, user=people.owner, role="admin", client_kind="web")

    def client(self, who: str) -> Client:
        client = Client()
        if who != "anonymous":
            client.force_login(getattr(self.people, who))
        return client

    @property
    def env_url(self) -> str:
        return f"/environments/{self.env.id}/"


@pytest.fixture()
def world(people: Any) -> World:
    return World(people)


def html(response: Any) -> str:
    return response.content.decode()


def has_id(page: str, element_id: str) -> bool:
    return f'id="{element_id}"' in page


# --- anonymous ------------------------------------------------------------------------

@pytest.mark.django_db
def test_anonymous_is_sent_to_login_everywhere(world: World) -> None:
    client = world.client("anonymous")
    urls = ["/", world.env_url, f"{world.env_url}delete/", "/teams/", "/tokens/",
            f"/sessions/{world.session.id}/", f"/sessions/{world.session.id}/replay/"]
    for url in urls:
        response = client.get(url)
        assert response.status_code == 302, url
        assert response["Location"].startswith("/login/?next="), url
    assert client.post(f"{world.env_url}stop/").status_code == 302
    login = client.get("/login/")
    assert login.status_code == 200 and 'name="password"' in html(login)
    assert "web-env" not in html(login)


# --- dashboard ----------------------------------------------------------------------------

@pytest.mark.django_db
def test_dashboard_lists_only_visible_environments(world: World) -> None:
    hidden = Environment.objects.create(name="secret-env", owner=world.people.outsider, template=world.env.template,
                                        image="x", status="stopped", cpus=1, memory_mb=64, pids=64)
    for who in ("owner", "viewer", "member", "admin"):
        page = html(world.client(who).get("/"))
        assert world.env_url in page, who
        assert "secret-env" not in page and str(hidden.id) not in page, who
    outsider = html(world.client("outsider").get("/"))
    assert world.env_url not in outsider and "web-env" not in outsider
    assert "secret-env" in outsider
    # Live sessions and who is attached are shown to those who can see the environment.
    owner_page = html(world.client("owner").get("/"))
    assert f"/sessions/{world.session.id}/" in owner_page and "pairing" in owner_page
    assert f"/sessions/{world.session.id}/" not in outsider


@pytest.mark.django_db
def test_dashboard_filters_and_filter_choices_leak_nothing(world: World) -> None:
    from accounts.services import create_team

    other_team = create_team("Hidden Squad", owner=world.people.outsider)
    Environment.objects.create(name="squad-env", owner=world.people.outsider, team=other_team,
                               template=world.env.template, image="x", status="running", cpus=1, memory_mb=64, pids=64)
    world.env.team = world.people.team
    world.env.save()
    client = world.client("viewer")
    page = html(client.get("/"))
    assert '<option value="platform"' in page
    assert "hidden-squad" not in page  # a team only known through an invisible environment
    assert world.env_url in html(client.get("/?team=platform"))
    assert world.env_url not in html(client.get("/?template=debian"))
    assert world.env_url in html(client.get("/?template=busybox"))
    # Filtering by a status: the row is reconciled against the engine, so only check that filters apply.
    status = Environment.objects.get(pk=world.env.pk).status
    other = "creating" if status != "creating" else "error"
    assert world.env_url not in html(client.get(f"/?status={other}"))


@pytest.mark.django_db
def test_new_environment_form_validates_and_creates(world: World) -> None:
    client = world.client("teammate")
    page = html(client.get("/"))
    assert 'name="template"' in page and '<option value="busybox"' in page
    assert '<option value="platform"' in page  # bob's team

    bad = client.post("/environments/new/", {"template": "busybox", "name": "not a slug!", "network_mode": ""})
    assert bad.status_code == 400 and "field-error" in html(bad)
    wrong_net = client.post("/environments/new/", {"template": "busybox", "name": "netty", "network_mode": "none"})
    assert wrong_net.status_code == 302  # busybox allows none
    foreign_team = client.post("/environments/new/", {"template": "busybox", "name": "x2", "team": "nope"})
    assert foreign_team.status_code == 400

    response = client.post("/environments/new/", {"template": "busybox", "name": "web-made", "team": "platform"})
    assert response.status_code == 302
    env = Environment.objects.get(owner=world.people.teammate, name="web-made")
    assert response["Location"] == f"/environments/{env.id}/"
    assert env.team == world.people.team and env.status == "creating"
    page = html(client.get(response["Location"]))
    assert has_id(page, "env-progress") and 'id="env-progress" class="progress" hidden' not in page

    duplicate = client.post("/environments/new/", {"template": "busybox", "name": "web-made"})
    assert duplicate.status_code == 400 and "already have an environment named" in html(duplicate)


# --- environment page ----------------------------------------------------------------------

CONTROLS = ["btn-start", "btn-delete", "share-form", "open-terminal"]


@pytest.mark.django_db
def test_environment_page_by_role(world: World) -> None:
    assert world.client("outsider").get(world.env_url).status_code == 404
    assert world.client("outsider").get("/environments/00000000-0000-0000-0000-000000000000/").status_code == 404

    status = Environment.objects.get(pk=world.env.pk).status
    viewer = html(world.client("viewer").get(world.env_url))
    assert "web-env" in viewer and "you are viewer" in viewer
    for control in CONTROLS + ["btn-stop", "btn-restart"]:
        assert not has_id(viewer, control), f"viewer sees {control}"
    assert "Revoke" not in viewer and 'name="role"' not in viewer
    assert "victor" in viewer and "ada" in viewer  # the access list itself is visible to viewers

    member = html(world.client("member").get(world.env_url))
    assert has_id(member, "btn-start") and has_id(member, "open-terminal")
    assert not has_id(member, "btn-delete") and not has_id(member, "share-form") and "Revoke" not in member

    for who in ("admin", "owner"):
        page = html(world.client(who).get(world.env_url))
        assert status == "creating" or has_id(page, "btn-start"), who
        assert has_id(page, "btn-delete") and has_id(page, "share-form"), who
        assert page.count('class="small danger revoke"') == 3, who


@pytest.mark.django_db
def test_environment_writes_need_the_role(world: World) -> None:
    urls = [f"{world.env_url}start/", f"{world.env_url}stop/", f"{world.env_url}restart/", f"{world.env_url}delete/",
            f"{world.env_url}share/", f"{world.env_url}access/user-{world.people.viewer.pk}/revoke/"]
    for url in urls:
        assert world.client("outsider").post(url, {"kind": "user", "name": "mallory", "role": "admin"}).status_code == 404, url
        assert world.client("viewer").post(url, {"kind": "user", "name": "victor", "role": "admin"}).status_code == 403, url
    for url in urls[3:]:
        assert world.client("member").post(url, {"kind": "user", "name": "meg", "role": "admin"}).status_code == 403, url
    denied = world.client("member").get(f"{world.env_url}delete/")
    assert denied.status_code == 403 and "needs the admin role" in html(denied)
    assert world.client("viewer").get(f"{world.env_url}bogus/").status_code == 405  # actions are POST-only
    assert world.client("member").post(f"{world.env_url}bogus/").status_code == 404
    # Nothing changed.
    assert {(g.name, g.role) for g in list_access(world.env)} == {("victor", Role.VIEWER), ("meg", Role.MEMBER), ("ada", Role.ADMIN)}
    assert Environment.objects.filter(pk=world.env.pk).exists()


@pytest.mark.django_db
def test_admin_shares_and_revokes(world: World) -> None:
    admin = world.client("admin")
    response = admin.post(f"{world.env_url}share/", {"kind": "user", "name": "bob", "role": "member"}, follow=True)
    assert "bob is now member" in html(response)
    assert world.client("teammate").get(world.env_url).status_code == 200

    team = admin.post(f"{world.env_url}share/", {"kind": "team", "name": "platform", "role": "viewer"}, follow=True)
    assert "platform is now viewer" in html(team)
    bad = admin.post(f"{world.env_url}share/", {"kind": "user", "name": "nobody", "role": "viewer"}, follow=True)
    assert "No active user named" in html(bad)
    owner = admin.post(f"{world.env_url}share/", {"kind": "user", "name": "alice", "role": "viewer"}, follow=True)
    assert "always admin" in html(owner)

    revoke = admin.post(f"{world.env_url}access/user-{world.people.teammate.pk}/revoke/", follow=True)
    assert "Access revoked" in html(revoke)
    admin.post(f"{world.env_url}access/team-{world.people.team.pk}/revoke/")
    assert world.client("teammate").get(world.env_url).status_code == 404
    assert "web-env" not in html(world.client("teammate").get("/"))


@pytest.mark.django_db
def test_delete_confirmation_keeps_or_purges(world: World) -> None:
    page = html(world.client("admin").get(f"{world.env_url}delete/"))
    assert 'name="purge"' in page and "lsl-ws-webtest" in page
    # The row has no container, so deleting touches the engine only for the volume (purge=False here).
    response = world.client("admin").post(f"{world.env_url}delete/")
    assert response.status_code == 302 and response["Location"] == "/"
    assert not Environment.objects.filter(pk=world.env.pk).exists()
    assert world.client("admin").get(world.env_url).status_code == 404


# --- terminal and replay pages -------------------------------------------------------------

@pytest.mark.django_db
def test_session_pages_follow_environment_visibility(world: World) -> None:
    for suffix in ("", "replay/"):
        url = f"/sessions/{world.session.id}/{suffix}"
        assert world.client("outsider").get(url).status_code == 404, url
        for who in ("viewer", "member", "owner"):
            assert world.client(who).get(url).status_code == 200, (who, url)
    page = html(world.client("viewer").get(f"/sessions/{world.session.id}/"))
    assert has_id(page, "role-badge") and has_id(page, "participants") and "frontend/dist/terminal.js" in page
    replay = html(world.client("viewer").get(f"/sessions/{world.session.id}/replay/"))
    assert f"/api/v1/sessions/{world.session.id}/recording/" in replay and "frontend/dist/player.js" in replay
    assert "Watch live" in replay and "Join live" not in replay
    assert world.client("viewer").get("/sessions/00000000-0000-0000-0000-000000000000/").status_code == 404
    orphan = TerminalSession.objects.create(environment=None, environment_name="gone", creator=world.people.owner)
    assert world.client("owner").get(f"/sessions/{orphan.id}/").status_code == 404


# --- teams ----------------------------------------------------------------------------------

@pytest.mark.django_db
def test_teams_page_and_membership_management(world: World) -> None:
    team = world.people.team
    owner_page = html(world.client("owner").get("/teams/"))
    assert "Platform" in owner_page and "bob" in owner_page and "add-member" in owner_page
    member_page = html(world.client("teammate").get("/teams/"))
    assert "Platform" in member_page and "add-member" not in member_page and "remove-member" not in member_page
    assert "Platform" not in html(world.client("outsider").get("/teams/"))

    assert world.client("teammate").post(f"/teams/{team.slug}/members/", {"username": "victor", "role": "member"}).status_code == 403
    assert world.client("outsider").post(f"/teams/{team.slug}/members/", {"username": "victor", "role": "member"}).status_code == 404
    added = world.client("owner").post(f"/teams/{team.slug}/members/", {"username": "victor", "role": "maintainer"}, follow=True)
    assert "victor is now maintainer" in html(added)
    assert Membership.objects.get(team=team, user=world.people.viewer).role == TeamRole.MAINTAINER
    # A maintainer manages members too; nobody can remove the last owner.
    maintainer = world.client("viewer")
    assert maintainer.post(f"/teams/{team.slug}/members/bob/remove/").status_code == 302
    assert not Membership.objects.filter(team=team, user=world.people.teammate).exists()
    last_owner = maintainer.post(f"/teams/{team.slug}/members/alice/remove/", follow=True)
    assert "last owner" in html(last_owner)
    assert Membership.objects.filter(team=team, user=world.people.owner).exists()


# --- API tokens --------------------------------------------------------------------------------

@pytest.mark.django_db
def test_tokens_are_shown_once_and_revocable(world: World) -> None:
    client = world.client("owner")
    assert "No tokens yet" in html(client.get("/tokens/"))
    created = client.post("/tokens/", {"name": "laptop"})
    assert created.status_code == 200 and created["Cache-Control"] == "no-store"
    key = re.search(r'<code id="token-key">([^<]+)</code>', html(created)).group(1)
    assert key.startswith("lsl_")
    api = api_client()
    api.credentials(HTTP_AUTHORIZATION=f"Token {key}")
    assert api.get("/api/v1/me/").json()["username"] == "alice"

    listing = html(client.get("/tokens/"))
    assert "laptop" in listing and key not in listing and "never" in listing
    duplicate = client.post("/tokens/", {"name": "laptop"})
    assert duplicate.status_code == 400 and "already have a live token" in html(duplicate)

    token = APIToken.objects.get(user=world.people.owner, name="laptop")
    assert world.client("outsider").post(f"/tokens/{token.pk}/revoke/").status_code == 404
    client.post(f"/tokens/{token.pk}/revoke/")
    assert api.get("/api/v1/me/").status_code == 401
    assert "revoked" in html(client.get("/tokens/"))


# --- login throttling -------------------------------------------------------------------------

@pytest.mark.django_db
def test_login_locks_after_five_failures(world: World) -> None:
    cache.clear()
    client = Client(REMOTE_ADDR="10.0.0.7")
    for _ in range(4):
        response = client.post("/login/", {"username": "alice", "password": "wrong"})
        assert response.status_code == 200 and "correct username and password" in html(response)
    fifth = client.post("/login/", {"username": "alice", "password": "wrong"})
    assert "Too many failed sign-in attempts" in html(fifth)
    # Even the right password is refused while locked…
    locked = client.post("/login/", {"username": "alice", "password": "password-alice"})
    assert locked.status_code == 200 and "Too many failed sign-in attempts" in html(locked)
    assert "_auth_user_id" not in client.session
    # …but only for that username from that address.
    other_ip = Client(REMOTE_ADDR="10.0.0.8")
    assert other_ip.post("/login/", {"username": "alice", "password": "password-alice"}).status_code == 302
    assert Client(REMOTE_ADDR="10.0.0.7").post("/login/", {"username": "bob", "password": "password-bob"}).status_code == 302
    cache.clear()
    assert client.post("/login/", {"username": "alice", "password": "password-alice"}).status_code == 302


@pytest.mark.django_db
def test_successful_login_resets_the_failure_count(world: World) -> None:
    cache.clear()
    client = Client(REMOTE_ADDR="10.0.0.9")
    for _ in range(4):
        client.post("/login/", {"username": "bob", "password": "wrong"})
    assert client.post("/login/", {"username": "bob", "password": "password-bob"}).status_code == 302
    client.post("/logout/")
    for _ in range(4):
        response = client.post("/login/", {"username": "bob", "password": "wrong"})
        assert "Too many" not in html(response)
    cache.clear()


# --- start / stop against the real engine ---------------------------------------------------------

@pytest.mark.django_db(transaction=True, serialized_rollback=True)  # keeps content-type ids stable for live servers
def test_start_stop_restart_through_the_web(people: Any, make_env: Any) -> None:
    env = make_env(people.owner, name="web-lifecycle")
    assert env.status == "running"
    client = Client()
    client.force_login(people.owner)
    url = f"/environments/{env.id}/"
    page = html(client.get(url))
    assert has_id(page, "btn-stop") and has_id(page, "btn-restart") and not has_id(page, "btn-start")

    stopped = client.post(f"{url}stop/", follow=True)
    assert "web-lifecycle stopped" in html(stopped) and has_id(html(stopped), "btn-start")
    assert wait_for_status(env.id, "stopped").status == "stopped"
    started = client.post(f"{url}start/", follow=True)
    assert "web-lifecycle started" in html(started)
    assert Environment.objects.get(pk=env.id).status == "running"
    assert "restarted" in html(client.post(f"{url}restart/", follow=True))

    # Engine errors become a message, not a 500.
    Environment.objects.filter(pk=env.id).update(container_id="")
    failed = client.post(f"{url}stop/", follow=False)
    assert failed.status_code == 302
    assert "Could not stop" in html(client.get(url))

    # The page's delete (with purge) removes the container and the workspace volume.
    Environment.objects.filter(pk=env.id).update(container_id=env.container_id)
    assert client.post(f"{url}delete/", {"purge": "on"}).status_code == 302
    assert runtime.local().container_state(env.container_id) is None
    assert not runtime.local().volume_exists(env.workspace_volume)


# --- monitoring ------------------------------------------------------------------------------

@pytest.mark.django_db
def test_monitor_page_is_for_staff(world: World) -> None:
    staff = world.client("staff")
    page = html(staff.get("/monitor/"))
    for tile in ("host-cpu", "host-memory", "host-disk", "host-engine", "chart-host-cpu", "chart-env-cpu", "monitor-envs"):
        assert has_id(page, tile), tile
    assert f'data-env="{world.env.id}"' in page and "pairing" in page  # every environment, with its live sessions
    assert f'href="/environments/{world.env.id}/monitor/"' in page
    # The bundle, and page.js to start it (data-page says how: templates carry no inline script).
    assert "frontend/dist/monitor.js" in page and "frontend/dist/page.js" in page and 'data-page="monitor"' in page
    assert 'id="nav-monitor"' in page

    for who in ("owner", "viewer", "admin", "outsider"):
        response = world.client(who).get("/monitor/")
        assert response.status_code == 403, who
        assert "host-cpu" not in html(response), who
        assert 'id="nav-monitor"' not in html(world.client(who).get("/")), who
    anonymous = world.client("anonymous").get("/monitor/")
    assert anonymous.status_code == 302 and anonymous["Location"].startswith("/login/")


@pytest.mark.django_db
def test_environment_monitor_page_follows_visibility(world: World) -> None:
    url = f"{world.env_url}monitor/"
    for who in ("viewer", "member", "admin", "owner", "staff"):
        response = world.client(who).get(url)
        assert response.status_code == 200, who
        page = html(response)
        for element in ("env-cpu", "env-memory", "env-network", "env-pids", "env-uptime", "chart-cpu", "monitor-sessions"):
            assert has_id(page, element), (who, element)
        assert "host-cpu" not in page and "host-disk" not in page  # host figures are for the staff page only
        assert "pairing" in page and "alice · admin · web" in page
    assert world.client("outsider").get(url).status_code == 404
    assert world.client("viewer").get("/environments/00000000-0000-0000-0000-000000000000/monitor/").status_code == 404
    assert world.client("anonymous").get(url).status_code == 302
    # Reached from the environment page, by anyone who can see it.
    assert f'href="{url}"' in html(world.client("viewer").get(world.env_url))


@pytest.mark.django_db
def test_monitor_api_reports_live_sessions_and_participants(world: World) -> None:
    people = world.people
    Participation.objects.create(session=world.session, user=people.viewer, role="viewer", client_kind="cli")
    Participation.objects.create(session=world.session, user=people.member, role="member", client_kind="web",
                                 left_at=world.session.created_at)  # gone again
    TerminalSession.objects.create(environment=world.env, environment_name=world.env.name, name="old",
                                   creator=people.owner, ended_at=world.session.created_at)

    data = api_client(people.viewer).get("/api/v1/monitor/").json()
    [env] = [e for e in data["environments"] if e["id"] == str(world.env.id)]
    assert env["sessions"] == [{
        "id": str(world.session.id), "name": "pairing", "created_at": env["sessions"][0]["created_at"],
        "participants": [{"user": "alice", "role": "admin", "client": "web"}, {"user": "victor", "role": "viewer", "client": "cli"}],
    }]
    assert env["limits"] == {"cpus": 0.5, "memory_bytes": 256 * 1024 * 1024, "pids": 128}

    # ?environment= narrows to one, still filtered by permission.
    one = api_client(people.viewer).get(f"/api/v1/monitor/?environment={world.env.id}")
    assert one.status_code == 200 and [e["id"] for e in one.json()["environments"]] == [str(world.env.id)]
    for who, env_id in (("outsider", world.env.id), ("viewer", "00000000-0000-0000-0000-000000000000"), ("viewer", "nope")):
        response = api_client(getattr(people, who)).get(f"/api/v1/monitor/?environment={env_id}")
        assert response.status_code == 404, (who, env_id)
    assert api_client(people.outsider).get("/api/v1/monitor/").json()["environments"] == []
    quick = api_client(people.viewer).get("/api/v1/monitor/?stats=0").json()
    assert all(e["stats"] is None for e in quick["environments"]) and "engine" not in quick["host"]


@pytest.mark.django_db
def test_monitor_api_query_count_does_not_grow_with_sessions(world: World) -> None:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    client = api_client(world.people.staff)

    def queries() -> int:
        client.get("/api/v1/monitor/?stats=0")  # the first call may reconcile (write) statuses
        with CaptureQueriesContext(connection) as captured:
            assert client.get("/api/v1/monitor/?stats=0").status_code == 200
        return len(captured)

    before = queries()
    for i in range(5):
        env = Environment.objects.create(name=f"more-{i}", owner=world.people.owner, template=world.env.template,
                                         image="x", status="stopped", cpus=1, memory_mb=64, pids=64)
        for j in range(3):
            session = TerminalSession.objects.create(environment=env, environment_name=env.name, name=f"s{j}",
                                                     creator=world.people.owner)
            for user in (world.people.owner, world.people.viewer):
                Participation.objects.create(session=session, user=user, role="admin", client_kind="web")
    assert queries() == before


@pytest.mark.django_db
def test_dashboard_refreshes_itself(world: World) -> None:
    """It follows the event stream from the id read before its rows (so nothing between is missed)."""
    from lsl_site.events import latest_id

    page = html(world.client("viewer").get("/"))
    assert has_id(page, "events-since") and "frontend/dist/dashboard.js" in page
    assert f'<script id="events-since" type="application/json">{latest_id()}</script>' in page


# --- team creation ---------------------------------------------------------------------------

@pytest.mark.django_db
def test_anyone_can_create_a_team_and_owns_it(world: World) -> None:
    from accounts.models import Team

    client = world.client("outsider")
    assert has_id(html(client.get("/teams/")), "team-create-form")
    created = client.post("/teams/new/", {"name": "  Data Platform "})
    assert created.status_code == 302 and created["Location"] == "/teams/#team-data-platform"
    team = Team.objects.get(slug="data-platform")
    assert team.name == "Data Platform"
    assert Membership.objects.get(team=team, user=world.people.outsider).role == TeamRole.OWNER
    assert world.people.outsider.groups.filter(pk=team.group_id).exists()
    page = html(client.get("/teams/"))
    assert "Team Data Platform created" in page and 'id="team-data-platform"' in page and "add-member" in page

    for name in ("Data Platform", "data platform", "Data-Platform!", "platform"):
        duplicate = client.post("/teams/new/", {"name": name})
        assert duplicate.status_code == 400, name
        assert "already exists" in html(duplicate) and has_id(html(duplicate), "team-create-errors"), name
    assert client.post("/teams/new/", {"name": "!!!"}).status_code == 400
    assert client.post("/teams/new/", {"name": ""}).status_code == 400
    assert client.get("/teams/new/").status_code == 405
    assert world.client("anonymous").post("/teams/new/", {"name": "Sneaky"}).status_code == 302
    assert Team.objects.count() == 2  # Platform and Data Platform


@pytest.mark.django_db(transaction=True, serialized_rollback=True)
def test_start_refused_by_quota_shows_the_message_not_a_500(people: Any, make_env: Any) -> None:
    from django.test.utils import override_settings

    from environments import services

    first = make_env(people.owner, name="web-quota-1")
    services.stop_environment(first)
    make_env(people.owner, name="web-quota-2")  # 0.5 CPU running
    client = Client()
    client.force_login(people.owner)
    url = f"/environments/{first.id}/"
    with override_settings(LSL_QUOTA_USER_CPUS=0.5):
        refused = client.post(f"{url}start/", follow=True)
    assert refused.status_code == 200
    page = html(refused)
    assert "Could not start web-quota-1" in page and "quota exceeded: cpus:" in page
    assert Environment.objects.get(pk=first.id).status == "stopped"


def html_of(client: Client, url: str) -> str:
    response = client.get(url)
    assert response.status_code == 200, (url, response.status_code)
    return response.content.decode()


def test_dashboard_and_environment_page_show_failures_as_failures(world: World) -> None:
    template = world.env.template
    failed = Environment.objects.create(name="broken", owner=world.people.owner, template=template, image=template.image,
                                        status="error", last_error="container could not start: no such image",
                                        cpus=0.5, memory_mb=256, pids=128, workspace_volume="lsl-ws-broken")
    Environment.objects.filter(pk=world.env.pk).update(stop_reason="disk", last_error="disk limit exceeded")
    page = html_of(world.client("owner"), "/")
    broken_row = re.search(rf'<tr data-env="{failed.id}" class="([^"]*)">(.*?)</tr>', page, re.S)
    assert broken_row and broken_row.group(1) == "error"
    assert "status-error" in broken_row.group(2) and "container could not start: no such image" in broken_row.group(2)
    disk_row = re.search(rf'<tr data-env="{world.env.id}" class="([^"]*)">(.*?)</tr>', page, re.S)
    assert disk_row and disk_row.group(1) == "failed"
    assert "status-stopped status-failed" in disk_row.group(2)
    assert "disk limit" in disk_row.group(2) and "disk limit exceeded" in disk_row.group(2)
    detail = html_of(world.client("owner"), world.env_url)
    assert re.search(r'id="env-status" class="status status-stopped status-failed"', detail)
    assert "disk limit exceeded" in detail
    # A plain stop is no failure.
    Environment.objects.filter(pk=world.env.pk).update(stop_reason="stopped", last_error="")
    page = html_of(world.client("owner"), "/")
    assert f'<tr data-env="{world.env.id}" class="">' in page and "status-failed" not in page.split("broken")[0]


def test_nav_admin_link_only_for_staff_and_docs_for_everyone(world: World) -> None:
    staff = html_of(world.client("staff"), "/")
    assert 'id="nav-admin"' in staff and 'href="/admin/"' in staff
    for who in ("owner", "member", "viewer"):
        page = html_of(world.client(who), "/")
        assert 'id="nav-admin"' not in page
        assert 'id="nav-docs"' in page and 'href="/docs/"' in page
    assert 'id="nav-docs"' in html_of(world.client("anonymous"), "/login/")


def test_favicon_is_linked_and_served(world: World) -> None:
    from django.contrib.staticfiles import finders

    page = html_of(world.client("owner"), "/")
    icon = re.search(r'<link rel="icon" href="([^"]+)"', page)
    assert icon and icon.group(1).endswith("frontend/favicon.svg")
    assert finders.find("frontend/favicon.svg")
    response = world.client("anonymous").get("/favicon.ico")
    assert response.status_code == 301 and response["Location"] == icon.group(1)


def test_dates_are_time_elements_in_utc_for_the_browser_to_localize(world: World) -> None:
    page = html_of(world.client("owner"), world.env_url)
    created = re.search(r'<dt>Created</dt><dd><time datetime="([^"]+)">([^<]+)</time>', page)
    assert created and created.group(1).endswith("+00:00") and created.group(2).endswith(" UTC")
    assert world.env.created_at.strftime("%Y-%m-%d %H:%M") in created.group(2)
    world.client("owner").post("/tokens/", {"name": "dated", "expires_in_days": 30})
    tokens = html_of(world.client("owner"), "/tokens/")
    assert re.search(r'<time datetime="[^"]+" data-date>\d{4}-\d\d-\d\d</time>', tokens)  # expiry: a day
    assert "<time datetime=" in html_of(world.client("owner"), "/teams/") or "no-teams" in html_of(world.client("owner"), "/teams/")


def test_monitor_page_says_how_metrics_are_reached(world: World) -> None:
    page = html_of(world.client("staff"), "/monitor/")
    assert "loopback" not in page
    assert "Authorization: Bearer $LSL_METRICS_TOKEN" in page


def test_terminal_page_knows_whether_the_user_may_open_a_new_terminal(world: World) -> None:
    url = f"/sessions/{world.session.id}/"
    assert 'data-can-open="true"' in html_of(world.client("member"), url)
    assert 'data-can-open="false"' in html_of(world.client("viewer"), url)
    page = html_of(world.client("member"), url)
    for control in ("term-copy", "term-search", "term-font-down", "term-font-up", "size-cue"):
        assert f'id="{control}"' in page
