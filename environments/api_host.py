"""REST API for host integration: files, setup logs, snapshots, environment files, team volumes, quotas.

Environment-scoped views find the environment among those the caller may view
(404 otherwise) and then check the role, exactly like `api.EnvironmentViewSet`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from asgiref.sync import sync_to_async
from django.db.models import QuerySet
from django.http import HttpResponse, StreamingHttpResponse
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.exceptions import NotFound, PermissionDenied
from rest_framework.fields import empty
from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.parsers import BaseParser, JSONParser
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.settings import api_settings
from rest_framework.views import APIView

from accounts.models import Membership, Team, TeamRole
from environments import envfile, files, policy, services
from environments.models import Environment, Role, SetupStatus, Status, TeamVolume
from environments.permissions import require_role, role_for
from environments.serializers import EnvironmentSerializer, TemplateSerializer
from lsl_site.fields import StrictCharField, StrictSlugField, StrictSlugRelatedField, names_nothing
from lsl_site.schema import NO_NUL, SLUG, flag_parameter, query_flag


def environment_for(request: Request, pk: Any, needed: Role) -> Environment:
    env = (Environment.objects.visible_to(request.user).select_related("owner", "team", "template", "node")
           .filter(pk=pk).first())
    if env is None:
        raise NotFound("No such environment.")
    require_role(request.user, env, needed)
    return env


def _request_body(request: Request) -> Any:
    """The raw body as a file. Under ASGI Django has already spooled it to a (seekable) temporary file."""
    django_request = request._request
    stream = getattr(django_request, "_stream", None)
    if stream is not None and callable(getattr(stream, "seekable", None)) and stream.seekable():
        return stream
    return django_request


# --- files -------------------------------------------------------------------------------

class _JsonErrorsOnly(DefaultContentNegotiation):
    """`?format=tar` means the transfer format here, not DRF's renderer override; errors are JSON."""

    def select_renderer(self, request: Any, renderers: Any, format_suffix: Any = None) -> Any:
        return renderers[0], renderers[0].media_type


class FilesView(APIView):
    """`GET` a file (raw bytes) or a directory (tar); `PUT` a file (raw body) or a tar to extract into a directory."""

    parser_classes: list[Any] = []  # the body is streamed, never parsed
    content_negotiation_class = _JsonErrorsOnly

    @extend_schema(parameters=[OpenApiParameter("path", str, required=True, description="Absolute path in the environment"),
                               OpenApiParameter("format", str, description="'tar': a tar archive even for a single file")],
                   responses={(200, "application/octet-stream"): bytes, (200, "application/x-tar"): bytes})
    def get(self, request: Request, pk: Any) -> StreamingHttpResponse:
        """Viewer role. Headers: X-LSL-File-Type (file|directory), X-LSL-Mode (octal), Content-Length for files,
        X-LSL-Size-Estimate for directories (for progress)."""
        env = environment_for(request, pk, Role.VIEWER)
        download = files.download(env, request.query_params.get("path"), as_tar=request.query_params.get("format") == "tar")
        content_type = "application/octet-stream" if download.kind == "file" else "application/x-tar"
        response = StreamingHttpResponse(files.as_async(download.chunks), content_type=content_type)
        response["Content-Disposition"] = files.content_disposition(download.name)
        response["X-LSL-File-Type"] = "file" if download.kind == "file" else "directory"
        response["X-LSL-Mode"] = f"{download.mode:04o}"
        if download.kind == "file" and download.size is not None:
            response["Content-Length"] = str(download.size)
        elif download.size:
            response["X-LSL-Size-Estimate"] = str(download.size)
        return response

    @extend_schema(parameters=[OpenApiParameter("path", str, required=True, description="Absolute path in the environment"),
                               OpenApiParameter("format", str, description="'tar': the body is a tar archive (or send Content-Type: application/x-tar)"),
                               OpenApiParameter("mode", str, description="Octal mode for a single file, e.g. 0755")],
                   request={"application/octet-stream": bytes, "application/x-tar": bytes}, responses={201: dict})
    def put(self, request: Request, pk: Any) -> Response:
        """Member role. A single file replaces `path` (parents created); a tar is extracted into the directory `path`."""
        env = environment_for(request, pk, Role.MEMBER)
        params = request.query_params
        as_tar = files.is_tar_request(request.content_type, params.get("format"))
        result = files.upload(env, params.get("path"), _request_body(request), as_tar=as_tar, mode=params.get("mode"))
        return Response({"path": result.path, "type": result.kind, "bytes": result.bytes, "entries": result.entries},
                        status=status.HTTP_201_CREATED)


# --- setup log ------------------------------------------------------------------------------

class SetupLogView(APIView):
    @extend_schema(parameters=[flag_parameter("follow", "Stream until setup ends (default false)")],
                   responses={(200, "text/plain"): str})
    def get(self, request: Request, pk: Any) -> HttpResponse:
        """The setup hooks' output (viewer role). `?follow=1` streams it while setup runs (as `tail -f` would).
        Header X-LSL-Setup-Status: pending, running, succeeded, failed (or empty: no setup)."""
        env = environment_for(request, pk, Role.VIEWER)
        follow = query_flag(request, "follow", default=False)
        if not follow:
            response = HttpResponse(env.setup_log, content_type="text/plain; charset=utf-8")
        else:
            response = StreamingHttpResponse(_follow_setup_log(env.pk), content_type="text/plain; charset=utf-8")
        response["X-LSL-Setup-Status"] = env.setup_status
        return response


async def _follow_setup_log(env_id: Any, poll: float = 0.3) -> Any:
    sent = 0
    fetch = sync_to_async(lambda: Environment.objects.filter(pk=env_id).values("setup_log", "setup_status", "status").first())
    while True:
        row = await fetch()
        if row is None:
            return
        text = row["setup_log"]
        if len(text) < sent:  # the log was trimmed at its start: resend from the beginning of what is kept
            sent = 0
        if len(text) > sent:
            yield text[sent:].encode()
            sent = len(text)
        if row["setup_status"] not in (SetupStatus.PENDING, SetupStatus.RUNNING) and row["status"] != Status.CREATING:
            return
        await asyncio.sleep(poll)


# --- snapshots and environment files -------------------------------------------------------

class SnapshotSerializer(serializers.Serializer):
    slug = StrictSlugField(max_length=63)
    description = StrictCharField(required=False, allow_blank=True, max_length=1000)
    teams = StrictSlugRelatedField(slug_field="slug", queryset=Team.objects.all(), many=True, required=False)
    include_workspace = serializers.BooleanField(required=False, default=True)


class SnapshotView(APIView):
    @extend_schema(request=SnapshotSerializer, responses={201: TemplateSerializer})
    def post(self, request: Request, pk: Any) -> Response:
        """Admin role. Commit the environment (and its workspace) to an image, registered as a private template
        usable by you and by `teams`."""
        env = environment_for(request, pk, Role.ADMIN)
        serializer = SnapshotSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        template = services.snapshot_environment(env, request.user, slug=data["slug"], description=data.get("description", ""),
                                                 teams=data.get("teams", []), include_workspace=data["include_workspace"])
        return Response(TemplateSerializer(template).data, status=status.HTTP_201_CREATED)


class ExportView(APIView):
    @extend_schema(responses={(200, "application/yaml"): OpenApiResponse(dict, description="An environment file: a YAML mapping")})
    def get(self, request: Request, pk: Any) -> HttpResponse:
        """Viewer role. The environment as an environment file (YAML): template, team, network, limits, mounts."""
        env = environment_for(request, pk, Role.VIEWER)
        response = HttpResponse(envfile.export_environment(env), content_type="application/yaml; charset=utf-8")
        response["Content-Disposition"] = files.content_disposition(f"{env.name}.lsl.yaml")
        return response


class YamlTextParser(BaseParser):
    """A raw YAML body (`Content-Type: application/yaml`; the other YAML spellings below). Only these
    types: a parser for `*/*` read any body (a multipart form, say) as YAML, which the schema could not
    describe and which named the wrong problem."""

    media_type = "application/yaml"

    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> dict[str, Any]:
        raw = stream.read() if stream is not None else b""
        try:
            return {"yaml": raw.decode("utf-8")}
        except UnicodeDecodeError:
            from rest_framework.exceptions import ParseError

            raise ParseError("the environment file is not valid UTF-8") from None


class XYamlTextParser(YamlTextParser):
    media_type = "application/x-yaml"


class TextYamlParser(YamlTextParser):
    media_type = "text/yaml"


class PlainTextYamlParser(YamlTextParser):
    media_type = "text/plain"


YAML_MEDIA_TYPES = [p.media_type for p in (YamlTextParser, XYamlTextParser, TextYamlParser, PlainTextYamlParser)]


_JSON_KINDS = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean", type(None): "null"}


class FromYamlSerializer(serializers.Serializer):
    yaml = StrictCharField(trim_whitespace=False, max_length=1024 * 1024)
    name = StrictSlugField(max_length=63, required=False)
    filename = StrictCharField(required=False, max_length=255)

    def run_validation(self, data: Any = empty) -> Any:
        if data is not empty and not isinstance(data, Mapping):  # a JSON body of `[]`, `"x"`, `3`, `null`...
            kind = _JSON_KINDS.get(type(data), type(data).__name__)
            raise serializers.ValidationError({api_settings.NON_FIELD_ERRORS_KEY: [
                f'the body must be a JSON object {{"yaml": ..., "name"?, "filename"?}} or a raw YAML document, not {kind}']})
        return super().run_validation(data)


class FromYamlView(APIView):
    parser_classes = [JSONParser, YamlTextParser, XYamlTextParser, TextYamlParser, PlainTextYamlParser]
    request_body_required = True  # lsl_site.schema.AutoSchema: the raw-YAML media types hide it from drf-spectacular

    @extend_schema(request={"application/json": FromYamlSerializer,
                            # The raw file: the same rules as the JSON body's `yaml` (not empty, no NUL, 1 MiB).
                            **{media: {"type": "string", "minLength": 1, "pattern": NO_NUL, "maxLength": 1024 * 1024,
                                       "description": "The environment file itself"} for media in YAML_MEDIA_TYPES}},
                   responses={202: EnvironmentSerializer},
                   parameters=[OpenApiParameter("name", {"type": "string", "pattern": SLUG, "maxLength": 63},
                                                description="Override the file's environment name")])
    def post(self, request: Request) -> Response:
        """Create an environment from an environment file: a raw YAML body, or JSON {"yaml", "name"?, "filename"?}.
        Problems come back as {"yaml": ["FILE:LINE:COL: path: message", ...]}."""
        data = request.data
        if isinstance(data, Mapping) and "name" in request.query_params:
            data = {**data, "name": request.query_params["name"]}
        serializer = FromYamlSerializer(data=data)  # a body that is not an object: the serializer's 400
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        env = envfile.create_from_yaml(request.user, data["yaml"], name=data.get("name"),
                                       filename=data.get("filename") or "environment.yaml")
        role = role_for(request.user, env)
        return Response(EnvironmentSerializer(env, context={"roles": {env.pk: role}}).data, status=status.HTTP_202_ACCEPTED)


# --- team volumes ------------------------------------------------------------------------------

class TeamVolumeSerializer(serializers.ModelSerializer):
    team = StrictSlugRelatedField(slug_field="slug", queryset=Team.objects.all())
    name = StrictSlugField(max_length=63)
    created_by = serializers.CharField(source="created_by.username", read_only=True, default=None)
    mount = serializers.SerializerMethodField()

    class Meta:
        model = TeamVolume
        fields = ["id", "team", "name", "volume_name", "created_by", "created_at", "mount"]
        read_only_fields = ["id", "volume_name", "created_by", "created_at"]
        validators: list[Any] = []

    def get_mount(self, volume: TeamVolume) -> str:
        return f"volume:{volume.name}:/mnt/{volume.name}"


# An integer id, at most 18 digits: a longer one is not a route (a 404), never an integer SQL cannot hold.
VOLUME_ID = OpenApiParameter("id", int, OpenApiParameter.PATH, description="The volume's id")


@extend_schema_view(retrieve=extend_schema(parameters=[VOLUME_ID]), destroy=extend_schema(parameters=[VOLUME_ID]))
class TeamVolumeViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.CreateModelMixin,
                        mixins.DestroyModelMixin, viewsets.GenericViewSet):
    """Named volumes shared by a team's environments. Members list and create them; the volume's creator,
    team owners and maintainers delete them (only while no environment mounts them)."""

    serializer_class = TeamVolumeSerializer
    lookup_value_regex = "[0-9]{1,18}"

    def get_queryset(self) -> QuerySet[TeamVolume]:
        qs = TeamVolume.objects.select_related("team", "created_by")
        user = self.request.user
        if not user.is_superuser:
            qs = qs.filter(team__memberships__user=user)
        if self.request.query_params.get("team"):
            team = self.request.query_params["team"]
            qs = qs.none() if names_nothing(team) else qs.filter(team__slug=team)
        return qs

    def get_serializer(self, *args: Any, **kwargs: Any) -> Any:
        serializer = super().get_serializer(*args, **kwargs)
        user = getattr(self.request, "user", None)
        if (not kwargs.get("many") and "team" in serializer.fields and user is not None and user.is_authenticated
                and not (user.is_staff or user.is_superuser)):
            # A team you may not see (you are not in it) is a team that does not exist (400), never a 403
            # that says it does. Staff see every team: for them, not being a member stays a 403.
            serializer.fields["team"].queryset = Team.objects.filter(memberships__user=user)
        return serializer

    @extend_schema(parameters=[OpenApiParameter("team", str)])
    def list(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return super().list(request, *args, **kwargs)

    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        team = serializer.validated_data["team"]
        if not request.user.is_superuser and not team.memberships.filter(user=request.user).exists():
            raise PermissionDenied(f"You are not a member of team {team.slug!r}.")
        volume = services.create_team_volume(team, serializer.validated_data["name"], by=request.user)
        return Response(self.get_serializer(volume).data, status=status.HTTP_201_CREATED)

    def destroy(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        volume = self.get_object()
        user = request.user
        manager = Membership.objects.filter(team=volume.team, user=user, role__in=[TeamRole.OWNER, TeamRole.MAINTAINER]).exists()
        if not (user.is_superuser or manager or volume.created_by_id == user.pk):
            raise PermissionDenied("Only the volume's creator and the team's owners and maintainers may delete it.")
        services.delete_team_volume(volume)
        return Response(status=status.HTTP_204_NO_CONTENT)


# --- quotas ------------------------------------------------------------------------------------

class QuotaView(APIView):
    @extend_schema(responses={200: dict})
    def get(self, request: Request) -> Response:
        """Your limits and usage, and those of your teams (0 = unlimited). CPUs and memory count running
        environments; disk (the environments' disk limits) counts all; teams and team volumes count those you created."""
        user = request.user
        teams = Team.objects.filter(memberships__user=user).order_by("slug")
        return Response({
            "user": {"name": user.username, "limits": policy.user_limits(user),
                     "usage": policy.user_usage(user)},
            "teams": [{"team": team.slug, "limits": policy.team_limits(team),
                       "usage": policy.quota_usage(Environment.objects.filter(team=team))} for team in teams],
        })
