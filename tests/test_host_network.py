"""Issue 12: a host-network environment is no back door to host networking.

The probe: staff create a host-network environment and share it with a plain member, who can then
reach the host's loopback-only services (/metrics, a Redis on 127.0.0.1) from a shell. Now a role
that runs commands (member, admin) there needs the host-network right: granting it is refused,
and whoever holds it anyway (through a team, a right taken away later, or ownership) is held at
viewer whenever a role is worked out. Viewers may still watch.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.test import Client
from django.urls import reverse

from accounts.models import Profile
from environments.models import Environment, NetworkMode, Role, Template
from environments.permissions import role_for
from environments.services import grant_access, list_access
from lsl_site.errors import DomainError
from lsl_site.models import Event
from tests.conftest import api_client, docker_cli

pytestmark = pytest.mark.usefixtures("catalog")


def db_env(owner: Any, name: str, *, network: str = NetworkMode.HOST, team: Any = None) -> Environment:
    """A row without a container: role checks come before anything asks the engine."""
    template = Template.objects.get(slug="busybox")
    return Environment.objects.create(name=name, owner=owner, team=team, template=template, image=template.image,
                                      status="stopped", cpus=0.5, memory_mb=64, pids=64, network_mode=network)


def allow_host_network(user: Any, allowed: bool = True) -> None:
    profile = Profile.for_user(user)
    profile.allow_host_network = allowed
    profile.save()


def exec_status(user: Any, env: Environment) -> int:
    """403 when the role check refuses; 409 (not running) means the member role was granted."""
    return api_client(user).post(f"/api/v1/environments/{env.id}/exec/", {"command": ["true"]}, format="json").status_code


def command_doors(user: Any, env: Environment) -> dict[str, int]:
    """Every way to run something in an environment, as status codes (all need the member role)."""
    client = api_client(user)
    base = f"/api/v1/environments/{env.id}"
    return {
        "exec": exec_status(user, env),
        "session": client.post(f"{base}/sessions/", {}, format="json").status_code,
        "files": client.put(f"{base}/files/?path=/tmp/x", data=b"x", content_type="application/octet-stream").status_code,
        "start": client.post(f"{base}/start/").status_code,
    }


REFUSED = {"exec": 403, "session": 403, "files": 403, "start": 403}


# --- granting -----------------------------------------------------------------------------------

@pytest.mark.django_db
def test_granting_a_command_role_to_a_user_without_the_right_is_refused(people: Any) -> None:
    env = db_env(people.staff, "hostnet")
    staff = api_client(people.staff)
    for role in ("member", "admin"):
        response = staff.post(f"/api/v1/environments/{env.id}/access/", {"user": "mallory", "role": role}, format="json")
        assert response.status_code == 403, response.content
        error = response.json()["error"]
        assert error["code"] == "host_network_not_allowed"
        [message] = error["fields"]["user"]
        assert message == error["detail"]
        assert f"'mallory' cannot be given the {role} role on 'hostnet': it is a host-network environment" in message
        assert "profile does not allow host networking" in message and "viewer" in message
    assert list_access(env) == []  # nothing half-written
    # Watching is fine.
    viewer = staff.post(f"/api/v1/environments/{env.id}/access/", {"user": "mallory", "role": "viewer"}, format="json")
    assert viewer.status_code == 201 and viewer.json()["role"] == "viewer"
    # An existing viewer grant is no foothold either: raising it is refused and leaves it as it was.
    with pytest.raises(DomainError) as refused:
        grant_access(env, role=Role.MEMBER, user=people.outsider)
    assert refused.value.status == 403
    assert [(g.name, g.role) for g in list_access(env)] == [("mallory", Role.VIEWER)]


@pytest.mark.django_db
def test_users_with_the_right_and_bridge_environments_are_unaffected(people: Any) -> None:
    env = db_env(people.staff, "hostnet")
    allow_host_network(people.member)
    assert grant_access(env, role=Role.MEMBER, user=people.member).role == Role.MEMBER
    assert exec_status(people.member, env) == 409  # past the role check: only "not running" stops it
    staff_peer = type(people.staff).objects.create_user("sam", is_staff=True)
    assert grant_access(env, role=Role.ADMIN, user=staff_peer).role == Role.ADMIN  # staff always may
    bridge = db_env(people.owner, "plain", network=NetworkMode.BRIDGE)
    assert grant_access(bridge, role=Role.ADMIN, user=people.outsider).role == Role.ADMIN
    assert exec_status(people.outsider, bridge) == 409


@pytest.mark.django_db
def test_web_share_form_shows_the_refusal(people: Any) -> None:
    env = db_env(people.staff, "hostnet")
    browser = Client()
    browser.force_login(people.staff)
    response = browser.post(reverse("environment-share", args=[env.id]), {"kind": "user", "name": "mallory", "role": "member"},
                            follow=True)
    assert response.status_code == 200
    shown = [str(m) for m in response.context["messages"]]
    assert any("'mallory' cannot be given the member role" in m and "host networking" in m for m in shown), shown
    assert list_access(env) == []


@pytest.mark.django_db
def test_admin_object_permission_page_refuses_too(people: Any) -> None:
    """guardian's admin page writes permissions directly: it must not be the way around the rule."""
    from django.contrib.auth.models import Permission

    env = db_env(people.staff, "hostnet")
    root = type(people.owner).objects.create_superuser("root", "", "root-password-123")
    admin = Client()
    admin.force_login(root)
    url = reverse("admin:environments_environment_permissions_manage_user", args=[env.pk, people.outsider.pk])
    response = admin.post(url, {"permissions": ["view_environment", "use_environment"]})
    assert response.status_code == 200  # the form again, with the error, not a redirect
    assert b"cannot be given the member role" in response.content and b"host networking" in response.content
    assert list_access(env) == []
    # A viewer's permission goes through.
    response = admin.post(url, {"permissions": ["view_environment"]})
    assert response.status_code == 302, response.content[:500]
    assert [(g.name, g.role) for g in list_access(env)] == [("mallory", Role.VIEWER)]
    assert Permission.objects.filter(codename="use_environment").exists()  # the refusal was not for lack of it


# --- using (the role is worked out on every check) -------------------------------------------------

@pytest.mark.django_db
def test_team_members_without_the_right_only_watch(people: Any) -> None:
    """A team environment grants its team the member role: on the host network that must not give bob a shell."""
    allow_host_network(people.owner)
    env = db_env(people.owner, "team-hostnet", team=people.team)
    grant_access(env, role=Role.MEMBER, team=people.team)  # what create_environment does for a team environment
    assert role_for(people.teammate, env) == Role.VIEWER
    bob = api_client(people.teammate)
    assert bob.get(f"/api/v1/environments/{env.id}/").json()["role"] == "viewer"
    assert bob.get(f"/api/v1/environments/{env.id}/sessions/").status_code == 200  # watching still works
    assert command_doors(people.teammate, env) == REFUSED
    refusal = api_client(people.teammate).post(f"/api/v1/environments/{env.id}/exec/", {"command": ["id"]}, format="json")
    assert "host-network environment" in refusal.json()["error"]["detail"], refusal.json()
    # A team admin grant changes nothing.
    grant_access(env, role=Role.ADMIN, team=people.team)
    assert role_for(people.teammate, env) == Role.VIEWER
    assert bob.delete(f"/api/v1/environments/{env.id}/").status_code == 403
    # With the right, the team grant counts in full.
    allow_host_network(people.teammate)
    assert role_for(people.teammate, env) == Role.ADMIN
    assert exec_status(people.teammate, env) == 409


@pytest.mark.django_db
def test_a_right_taken_away_later_takes_effect_at_once(people: Any) -> None:
    env = db_env(people.staff, "hostnet")
    allow_host_network(people.member)
    grant_access(env, role=Role.MEMBER, user=people.member)
    assert exec_status(people.member, env) == 409
    allow_host_network(people.member, False)
    assert command_doors(people.member, env) == REFUSED
    assert api_client(people.member).get(f"/api/v1/environments/{env.id}/").json()["role"] == "viewer"
    # The owner too: an environment made while allowed is no way to keep the right.
    allow_host_network(people.owner)
    own = db_env(people.owner, "mine")
    assert role_for(people.owner, own) == Role.ADMIN
    allow_host_network(people.owner, False)
    assert role_for(people.owner, own) == Role.VIEWER
    assert command_doors(people.owner, own) == REFUSED
    # Staff status is the right as well, and losing it counts too.
    type(people.staff).objects.filter(pk=people.staff.pk).update(is_staff=False)
    people.staff.refresh_from_db()
    assert role_for(people.staff, env) == Role.VIEWER


@pytest.mark.django_db
def test_live_terminals_are_told_when_the_right_changes(people: Any) -> None:
    """Terminals re-check their role on `access.changed` for their environment (sessions.consumers):
    changing a profile's right must send one for each host-network environment the user can see."""
    hostnet = db_env(people.staff, "hostnet")
    db_env(people.staff, "bridged", network=NetworkMode.BRIDGE)
    allow_host_network(people.member)
    grant_access(hostnet, role=Role.MEMBER, user=people.member)
    grant_access(Environment.objects.get(name="bridged"), role=Role.MEMBER, user=people.member)
    before = Event.objects.order_by("-id").values_list("id", flat=True).first() or 0
    allow_host_network(people.member, False)
    sent = list(Event.objects.filter(id__gt=before, kind="access.changed"))
    assert [(str(e.environment_id), e.payload) for e in sent] == [
        (str(hostnet.id), {"subject": f"user-{people.member.pk}", "role": "viewer"})]
    assert people.member.pk in sent[0].user_ids
    # Saving the profile without changing the right sends nothing.
    Profile.for_user(people.member).save()
    assert not Event.objects.filter(id__gt=sent[0].id, kind="access.changed").exists()


# --- on the engine: the probe's own steps ----------------------------------------------------------

@pytest.mark.django_db(transaction=True, serialized_rollback=True)
def test_probe_a_shared_host_network_environment_gives_no_shell(people: Any, make_env: Any) -> None:
    from tests.test_host_integration import run

    env = make_env(people.staff, name="shared-hostnet", network_mode="host")
    assert env.status == "running" and env.network_mode == "host", env.last_error
    assert docker_cli("inspect", "-f", "{{.HostConfig.NetworkMode}}", env.container_id).stdout.strip() == "host"
    staff = api_client(people.staff)
    refused = staff.post(f"/api/v1/environments/{env.id}/access/", {"user": "mallory", "role": "member"}, format="json")
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "host_network_not_allowed"
    assert staff.post(f"/api/v1/environments/{env.id}/access/", {"user": "mallory", "role": "viewer"},
                      format="json").status_code == 201
    mallory = api_client(people.outsider)
    probe = mallory.post(f"/api/v1/environments/{env.id}/exec/",
                         {"command": ["wget", "-qO-", "http://127.0.0.1:8000/metrics"]}, format="json")
    assert probe.status_code == 403, probe.content
    assert json.loads(probe.content)["error"]["code"] == "permission_denied"
    assert mallory.post(f"/api/v1/environments/{env.id}/sessions/", {}, format="json").status_code == 403
    watched = mallory.get(f"/api/v1/environments/{env.id}/files/?path=/workspace")
    assert watched.status_code == 200, watched.content  # watching
    # Given the right, the same person may use it.
    allow_host_network(people.outsider)
    assert staff.post(f"/api/v1/environments/{env.id}/access/", {"user": "mallory", "role": "member"},
                      format="json").status_code == 201
    assert run(env, "true", user=people.outsider)[0] == 0


@pytest.mark.django_db(transaction=True, serialized_rollback=True)
def test_a_live_terminal_loses_typing_when_the_right_is_taken_away(people: Any, make_env: Any, live_server_proc: Any) -> None:
    import requests

    from tests.conftest import make_token
    from tests.wsclient import TermClient

    env = make_env(people.staff, name="live-hostnet", network_mode="host")
    allow_host_network(people.member)
    grant_access(env, role=Role.MEMBER, user=people.member)
    token = make_token(people.member)
    opened = requests.post(f"{live_server_proc.url}/api/v1/environments/{env.id}/sessions/",
                           headers={"Authorization": f"Token {token}"}, json={}, timeout=30)
    assert opened.status_code == 201, opened.text
    meg = TermClient(opened.json()["ws_url"], token=token)
    try:
        assert meg.wait_event("hello")["can_write"] is True
        meg.wait_event("snapshot")
        meg.send_input("echo typed-$((6*7))\r")
        meg.wait_output(b"typed-42")
        allow_host_network(people.member, False)  # an administrator takes the right away
        demoted = meg.wait_event("hello", role="viewer")
        assert demoted["can_write"] is False
        meg.send_input("echo sneaked-$((6*7))\r")
        meg.send_input("echo typed-$((7*7))\r")
        with pytest.raises(AssertionError):
            meg.wait_output(b"sneaked-42", timeout=3)
        assert b"typed-49" not in bytes(meg.output)
    finally:
        meg.close()
