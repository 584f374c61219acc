"""The permission matrix: every API route × every HTTP method it allows × every kind of caller, and every
websocket route × every kind of caller (NetBox style).

Both matrices are generated from the routing itself: the API's from Django's URL resolver (every route
under `api/`, with the methods its view routes), the websockets' from `lsl_site.routing`. A route or
method without a row fails `test_every_api_route_and_method_has_a_row` (or its websocket twin), and so
does a row naming a route or method that no longer exists.

The rules encoded (README, "Who may do what"):
- credentials that do not authenticate (none, a forged token, a revoked token) get 401; a websocket
  handshake without a user is refused with HTTP 403;
- an environment (or team, volume, session, token, private template) the caller may not see is a 404,
  exactly like one that does not exist, never a 403; only a caller who may see it gets a 403 for an
  action above their role;
- roles on an environment: viewer < member < admin; the owner is admin; the team an environment was
  created for has the member role; staff see every environment (and team) read-only.

Callers authenticate with real API tokens (`Authorization: Token ...`). Throttling is switched off for the
in-process API client (`no_throttling`): the matrix makes hundreds of requests, many as failed-auth callers.
"""

from __future__ import annotations

import functools
import json
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import pytest
from django.urls import URLPattern, URLResolver, get_resolver

from environments.models import Environment, Role, Template
from environments.services import grant_access, revoke_access
from tests.conftest import api_client, make_token, read_streaming

# --- callers -------------------------------------------------------------------------------------------

UNAUTHENTICATED = ("anonymous", "bad_token", "revoked_token")
PEOPLE = ("outsider", "viewer", "member", "admin", "owner", "team_member", "staff")
CALLERS = UNAUTHENTICATED + PEOPLE
# Each person's role on the matrix environment (0: may not see it). The environment is created for team
# Platform, which alice ("owner") owns and bob ("team_member") belongs to: bob's member role is the team's.
ENV_RANK = {"outsider": 0, "viewer": 1, "member": 2, "admin": 3, "owner": 3, "team_member": 2, "staff": 1}
RANK = {"viewer": 1, "member": 2, "admin": 3}
TEAM_MEMBERS = frozenset({"owner", "team_member"})
TEAM_SEES = TEAM_MEMBERS | {"staff"}  # staff see every team


@pytest.fixture(autouse=True)
def fast_passwords(settings: Any) -> None:
    """The cast has eight users: hashing their passwords with the production PBKDF2 costs seconds per test."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


def signed_in(ok: int, **overrides: int) -> dict[str, int]:
    """Every signed-in person gets `ok`; credentials that do not authenticate get 401."""
    return {**{caller: 401 for caller in UNAUTHENTICATED}, **{caller: ok for caller in PEOPLE}, **overrides}


def on_env(role: str, ok: int) -> dict[str, int]:
    """An action on the matrix environment needing `role`: 404 if you may not see it, 403 if your role is too low."""
    return signed_in(ok, **{c: 404 if rank == 0 else ok if rank >= RANK[role] else 403 for c, rank in ENV_RANK.items()})


def only(allowed: frozenset[str] | set[str], ok: int, *, seen_by: frozenset[str] | set[str] = frozenset(),
         hidden: int = 404) -> dict[str, int]:
    """`allowed` get `ok`; `seen_by` (who see the object but may not do this) 403; everyone else `hidden`."""
    return signed_in(ok, **{c: ok if c in allowed else 403 if c in seen_by else hidden for c in PEOPLE})


# --- the world ------------------------------------------------------------------------------------------

YAML = "version: 1\nenvironment:\n  name: {name}\n  template: {template}\n  network: none\n"


class World:
    """The matrix environment, its grants, an API key per caller, and (made when first needed) the objects
    the other routes act on; `created_*` and `recordings` collect what calls create, for clean-up."""

    def __init__(self, people: Any, env: Environment) -> None:
        from django.contrib.auth import get_user_model

        from accounts.services import create_token, revoke_token

        self.people, self.env, self.team = people, env, people.team
        self.extra = get_user_model().objects.create_user("extra", "extra@example.com", "password-extra")
        grant_roles(env, people)
        self.users: dict[str, Any] = {"anonymous": None, "bad_token": None, "revoked_token": None,
                                      "outsider": people.outsider, "viewer": people.viewer, "member": people.member,
                                      "admin": people.admin, "owner": people.owner, "team_member": people.teammate,
                                      "staff": people.staff}
        self.keys: dict[str, str | None] = {caller: make_token(user, "matrix") if user else None
                                            for caller, user in self.users.items()}
        owner_key = self.keys["owner"]
        assert owner_key is not None
        self.keys["bad_token"] = "_".join(owner_key.split("_", 2)[:2]) + "_forged-secret"  # alice's prefix, wrong secret
        revoked, self.keys["revoked_token"] = create_token(people.owner, "revoked")
        revoke_token(revoked)
        self.created_envs: list[str] = []
        self.created_templates: list[str] = []
        self.recordings: list[Path] = []
        self.serial = 0

    def unique(self, stem: str) -> str:
        self.serial += 1
        return f"{stem}-{self.serial}"

    # Objects made once, when a row first needs them.

    @cached_property
    def probe_token(self) -> Any:
        """A token of alice's that only alice may see."""
        from accounts.services import create_token

        return create_token(self.people.owner, "probe")[0]

    @cached_property
    def private_template(self) -> Template:
        """A template only team Platform may use."""
        template = Template.objects.get(slug="busybox")
        template.pk, template.slug, template.public, template.managed_by_catalog = None, "matrix-private", False, False
        template.save()
        template.teams.set([self.team])
        return template

    @cached_property
    def unpullable_template(self) -> Template:
        """A public template whose image no registry serves. Creating an environment answers 202 whatever
        the worker then makes of it; with this image, the worker fails it at once (nothing listens on port 9)
        instead of starting a container per creating caller."""
        template = Template.objects.get(slug="busybox")
        template.pk, template.slug, template.managed_by_catalog = None, "matrix-unpullable", False
        template.image = "127.0.0.1:9/lsl-matrix/unpullable:never"
        template.save()
        return template

    @cached_property
    def volume(self) -> Any:
        from environments.services import create_team_volume

        return create_team_volume(self.team, "shared", by=self.people.owner)

    @cached_property
    def session(self) -> Any:
        """A session of the matrix environment (database only), with a recording on disk."""
        return self.new_session(self.people.owner, recorded=True)

    # Fresh objects, one per call that consumes its target.

    def new_session(self, creator: Any, recorded: bool = False) -> Any:
        from sessions.recording import recording_path
        from sessions.services import open_session

        session = open_session(self.env, creator, name=self.unique("matrix"))
        if recorded:
            path = recording_path(str(session.pk))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text('{"version": 2, "width": 80, "height": 24}\n[0.1, "o", "hi"]\n')
            self.recordings.append(path)
        return session

    def doomed_env(self, caller: str) -> Environment:
        """An environment like the matrix one (same grants), database only, for a call that deletes it."""
        env = db_env(self.people.owner, self.unique(f"doomed-{caller.replace('_', '-')}"), team=self.team)
        grant_roles(env, self.people, team=True)
        return env

    def fresh_volume(self, caller: str) -> Any:
        from environments.services import create_team_volume

        return create_team_volume(self.team, self.unique("doomed"), by=self.people.owner)

    def fresh_kept_workspace(self, caller: str) -> Any:
        """A kept workspace of alice's (a record only: purging a volume that is not there is a no-op)."""
        from environments.models import KeptWorkspace

        name = self.unique("kept")
        return KeptWorkspace.objects.create(owner=self.people.owner, volume_name=f"lsl-ws-matrix-{name}",
                                            environment_name=name)

    def fresh_owner_token(self, caller: str) -> Any:
        from accounts.services import create_token

        return create_token(self.people.owner, self.unique("doomed"))[0]

    def own_fresh_key(self, caller: str) -> str | None:
        """The key a call that revokes its own token authenticates with: a fresh one (or the caller's bad one)."""
        user = self.users[caller]
        return make_token(user, self.unique("current")) if user is not None else self.keys[caller]

    def extra_granted(self, caller: str) -> None:
        grant_access(self.env, role=Role.VIEWER, user=self.extra)

    def extra_in_team(self, caller: str) -> None:
        from accounts.services import add_member

        add_member(self.team, self.extra)

    def fresh_preview_link(self, caller: str) -> Any:
        """A public link to the matrix environment's port 8080, made by alice (a call revokes it)."""
        from environments.ports import do_create_preview_link

        return do_create_preview_link(self.env, 8080, by=self.people.owner)[0]

    def remember_created(self, caller: str, data: Any) -> str | None:
        self.created_envs.append(data["id"])
        return None

    def remember_template(self, caller: str, data: Any) -> str | None:
        self.created_templates.append(data["slug"])
        return None


def db_env(owner: Any, name: str, team: Any = None) -> Environment:
    """An environment row without a container (status `missing`): for rows that only need database state."""
    template = Template.objects.get(slug="busybox")
    return Environment.objects.create(name=name, owner=owner, team=team, template=template, image=template.image,
                                      status="missing", cpus=0.5, memory_mb=64, pids=64)


def grant_roles(env: Environment, people: Any, team: bool = False) -> None:
    grant_access(env, role=Role.VIEWER, user=people.viewer)
    grant_access(env, role=Role.MEMBER, user=people.member)
    grant_access(env, role=Role.ADMIN, user=people.admin)
    if team:  # what create_environment gives the team of an environment created for it
        grant_access(env, role=Role.MEMBER, team=people.team)


# --- content checks on successful answers: lists are where leaks hide -----------------------------------

def listed(present: bool, what: str) -> str | None:
    return None if present else f"{what} missing"


def hidden(present: bool, what: str) -> str | None:
    return f"LEAK: {what} shown" if present else None


def visibility(should_see: bool, present: bool, what: str) -> str | None:
    return listed(present, what) if should_see else hidden(present, what)


def sees_env_in_list(w: World, caller: str, data: Any) -> str | None:
    ids = {item["id"] for item in data["results"]}
    return visibility(ENV_RANK[caller] > 0, str(w.env.id) in ids, "the matrix environment")


def sees_env_in_monitor(w: World, caller: str, data: Any) -> str | None:
    ids = {item["id"] for item in data["environments"]}
    return visibility(ENV_RANK[caller] > 0, str(w.env.id) in ids, "the matrix environment")


def sees_team(w: World, caller: str, data: Any) -> str | None:
    items = data["results"] if isinstance(data, dict) else data
    return visibility(caller in TEAM_SEES, "platform" in {t["slug"] for t in items}, "team platform")


def sees_volume(w: World, caller: str, data: Any) -> str | None:
    items = data["results"] if isinstance(data, dict) else data
    return visibility(caller in TEAM_MEMBERS, w.volume.pk in {v["id"] for v in items}, "team platform's volume")


def sees_kept_workspace(w: World, caller: str, data: Any) -> str | None:
    from environments.models import KeptWorkspace

    mine = {str(pk) for pk in KeptWorkspace.objects.filter(owner=w.people.owner).values_list("pk", flat=True)}
    present = bool(mine & {item["id"] for item in data["results"]})
    return visibility(caller == "owner", present, "alice's kept workspace")


def sees_probe_token(w: World, caller: str, data: Any) -> str | None:
    items = data["results"] if isinstance(data, dict) else data
    return visibility(caller == "owner", w.probe_token.pk in {t["id"] for t in items}, "alice's token")


def sees_private_template(w: World, caller: str, data: Any) -> str | None:
    items = data["templates"] if "templates" in data else data["results"] if isinstance(data, dict) else data
    return visibility(caller in TEAM_MEMBERS, w.private_template.slug in {t["slug"] for t in items}, "the private template")


def sees_team_quota(w: World, caller: str, data: Any) -> str | None:
    return visibility(caller in TEAM_MEMBERS, "platform" in {t["team"] for t in data["teams"]}, "team platform's quota")


def sees_ports(w: World, caller: str, data: Any) -> str | None:
    """Public links are for the environment's admins only; a viewer gets no preview URL to follow."""
    admin = ENV_RANK[caller] >= RANK["admin"]
    problem = visibility(admin, data["links"] is not None, "the public links")
    may_open = ENV_RANK[caller] >= RANK["member"]
    urls = [p["preview_url"] for p in data["listening"] + data["declared"]]
    if any(url is not None for url in urls) and not may_open:
        problem = problem or "LEAK: a preview URL offered to a viewer"
    return problem


def is_me(w: World, caller: str, data: Any) -> str | None:
    want = w.users[caller].get_username()
    return None if data["username"] == want else f"LEAK: /me/ answered {data['username']!r}, not {want!r}"


def exec_succeeded(w: World, caller: str, data: Any) -> str | None:
    last = json.loads(data.strip().splitlines()[-1])
    return None if last == {"exit_code": 0} else f"exec ended {last!r}"


# --- the API matrix -------------------------------------------------------------------------------------

CATCH_ALL = "lsl_site.api_urls.not_found"  # an unnamed route is keyed by its view: the JSON 404 for unknown paths
ANY_METHOD = ("get", "post", "put", "patch", "delete")  # what a plain function view (no method list) answers

Kwargs = Callable[[World, Any], dict[str, Any]]


def env_kwargs(w: World, target: Any) -> dict[str, Any]:
    return {"pk": w.env.pk}


def target_kwargs(w: World, target: Any) -> dict[str, Any]:
    return {"pk": target.pk}


def no_kwargs(w: World, target: Any) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class Case:
    route: str  # the URL name (an unnamed route: its view, as module.name; `path` gives the URL)
    method: str
    expected: Mapping[str, int]
    kwargs: Kwargs = no_kwargs
    body: Callable[[World, str], Any] | None = None
    raw: bytes | None = None  # a raw body (application/octet-stream) instead of JSON
    query: str = ""  # may use {caller}
    prepare: Callable[[World, str], Any] | None = None  # a fresh target for each call (it consumes it)
    key: Callable[[World, str], str | None] | None = None  # the key to use, when not the caller's own
    check: Callable[[World, str, Any], str | None] | None = None  # on a 2xx answer: a problem, or None
    variant: str = ""
    json_errors: bool = True  # errors come in the API's JSON shape (not the schema's YAML, nor the docs' HTML)
    path: str = ""  # for an unnamed route: the URL to call

    @property
    def label(self) -> str:
        return f"{self.method.upper()} {self.route}" + (f" ({self.variant})" if self.variant else "")


CASES: list[Case] = [
    # The OpenAPI schema and its UI are public (README: "OpenAPI at /api/schema/"); a bad token is still a 401.
    Case("schema", "get", signed_in(200, anonymous=200), json_errors=False),
    Case("swagger-ui", "get", signed_in(200, anonymous=200), json_errors=False),
    # The caller, the CLI.
    Case("me", "get", signed_in(200), check=is_me),
    Case("config", "get", signed_in(200), check=sees_private_template),
    Case("ping", "post", signed_in(200),
         body=lambda w, c: {"client_id": str(uuid.uuid4()), "hostname": "laptop", "version": "0.1.0"}),
    # Password -> token: no authentication at all (a bad Authorization header is ignored), throttled.
    Case("login-token", "post", {caller: 201 for caller in CALLERS},
         body=lambda w, c: {"username": "alice", "password": "password-alice", "name": w.unique("login")}),
    Case("quotas", "get", signed_in(200), check=sees_team_quota),
    Case("monitor", "get", signed_in(200), check=sees_env_in_monitor),
    # Tokens: your own only; anyone else's is a 404.
    Case("token-list", "get", signed_in(200), check=sees_probe_token),
    Case("token-list", "post", signed_in(201), body=lambda w, c: {"name": w.unique("new")}),
    Case("token-detail", "get", only({"owner"}, 200), kwargs=lambda w, t: {"pk": w.probe_token.pk}),
    Case("token-detail", "delete", only({"owner"}, 204), kwargs=target_kwargs, prepare=World.fresh_owner_token),
    Case("token-revoke-current", "post", signed_in(204), key=World.own_fresh_key),
    # Teams: members and staff see one; its owners (and maintainers) manage members.
    Case("team-list", "get", signed_in(200), check=sees_team),
    Case("team-list", "post", signed_in(201), body=lambda w, c: {"name": w.unique(f"Team {c}")}),
    Case("team-detail", "get", only(TEAM_SEES, 200), kwargs=lambda w, t: {"slug": "platform"}),
    Case("team-members", "post", only({"owner"}, 201, seen_by=TEAM_SEES), kwargs=lambda w, t: {"slug": "platform"},
         body=lambda w, c: {"user": "extra", "role": "member"}),
    Case("team-remove-member", "delete", only({"owner"}, 204, seen_by=TEAM_SEES), prepare=World.extra_in_team,
         kwargs=lambda w, t: {"slug": "platform", "username": "extra"}),
    # Team volumes: the team's members see and create them; the creator (alice) and team owners delete them.
    # A team you cannot see is, in a body, a team that does not exist (400); staff see it (403).
    Case("volume-list", "get", signed_in(200), check=sees_volume),
    Case("volume-list", "post", only(TEAM_MEMBERS, 201, seen_by={"staff"}, hidden=400),
         body=lambda w, c: {"team": "platform", "name": w.unique("vol")}),
    Case("volume-detail", "get", only(TEAM_MEMBERS, 200), kwargs=lambda w, t: {"pk": w.volume.pk}),
    Case("volume-detail", "delete", only({"owner"}, 204, seen_by=TEAM_MEMBERS), kwargs=target_kwargs,
         prepare=World.fresh_volume),
    # Kept workspaces (deleted environments' data): their owner's only; anyone else's is a 404.
    Case("workspace-list", "get", signed_in(200), prepare=World.fresh_kept_workspace, check=sees_kept_workspace),
    Case("workspace-detail", "get", only({"owner"}, 200), kwargs=target_kwargs, prepare=World.fresh_kept_workspace),
    Case("workspace-detail", "delete", only({"owner"}, 204), kwargs=target_kwargs, prepare=World.fresh_kept_workspace),
    # Templates: public ones for everyone signed in, private ones for the teams (or users) given them.
    Case("template-list", "get", signed_in(200), check=sees_private_template),
    Case("template-catalog-schema", "get", signed_in(200)),
    Case("template-detail", "get", signed_in(200), kwargs=lambda w, t: {"slug": "busybox"}, variant="public"),
    Case("template-detail", "get", only(TEAM_MEMBERS, 200), kwargs=lambda w, t: {"slug": w.private_template.slug},
         variant="private to team platform"),
    # Environments.
    Case("environment-list", "get", signed_in(200), check=sees_env_in_list),
    Case("environment-list", "post", signed_in(202), check=World.remember_created,
         body=lambda w, c: {"name": w.unique("new"), "template": w.unpullable_template.slug, "network_mode": "none"}),
    Case("environment-from-yaml", "post", signed_in(202), check=World.remember_created,
         body=lambda w, c: {"yaml": YAML.format(name=w.unique("from-yaml"), template=w.unpullable_template.slug)}),
    Case("environment-detail", "get", on_env("viewer", 200), kwargs=env_kwargs),
    Case("environment-detail", "patch", on_env("admin", 200), kwargs=env_kwargs, body=lambda w, c: {"name": w.env.name}),
    Case("environment-detail", "put", on_env("admin", 200), kwargs=env_kwargs, body=lambda w, c: {"name": w.env.name}),
    Case("environment-detail", "delete", on_env("admin", 204), kwargs=target_kwargs, prepare=World.doomed_env),
    Case("environment-access", "get", on_env("viewer", 200), kwargs=env_kwargs),
    Case("environment-access", "post", on_env("admin", 201), kwargs=env_kwargs,
         body=lambda w, c: {"user": "extra", "role": "viewer"}),
    Case("environment-revoke", "delete", on_env("admin", 204), prepare=World.extra_granted,
         kwargs=lambda w, t: {"pk": w.env.pk, "grant_id": f"user-{w.extra.pk}"}),
    Case("environment-setup-log", "get", on_env("viewer", 200), kwargs=env_kwargs),
    Case("environment-export", "get", on_env("viewer", 200), kwargs=env_kwargs),
    Case("environment-files", "put", on_env("member", 201), kwargs=env_kwargs, query="?path=/tmp/matrix-{caller}",
         raw=b"written by the permission matrix\n"),
    Case("environment-files", "get", on_env("viewer", 200), kwargs=env_kwargs, query="?path=/tmp/matrix-owner",
         check=lambda w, c, text: None if text == "written by the permission matrix\n" else f"read {text[:100]!r}"),
    Case("environment-exec-command", "post", on_env("member", 200), kwargs=env_kwargs,
         body=lambda w, c: {"command": ["true"]}, check=exec_succeeded),
    Case("environment-snapshot", "post", on_env("admin", 201), kwargs=env_kwargs, check=World.remember_template,
         body=lambda w, c: {"slug": w.unique(f"matrix-snap-{c.replace('_', '-')}"), "include_workspace": False}),
    # Ports (issue 14): viewers see what listens; public preview links are made and revoked by admins.
    Case("environment-ports", "get", on_env("viewer", 200), kwargs=env_kwargs, check=sees_ports),
    Case("environment-port-links", "post", on_env("admin", 201), kwargs=env_kwargs,
         body=lambda w, c: {"port": 8080, "expires_in": 3600}),
    Case("environment-port-link", "delete", on_env("admin", 204), prepare=World.fresh_preview_link,
         kwargs=lambda w, t: {"pk": w.env.pk, "link_id": t.pk}),
    # Terminal sessions: viewers list and watch (and download recordings); members open; the creator or an
    # admin ends one (here the creator is meg, the "member").
    Case("environment-sessions", "get", on_env("viewer", 200), kwargs=lambda w, t: {"env_id": w.env.pk}),
    Case("environment-sessions", "post", on_env("member", 201), kwargs=lambda w, t: {"env_id": w.env.pk}),
    Case("session-detail", "get", on_env("viewer", 200), kwargs=lambda w, t: {"pk": w.session.pk}),
    Case("session-recording", "get", on_env("viewer", 200), kwargs=lambda w, t: {"pk": w.session.pk}),
    Case("session-end", "post", {**on_env("admin", 200), "member": 200}, kwargs=target_kwargs,
         prepare=lambda w, c: w.new_session(w.people.member)),
    # Lifecycle last (the engine works for these): start a running one, restart it, stop it.
    Case("environment-start", "post", on_env("member", 200), kwargs=env_kwargs),
    Case("environment-restart", "post", on_env("member", 200), kwargs=env_kwargs),
    Case("environment-stop", "post", on_env("member", 200), kwargs=env_kwargs),
    # No such endpoint: the API's JSON 404 for everyone, signed in or not.
    *[Case(CATCH_ALL, method, {caller: 404 for caller in CALLERS}, path="/api/v1/no-such-endpoint/")
      for method in ANY_METHOD],
]


def walk(patterns: list[Any], prefix: str = "") -> Iterator[tuple[str, URLPattern]]:
    for pattern in patterns:
        if isinstance(pattern, URLResolver):
            yield from walk(pattern.url_patterns, prefix + str(pattern.pattern))
        else:
            yield prefix + str(pattern.pattern), pattern


def view_methods(pattern: URLPattern) -> set[str]:
    """The HTTP methods a route's view handles itself (OPTIONS and HEAD are derived by DRF/Django, not routed)."""
    callback = pattern.callback
    actions = getattr(callback, "actions", None)  # a DRF viewset route: {method: action}
    if actions:
        return set(actions) - {"options", "head"}
    view_class = getattr(callback, "cls", None) or getattr(callback, "view_class", None)
    if view_class is None:  # a plain function view takes any method
        return set(ANY_METHOD)
    return {m for m in view_class.http_method_names if m not in ("options", "head") and hasattr(view_class, m)}


@functools.cache
def api_resolver() -> URLResolver:
    """The project's URL resolver restricted to `api/`: URL names are unique there, not across the site
    (the pages have their own "monitor", "team-remove-member"...)."""
    from django.urls.resolvers import RegexPattern

    api = tuple(p for p in get_resolver().url_patterns if str(p.pattern).lstrip("^").startswith("api/"))
    return URLResolver(RegexPattern(r"^/"), api)


def api_reverse(name: str, kwargs: dict[str, Any]) -> str:
    return "/" + api_resolver().reverse(name, **kwargs)


def api_routes() -> dict[tuple[str, str], str]:
    """(URL name, method) -> the route, for every route under `api/` in the project's URL resolver."""
    routes: dict[tuple[str, str], str] = {}
    for route, pattern in walk(get_resolver().url_patterns):
        if not route.lstrip("^").startswith("api/"):
            continue
        key = pattern.name or f"{pattern.callback.__module__}.{pattern.callback.__qualname__}"
        for method in view_methods(pattern):
            assert (key, method) not in routes, f"two API routes are named {key!r}"
            routes[(key, method)] = route
    return routes


def test_every_api_route_and_method_has_a_row() -> None:
    routes = api_routes()
    rows = {(case.route, case.method) for case in CASES}
    missing = sorted(set(routes) - rows)
    stale = sorted(rows - set(routes))
    assert not missing, "API routes without a row in the permission matrix: " + ", ".join(
        f"{method.upper()} {name} ({routes[(name, method)]})" for name, method in missing)
    assert not stale, "matrix rows for routes or methods that no longer exist: " + ", ".join(
        f"{method.upper()} {name}" for name, method in stale)
    for case in CASES:
        assert set(case.expected) == set(CALLERS), f"{case.label}: a row must give every caller kind"
        if case.path:  # an unnamed route: its URL must land on it
            match = api_resolver().resolve(case.path)
            assert match.url_name is None and f"{match.func.__module__}.{match.func.__qualname__}" == case.route, case.label
    assert len(routes) >= 47  # the resolver walk found the API (37 routes, 47 route × method, at the time of writing)


@pytest.fixture()
def no_throttling(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever throttles exist now or later (anonymous, failed auth, login): off for the in-process client."""
    from rest_framework.views import APIView

    monkeypatch.setattr(APIView, "check_throttles", lambda self, request: None)


def call(client: Any, world: World, case: Case, caller: str) -> tuple[int, Any, str | None]:
    """Make one call; returns (status, parsed body, a problem with the answer or None).

    One client serves every call (its credentials and cookies reset each time): a fresh test client loads
    the middleware again, and WhiteNoise's scan of the static files costs ~0.1 s each time."""
    from django.core.cache import cache

    target = case.prepare(world, caller) if case.prepare else None
    key = case.key(world, caller) if case.key else world.keys[caller]
    client.cookies.clear()
    client.credentials(**({"HTTP_AUTHORIZATION": f"Token {key}"} if key else {}))
    url = (case.path or api_reverse(case.route, case.kwargs(world, target))) + case.query.format(caller=caller)
    cache.clear()  # and any cache-kept counter (throttles, lockouts) with it
    if case.raw is not None:
        response = client.generic(case.method.upper(), url, case.raw, content_type="application/octet-stream")
    else:
        body = case.body(world, caller) if case.body else None
        response = client.generic(case.method.upper(), url, json.dumps(body) if body is not None else "",
                                  content_type="application/json")
    raw = read_streaming(response) if response.streaming else response.content
    content_type = response.get("Content-Type", "")
    parsed: Any = raw.decode(errors="replace")
    if content_type.startswith("application/json") and raw:
        parsed = json.loads(raw)
    problem = None
    if response.status_code >= 400 and case.json_errors and not (isinstance(parsed, dict) and "error" in parsed):
        problem = f"error answer not in the JSON error shape: {raw[:200]!r}"
    elif 200 <= response.status_code < 300 and case.check is not None:
        try:
            problem = case.check(world, caller, parsed)
        except (AttributeError, KeyError, TypeError, ValueError, IndexError) as exc:
            problem = f"unexpected answer ({exc!r}): {str(parsed)[:200]}"
    return response.status_code, parsed, problem


@pytest.mark.django_db(transaction=True, serialized_rollback=True)
def test_api_permission_matrix(people: Any, make_env: Any, no_throttling: None) -> None:
    from rest_framework.test import APIClient

    from environments import runtime, services

    env = make_env(people.owner, name="matrix", team=people.team)
    assert env.status == "running", env.last_error
    world = World(people, env)
    client = APIClient()
    mismatches: list[str] = []
    calls = 0
    try:
        for case in CASES:
            for caller in CALLERS:
                status, parsed, problem = call(client, world, case, caller)
                calls += 1
                want = case.expected[caller]
                if status != want:
                    detail = parsed.get("error", parsed) if isinstance(parsed, dict) else str(parsed)[:200]
                    mismatches.append(f"{case.label} as {caller}: got {status}, want {want}: {str(detail)[:300]}")
                elif problem:
                    mismatches.append(f"{case.label} as {caller}: {problem}")
    finally:
        for path in world.recordings:
            path.unlink(missing_ok=True)
        for slug in world.created_templates:
            template = Template.objects.filter(slug=slug).first()
            if template is not None:
                runtime.local().remove_image(template.image)
        deadline = time.monotonic() + 60
        for env_id in world.created_envs:  # let the worker finish provisioning them, then remove them
            while Environment.objects.filter(pk=env_id, status="creating").exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            created = Environment.objects.filter(pk=env_id).first()
            if created is not None:
                services.delete_environment(created, purge=True)
    assert calls == len(CASES) * len(CALLERS)
    assert not mismatches, f"{len(mismatches)} of {calls} calls answered unexpectedly:\n" + "\n".join(mismatches)


@pytest.mark.django_db
def test_options_and_head_on_a_hidden_environment_say_what_a_missing_one_says(people: Any, catalog: None,
                                                                              no_throttling: None) -> None:
    """The methods DRF and Django derive (OPTIONS: metadata; HEAD: GET without a body) on every route of an
    environment: an outsider learns nothing from them that a made-up id would not say; no credentials, 401."""
    import re

    from rest_framework.test import APIClient

    env = db_env(people.owner, "hidden")
    missing = uuid.uuid4()
    routes: dict[str, tuple[set[str], set[str]]] = {}  # name -> (its URL parameters, its methods)
    for (name, method), route in api_routes().items():
        params = {a or b for a, b in re.findall(r"\(\?P<(\w+)>|<(?:\w+:)?(\w+)>", route)}
        if params & {"pk", "env_id"} and name.startswith("environment-"):
            routes.setdefault(name, (params, set()))[1].add(method)
    assert len(routes) >= 12, routes
    outsider, anonymous = APIClient(), APIClient()
    outsider.force_authenticate(people.outsider)
    problems: list[str] = []
    for name, (params, methods) in sorted(routes.items()):
        def url(env_id: Any, name: str = name, params: set[str] = params) -> str:
            values = {"pk": env_id, "env_id": env_id, "grant_id": f"user-{people.viewer.pk}", "link_id": uuid.uuid4()}
            return api_reverse(name, {param: values[param] for param in params})

        hidden_options, missing_options = outsider.options(url(env.pk)), outsider.options(url(missing))
        if (hidden_options.status_code, hidden_options.content) != (missing_options.status_code, missing_options.content):
            problems.append(f"OPTIONS {name}: hidden {hidden_options.status_code} {hidden_options.content[:150]!r}, "
                            f"missing {missing_options.status_code} {missing_options.content[:150]!r}")
        if anonymous.options(url(env.pk)).status_code != 401:
            problems.append(f"OPTIONS {name} answered an anonymous caller")
        if "get" in methods:
            hidden_head, missing_head = outsider.head(url(env.pk)), outsider.head(url(missing))
            if not hidden_head.status_code == missing_head.status_code == 404:
                problems.append(f"HEAD {name}: hidden {hidden_head.status_code}, missing {missing_head.status_code}")
    assert not problems, "\n".join(problems)


# --- the websocket matrix ---------------------------------------------------------------------------------

# Outcomes: "refused" (handshake answered HTTP 403, nothing accepted); on /ws/events/, "sees" / "blind"
# (accepted; an event about the matrix environment reaches the caller, or does not); on a live terminal,
# the role in `hello` ("viewer": read-only, input refused; "member", "admin": may type); on an ended
# terminal, "ended" (accepted, an `exit` frame, closed with 4410).
WS_TERMINAL_ROLES = {"outsider": "refused", "viewer": "viewer", "member": "member", "admin": "admin", "owner": "admin",
                     "team_member": "member", "staff": "viewer"}


def ws_expect(**people: str) -> dict[str, str]:
    return {**{caller: "refused" for caller in UNAUTHENTICATED}, **people}


@dataclass(frozen=True)
class WsCase:
    route: str  # the routing pattern, as written in lsl_site/routing.py (or the module it includes)
    path: Callable[[Any], str]  # from the websocket world
    expected: Mapping[str, str]
    variant: str = ""

    @property
    def label(self) -> str:
        return self.route + (f" ({self.variant})" if self.variant else "")


WS_CASES: list[WsCase] = [
    WsCase("ws/events/", lambda w: "/ws/events/",
           ws_expect(**{caller: "sees" if rank else "blind" for caller, rank in ENV_RANK.items()}), variant="live"),
    WsCase("ws/events/", lambda w: f"/ws/events/?since={w.before_event}",
           ws_expect(**{caller: "sees" if rank else "blind" for caller, rank in ENV_RANK.items()}),
           variant="replayed with ?since="),
    WsCase("ws/sessions/<uuid:session_id>/", lambda w: f"/ws/sessions/{w.live.pk}/", ws_expect(**WS_TERMINAL_ROLES),
           variant="live session"),
    WsCase("ws/sessions/<uuid:session_id>/", lambda w: f"/ws/sessions/{w.ended.pk}/",
           ws_expect(**{caller: "refused" if rank == 0 else "ended" for caller, rank in ENV_RANK.items()}),
           variant="ended session"),
    WsCase("ws/sessions/<uuid:session_id>/", lambda w: f"/ws/sessions/{uuid.uuid4()}/",
           ws_expect(**{caller: "refused" for caller in PEOPLE}), variant="no such session"),
    # A port nothing listens on: "port_closed" means the caller got past the access check to the keeper.
    WsCase("ws/environments/<uuid:environment_id>/forward/<int:port>/", lambda w: f"/ws/environments/{w.env.pk}/forward/9/",
           ws_expect(outsider="not_found", viewer="permission_denied", staff="permission_denied",
                     **{caller: "port_closed" for caller in ("member", "admin", "owner", "team_member")})),
    WsCase("ws/environments/<uuid:environment_id>/forward/<int:port>/",
           lambda w: f"/ws/environments/{uuid.uuid4()}/forward/9/",
           ws_expect(**{caller: "not_found" for caller in PEOPLE}), variant="no such environment"),
]


def websocket_routes() -> set[str]:
    from lsl_site.routing import websocket_urlpatterns

    return {route for route, _ in walk(websocket_urlpatterns)}


def websocket_route_of(path: str) -> str:
    from django.urls.resolvers import RegexPattern

    from lsl_site.routing import websocket_urlpatterns

    return URLResolver(RegexPattern(r"^/"), websocket_urlpatterns).resolve(path.split("?", 1)[0]).route


def test_every_websocket_route_has_a_row() -> None:
    routes = websocket_routes()
    rows = {case.route for case in WS_CASES}
    assert not routes - rows, f"websocket routes without a row in the permission matrix: {sorted(routes - rows)}"
    assert not rows - routes, f"matrix rows for websocket routes that no longer exist: {sorted(rows - routes)}"
    for case in WS_CASES:
        assert set(case.expected) == set(CALLERS), f"{case.label}: a row must give every caller kind"
    assert websocket_route_of("/ws/events/") == "ws/events/"


class WsWorld(World):
    def __init__(self, people: Any, env: Environment) -> None:
        from sessions.services import mark_ended, open_session

        super().__init__(people, env)
        self.live = open_session(env, people.owner, name="live")
        self.ended = open_session(env, people.owner, name="ended")
        mark_ended(self.ended.pk, "exited", 0)
        self.before_event = 0  # the last event id before the matrix's own (set by the test)


class Connection:
    """A websocket opened as one caller; `refused` holds the HTTP status when the handshake was refused."""

    def __init__(self, url: str, key: str | None, origin: str) -> None:
        from websockets.exceptions import InvalidStatus
        from websockets.sync.client import connect

        self.ws: Any = None
        self.refused: int | None = None
        headers = {"Authorization": f"Token {key}"} if key else {}
        try:
            # A browser's Origin (the server's own page), so an anonymous caller reaches the consumer's own check.
            self.ws = connect(url, additional_headers=headers, origin=origin, open_timeout=10)  # type: ignore[arg-type]
        except InvalidStatus as exc:
            self.refused = exc.response.status_code

    def frames(self, until: Callable[[dict[str, Any]], bool], timeout: float = 10.0) -> list[dict[str, Any]]:
        """JSON frames (binary ones skipped) up to and including the first for which `until` holds."""
        got: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no matching frame within {timeout} s; got {[f.get('type') for f in got]}")
            message = self.ws.recv(timeout=remaining)
            if isinstance(message, bytes):
                continue
            frame = json.loads(message)
            got.append(frame)
            if until(frame):
                return got

    def close(self) -> None:
        if self.ws is not None:
            self.ws.close()


def env_id_of(frame: dict[str, Any]) -> Any:
    about = frame.get("environment")
    return about.get("id") if isinstance(about, dict) else about


def forward_outcome(conn: Connection) -> str:
    """A forward's answer: "ready", or the code of its one error frame (then it closes)."""
    first = conn.frames(lambda f: f.get("type") == "ready" or "error" in f)[-1]
    return "ready" if first.get("type") == "ready" else first["error"]["code"]


def terminal_outcome(conn: Connection) -> str:
    from websockets.exceptions import ConnectionClosed

    first = conn.frames(lambda f: f.get("type") in ("hello", "exit"))[-1]
    if first["type"] == "exit":
        try:
            conn.ws.recv(timeout=5)
        except ConnectionClosed:
            pass
        return "ended" if conn.ws.close_code == 4410 else f"exit, closed {conn.ws.close_code}"
    role, can_write = first["role"], first["can_write"]
    if can_write != (role in ("member", "admin")):
        return f"{role} with can_write={can_write}"
    if not can_write:  # read-only: input is refused, and said so
        conn.ws.send(b"echo typed-by-a-viewer\r")
        error = conn.frames(lambda f: f.get("type") == "error")[-1]
        if error.get("code") != "read_only":
            return f"{role}, but input answered {error}"
    return role


@pytest.mark.django_db(transaction=True, serialized_rollback=True)
def test_websocket_permission_matrix(people: Any, make_env: Any, live_server_proc: Any) -> None:
    from django.db import transaction

    from environments.services import publish_environment
    from lsl_site import events

    env = make_env(people.owner, name="ws-matrix", team=people.team)
    assert env.status == "running", env.last_error
    world = WsWorld(people, env)
    server = live_server_proc
    outcomes: dict[tuple[str, str], str] = {}

    for case in WS_CASES:
        assert websocket_route_of(case.path(world)) == case.route, f"{case.label}: its path is not its route"
    from lsl_site.models import Event

    events_cases = [case for case in WS_CASES if case.route == "ws/events/"]
    terminal_cases = [case for case in WS_CASES if case.route != "ws/events/"]
    world.before_event = Event.objects.order_by("-id").values_list("id", flat=True).first() or 0

    def publish() -> None:
        with transaction.atomic():
            publish_environment(env)  # environment.changed, about the matrix environment only
        with transaction.atomic():
            events.publish("matrix.sentinel", {}, user_ids=[u.pk for u in world.users.values() if u is not None])

    # /ws/events/: everyone connects; then (live) one event about the environment and one addressed to
    # everyone are published, or (replayed) they were, before `?since=`. Who sees the first before the second?
    for number, case in enumerate(events_cases):
        connections = {caller: Connection(server.ws_url + case.path(world), world.keys[caller], server.url)
                       for caller in CALLERS}
        try:
            for caller, conn in connections.items():
                if conn.refused is None:
                    hello = conn.frames(lambda f: f.get("type") == "hello")[-1]
                    assert hello["user"] == world.users[caller].get_username(), (caller, hello)
            if number == 0:
                publish()
            for caller, conn in connections.items():
                if conn.refused is not None:
                    outcomes[(case.label, caller)] = "refused" if conn.refused == 403 else f"http {conn.refused}"
                    continue
                seen = conn.frames(lambda f: f.get("type") == "matrix.sentinel")
                about_env = [f for f in seen if f.get("type") == "environment.changed" and env_id_of(f) == str(env.pk)]
                outcomes[(case.label, caller)] = "sees" if about_env else "blind"
        finally:
            for conn in connections.values():
                conn.close()

    # Terminals: one caller at a time.
    for case in terminal_cases:
        for caller in CALLERS:
            conn = Connection(server.ws_url + case.path(world), world.keys[caller], server.url)
            try:
                if conn.refused is not None:
                    outcomes[(case.label, caller)] = "refused" if conn.refused == 403 else f"http {conn.refused}"
                elif "/forward/" in case.route:
                    outcomes[(case.label, caller)] = forward_outcome(conn)
                else:
                    outcomes[(case.label, caller)] = terminal_outcome(conn)
            finally:
                conn.close()

    expected = {(case.label, caller): case.expected[caller] for case in WS_CASES for caller in CALLERS}
    assert len(outcomes) == len(expected)
    mismatches = [f"{label} as {caller}: got {outcomes[(label, caller)]}, want {want}"
                  for (label, caller), want in expected.items() if outcomes[(label, caller)] != want]
    assert not mismatches, f"{len(mismatches)} of {len(expected)} websocket outcomes unexpected:\n" + "\n".join(mismatches)


# --- focused checks ----------------------------------------------------------------------------------------

@pytest.mark.django_db
def test_it_rejects_outsider_without_leaking(people: Any, catalog: None) -> None:
    env = db_env(people.owner, "secret")
    client = api_client(people.outsider)
    assert client.get("/api/v1/environments/").json()["count"] == 0
    missing = client.get("/api/v1/environments/00000000-0000-0000-0000-000000000000/")
    hidden_env = client.get(f"/api/v1/environments/{env.id}/")
    assert hidden_env.status_code == missing.status_code == 404
    assert hidden_env.json() == missing.json()
    assert client.get("/api/v1/monitor/").json()["environments"] == []
    assert client.get(f"/api/v1/monitor/?environment={env.id}").json() == \
        client.get("/api/v1/monitor/?environment=00000000-0000-0000-0000-000000000000").json()


@pytest.mark.django_db
def test_revoking_takes_effect_on_next_request(people: Any, catalog: None) -> None:
    env = db_env(people.owner, "shared")
    grant = grant_access(env, role=Role.MEMBER, user=people.teammate)
    client = api_client(people.teammate)
    assert client.get(f"/api/v1/environments/{env.id}/").status_code == 200
    owner = api_client(people.owner)
    assert owner.delete(f"/api/v1/environments/{env.id}/access/{grant.id}/").status_code == 204
    assert client.get(f"/api/v1/environments/{env.id}/").status_code == 404
    assert client.post(f"/api/v1/environments/{env.id}/stop/").status_code == 404


@pytest.mark.django_db
def test_team_grant_follows_membership(people: Any, catalog: None) -> None:
    from accounts.services import remove_member

    env = db_env(people.owner, "team-env")
    grant_access(env, role=Role.MEMBER, team=people.team)
    client = api_client(people.teammate)
    assert client.get(f"/api/v1/environments/{env.id}/").json()["role"] == "member"
    remove_member(people.team, people.teammate)
    assert client.get(f"/api/v1/environments/{env.id}/").status_code == 404


@pytest.mark.django_db
def test_access_list_shows_roles_and_regrant_replaces(people: Any, catalog: None) -> None:
    env = db_env(people.owner, "granted")
    owner = api_client(people.owner)
    assert owner.post(f"/api/v1/environments/{env.id}/access/", {"user": "victor", "role": "admin"}, format="json").status_code == 201
    assert owner.post(f"/api/v1/environments/{env.id}/access/", {"user": "victor", "role": "viewer"}, format="json").status_code == 201
    assert owner.post(f"/api/v1/environments/{env.id}/access/", {"team": "platform", "role": "member"}, format="json").status_code == 201
    listed_grants = {(g["kind"], g["name"]): g["role"] for g in owner.get(f"/api/v1/environments/{env.id}/access/").json()}
    assert listed_grants == {("user", "victor"): "viewer", ("team", "platform"): "member"}
    bad = owner.post(f"/api/v1/environments/{env.id}/access/", {"user": "victor", "team": "platform", "role": "boss"}, format="json")
    assert bad.status_code == 400 and "role" in bad.json()["error"]["fields"]
    assert revoke_access(env, f"user-{people.viewer.pk}")
    assert owner.get(f"/api/v1/environments/{env.id}/access/").json() == [
        {"id": f"team-{people.team.pk}", "kind": "team", "name": "platform", "role": "member"}]


@pytest.mark.django_db
def test_a_team_you_are_not_in_is_a_team_that_does_not_exist(people: Any) -> None:
    client = api_client(people.outsider)
    hidden_team = client.post("/api/v1/volumes/", {"team": "platform", "name": "mine"}, format="json")
    no_team = client.post("/api/v1/volumes/", {"team": "nosuchteam", "name": "mine"}, format="json")
    assert hidden_team.status_code == no_team.status_code == 400
    assert hidden_team.json()["error"]["fields"]["team"] == [
        message.replace("nosuchteam", "platform") for message in no_team.json()["error"]["fields"]["team"]]
    assert client.get("/api/v1/teams/platform/").json() == client.get("/api/v1/teams/nosuchteam/").json()
    # Staff see every team: for them, not being in it is a 403.
    staff = api_client(people.staff).post("/api/v1/volumes/", {"team": "platform", "name": "mine"}, format="json")
    assert staff.status_code == 403


@pytest.mark.django_db
def test_moving_an_environment_into_a_team_needs_membership(people: Any, catalog: None) -> None:
    """Creating an environment for a team you are not in is refused; moving one there must be too: it would
    count against that team's quotas and show up as the team's."""
    from accounts.services import create_team

    other = create_team("Other", owner=people.outsider)
    env = db_env(people.owner, "movable")
    grant_access(env, role=Role.ADMIN, user=people.admin)
    for user in (people.owner, people.admin):  # neither is in team "other"
        response = api_client(user).patch(f"/api/v1/environments/{env.id}/", {"team": other.slug}, format="json")
        assert response.status_code == 400, (user, response.content)
        assert "team" in response.json()["error"]["fields"]
    env.refresh_from_db()
    assert env.team_id is None
    moved = api_client(people.owner).patch(f"/api/v1/environments/{env.id}/", {"team": "platform"}, format="json")
    assert moved.status_code == 200 and moved.json()["team"] == "platform"
    assert api_client(people.owner).patch(f"/api/v1/environments/{env.id}/", {"team": None}, format="json").status_code == 200

