"""REST API for kept workspaces: the data of deleted environments, until its owner attaches or purges it.

Filtered by owner first (NetBox style): someone else's kept workspace is a 404, never a 403.
Attaching is `POST /api/v1/environments/` with `"workspace": "<id>"`.
"""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_view
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.request import Request
from rest_framework.response import Response

from environments import services
from environments.models import KeptWorkspace


class KeptWorkspaceSerializer(serializers.ModelSerializer):
    owner = serializers.CharField(source="owner.username", read_only=True)
    team = serializers.CharField(source="team.slug", read_only=True, allow_null=True, default=None)

    class Meta:
        model = KeptWorkspace
        fields = ["id", "environment_name", "owner", "team", "template_slug", "volume_name", "disk_mb", "deleted_at"]
        read_only_fields = fields


_ID = OpenApiParameter("id", OpenApiTypes.UUID, OpenApiParameter.PATH, description="The kept workspace's id")


@extend_schema_view(retrieve=extend_schema(parameters=[_ID]), destroy=extend_schema(parameters=[_ID]))
class KeptWorkspaceViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.DestroyModelMixin,
                           viewsets.GenericViewSet):
    """Your kept workspaces (superusers: everyone's). `DELETE` purges one: its data is deleted."""

    serializer_class = KeptWorkspaceSerializer
    lookup_value_regex = "[0-9a-f-]{32,36}"  # a UUID: anything else is a 404 from the router, not a 500

    def get_queryset(self) -> QuerySet[KeptWorkspace]:
        qs = KeptWorkspace.objects.select_related("owner", "team")
        if not self.request.user.is_superuser:
            qs = qs.filter(owner=self.request.user)
        return qs

    def destroy(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        services.purge_kept_workspace(self.get_object())
        return Response(status=status.HTTP_204_NO_CONTENT)
