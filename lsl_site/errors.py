"""One JSON error shape for the whole API: {"error": {"code", "detail", "fields"?}}."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.http import Http404
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler


class DomainError(Exception):
    """A rule of LSL's own said no. Domain code raises these (never DRF's exceptions); the API maps
    them once (api_exception_handler) and so do the web pages (frontend.views.domain_errors)."""

    status = 400
    code = "invalid"

    def __init__(self, detail: str, *, fields: dict[str, list[str]] | None = None) -> None:
        super().__init__(detail)
        self.detail, self.fields = detail, fields


class InvalidInput(DomainError):
    """Fields that break a rule: {"field": ["why", ...]} (`non_field_errors` for the request as a whole)."""

    def __init__(self, fields: dict[str, list[str]]) -> None:
        only_general = set(fields) == {"non_field_errors"}
        detail = "; ".join(fields["non_field_errors"]) if only_general else "The request has invalid fields."
        super().__init__(detail, fields=fields)

    def messages(self) -> list[str]:
        """One readable line per problem ("field: why"), for pages and logs."""
        return [msg if field == "non_field_errors" else f"{field}: {msg}"
                for field, msgs in (self.fields or {}).items() for msg in msgs]


class QuotaExceeded(DomainError):
    """A 403 naming the limit: {"quota": ["..."]}. Raised before anything is created or started.

    Here rather than in environments.policy so that accounts (team creation) raises the same error
    without depending on environments (dependencies point one way)."""

    status = 403
    code = "quota_exceeded"

    def __init__(self, scope: str, limit: str, message: str) -> None:
        super().__init__(message, fields={"quota": [message]})
        self.scope, self.limit = scope, limit


class EngineUnavailable(exceptions.APIException):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_code = "engine_unavailable"
    default_detail = "The Docker engine is not reachable."


class Conflict(exceptions.APIException):
    status_code = status.HTTP_409_CONFLICT
    default_code = "conflict"
    default_detail = "The request conflicts with the current state."


def api_exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    from environments.runtime import EngineError, EngineUnavailableError, ImageNotFound, NodeUnavailableError

    if isinstance(exc, Http404):  # get_object_or_404's: the same code as the API's own NotFound
        exc = exceptions.NotFound(str(exc) or None)
    elif isinstance(exc, DjangoPermissionDenied):
        exc = exceptions.PermissionDenied(str(exc) or None)
    if isinstance(exc, NodeUnavailableError):
        return Response({"error": {"code": "node_unavailable", "detail": str(exc), "node": exc.node}},
                        status=status.HTTP_503_SERVICE_UNAVAILABLE)
    if isinstance(exc, EngineUnavailableError):
        exc = EngineUnavailable(str(exc))
    elif isinstance(exc, ImageNotFound):
        exc = exceptions.ValidationError({"image": [str(exc)]})
    elif isinstance(exc, EngineError):
        exc = Conflict(str(exc), code="engine_error")
    if isinstance(exc, DomainError):
        body: dict[str, Any] = {"code": exc.code, "detail": exc.detail}
        if exc.fields:
            body["fields"] = exc.fields
        return Response({"error": body}, status=exc.status)
    response = exception_handler(exc, context)
    if response is None:
        return None
    data = response.data
    if isinstance(exc, exceptions.ValidationError):
        body = {"code": "invalid", "detail": "The request has invalid fields.", "fields": data}
        if isinstance(data, list):
            body = {"code": "invalid", "detail": "; ".join(str(d) for d in data)}
        elif isinstance(data, dict) and set(data) == {"non_field_errors"}:
            body = {"code": "invalid", "detail": "; ".join(str(d) for d in data["non_field_errors"]), "fields": data}
    else:
        detail = data.get("detail", data) if isinstance(data, dict) else data
        codes = exc.get_codes() if isinstance(exc, exceptions.APIException) else "error"
        code = codes if isinstance(codes, str) else (codes.get("detail") if isinstance(codes, dict) else "error")
        body = {"code": str(code or "error"), "detail": str(detail)}
    response.data = {"error": body}
    return response
