"""The server-rendered web app.

Every page starts from what the user may see: `Environment.objects.visible_to`
filters lists, and `role_for` decides which controls are rendered and which
POSTs are allowed. An environment the user cannot view is a 404, exactly like
the API. All writes go through the services modules.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

from csp.decorators import csp_update
from django.contrib import messages
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.db import IntegrityError, transaction
from django.db.models import Prefetch, QuerySet
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_POST

from accounts import services as account_services
from accounts.models import APIToken, Membership, Team, TeamRole
from environments import metrics, runtime, services
from environments.models import Environment, Role, Status
from lsl_site import events
from lsl_site.errors import DomainError, InvalidInput
from lsl_site.fields import names_nothing
from environments.permissions import make_checker, role_for
from frontend.forms import (EnvironmentCreateForm, MemberForm, ShareForm, TeamCreateForm, ThrottledAuthenticationForm,
                            TokenCreateForm)
from sessions.models import Participation, TerminalSession


class LoginView(auth_views.LoginView):
    template_name = "frontend/login.html"
    authentication_form = ThrottledAuthenticationForm
    redirect_authenticated_user = True

    def form_invalid(self, form: Any) -> HttpResponse:
        response = super().form_invalid(form)
        if form.retry_after is not None:  # the address is over its failed-authentication rate
            response.status_code = 429
            response["Retry-After"] = str(int(form.retry_after))
        return response


# --- helpers -----------------------------------------------------------------------

def _service_errors(exc: DomainError) -> list[str]:
    """A domain refusal as readable lines: the one place the web pages turn domain errors into words."""
    if isinstance(exc, InvalidInput):
        return exc.messages()
    return [exc.detail]


def _visible_environment(request: HttpRequest, env_id: uuid.UUID) -> tuple[Environment, Role]:
    """The environment and the caller's role, or 404 when they may not view it (never 403: no leak)."""
    qs = Environment.objects.visible_to(request.user).select_related("owner", "team", "template", "node")
    env = get_object_or_404(qs, pk=env_id)
    role = role_for(request.user, env)
    if role is None:
        raise Http404("No such environment.")
    return env, role


def _require(role: Role, needed: Role) -> None:
    if role < needed:
        raise PermissionDenied(f"This needs the {needed.label} role on the environment; you are {role.label}.")


def _event_cursor() -> int:
    """The newest event id, read *before* a live page's rows: its script resumes /ws/events/ from it,
    so whatever changes while the page renders is replayed to it rather than missed."""
    return events.latest_id()


def _live_sessions_by_environment(envs: list[Environment]) -> dict[uuid.UUID, list[TerminalSession]]:
    """Live sessions of `envs` with who is attached right now (`live_participations`), in two queries."""
    attached = Participation.objects.filter(left_at__isnull=True).select_related("user").order_by("joined_at")
    live = (TerminalSession.objects.filter(environment__in=envs, ended_at__isnull=True)
            .select_related("creator")
            .prefetch_related(Prefetch("participations", queryset=attached, to_attr="live_participations")))
    by_env: dict[uuid.UUID, list[TerminalSession]] = {}
    for session in live:
        by_env.setdefault(session.environment_id, []).append(session)
    return by_env


# --- dashboard ---------------------------------------------------------------------

def _dashboard_context(request: HttpRequest, form: EnvironmentCreateForm | None = None) -> dict[str, Any]:
    user = request.user
    cursor = _event_cursor()
    visible = Environment.objects.visible_to(user).select_related("owner", "team", "template", "node")
    # Filter choices come from what the user can already see, so they reveal nothing new.
    team_slugs = sorted({slug for slug in visible.values_list("team__slug", flat=True) if slug})
    template_slugs = sorted(set(visible.values_list("template__slug", flat=True)))
    filters = {key: request.GET.get(key, "") for key in ("status", "team", "template")}
    envs_qs: QuerySet[Environment] = visible
    if filters["status"]:
        envs_qs = envs_qs.filter(status=filters["status"])
    if filters["team"]:
        envs_qs = envs_qs.filter(team__slug=filters["team"])
    if filters["template"]:
        envs_qs = envs_qs.filter(template__slug=filters["template"])
    envs = list(envs_qs)
    checker = make_checker(user, envs)
    live = _live_sessions_by_environment(envs)
    rows = [{"env": env, "role": role_for(user, env, checker), "sessions": live.get(env.pk, [])} for env in envs]
    return {
        "rows": rows,
        "filters": filters,
        "status_choices": Status.choices,
        "team_choices": team_slugs,
        "template_choices": template_slugs,
        "form": form or EnvironmentCreateForm(user=user),
        "events_since": cursor,
    }


@login_required
def dashboard(request: HttpRequest) -> HttpResponse:
    return render(request, "frontend/dashboard.html", _dashboard_context(request))


@login_required
def environment_create(request: HttpRequest) -> HttpResponse:
    if request.method != "POST":
        return redirect("dashboard")
    form = EnvironmentCreateForm(request.POST, user=request.user)
    if form.is_valid():
        data = form.cleaned_data
        try:
            env = services.create_environment(request.user, services.CreateRequest(
                name=data["name"], template=data["template"], team=data["team"],
                network_mode=data["network_mode"] or None,
            ))
        except DomainError as exc:
            for field, msgs in (exc.fields or {"non_field_errors": [exc.detail]}).items():
                target = field if field in form.fields else None
                for msg in msgs if isinstance(msgs, list) else [msgs]:
                    form.add_error(target, str(msg))
        else:
            messages.success(request, f"Creating {env.name} from {env.template.slug}…")
            return redirect("environment", env_id=env.id)
    return render(request, "frontend/dashboard.html", _dashboard_context(request, form), status=400)


# --- one environment ---------------------------------------------------------------

@login_required
def environment_detail(request: HttpRequest, env_id: uuid.UUID) -> HttpResponse:
    cursor = _event_cursor()
    env, role = _visible_environment(request, env_id)
    context = {
        "events_since": cursor,
        "env": env,
        "role": role,
        "can_use": role >= Role.MEMBER,
        "can_admin": role >= Role.ADMIN,
        "grants": services.list_access(env),
        "share_form": ShareForm() if role >= Role.ADMIN else None,
    }
    return render(request, "frontend/environment.html", context)


ACTIONS = {
    "start": (services.start_environment, "started"),
    "stop": (services.stop_environment, "stopped"),
    "restart": (services.restart_environment, "restarted"),
}


@login_required
@require_POST
def environment_action(request: HttpRequest, env_id: uuid.UUID, action: str) -> HttpResponse:
    if action not in ACTIONS:
        raise Http404("No such action.")
    env, role = _visible_environment(request, env_id)
    _require(role, Role.MEMBER)
    service, done = ACTIONS[action]
    try:
        service(env)
    except runtime.EngineError as exc:
        messages.error(request, f"Could not {action} {env.name}: {exc}")
    except DomainError as exc:  # refusals from the domain (a quota, a state rule): a message, not a 500
        for line in _service_errors(exc):
            messages.error(request, f"Could not {action} {env.name}: {line}")
    else:
        messages.success(request, f"{env.name} {done}.")
    return redirect("environment", env_id=env.id)


@login_required
def environment_delete(request: HttpRequest, env_id: uuid.UUID) -> HttpResponse:
    """GET: the confirmation page (with the purge choice). POST: delete."""
    env, role = _visible_environment(request, env_id)
    _require(role, Role.ADMIN)
    if request.method != "POST":
        return render(request, "frontend/environment_delete.html", {"env": env})
    purge = request.POST.get("purge") == "on"
    name = env.name
    try:
        services.delete_environment(env, purge=purge)
    except runtime.EngineError as exc:
        messages.error(request, f"Could not delete {name}: {exc}")
        return redirect("environment", env_id=env_id)
    messages.success(request, f"{name} deleted" + (" with its workspace." if purge else "; its workspace volume was kept."))
    return redirect("dashboard")


@login_required
@require_POST
def environment_share(request: HttpRequest, env_id: uuid.UUID) -> HttpResponse:
    env, role = _visible_environment(request, env_id)
    _require(role, Role.ADMIN)
    form = ShareForm(request.POST)
    if not form.is_valid():
        for field_errors in form.errors.values():
            for error in field_errors:
                messages.error(request, error)
        return redirect("environment", env_id=env.id)
    data = form.cleaned_data
    subject = data["subject"]
    kwargs = {"user": subject} if data["kind"] == "user" else {"team": subject}
    try:
        grant = services.grant_access(env, role=Role.from_name(data["role"]), **kwargs)
    except DomainError as exc:
        for line in _service_errors(exc):
            messages.error(request, line)
    else:
        messages.success(request, f"{grant.kind.title()} {grant.name} is now {grant.role.label} of {env.name}.")
    return redirect("environment", env_id=env.id)


@login_required
@require_POST
def environment_revoke(request: HttpRequest, env_id: uuid.UUID, grant_id: str) -> HttpResponse:
    env, role = _visible_environment(request, env_id)
    _require(role, Role.ADMIN)
    if services.revoke_access(env, grant_id):
        messages.success(request, "Access revoked.")
    else:
        messages.error(request, "There was no such grant.")
    return redirect("environment", env_id=env.id)


# --- monitoring --------------------------------------------------------------------------
# Both pages render what is cheap server-side (host figures, rows, live sessions) and leave the rest to
# frontend/src/monitor.js: statuses and sessions follow the event stream, the container figures and
# charts come from /api/v1/monitor/ every 2 s (the worker's samples; no event carries them).

def _is_staff(user: Any) -> bool:
    return bool(user.is_staff or user.is_superuser)


@login_required
def monitor(request: HttpRequest) -> HttpResponse:
    if not _is_staff(request.user):
        raise PermissionDenied("The monitoring page is for staff; each environment has its own monitor page.")
    cursor = _event_cursor()
    envs = list(Environment.objects.visible_to(request.user).select_related("owner", "template", "node"))
    live = _live_sessions_by_environment(envs)
    host = metrics.host_snapshot()
    context = {
        "host": host,
        "memory_percent": _percent(host["memory_used_bytes"], host["memory_total_bytes"]),
        "disk_percent": _percent(host["disk_used_bytes"], host["disk_total_bytes"]),
        "rows": [{"env": env, "sessions": live.get(env.pk, [])} for env in envs],
        "events_since": cursor,
    }
    return render(request, "frontend/monitor.html", context)


@login_required
def environment_monitor(request: HttpRequest, env_id: uuid.UUID) -> HttpResponse:
    cursor = _event_cursor()
    env, role = _visible_environment(request, env_id)
    context = {"env": env, "role": role, "sessions": _live_sessions_by_environment([env]).get(env.pk, []),
               "uptime": metrics.uptime_seconds(env), "events_since": cursor}
    return render(request, "frontend/environment_monitor.html", context)


def _percent(part: float, whole: float) -> float:
    return round(100.0 * part / whole, 1) if whole else 0.0


# --- terminal sessions ---------------------------------------------------------------

def _session_environment(request: HttpRequest, session_id: uuid.UUID) -> tuple[TerminalSession, Environment, Role]:
    """The terminal session, its environment and the caller's role; 404 unless they may view it."""
    session = get_object_or_404(TerminalSession.objects.select_related("creator"), pk=session_id)
    if session.environment_id is None:
        # Its environment was deleted: nobody's role can be checked any more (the API answers 404 too).
        raise Http404("No such session.")
    env, role = _visible_environment(request, session.environment_id)
    return session, env, role


@login_required
def terminal(request: HttpRequest, session_id: uuid.UUID) -> HttpResponse:
    session, env, role = _session_environment(request, session_id)
    return render(request, "frontend/terminal.html",
                  {"session": session, "env": env, "role": role, "can_open": role >= Role.MEMBER})


# asciinema-player parses the recording with WebAssembly: compiling it needs 'wasm-unsafe-eval' (which lets
# WebAssembly compile, never JavaScript's eval), on this page only.
@csp_update({"script-src": ["'wasm-unsafe-eval'"]})
@login_required
def replay(request: HttpRequest, session_id: uuid.UUID) -> HttpResponse:
    session, env, role = _session_environment(request, session_id)
    return render(request, "frontend/replay.html",
                  {"session": session, "env": env, "role": role, "can_use": role >= Role.MEMBER})


# --- teams -----------------------------------------------------------------------------

def _can_manage(user: Any, team: Team) -> bool:
    if user.is_superuser:
        return True
    return team.memberships.filter(user=user, role__in=[TeamRole.OWNER, TeamRole.MAINTAINER]).exists()


def _team_for_manager(request: HttpRequest, slug: str) -> Team:
    team = get_object_or_404(_my_teams(request.user), slug=slug)
    if not _can_manage(request.user, team):
        raise PermissionDenied("Only the team's owners and maintainers manage its members.")
    return team


def _my_teams(user: Any) -> QuerySet[Team]:
    qs = Team.objects.prefetch_related("memberships__user")
    return qs if user.is_superuser else qs.filter(memberships__user=user).distinct()


def _teams_page(request: HttpRequest, create_form: TeamCreateForm | None = None, status: int = 200) -> HttpResponse:
    rows = [{"team": team, "manage": _can_manage(request.user, team),
             "members": sorted(team.memberships.all(), key=lambda m: m.user.username)}
            for team in _my_teams(request.user)]
    context = {"rows": rows, "member_form": MemberForm(), "create_form": create_form or TeamCreateForm()}
    return render(request, "frontend/teams.html", context, status=status)


@login_required
def teams(request: HttpRequest) -> HttpResponse:
    return _teams_page(request)


@login_required
@require_POST
def team_create(request: HttpRequest) -> HttpResponse:
    """Anyone signed in may create a team (as the API allows) and becomes its owner."""
    form = TeamCreateForm(request.POST)
    if form.is_valid():
        name, slug = form.cleaned_data["name"], form.cleaned_data["slug"]
        try:
            with transaction.atomic():
                team = account_services.create_team(name, owner=request.user, slug=slug)
        except IntegrityError:
            # Someone created the same team between the form's check and ours.
            form.add_error("name", f"A team named {name!r} already exists.")
        except DomainError as exc:  # e.g. the team quota: said on the form, nothing was created
            for line in _service_errors(exc):
                form.add_error(None, line)
        else:
            messages.success(request, f"Team {team.name} created; you are its owner.")
            return redirect(f"{reverse('teams')}#team-{team.slug}")
    return _teams_page(request, form, status=400)


@login_required
@require_POST
def team_add_member(request: HttpRequest, slug: str) -> HttpResponse:
    team = _team_for_manager(request, slug)
    form = MemberForm(request.POST)
    if form.is_valid():
        user, role = form.cleaned_data["username"], form.cleaned_data["role"]
        try:
            account_services.add_member(team, user, role)
            messages.success(request, f"{user.username} is now {role} of {team.name}.")
        except DomainError as exc:
            messages.error(request, f"{exc.detail}.")
    else:
        for errors in form.errors.values():
            for error in errors:
                messages.error(request, error)
    return redirect("teams")


@login_required
@require_POST
def team_remove_member(request: HttpRequest, slug: str, username: str) -> HttpResponse:
    team = _team_for_manager(request, slug)
    if names_nothing(username):
        raise Http404("No such member.")
    membership = get_object_or_404(Membership.objects.select_related("user"), team=team, user__username=username)
    try:
        account_services.remove_member(team, membership.user)
    except DomainError as exc:
        messages.error(request, f"{exc.detail}.")
        return redirect("teams")
    messages.success(request, f"{username} removed from {team.name}.")
    return redirect("teams")


# --- API tokens ----------------------------------------------------------------------------

def _tokens_page(request: HttpRequest, form: TokenCreateForm, status: int = 200) -> HttpResponse:
    tokens = APIToken.objects.filter(user=request.user)
    return render(request, "frontend/tokens.html", {"tokens": tokens, "form": form}, status=status)


@login_required
def tokens(request: HttpRequest) -> HttpResponse:
    if request.method != "POST":
        return _tokens_page(request, TokenCreateForm())
    form = TokenCreateForm(request.POST)
    if form.is_valid():
        name = form.cleaned_data["name"]
        days = form.cleaned_data["expires_in_days"]
        if APIToken.objects.filter(user=request.user, name=name, revoked_at__isnull=True).exists():
            form.add_error("name", f"You already have a live token named {name!r}.")
        else:
            expires_at = timezone.now() + timedelta(days=days) if days else None
            token, key = account_services.create_token(request.user, name, expires_at=expires_at)
            # Rendered directly (no redirect): the key must never be stored anywhere, not even in a message.
            response = render(request, "frontend/token_created.html", {"token": token, "key": key})
            response["Cache-Control"] = "no-store"
            return response
    return _tokens_page(request, form, status=400)


@login_required
@require_POST
def token_revoke(request: HttpRequest, token_id: int) -> HttpResponse:
    token = get_object_or_404(APIToken, pk=token_id, user=request.user)
    account_services.revoke_token(token)
    messages.success(request, f"Token {token.name} revoked.")
    return redirect("tokens")

