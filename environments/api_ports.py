"""REST API for an environment's ports: what listens, what the template declares, public preview links.

    GET    /api/v1/environments/<id>/ports/                 viewer+: listening + declared (+ links for admins)
    POST   /api/v1/environments/<id>/ports/links/           admin: a public link {port, expires_in?} -> 201, token once
    DELETE /api/v1/environments/<id>/ports/links/<link>/    admin: revoke -> 204

An environment the caller may not see is a 404 (api_host.environment_for), a role too low a 403. Reads
never ask the engine: `listening` is what the worker found last (`checked_at`). The writes are
environments.ports' do_create_preview_link / do_revoke_preview_link (audit and event included).
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import status
from rest_framework.exceptions import NotFound
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from environments import ports
from environments.api_host import environment_for
from environments.models import Environment, NetworkMode, PreviewLink, Role
from environments.permissions import role_for
from environments.serializers import (
    CreatedPreviewLinkSerializer,
    PortsSerializer,
    PreviewLinkCreateSerializer,
)
from lsl_site.schema import errors

LINK_ID = OpenApiParameter("link_id", OpenApiTypes.UUID, OpenApiParameter.PATH, description="The link's id")


def _host(request: Request) -> str:
    return request.get_host()


def preview_url_for(request: Request, env: Environment, port: int) -> str:
    from environments import preview_urls

    return preview_urls.preview_url(env.pk, port, _host(request), request.scheme)


def public_url_for(request: Request, token: str) -> str:
    from environments import preview_urls

    return preview_urls.public_link_url(token, _host(request), request.scheme)


def _url_template(request: Request, env: Environment) -> str:
    from environments import preview_urls

    return preview_urls.preview_url_template(env.pk, _host(request), request.scheme)


def ports_view(request: Request, env: Environment, role: Role) -> dict[str, Any]:
    """The ports answer (also what the environment page renders first)."""
    # A viewer may not open a preview, and a host-network environment has none: no link to follow.
    can_open = role >= Role.MEMBER and env.network_mode != NetworkMode.HOST

    def url(port: int) -> str | None:
        return preview_url_for(request, env, port) if can_open else None

    listening = [p for p in (env.listening_ports or []) if isinstance(p, dict) and "port" in p]
    listening_ports = {p["port"] for p in listening}
    declared = [p for p in (env.template.ports or []) if isinstance(p, dict) and "port" in p]
    links = None
    if role >= Role.ADMIN:
        links = list(env.preview_links.select_related("created_by").order_by("-created_at"))
    return {
        "listening": [{"port": p["port"], "loopback_only": bool(p.get("loopback_only")), "preview_url": url(p["port"])}
                      for p in listening],
        "declared": [{"port": p["port"], "name": p.get("name") or "", "listening": p["port"] in listening_ports,
                      "preview_url": url(p["port"])} for p in declared],
        "checked_at": env.ports_checked_at,
        "preview_url_template": _url_template(request, env) if can_open else None,
        "links": links,
    }


class PortsView(APIView):
    @extend_schema(responses={200: PortsSerializer})
    def get(self, request: Request, pk: Any) -> Response:
        """Viewer role. The TCP ports something listens on inside the environment (found by the worker every
        LSL_PORT_SCAN_INTERVAL seconds; `checked_at` says when), the ports its template declares, each with its
        browser preview URL (null when you may not open it: viewer role, or a host-network environment), and,
        for admins, the environment's public preview links (tokens are never shown again)."""
        env = environment_for(request, pk, Role.VIEWER)
        role = role_for(request.user, env)
        assert role is not None  # environment_for checked it
        return Response(PortsSerializer(ports_view(request, env, role)).data)


class PreviewLinksView(APIView):
    @extend_schema(request=PreviewLinkCreateSerializer, responses={201: CreatedPreviewLinkSerializer, **errors(409)})
    def post(self, request: Request, pk: Any) -> Response:
        """Admin role. A public link to one port: anyone holding its URL may open the preview without signing in,
        until it expires (`expires_in` seconds, default LSL_PREVIEW_LINK_TTL) or is revoked. The URL and token are
        in this answer only. 409 for a host-network environment (its ports are the host's)."""
        env = environment_for(request, pk, Role.ADMIN)
        serializer = PreviewLinkCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        link, token = ports.do_create_preview_link(env, data["port"], by=request.user, ttl_seconds=data.get("expires_in"))
        return Response(CreatedPreviewLinkSerializer({
            "id": link.id, "port": link.port, "url": public_url_for(request, token), "token": token,
            "expires_at": link.expires_at}).data, status=status.HTTP_201_CREATED)


class PreviewLinkView(APIView):
    @extend_schema(parameters=[LINK_ID], request=None, responses={204: None})
    def delete(self, request: Request, pk: Any, link_id: Any) -> Response:
        """Admin role. Revoke a public link: it stops working at once (revoking twice is no error)."""
        env = environment_for(request, pk, Role.ADMIN)
        link = PreviewLink.objects.select_related("environment").filter(pk=link_id, environment=env).first()
        if link is None:
            raise NotFound("No such preview link on this environment.")
        ports.do_revoke_preview_link(link, by=request.user)
        return Response(status=status.HTTP_204_NO_CONTENT)
