"""REST API for the caller, teams, API tokens, and the CLI's config/ping endpoints."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.contrib.auth import authenticate, get_user_model
from django.db.models import QuerySet
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_view
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import AuthenticationFailed, NotFound, PermissionDenied
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from lsl_site.throttling import ScopedRateThrottle
from rest_framework.views import APIView
from rest_framework.validators import UniqueValidator

from accounts import services
from accounts.models import APIToken, Membership, Team, TeamRole
from lsl_site.fields import SLUG_LOOKUP_REGEX, StrictCharField, StrictSlugField, StrictSlugRelatedField, StrictUUIDField
from lsl_site.schema import errors

User = get_user_model()


class MembershipSerializer(serializers.ModelSerializer):
    user = serializers.CharField(source="user.username")

    class Meta:
        model = Membership
        fields = ["user", "role", "joined_at"]


class TeamSerializer(serializers.ModelSerializer):
    members = MembershipSerializer(source="memberships", many=True, read_only=True)
    name = StrictCharField(max_length=100, validators=[UniqueValidator(queryset=Team.objects.all())])  # as the model's
    slug = StrictSlugField(required=False, max_length=100)

    class Meta:
        model = Team
        fields = ["name", "slug", "created_at", "members"]
        read_only_fields = ["created_at"]


class MemberWriteSerializer(serializers.Serializer):
    user = StrictSlugRelatedField(slug_field="username", queryset=User.objects.filter(is_active=True))
    role = serializers.ChoiceField(choices=TeamRole.choices, default=TeamRole.MEMBER)


class TokenSerializer(serializers.ModelSerializer):
    class Meta:
        model = APIToken
        fields = ["id", "name", "prefix", "created_at", "expires_at", "last_used_at", "revoked_at"]
        read_only_fields = ["prefix", "created_at", "last_used_at", "revoked_at"]


class TokenCreateSerializer(serializers.Serializer):
    name = StrictCharField(max_length=100)
    expires_at = serializers.DateTimeField(required=False, allow_null=True)


class LoginTokenSerializer(TokenCreateSerializer):
    username = StrictCharField()
    password = StrictCharField(style={"input_type": "password"})


def me_payload(user: Any) -> dict[str, Any]:
    memberships = Membership.objects.filter(user=user).select_related("team")
    return {
        "username": user.username,
        "email": user.email,
        "is_staff": user.is_staff,
        "is_superuser": user.is_superuser,
        "teams": [{"slug": m.team.slug, "name": m.team.name, "role": m.role} for m in memberships],
    }


class MeView(APIView):
    @extend_schema(responses={200: dict})
    def get(self, request: Request) -> Response:
        return Response(me_payload(request.user))


TEAM_SLUG = OpenApiParameter("slug", str, OpenApiParameter.PATH, description="The team's slug")


@extend_schema_view(retrieve=extend_schema(parameters=[TEAM_SLUG]), members=extend_schema(parameters=[TEAM_SLUG]),
                    remove_member=extend_schema(parameters=[TEAM_SLUG]))
class TeamViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.CreateModelMixin, viewsets.GenericViewSet):
    """Teams I belong to (staff: all). Owners and maintainers manage membership."""

    serializer_class = TeamSerializer
    lookup_field = "slug"
    lookup_value_regex = SLUG_LOOKUP_REGEX

    def get_queryset(self) -> QuerySet[Team]:
        qs = Team.objects.prefetch_related("memberships__user")
        user = self.request.user
        return qs if user.is_staff else qs.filter(memberships__user=user).distinct()

    def perform_create(self, serializer: Any) -> None:
        data = serializer.validated_data
        slug = services.team_slug(data["name"], data.get("slug"))
        if Team.objects.filter(slug=slug).exists() or Team.objects.filter(name=data["name"]).exists():
            raise serializers.ValidationError({"slug": [f"a team named {slug!r} already exists"]})
        serializer.instance = services.create_team(data["name"], owner=self.request.user, slug=slug)

    def _manageable(self) -> Team:
        team = self.get_object()
        user = self.request.user
        if not user.is_superuser and not team.memberships.filter(user=user, role__in=[TeamRole.OWNER, TeamRole.MAINTAINER]).exists():
            raise PermissionDenied("Only the team's owners and maintainers manage its members.")
        return team

    @extend_schema(request=MemberWriteSerializer, responses={201: MembershipSerializer, **errors(409)})
    @action(detail=True, methods=["post"])
    def members(self, request: Request, slug: str | None = None) -> Response:
        team = self._manageable()
        serializer = MemberWriteSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        membership = services.add_member(team, serializer.validated_data["user"], serializer.validated_data["role"])
        return Response(MembershipSerializer(membership).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=None, responses={204: None})
    @action(detail=True, methods=["delete"], url_path=r"members/(?P<username>[\w.@+-]+)")
    def remove_member(self, request: Request, slug: str | None = None, username: str = "") -> Response:
        team = self._manageable()
        membership = team.memberships.filter(user__username=username).first()
        if membership is None:
            raise NotFound(f"{username!r} is not a member of {team.slug!r}.")
        services.remove_member(team, membership.user)
        return Response(status=status.HTTP_204_NO_CONTENT)


# An integer id, at most 18 digits: a longer one is not a route (a 404), never an integer SQL cannot hold.
TOKEN_ID = OpenApiParameter("id", int, OpenApiParameter.PATH, description="The token's id")


@extend_schema_view(retrieve=extend_schema(parameters=[TOKEN_ID]), destroy=extend_schema(parameters=[TOKEN_ID]))
class TokenViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.DestroyModelMixin, viewsets.GenericViewSet):
    """My API tokens. Creating one returns its key once; DELETE revokes."""

    serializer_class = TokenSerializer
    lookup_value_regex = "[0-9]{1,18}"

    def get_queryset(self) -> QuerySet[APIToken]:
        return APIToken.objects.filter(user=self.request.user)

    @extend_schema(request=TokenCreateSerializer, responses={201: dict})
    def create(self, request: Request) -> Response:
        serializer = TokenCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        name = serializer.validated_data["name"]
        if APIToken.objects.filter(user=request.user, name=name, revoked_at__isnull=True).exists():
            raise serializers.ValidationError({"name": [f"you already have a live token named {name!r}"]})
        token, key = services.create_token(request.user, name, expires_at=serializer.validated_data.get("expires_at"))
        return Response({**TokenSerializer(token).data, "key": key}, status=status.HTTP_201_CREATED)

    def perform_destroy(self, instance: APIToken) -> None:
        services.revoke_token(instance)

    @extend_schema(request=None, responses={204: None})
    @action(detail=False, methods=["post"], url_path="revoke-current")
    def revoke_current(self, request: Request) -> Response:
        """Revoke the token this request is authenticated with (`lsl logout`)."""
        if not isinstance(request.auth, APIToken):
            raise serializers.ValidationError({"detail": ["this request is not authenticated with an API token"]})
        services.revoke_token(request.auth)
        return Response(status=status.HTTP_204_NO_CONTENT)


class LoginTokenView(APIView):
    """Exchange username + password for a new named token (what `lsl init` does). Throttled."""

    permission_classes = [AllowAny]
    authentication_classes: list[Any] = []
    throttle_classes = [ScopedRateThrottle]
    throttle_scope = "login"

    @extend_schema(request=LoginTokenSerializer, responses={201: dict})
    def post(self, request: Request) -> Response:
        serializer = LoginTokenSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        user = authenticate(request._request, username=data["username"], password=data["password"])
        if user is None:
            raise AuthenticationFailed("Wrong username or password.")
        token, key = services.create_token(user, data["name"], expires_at=data.get("expires_at"))
        return Response({**TokenSerializer(token).data, "key": key}, status=status.HTTP_201_CREATED)


class PingSerializer(serializers.Serializer):
    client_id = StrictUUIDField()
    hostname = StrictCharField(max_length=255, allow_blank=True, default="")
    version = StrictCharField(max_length=50, allow_blank=True, default="")


class PingView(APIView):
    @extend_schema(request=PingSerializer, responses={200: dict})
    def post(self, request: Request) -> Response:
        serializer = PingSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        client = services.record_ping(request.user, data["client_id"], hostname=data["hostname"],
                                      version=data["version"], remote_addr=request.META.get("REMOTE_ADDR"))
        return Response({"client_id": str(client.client_id), "last_seen_at": client.last_seen_at})


class ConfigView(APIView):
    """Everything a client needs after login: who am I, what can I use, where are websockets."""

    @extend_schema(responses={200: dict})
    def get(self, request: Request) -> Response:
        from environments.models import usable_templates

        templates = usable_templates(request.user)
        ws_base = settings.LSL_WS_BASE_URL or (
            ("wss://" if request.is_secure() else "ws://") + request.get_host() + "/ws/"
        )
        return Response({
            "user": me_payload(request.user),
            "templates": [{"slug": t.slug, "image": t.image, "description": t.description,
                           "limits": {"cpus": t.cpus, "memory_mb": t.memory_mb, "pids": t.pids},
                           "network_modes": t.network_modes} for t in templates],
            "server_version": settings.LSL_VERSION,
            "websocket_base_url": ws_base,
        })
