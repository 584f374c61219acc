"""Hostile input against the API, as an attacker would send it: never a 500, always the JSON error shape
({"error": {"code", "detail", "fields"?}}), and nothing half-written.

No engine needed: every request here is refused (or only reads) before anything reaches Docker.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import Group
from django.test import Client
from django.test.utils import override_settings

from accounts.models import Team
from accounts.services import create_token
from environments.models import Environment
from tests.conftest import api_client

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("catalog")]

INT64_MAX = 2**63 - 1


def error_of(response: Any, status: int = 400) -> dict[str, Any]:
    """The response is `status` (a 4xx, never a 5xx), JSON, in the project's error shape; returns the error."""
    assert response.status_code == status, (response.status_code, response.content[:2000])
    assert response["Content-Type"].startswith("application/json"), response["Content-Type"]
    body = json.loads(response.content)
    assert set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error["code"], str) and error["code"], error
    assert isinstance(error["detail"], str) and error["detail"], error
    assert set(error) <= {"code", "detail", "fields"}, error
    return error


def raw_post(client: Any, path: str, body: str, content_type: str = "application/json") -> Any:
    return client.generic("POST", path, body.encode(), content_type=content_type)


# --- 1. from-yaml with a body that is JSON but not an object ---------------------------------------

FROM_YAML = "/api/v1/environments/from-yaml/"


@pytest.mark.parametrize("body", ["[]", '["yaml"]', '[{"yaml": "version: 1"}]', '"x"', '""', "3", "-1.5", "1e999",
                                  "true", "false", "null"])
@pytest.mark.parametrize("query", ["", "?name=pwned"])
def test_from_yaml_refuses_json_that_is_not_an_object(people: Any, body: str, query: str) -> None:
    error = error_of(raw_post(api_client(people.owner), FROM_YAML + query, body))
    assert error["code"] == "invalid"
    assert "must be a JSON object" in error["detail"], error
    assert Environment.objects.count() == 0


def test_from_yaml_refuses_an_environment_file_that_is_not_a_mapping(people: Any) -> None:
    client = api_client(people.owner)
    for text in ("[]", "- a\n- b\n", "null", "3", '"x"', "~"):
        error_of(client.post(FROM_YAML, {"yaml": text}, format="json"))
        error_of(raw_post(client, FROM_YAML, text, content_type="application/yaml"))
    for value in (["version: 1"], {"version": 1}, None, True):
        error_of(client.post(FROM_YAML, {"yaml": value}, format="json"))
    assert Environment.objects.count() == 0


# --- 2. pagination: limits and offsets out of any integer's range ------------------------------------

LISTS = ["/api/v1/environments/", "/api/v1/teams/", "/api/v1/tokens/", "/api/v1/templates/"]
HOSTILE_PAGES = [
    "limit=99999999999999999999", f"limit={INT64_MAX}", f"limit={INT64_MAX + 1}", "limit=-1",
    "limit=-99999999999999999999", "limit=0", "limit=abc", "limit=1e3", "limit=", "limit=%00", "limit=" + "9" * 5000,
    "offset=99999999999999999999", f"offset={INT64_MAX}", f"offset={INT64_MAX + 1}", "offset=-5", "offset=x",
    "offset=" + "9" * 5000,
    f"limit={INT64_MAX}&offset={INT64_MAX}", "limit=99999999999999999999&offset=99999999999999999999",
    "limit=1&offset=-99999999999999999999",
]


@pytest.mark.parametrize("path", LISTS)
@pytest.mark.parametrize("query", HOSTILE_PAGES)
def test_list_endpoints_survive_hostile_limit_and_offset(people: Any, path: str, query: str) -> None:
    create_token(people.owner, "one")  # something in every list
    response = api_client(people.owner).get(f"{path}?{query}")
    assert response.status_code == 200, (response.status_code, response.content[:2000])
    page = response.json()
    assert set(page) == {"count", "next", "previous", "results"}, page
    assert isinstance(page["results"], list) and len(page["results"]) <= 200


def test_page_size_is_capped(people: Any) -> None:
    for i in range(205):
        create_token(people.owner, f"t{i}")
    client = api_client(people.owner)
    for query in ("limit=1000", "limit=99999999999999999999", f"limit={INT64_MAX}"):
        page = client.get(f"/api/v1/tokens/?{query}").json()
        assert page["count"] == 205 and len(page["results"]) == 200, query
        assert "limit=200" in page["next"] and "offset=200" in page["next"], page["next"]
    assert len(client.get("/api/v1/tokens/").json()["results"]) == 50  # the default page is unchanged
    assert len(client.get("/api/v1/tokens/?limit=-7").json()["results"]) == 50
    far = client.get("/api/v1/tokens/?offset=99999999999999999999").json()
    assert far["results"] == [] and far["count"] == 205 and far["next"] is None


# --- 3. NUL bytes in mount paths ------------------------------------------------------------------------

def _create(client: Any, *mounts: Any, name: str = "m") -> Any:
    return client.post("/api/v1/environments/", {"name": name, "template": "busybox", "mounts": list(mounts)}, format="json")


def test_nul_byte_in_a_mount_path_is_a_400_naming_the_field(people: Any, tmp_path: Path) -> None:
    (tmp_path / "ok").mkdir()
    ok = str(tmp_path / "ok")
    client = api_client(people.owner)
    cases = [
        (f"{ok}\x00:/x", "source"),
        (f"{ok}\x00/../../../etc:/x", "source"),
        (f"\x00{ok}:/x", "source"),
        (f"{ok}:/x\x00", "target"),
        (f"{ok}:/x\x00/../../proc", "target"),
        ({"source": f"{ok}\x00", "target": "/x"}, "source"),
        ({"source": ok, "target": "/x\x00y"}, "target"),
        ({"source": ok, "target": "\x00"}, "target"),
        ({"source": "\x00", "target": "\x00"}, "source"),
        ("volume:cache\x00:/x", "volume"),
        ({"volume": "cache", "target": "/cache\x00"}, "target"),
    ]
    with override_settings(LSL_HOST_MOUNT_ROOTS=[tmp_path]):
        for mount, field in cases:
            error = error_of(_create(client, mount))
            assert error["code"] == "invalid"
            assert set(error["fields"]) == {"mounts"}, error
            [message] = error["fields"]["mounts"]
            assert f"{field} " in message and "NUL" in message, (mount, message)
        # A good mount next to a bad one: the whole request is refused.
        error_of(_create(client, f"{ok}:/good", {"source": ok, "target": "/bad\x00"}))
        # An environment file too (YAML's "\0" escape is a NUL byte).
        text = f'version: 1\nenvironment:\n  template: busybox\n  mounts:\n    - {{source: "{ok}\\0", target: /x}}\n'
        error = error_of(client.post(FROM_YAML, {"yaml": text}, format="json"))
        assert "NUL" in json.dumps(error["fields"]["yaml"]), error
    assert Environment.objects.count() == 0


def test_nul_byte_elsewhere_in_a_create_is_a_400(people: Any) -> None:
    client = api_client(people.owner)
    for payload in ({"name": "a\x00b", "template": "busybox"}, {"name": "ok", "template": "busy\x00box"},
                    {"name": "ok", "template": "busybox", "team": "platform\x00"},
                    {"name": "ok", "template": "busybox", "network_mode": "bridge\x00"}):
        error_of(client.post("/api/v1/environments/", payload, format="json"))
    assert Environment.objects.count() == 0


def test_nul_byte_in_a_lookup_names_nothing(people: Any) -> None:
    """A NUL where a slug or name is looked up finds nothing, as it does on SQLite. PostgreSQL refuses
    a NUL in any text parameter, so such a lookup reaching the database was a 500 there."""
    client = api_client(people.owner)
    team = people.team.slug
    for path in (f"/api/v1/teams/{team}%00/", "/api/v1/teams/%00/", "/api/v1/templates/busybox%00/", "/api/v1/templates/%00/"):
        assert client.get(path).status_code == 404, path
    assert client.post(f"/api/v1/teams/{team}%00/members/", {"username": "meg"}, format="json").status_code == 404
    assert client.delete(f"/api/v1/teams/{team}/members/bob%00/").status_code == 404
    listing = client.get("/api/v1/volumes/", {"team": f"{team}\x00"})
    assert listing.status_code == 200 and listing.json()["results"] == [], listing.content
    error = error_of(client.post("/api/v1/volumes/", {"name": "cache", "team": f"{team}\x00"}, format="json"))
    assert set(error["fields"]) == {"team"}, error
    # The web page removing a member.
    page = Client()
    page.force_login(people.owner)
    assert page.post(f"/teams/{team}/members/bob%00/remove/").status_code == 404
    assert Team.objects.get(pk=people.team.pk).memberships.filter(user=people.teammate).exists()


# --- 4. team names with no letter or digit ---------------------------------------------------------------

@pytest.mark.parametrize("name", ["!!!", "---", "___", "-_-", "...", "🦄🦄🦄", "\u200b", "!@#$%^&*()", "ß", "开发团队"])
def test_team_name_without_a_slug_is_refused(people: Any, name: str) -> None:
    teams, groups = Team.objects.count(), Group.objects.count()
    client = api_client(people.outsider)
    error = error_of(client.post("/api/v1/teams/", {"name": name}, format="json"))
    assert error["code"] == "invalid"
    assert set(error["fields"]) == {"name"} and "letter or digit" in error["fields"]["name"][0], error
    assert not Team.objects.filter(slug="").exists() and not Group.objects.filter(name="team:").exists()
    assert (Team.objects.count(), Group.objects.count()) == (teams, groups)
    # Nothing broke for the caller: their teams list still answers.
    assert client.get("/api/v1/teams/").status_code == 200


def test_team_name_without_a_slug_is_fine_with_an_explicit_slug(people: Any) -> None:
    client = api_client(people.outsider)
    error_of(client.post("/api/v1/teams/", {"name": "!!!", "slug": ""}, format="json"))
    error_of(client.post("/api/v1/teams/", {"name": "!!!", "slug": "-\x00-"}, format="json"))
    error_of(client.post("/api/v1/teams/", {"name": "!!!", "slug": "!!!"}, format="json"))
    assert not Team.objects.filter(name="!!!").exists()
    response = client.post("/api/v1/teams/", {"name": "🦄🦄🦄", "slug": "unicorns"}, format="json")
    assert response.status_code == 201, response.content
    listed = client.get("/api/v1/teams/")
    assert listed.status_code == 200 and [t["slug"] for t in listed.json()["results"]] == ["unicorns"]


def test_team_services_refuse_an_empty_slug_too(people: Any) -> None:
    from accounts.services import create_team
    from lsl_site.errors import InvalidInput

    with pytest.raises(InvalidInput) as refused:
        create_team("!!!", owner=people.outsider)
    assert set(refused.value.fields or {}) == {"name"}
    assert not Team.objects.filter(slug="").exists() and not Group.objects.filter(name="team:").exists()


@pytest.mark.django_db
def test_a_team_left_with_an_empty_slug_is_repaired(people: Any) -> None:
    """Made before the name check existed (the slug is unique, so at most one): the data migration gives
    it a slug its members can use, avoiding one already taken."""
    import importlib

    from django.apps import apps

    from accounts.models import Team
    from accounts.services import create_team

    broken = create_team("Broken", owner=people.owner)
    Team.objects.filter(pk=broken.pk).update(slug="")
    Team.objects.filter(pk=people.team.pk).update(slug=f"team-{broken.pk}")  # its first choice is taken
    importlib.import_module("accounts.migrations.0004_repair_empty_team_slugs").repair(apps, None)
    assert Team.objects.get(pk=broken.pk).slug == f"team-{broken.pk}-2"
    assert not Team.objects.filter(slug="").exists()
    response = api_client(people.owner).get("/api/v1/teams/")
    assert response.status_code == 200, response.content
    assert f"team-{broken.pk}-2" in {t["slug"] for t in response.json()["results"]}


def test_max_length_counts_the_string_as_sent(people: Any) -> None:
    """The schema's maxLength is of the string sent. DRF checked it after trimming, so a token name of
    "\\r" + 100 characters was created (the fuzzer's seed 71708283171402798018121860296254409618)."""
    client = api_client(people.owner)
    before = people.owner.api_tokens.count()
    error = error_of(client.post("/api/v1/tokens/", {"name": "\r" + "n" * 100}, format="json"))
    assert "no more than 100 characters" in error["fields"]["name"][0], error
    assert people.owner.api_tokens.count() == before
    created = client.post("/api/v1/tokens/", {"name": " " + "n" * 99}, format="json")
    assert created.status_code == 201 and created.json()["name"] == "n" * 99, created.content
