"""Ports around the byte pipe: the ports API, public preview links, the catalog's `ports`, the
metrics, the admin and the CLI's `lsl ports` / `lsl preview ...`.

The worker's scan against a real container is tests/test_ports_worker.py; who may call which route
is also in tests/test_permissions.py's matrix.
"""

from __future__ import annotations

import json
import textwrap
import uuid
from pathlib import Path
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from environments import catalog as catalog_module
from environments.models import (
    Environment,
    NetworkMode,
    PortAuditEvent,
    PortAuditKind,
    PortVia,
    PreviewLink,
    Role,
    Template,
)
from environments.ports import (
    ListeningPort,
    do_create_preview_link,
    do_update_listening_ports,
    record_traffic,
)
from environments.services import grant_access
from tests.conftest import api_client


def db_env(owner: Any, name: str, *, template: str = "busybox", status: str = "running", **fields: Any) -> Environment:
    """An environment row (no container): the API reads the database only."""
    tpl = Template.objects.get(slug=template)
    return Environment.objects.create(name=name, owner=owner, template=tpl, image=tpl.image, status=status,
                                      container_id="c" * 64 if status == "running" else "", cpus=0.5, memory_mb=64,
                                      pids=64, **fields)


@pytest.fixture(autouse=True)
def hosts(settings: Any) -> None:
    settings.ALLOWED_HOSTS = [*settings.ALLOWED_HOSTS, "lsl.example", "lsl.example.com"]


@pytest.fixture()
def env(people: Any, catalog: None) -> Environment:
    env = db_env(people.owner, "web")
    grant_access(env, role=Role.VIEWER, user=people.viewer)
    grant_access(env, role=Role.MEMBER, user=people.member)
    grant_access(env, role=Role.ADMIN, user=people.admin)
    template = env.template
    template.ports = [{"port": 3000, "name": "web"}, {"port": 5173, "name": "vite"}]
    template.save()
    return env


def ports_url(env: Environment) -> str:
    return f"/api/v1/environments/{env.pk}/ports/"


# --- GET .../ports/ -------------------------------------------------------------------------------

@pytest.mark.django_db
def test_listening_and_declared_ports_with_preview_urls(people: Any, env: Environment) -> None:
    do_update_listening_ports(env, [ListeningPort(3000, False), ListeningPort(8123, True)])
    answer = api_client(people.member).get(ports_url(env), HTTP_HOST="lsl.example:8000")
    assert answer.status_code == 200, answer.content
    data = answer.json()
    base = f"http://lsl.example:8000/preview/{env.pk}"
    assert data["listening"] == [
        {"port": 3000, "loopback_only": False, "preview_url": f"{base}/3000/"},
        {"port": 8123, "loopback_only": True, "preview_url": f"{base}/8123/"},
    ]
    assert data["declared"] == [
        {"port": 3000, "name": "web", "listening": True, "preview_url": f"{base}/3000/"},
        {"port": 5173, "name": "vite", "listening": False, "preview_url": f"{base}/5173/"},
    ]
    assert data["checked_at"] is not None
    assert data["links"] is None  # a member is not an admin


@pytest.mark.django_db
def test_subdomain_mode_urls(people: Any, env: Environment, settings: Any) -> None:
    settings.LSL_PREVIEW_DOMAIN = "preview.example.com"
    do_update_listening_ports(env, [ListeningPort(3000, False)])
    data = api_client(people.owner).get(ports_url(env), HTTP_HOST="lsl.example.com:8443", secure=True).json()
    assert data["listening"][0]["preview_url"] == f"https://p3000-{env.pk.hex}.preview.example.com:8443/"


@pytest.mark.django_db
def test_who_sees_what(people: Any, env: Environment) -> None:
    do_update_listening_ports(env, [ListeningPort(3000, False)])
    do_create_preview_link(env, 3000, by=people.owner)
    outsider = api_client(people.outsider).get(ports_url(env))
    missing = api_client(people.outsider).get(f"/api/v1/environments/{uuid.uuid4()}/ports/")
    assert outsider.status_code == missing.status_code == 404
    assert outsider.json() == missing.json()
    assert api_client().get(ports_url(env)).status_code == 401
    viewer = api_client(people.viewer).get(ports_url(env)).json()
    assert viewer["listening"] == [{"port": 3000, "loopback_only": False, "preview_url": None}]  # may not open it
    assert viewer["links"] is None
    admin = api_client(people.admin).get(ports_url(env)).json()
    [link] = admin["links"]
    assert link["port"] == 3000 and link["url"] is None and link["active"] is True and link["created_by"] == "alice"
    assert len(link["token_hint"]) == 6 and "token" not in link


@pytest.mark.django_db
def test_host_network_environment_offers_no_preview(people: Any, catalog: None) -> None:
    from accounts.models import Profile

    profile = Profile.for_user(people.owner)
    profile.allow_host_network = True  # else the owner is only a viewer of it
    profile.save()
    env = db_env(people.owner, "hosted", network_mode=NetworkMode.HOST)
    data = api_client(people.owner).get(ports_url(env)).json()
    assert data["listening"] == [] and all(p["preview_url"] is None for p in data["declared"])
    refused = api_client(people.owner).post(f"{ports_url(env)}links/", {"port": 3000}, format="json")
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "port_unavailable", refused.content
    assert "host network" in refused.json()["error"]["detail"]


# --- public links -----------------------------------------------------------------------------------

@pytest.mark.django_db
def test_an_admin_makes_a_link_and_sees_its_token_once(people: Any, env: Environment,
                                                       django_capture_on_commit_callbacks: Any) -> None:
    from lsl_site.models import Event

    before = Event.objects.filter(kind="environment.ports").count()
    with django_capture_on_commit_callbacks(execute=True):
        answer = api_client(people.admin).post(f"{ports_url(env)}links/", {"port": 3000, "expires_in": 3600},
                                               format="json", HTTP_HOST="lsl.example:8000")
    assert answer.status_code == 201, answer.content
    data = answer.json()
    assert set(data) == {"id", "port", "url", "token", "expires_at"}
    assert data["url"] == f"http://lsl.example:8000/preview/link/{data['token']}/"
    link = PreviewLink.objects.get(pk=data["id"])
    assert link.created_by == people.admin and link.port == 3000 and link.is_active()
    assert data["token"] not in json.dumps(api_client(people.admin).get(ports_url(env)).json())  # never shown again
    assert PortAuditEvent.objects.filter(environment=env, kind=PortAuditKind.LINK_CREATED, user=people.admin).exists()
    assert Event.objects.filter(kind="environment.ports").count() == before + 1


@pytest.mark.django_db
@pytest.mark.parametrize(("body", "field", "message"), [
    ({"port": 0}, "port", "greater than or equal to 1"),
    ({"port": 70000}, "port", "less than or equal to 65535"),
    ({"port": "web"}, "port", "A valid integer is required"),
    ({}, "port", "This field is required"),
    ({"port": 3000, "expires_in": 30}, "expires_in", "greater than or equal to 60"),
    ({"port": 3000, "expires_in": 10 ** 9}, "expires_in", "less than or equal to 604800"),
])
def test_bad_link_requests_are_400s_naming_the_field(people: Any, env: Environment, body: Any, field: str,
                                                     message: str) -> None:
    answer = api_client(people.owner).post(f"{ports_url(env)}links/", body, format="json")
    assert answer.status_code == 400, answer.content
    assert message in " ".join(answer.json()["error"]["fields"][field])
    assert not PreviewLink.objects.exists()


@pytest.mark.django_db
def test_members_and_viewers_may_not_make_or_revoke_links(people: Any, env: Environment) -> None:
    link, _ = do_create_preview_link(env, 3000, by=people.owner)
    for user, want in ((people.member, 403), (people.viewer, 403), (people.outsider, 404)):
        made = api_client(user).post(f"{ports_url(env)}links/", {"port": 3000}, format="json")
        assert made.status_code == want, (user, made.content)
        revoked = api_client(user).delete(f"{ports_url(env)}links/{link.pk}/")
        assert revoked.status_code == want, (user, revoked.content)
    made = api_client(people.member).post(f"{ports_url(env)}links/", {"port": 3000}, format="json")
    assert made.json()["error"]["detail"] == "This needs the admin role on the environment; you are member."
    link.refresh_from_db()
    assert link.is_active() and PreviewLink.objects.count() == 1


@pytest.mark.django_db
def test_revoking(people: Any, env: Environment) -> None:
    link, _ = do_create_preview_link(env, 3000, by=people.owner)
    other = db_env(people.owner, "other")
    elsewhere = api_client(people.owner).delete(f"/api/v1/environments/{other.pk}/ports/links/{link.pk}/")
    assert elsewhere.status_code == 404 and elsewhere.json()["error"]["code"] == "not_found"
    assert api_client(people.owner).delete(f"{ports_url(env)}links/{uuid.uuid4()}/").status_code == 404
    assert api_client(people.owner).delete(f"{ports_url(env)}links/not-a-uuid/").status_code == 404
    answer = api_client(people.admin).delete(f"{ports_url(env)}links/{link.pk}/")
    assert answer.status_code == 204, answer.content
    link.refresh_from_db()
    assert not link.is_active() and link.revoked_by == people.admin
    assert api_client(people.admin).delete(f"{ports_url(env)}links/{link.pk}/").status_code == 204  # twice: no error
    assert PortAuditEvent.objects.filter(kind=PortAuditKind.LINK_REVOKED).count() == 1
    [listed] = api_client(people.owner).get(ports_url(env)).json()["links"]
    assert listed["active"] is False and listed["revoked_at"] is not None


# --- the catalog's `ports` ---------------------------------------------------------------------------

def write_catalog(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "catalog.yaml"
    path.write_text(textwrap.dedent(body))
    return path


@pytest.mark.django_db
def test_the_catalog_declares_ports(tmp_path: Path) -> None:
    path = write_catalog(tmp_path, """\
        version: 1
        templates:
          - slug: node
            image: node:20
            ports:
              - {port: 3000, name: web}
              - port: 9229
    """)
    result = catalog_module.apply_catalog(path)
    assert not result.problems, result.problems
    assert Template.objects.get(slug="node").ports == [{"port": 3000, "name": "web"}, {"port": 9229, "name": ""}]
    again = catalog_module.apply_catalog(path)
    assert again.unchanged == ["node"]


@pytest.mark.django_db
def test_bad_ports_in_the_catalog_are_reported_at_their_line(tmp_path: Path) -> None:
    path = write_catalog(tmp_path, """\
        version: 1
        templates:
          - slug: node
            image: node:20
            ports:
              - {port: 3000, name: web}
              - {port: 70000}
              - {port: 3000, name: again}
              - {name: nameless}
              - {port: 8080, label: x}
              - {port: "80"}
    """)
    problems = [f"{p.line}:{p.column}: {p.path}: {p.message}" for p in catalog_module.validate_catalog(path)]
    assert problems == [
        "7:16: templates[0].ports[1].port: must be <= 65535",
        "8:16: templates[0].ports[2].port: port 3000 is declared more than once (first at line 6)",
        "9:9: templates[0].ports[3]: missing required key 'port'",
        "10:22: templates[0].ports[4].label: unknown key 'label'",
        "11:16: templates[0].ports[5].port: expected an integer, got string '80'",
    ]
    assert not Template.objects.filter(slug="node").exists()


def test_the_shipped_schema_describes_ports() -> None:
    ports = catalog_module.load_schema()["$defs"]["template"]["properties"]["ports"]
    assert ports["items"]["properties"]["port"] == {"type": "integer", "minimum": 1, "maximum": 65535}


# --- metrics -----------------------------------------------------------------------------------------

def scrape(people: Any) -> str:
    from django.test import Client

    client = Client()
    client.force_login(people.staff)
    response = client.get("/metrics")
    assert response.status_code == 200
    return response.content.decode()


@pytest.mark.django_db
def test_port_traffic_and_links_in_metrics(people: Any, env: Environment) -> None:
    record_traffic(env.pk, 3000, PortVia.FORWARD, connections=2, to_environment=100, from_environment=5000)
    record_traffic(env.pk, 3000, PortVia.PREVIEW, connections=1, to_environment=10, from_environment=20)
    do_create_preview_link(env, 3000, by=people.owner)
    revoked, _ = do_create_preview_link(env, 3000, by=people.owner)
    from environments.ports import do_revoke_preview_link

    do_revoke_preview_link(revoked, by=people.owner)
    text = scrape(people)
    labels = 'environment="web",owner="alice",port="3000"'  # the exposition sorts labels by name
    assert f'lsl_port_connections_total{{{labels},via="forward"}} 2.0' in text
    assert f'lsl_port_connections_total{{{labels},via="preview"}} 1.0' in text
    assert f'lsl_port_bytes_total{{direction="to_environment",{labels},via="forward"}} 100.0' in text
    assert f'lsl_port_bytes_total{{direction="from_environment",{labels},via="forward"}} 5000.0' in text
    assert "lsl_preview_links_active 1.0" in text


@pytest.mark.django_db
def test_port_metrics_cost_the_same_queries_for_many_environments(people: Any, env: Environment) -> None:
    from environments.metrics import LSLCollector

    def queries() -> int:
        with CaptureQueriesContext(connection) as captured:
            list(LSLCollector()._ports())
        return len(captured)

    record_traffic(env.pk, 3000, PortVia.FORWARD, connections=1)
    one = queries()
    for n in range(5):
        other = db_env(people.owner, f"more-{n}")
        record_traffic(other.pk, 8000 + n, PortVia.PREVIEW, connections=1)
        do_create_preview_link(other, 8000 + n, by=people.owner)
    assert queries() == one == 2


# --- admin -------------------------------------------------------------------------------------------

@pytest.mark.django_db
def test_the_admin_lists_links_and_revokes_them(people: Any, env: Environment) -> None:
    from django.contrib.auth import get_user_model
    from django.test import Client

    root = get_user_model().objects.create_superuser("root", "root@example.com", "pw")
    link, _ = do_create_preview_link(env, 3000, by=people.owner)
    client = Client()
    client.force_login(root)
    listing = client.get("/admin/environments/previewlink/")
    assert listing.status_code == 200 and link.token_hint in listing.content.decode()
    assert client.get(f"/admin/environments/environment/{env.pk}/change/").status_code == 200
    assert client.get("/admin/environments/portauditevent/").status_code == 200
    answer = client.post("/admin/environments/previewlink/", {"action": "revoke_selected", "_selected_action": [str(link.pk)]})
    assert answer.status_code == 302
    link.refresh_from_db()
    assert link.revoked_at is not None and link.revoked_by == root
    assert PortAuditEvent.objects.filter(kind=PortAuditKind.LINK_REVOKED, user=root).exists()


# --- the CLI (the real `lsl` executable against a live daphne) ---------------------------------------

@pytest.mark.django_db(transaction=True, serialized_rollback=True)
def test_the_cli_lists_ports_and_manages_public_links(people: Any, env: Environment, live_server_proc: Any,
                                                     tmp_path: Path) -> None:
    from tests.conftest import make_token
    from tests.test_cli import Cli, assert_error

    do_update_listening_ports(env, [ListeningPort(3000, False), ListeningPort(8123, True)])
    alice = Cli(live_server_proc.url, tmp_path / "alice", make_token(people.owner))
    meg = Cli(live_server_proc.url, tmp_path / "meg", make_token(people.member))
    victor = Cli(live_server_proc.url, tmp_path / "victor", make_token(people.viewer))

    lines = alice.ok("ports", "web").stdout.splitlines()
    assert lines[0].split() == ["PORT", "STATE", "NAME", "PREVIEW"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == {"3000", "5173", "8123"}
    assert "listening" in rows["3000"] and "web" in rows["3000"] and f"/preview/{env.pk}/3000/" in rows["3000"]
    assert "declared" in rows["5173"] and "localhost only" in rows["8123"]
    assert alice.json("ports", "web")["declared"][1] == {"port": 5173, "name": "vite", "listening": False,
                                                         "preview_url": f"{live_server_proc.url}/preview/{env.pk}/5173/"}
    assert "-" in victor.ok("ports", "web").stdout.splitlines()[1]  # a viewer gets no preview URL

    made = alice.ok("preview", "link", "web", "3000", "--expires", "1h")
    url = made.stdout.strip()
    assert url.startswith(f"{live_server_proc.url}/preview/link/") and "not shown again" in made.stderr
    [link] = alice.json("preview", "links", "web")
    assert link["port"] == 3000 and link["active"]
    assert url.split("/preview/link/")[1].startswith(link["token_hint"])
    assert 3590 < (PreviewLink.objects.get().expires_at - PreviewLink.objects.get().created_at).total_seconds() <= 3600

    assert_error(meg("preview", "link", "web", "3000"), 3, "This needs the admin role on the environment; you are member.")
    assert_error(meg("preview", "links", "web"), 3, "only admins of web may see its public links (you are member)")
    assert_error(alice("preview", "link", "web", "3000", "--expires", "soon"), 2, "--expires 'soon': expected a duration")
    assert_error(alice("preview", "link", "web", "3000", "--expires", "10s"), 2, "expires_in")
    assert alice("preview", "link", "web", "0").returncode == 2
    assert_error(alice("preview", "revoke", "web", "ffffffff"), 4, "no public link 'ffffffff' on web")

    revoked = alice.ok("preview", "revoke", "web", link["id"][:8])
    assert "revoked the public link to port 3000" in revoked.stderr
    assert alice.json("preview", "links", "web")[0]["active"] is False
    assert not PreviewLink.objects.get().is_active()
