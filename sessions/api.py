"""REST API for terminal sessions (docs/protocol.md §1)."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db.models import Prefetch, QuerySet
from django.http import FileResponse
from drf_spectacular.utils import extend_schema
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import NotFound, PermissionDenied
from rest_framework.generics import get_object_or_404
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from environments.models import Environment, Role, Status
from environments.permissions import require_role, role_for
from lsl_site.errors import Conflict
from lsl_site.fields import StrictCharField
from lsl_site.schema import flag_parameter, query_flag
from sessions import services
from sessions.models import Participation, TerminalSession
from sessions.recording import recording_path


class SessionSerializer(serializers.ModelSerializer):
    environment = serializers.UUIDField(source="environment_id", read_only=True)
    creator = serializers.CharField(source="creator.username", read_only=True)
    live = serializers.BooleanField(read_only=True)
    detached = serializers.BooleanField(read_only=True, help_text=(
        "live, but no server process serves it right now (its server went away): the shell keeps running "
        "in the keeper, and whoever joins next takes the session over"))
    ws_url = serializers.SerializerMethodField()
    participants = serializers.SerializerMethodField()

    class Meta:
        model = TerminalSession
        fields = ["id", "name", "environment", "environment_name", "command", "creator", "created_at", "ended_at",
                  "end_reason", "exit_code", "cols", "rows", "live", "detached", "ws_url", "participants"]

    def get_ws_url(self, session: TerminalSession) -> str:
        request = self.context.get("request")
        base = settings.LSL_WS_BASE_URL
        if not base and request is not None:
            base = ("wss://" if request.is_secure() else "ws://") + request.get_host() + "/ws/"
        return f"{base.rstrip('/')}/sessions/{session.id}/"

    def get_participants(self, session: TerminalSession) -> list[dict[str, Any]]:
        return [{"user": p.user.username, "role": p.role, "client": p.client_kind}
                for p in getattr(session, "live_participations", [])]


class OpenSessionSerializer(serializers.Serializer):
    name = StrictCharField(max_length=100, required=False, allow_blank=True, default="")
    cols = serializers.IntegerField(min_value=1, max_value=1000, required=False, default=80)
    rows = serializers.IntegerField(min_value=1, max_value=1000, required=False, default=24)


def _with_participants(qs: QuerySet[TerminalSession]) -> QuerySet[TerminalSession]:
    live = Participation.objects.filter(left_at__isnull=True).select_related("user")
    return qs.select_related("creator").prefetch_related(Prefetch("participations", queryset=live, to_attr="live_participations"))


class EnvironmentSessionsView(APIView):
    """List an environment's sessions (viewer) or open a new one (member)."""

    def _env(self, request: Request, env_id: Any, needed: Role) -> Environment:
        env = get_object_or_404(Environment.objects.visible_to(request.user).select_related("template"), pk=env_id)
        require_role(request.user, env, needed)
        return env

    @extend_schema(parameters=[flag_parameter("live", "Only live sessions (true) or only ended ones (false); both if missing")],
                   responses=SessionSerializer(many=True))
    def get(self, request: Request, env_id: Any) -> Response:
        env = self._env(request, env_id, Role.VIEWER)
        qs = TerminalSession.objects.filter(environment=env)
        if "live" in request.query_params:
            qs = qs.filter(ended_at__isnull=query_flag(request, "live", default=True))
        return Response(SessionSerializer(_with_participants(qs)[:200], many=True, context={"request": request}).data)

    @extend_schema(request=OpenSessionSerializer, responses={201: SessionSerializer})
    def post(self, request: Request, env_id: Any) -> Response:
        env = self._env(request, env_id, Role.MEMBER)
        serializer = OpenSessionSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        if env.status != Status.RUNNING:
            raise Conflict(f"the environment is {env.status}; start it first", code="not_running")
        session = services.open_session(env, request.user, **serializer.validated_data)
        session = _with_participants(TerminalSession.objects.filter(pk=session.pk)).get()
        return Response(SessionSerializer(session, context={"request": request}).data, status=status.HTTP_201_CREATED)


class SessionViewSet(mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    serializer_class = SessionSerializer

    def get_queryset(self) -> QuerySet[TerminalSession]:
        visible = Environment.objects.visible_to(self.request.user).values("pk")
        return _with_participants(TerminalSession.objects.filter(environment__in=visible))

    @extend_schema(request=None, responses=SessionSerializer)
    @action(detail=True, methods=["post"])
    def end(self, request: Request, pk: str | None = None) -> Response:
        session = self.get_object()
        role = role_for(request.user, session.environment)
        if role != Role.ADMIN and session.creator_id != request.user.pk:
            raise PermissionDenied("Only the session's creator or an admin of the environment can end it.")
        services.end_session(session)
        session = self.get_queryset().get(pk=session.pk)
        return Response(SessionSerializer(session, context={"request": request}).data)

    @extend_schema(responses={(200, "application/x-asciicast"): bytes})
    @action(detail=True, methods=["get"])
    def recording(self, request: Request, pk: str | None = None) -> FileResponse:
        session = self.get_object()
        path = recording_path(str(session.pk))
        if not path.exists():
            raise NotFound("This session has no recording (its terminal never started).")
        response = FileResponse(path.open("rb"), content_type="application/x-asciicast")
        response["Content-Disposition"] = f'attachment; filename="{session.environment_name}-{session.pk.hex[:8]}.cast"'
        return response
