"""REST API for templates, environments, access grants and monitoring.

Every queryset is filtered by permission first, so an environment the caller
may not view is a 404 (NetBox style); role checks then decide 403s.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from typing import Any

from django.apps import apps
from django.db.models import Prefetch, QuerySet, prefetch_related_objects
from django.http import StreamingHttpResponse
from django.utils.encoding import smart_str
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_view
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import NotFound
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from environments import catalog, metrics, nodes, services
from environments.files import as_async
from lsl_site.errors import Conflict, InvalidInput
from lsl_site.fields import SLUG_LOOKUP_REGEX, StrictCharField, names_nothing
from lsl_site.schema import errors, flag_parameter, query_flag
from environments.models import Environment, KeptWorkspace, Role, Status, Template, usable_templates
from environments.permissions import make_checker, require_role, role_for
from environments.serializers import (
    EnvironmentSerializer,
    EnvironmentUpdateSerializer,
    GrantSerializer,
    TemplateSerializer,
)


class TemplateViewSet(viewsets.ReadOnlyModelViewSet):
    serializer_class = TemplateSerializer
    lookup_field = "slug"
    lookup_value_regex = SLUG_LOOKUP_REGEX

    def get_queryset(self) -> QuerySet[Template]:
        return usable_templates(self.request.user).prefetch_related("teams")

    @extend_schema(responses={200: dict})
    @action(detail=False, methods=["get"], url_path="schema")
    def catalog_schema(self, request: Request) -> Response:
        """The JSON Schema that catalog files are validated against."""
        return Response(catalog.load_schema())


class UsableTemplateField(serializers.SlugRelatedField):
    """A template by slug, among those `user` may use: a SlugRelatedField over usable_templates(user),
    with the same answers and errors, but a public template (the usual case) costs one plain lookup
    instead of building and running the permission subqueries; only a private one runs them."""

    def __init__(self, user: Any, **kwargs: Any) -> None:
        self.user = user
        super().__init__(slug_field="slug", queryset=Template.objects.all(), **kwargs)

    def get_queryset(self) -> QuerySet[Template]:
        return usable_templates(self.user)

    def to_internal_value(self, data: Any) -> Template:
        if not isinstance(data, str):  # the schema says a slug string; `3` is not template "3"
            self.fail("invalid")
        if names_nothing(data):
            self.fail("does_not_exist", slug_name=self.slug_field, value=smart_str(data))
        try:
            template = Template.objects.filter(slug=data).first()
        except (TypeError, ValueError):
            self.fail("invalid")
        if template is not None and ((template.public and self.user.is_authenticated)
                                     or self.get_queryset().filter(pk=template.pk).exists()):
            return template
        self.fail("does_not_exist", slug_name=self.slug_field, value=smart_str(data))


class ExecSerializer(serializers.Serializer):
    command = serializers.ListField(child=StrictCharField(), min_length=1, max_length=256)
    workdir = StrictCharField(required=False, max_length=4096)
    env = serializers.DictField(child=StrictCharField(), required=False)


def _exec_lines(chunks: Iterator[bytes], exit_code: Any) -> Iterator[bytes]:
    """NDJSON: {"o": base64 output}… then {"exit_code": n}. Base64 keeps arbitrary bytes intact."""
    for chunk in chunks:
        yield json.dumps({"o": base64.b64encode(chunk).decode()}).encode() + b"\n"
    yield json.dumps({"exit_code": exit_code()}).encode() + b"\n"


class EnvironmentFilterSerializer(serializers.Serializer):
    """The list's filters. Validated, so an unknown status or a NUL byte is a 400, not an empty page
    (or a database error: PostgreSQL refuses NUL in a string). Blank means no filter."""

    status = serializers.ChoiceField(choices=Status.choices, required=False, allow_blank=True)
    team = serializers.CharField(required=False, allow_blank=True, trim_whitespace=False, max_length=200,
                                 help_text="A team's slug")
    template = serializers.CharField(required=False, allow_blank=True, trim_whitespace=False, max_length=200,
                                     help_text="A template's slug")
    owner = serializers.CharField(required=False, allow_blank=True, trim_whitespace=False, max_length=200,
                                  help_text="The owner's username")
    name = serializers.CharField(required=False, allow_blank=True, trim_whitespace=False, max_length=200)


def _kept_workspace(user: Any, workspace_id: Any) -> KeptWorkspace | None:
    """The caller's kept workspace by id; someone else's, or none, is the same 400 (nothing leaks)."""
    if workspace_id is None:
        return None
    kept = KeptWorkspace.objects.filter(pk=workspace_id, owner=user).first()
    if kept is None:
        raise InvalidInput({"workspace": ["no such kept workspace (see GET /api/v1/workspaces/)"]})
    return kept


# PATCH goes through update() too (partial): the same input, all of it optional.
@extend_schema_view(partial_update=extend_schema(request=EnvironmentUpdateSerializer, responses=EnvironmentSerializer))
class EnvironmentViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.CreateModelMixin,
                         mixins.UpdateModelMixin, mixins.DestroyModelMixin, viewsets.GenericViewSet):
    serializer_class = EnvironmentSerializer
    lookup_value_regex = "[0-9a-f-]{32,36}"

    def get_queryset(self) -> QuerySet[Environment]:
        qs = Environment.objects.visible_to(self.request.user).select_related("owner", "team", "template", "node")
        if self.action != "list":
            return qs
        filters = EnvironmentFilterSerializer(data=self.request.query_params)
        filters.is_valid(raise_exception=True)
        params = filters.validated_data
        if params.get("status"):
            qs = qs.filter(status=params["status"])
        if params.get("team"):
            qs = qs.filter(team__slug=params["team"])
        if params.get("template"):
            qs = qs.filter(template__slug=params["template"])
        if params.get("owner"):
            qs = qs.filter(owner__username=params["owner"])
        if params.get("name"):
            qs = qs.filter(name=params["name"])
        return qs

    def get_serializer(self, *args: Any, **kwargs: Any) -> Any:
        serializer = super().get_serializer(*args, **kwargs)
        if not kwargs.get("many") and "template" in getattr(serializer, "fields", {}):
            serializer.fields["template"] = UsableTemplateField(self.request.user)
        return serializer

    def _respond(self, env: Environment, code: int = status.HTTP_200_OK) -> Response:
        role = role_for(self.request.user, env)
        return Response(EnvironmentSerializer(env, context={"roles": {env.pk: role}}).data, status=code)

    def _env(self, needed: Role) -> Environment:
        env = self.get_object()
        require_role(self.request.user, env, needed)
        return env

    @extend_schema(parameters=[EnvironmentFilterSerializer])
    def list(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        page = self.paginate_queryset(self.filter_queryset(self.get_queryset()))
        envs = list(page if page is not None else [])
        checker = make_checker(request.user, envs)
        roles = {env.pk: role_for(request.user, env, checker) for env in envs}
        data = EnvironmentSerializer(envs, many=True, context={"roles": roles}).data
        return self.get_paginated_response(data)

    def retrieve(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return self._respond(self.get_object())

    @extend_schema(responses={202: EnvironmentSerializer})
    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        env = services.create_environment(request.user, services.CreateRequest(
            name=data["name"], template=data["template"], team=data.get("team"),
            network_mode=data.get("network_mode"), mounts=tuple(data.get("mounts", [])),
            cpus=data.get("cpus"), memory_mb=data.get("memory_mb"), disk_mb=data.get("disk_mb"),
            workspace=_kept_workspace(request.user, data.get("workspace")),
        ))
        return self._respond(env, status.HTTP_202_ACCEPTED)

    @extend_schema(request=EnvironmentUpdateSerializer, responses=EnvironmentSerializer)
    def update(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        env = self._env(Role.ADMIN)
        serializer = EnvironmentUpdateSerializer(data=request.data, partial=kwargs.get("partial", False))
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        services.update_environment(env, name=data.get("name"), team=data["team"] if "team" in data else ..., by=request.user)
        return self._respond(env)

    @extend_schema(parameters=[flag_parameter("purge", "Also delete the workspace volume (default false)")])
    def destroy(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        env = self._env(Role.ADMIN)
        body = request.data.get("purge", "false") if isinstance(request.data, dict) else "false"  # older clients
        purge = query_flag(request, "purge", default=str(body).lower() in ("1", "true", "yes"))
        services.delete_environment(env, purge=purge)
        return Response(status=status.HTTP_204_NO_CONTENT)

    @extend_schema(request=None, responses=EnvironmentSerializer)
    @action(detail=True, methods=["post"])
    def start(self, request: Request, pk: str | None = None) -> Response:
        return self._respond(services.start_environment(self._env(Role.MEMBER)))

    @extend_schema(request=None, responses=EnvironmentSerializer)
    @action(detail=True, methods=["post"])
    def stop(self, request: Request, pk: str | None = None) -> Response:
        return self._respond(services.stop_environment(self._env(Role.MEMBER)))

    @extend_schema(request=None, responses=EnvironmentSerializer)
    @action(detail=True, methods=["post"])
    def restart(self, request: Request, pk: str | None = None) -> Response:
        return self._respond(services.restart_environment(self._env(Role.MEMBER)))

    @extend_schema(request=ExecSerializer, responses={(200, "application/x-ndjson"): str})
    @action(detail=True, methods=["post"], url_path="exec", serializer_class=ExecSerializer)
    def exec_command(self, request: Request, pk: str | None = None) -> StreamingHttpResponse:
        """Run a command non-interactively (member role); streams NDJSON output, ends with the exit code."""
        env = self._env(Role.MEMBER)
        serializer = ExecSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        if env.status != Status.RUNNING:
            raise Conflict(f"the environment is {env.status}, not running", code="not_running")
        user, user_env = services.shell_identity(env)  # as the environment user, like its terminals
        chunks, exit_code = nodes.engine_for(env).exec_stream(env.container_id, data["command"], workdir=data.get("workdir"),
                                                user=user, environment={**user_env, **(data.get("env") or {})})
        # An async iterator: under ASGI, Django would buffer a plain one until the command ends.
        return StreamingHttpResponse(as_async(_exec_lines(chunks, exit_code)), content_type="application/x-ndjson")

    @extend_schema(methods=["GET"], request=None, responses=GrantSerializer(many=True))
    @extend_schema(methods=["POST"], request=GrantSerializer, responses={201: GrantSerializer})
    @action(detail=True, methods=["get", "post"], serializer_class=GrantSerializer, pagination_class=None)
    def access(self, request: Request, pk: str | None = None) -> Response:
        """List grants (viewer role), or grant `{"user"|"team", "role"}` (admin role)."""
        if request.method == "GET":
            env = self._env(Role.VIEWER)
            return Response(GrantSerializer(services.list_access(env), many=True).data)
        env = self._env(Role.ADMIN)
        serializer = GrantSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        grant = services.grant_access(env, role=Role.from_name(data["role"]), user=data.get("user"), team=data.get("team"))
        return Response(GrantSerializer(grant).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=None, responses={204: None})
    # At most 18 digits: a longer id is not a route (a 404), never an integer SQL cannot hold (a 500).
    @action(detail=True, methods=["delete"], url_path=r"access/(?P<grant_id>(user|team)-[0-9]{1,18})")
    def revoke(self, request: Request, pk: str | None = None, grant_id: str = "") -> Response:
        env = self._env(Role.ADMIN)
        if not services.revoke_access(env, grant_id):
            raise NotFound(f"No grant {grant_id!r} on this environment.")
        return Response(status=status.HTTP_204_NO_CONTENT)


class MonitorView(APIView):
    """Host figures plus, for environments the caller may view, container stats and live sessions.

    `?environment=<id>` narrows the answer to one environment (404 when the caller
    may not view it, exactly like the environment itself). Container figures are the
    worker's latest sample (`stats_at` says when); `?stats=0` leaves them out.
    """

    @extend_schema(parameters=[OpenApiParameter("environment", str, description="Only this environment (its id)"),
                               flag_parameter("stats", "Include the sampled container stats (default true)")],
                   responses={200: dict, **errors(404)})
    def get(self, request: Request) -> Response:
        qs = Environment.objects.visible_to(request.user).select_related("owner", "template", "node")
        wanted = request.query_params.get("environment")
        if wanted:
            try:
                qs = qs.filter(pk=uuid.UUID(wanted))
            except ValueError:
                raise NotFound("No such environment.") from None
        envs = list(qs)
        if wanted and not envs:
            raise NotFound("No such environment.")
        # The models come from the app registry: sessions depends on environments, never the other way round.
        session_model = apps.get_model("terminals", "TerminalSession")
        participation_model = apps.get_model("terminals", "Participation")
        attached = participation_model.objects.filter(left_at__isnull=True).select_related("user").order_by("joined_at")
        live = (session_model.objects.filter(ended_at__isnull=True).order_by("created_at")
                .prefetch_related(Prefetch("participations", queryset=attached, to_attr="attached")))
        prefetch_related_objects(envs, Prefetch("terminal_sessions", queryset=live, to_attr="live_sessions"))

        # Figures the worker sampled (LSL_STATS_INTERVAL): a read never asks the engine.
        with_stats = query_flag(request, "stats", default=True)
        host = metrics.host_snapshot()
        if with_stats:
            host["engine"] = metrics.engine_snapshot().get("engine") or {"error": "not sampled yet (is the worker running?)"}
        environments = [
            {"id": str(env.id), "name": env.name, "owner": env.owner.username, "template": env.template.slug,
             "status": env.status, "stop_reason": env.stop_reason, "last_error": env.last_error, "progress": env.progress,
             "started_at": env.started_at, "uptime_seconds": metrics.uptime_seconds(env),
             "limits": {"cpus": env.cpus, "memory_bytes": env.memory_mb * 1024 * 1024, "pids": env.pids},
             "stats": metrics.stored_stats(env) if with_stats else None,
             "sessions": [
                 {"id": str(session.id), "name": session.name, "created_at": session.created_at,
                  "participants": [{"user": p.user.username, "role": p.role, "client": p.client_kind}
                                   for p in session.attached]}
                 for session in env.live_sessions
             ]}
            for env in envs
        ]
        return Response({"host": host, "environments": environments})
