"""The OpenAPI schema (drf-spectacular) told as the server behaves: how to authenticate, which errors
each operation can answer (all in one JSON shape), and the limits the validators enforce.

tests/test_schemathesis.py holds the schema to that: it fuzzes a live server with it and fails on any
response the schema does not describe, any input it forbids that is accepted, and any input it allows
that is refused for a reason it could have stated.
"""

from __future__ import annotations

import re
from typing import Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.openapi import AutoSchema as SpectacularAutoSchema
from drf_spectacular.plumbing import is_serializer
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse
from rest_framework import permissions, serializers
from rest_framework.request import Request

# --- authentication ---------------------------------------------------------------------------------


class TokenAuthScheme(OpenApiAuthenticationExtension):
    """accounts.auth.APITokenAuthentication. Defined here, next to the AutoSchema that settings name,
    so it is registered whenever a schema is generated (no import elsewhere needed)."""

    target_class = "accounts.auth.APITokenAuthentication"
    name = "tokenAuth"

    def get_security_definition(self, auto_schema: Any) -> dict[str, Any]:
        return {
            "type": "apiKey",
            "in": "header",
            "name": "Authorization",
            "description": 'An API token with the required prefix "Token": `Authorization: Token lsl_…` '
                           "(`POST /api/v1/auth/token/`, `POST /api/v1/tokens/`, or `manage.py lsl_token`).",
        }


# --- the error shape (lsl_site/errors.py) -------------------------------------------------------------


class ErrorBodySerializer(serializers.Serializer):
    code = serializers.CharField(help_text="Machine-readable: invalid, not_found, permission_denied, "
                                           "not_authenticated, conflict, not_running, throttled, quota_exceeded…")
    detail = serializers.CharField(help_text="Human-readable.")
    fields = serializers.DictField(
        required=False,
        child=serializers.JSONField(),
        help_text='Per input field, the reasons it was refused: {"field": ["why", ...]} '
                  '("non_field_errors" for the request as a whole; nested objects for nested inputs).')


class ErrorSerializer(serializers.Serializer):
    error = ErrorBodySerializer()

    class Meta:
        ref_name = "Error"


ERROR_DESCRIPTIONS = {
    400: "Invalid input: a malformed body, or fields that break a rule (`fields` says which).",
    401: "No credentials, or a bad, expired or revoked token.",
    403: "Authenticated, but not allowed (role, ownership, quota, CSRF for session requests).",
    404: "Not found, or not visible to the caller.",
    409: "The current state does not allow it (e.g. the environment is not running), or the engine refused.",
    413: "The request body is larger than the server accepts (LSL_MAX_REQUEST_BYTES).",
    415: "The request's Content-Type is not one this operation parses.",
    429: "Throttled: too many requests (Retry-After says when to try again).",
    503: "The Docker engine is not reachable.",
}

# Operations that reach the Docker engine (and so may answer 409 engine_error or 503), by path suffix
# and method. Reads never call the engine (the worker samples it), except file downloads.
ENGINE_OPERATIONS = re.compile(
    r"^(POST /api/v1/environments/(\{id\}/(start|stop|restart|exec|snapshot)/|from-yaml/)?"
    r"|POST /api/v1/environments/\{env_id\}/sessions/"
    r"|(PUT|PATCH|DELETE) /api/v1/environments/\{id\}/"
    r"|(GET|PUT) /api/v1/environments/\{id\}/files/"
    r"|(POST /api/v1/volumes/|DELETE /api/v1/volumes/\{id\}/)"
    r"|POST /api/v1/sessions/\{id\}/end/)$")
# Operations refused when the state does not allow them (409), besides the engine's own refusals.
STATE_OPERATIONS = re.compile(
    r"^(POST /api/v1/environments/\{id\}/(start|stop|restart|exec|snapshot)/"
    r"|POST /api/v1/environments/\{env_id\}/sessions/"
    r"|GET /api/v1/environments/\{id\}/files/"
    r"|DELETE /api/v1/volumes/\{id\}/)$")

# A DRF CharField trims surrounding whitespace and refuses NUL: a non-blank one needs a character that
# is neither; a blank-allowed one still may not hold NUL. (JSON Schema patterns are not anchored.)
NON_BLANK = r"^[^\x00]*[^\s\x00][^\x00]*$"
NO_NUL = r"^[^\x00]*$"
SLUG = r"^[-a-zA-Z0-9_]+$"  # django.core.validators.slug_re
SLUG_UNICODE = r"^[-\w]+$"


def errors(*statuses: int) -> dict[int, OpenApiResponse]:
    """For `@extend_schema(responses={200: ..., **errors(404)})`: an error status that AutoSchema cannot
    infer from the view (e.g. a 404 for a query parameter naming an object)."""
    return {status: OpenApiResponse(ErrorSerializer, description=ERROR_DESCRIPTIONS[status]) for status in statuses}


class AutoSchema(SpectacularAutoSchema):
    """Adds the error responses every operation can really give, each the `Error` component, so a new
    view documents them without a decorator. A view's own `@extend_schema(responses=...)` wins."""

    def _get_request_body(self, direction: str = "request") -> dict[str, Any] | None:
        # drf-spectacular marks a body required only when every media type's schema is a serializer with a
        # required field; a view whose body is a raw document in some media types (from-yaml) says so itself.
        body = super()._get_request_body(direction)
        if body is not None and getattr(self.view, "request_body_required", False):
            body["required"] = True
        return body

    def _get_response_bodies(self, direction: str = "response") -> dict[str, Any]:
        responses = super()._get_response_bodies(direction)
        if direction != "response":
            return responses
        error = self.resolve_serializer(ErrorSerializer(), "response").ref
        for status in sorted(self.error_statuses()):
            responses.setdefault(str(status), {
                "description": ERROR_DESCRIPTIONS[status],
                "content": {"application/json": {"schema": error}},
            })
        return responses

    def error_statuses(self) -> set[int]:
        statuses: set[int] = set()
        operation = f"{self.method} {self.path}"
        has_body = self.method in ("POST", "PUT", "PATCH") and self.get_request_serializer() is not None
        public = any(isinstance(p, permissions.AllowAny) for p in self.view.get_permissions())
        if not public:
            statuses |= {401, 403}
        elif getattr(self.view, "authentication_classes", None) == []:
            # No authenticator offers a WWW-Authenticate challenge, so DRF turns a 401 into a 403.
            statuses.add(403)
        if self._has_validated_query_parameters() or has_body:
            statuses.add(400)
        if has_body:
            statuses |= {413, 415}
        if "{" in self.path:
            statuses.add(404)
        if ENGINE_OPERATIONS.match(operation):
            statuses |= {409, 503}
        if STATE_OPERATIONS.match(operation):
            statuses.add(409)
        if self.view.get_throttles():
            statuses.add(429)
        return statuses

    def _has_validated_query_parameters(self) -> bool:
        """Declared query parameters (views validate theirs); pagination's never refuse (lsl_site/pagination.py)."""
        return any(is_serializer(p) or (isinstance(p, OpenApiParameter) and p.location == OpenApiParameter.QUERY)
                   for p in self.get_override_parameters())

    def _insert_field_validators(self, field: Any, schema: dict[str, Any]) -> None:
        super()._insert_field_validators(field, schema)
        # drf-spectacular offers a blank-allowed string with a pattern as oneOf [the string, ""]; NO_NUL
        # already admits "", so "" would match both branches, which oneOf forbids: one branch is the truth.
        branches = schema.get("oneOf")
        if (isinstance(branches, list) and len(branches) == 2 and branches[1] == {"type": "string", "maxLength": 0}
                and branches[0].get("pattern") == NO_NUL and not {"minLength", "format"} & set(branches[0])):
            del schema["oneOf"]
            schema.update(branches[0])

    def _map_serializer_field(self, field: Any, direction: str, bypass_extensions: bool = False) -> dict[str, Any]:
        schema = super()._map_serializer_field(field, direction, bypass_extensions)
        if (direction == "request" and isinstance(field, serializers.CharField) and schema.get("type") == "string"
                and not {"enum", "format", "pattern"} & set(schema)):
            if isinstance(field, serializers.SlugField):
                schema["pattern"] = SLUG_UNICODE if field.allow_unicode else SLUG
            else:
                schema["pattern"] = NO_NUL if field.allow_blank or not field.trim_whitespace else NON_BLANK
        return schema


# --- query parameters that are flags ---------------------------------------------------------------------

# Exactly these words (what the CLI, the web pages and Python's str(bool) send), so the schema can list them.
TRUE_WORDS = ("1", "true", "True", "yes")
FALSE_WORDS = ("0", "false", "False", "no")


def flag_parameter(name: str, description: str) -> OpenApiParameter:
    """The OpenAPI side of query_flag(): exactly the words it accepts."""
    return OpenApiParameter(name, str, enum=[*TRUE_WORDS, *FALSE_WORDS], description=description)


def query_flag(request: Request, name: str, default: bool) -> bool:
    """`?name=` as a boolean. A word that is neither yes nor no is a 400 (not silently one of them):
    `?purge=ture` must not keep a workspace its caller meant to delete."""
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if raw in TRUE_WORDS:
        return True
    if raw in FALSE_WORDS:
        return False
    raise serializers.ValidationError({name: [f"expected one of {', '.join(TRUE_WORDS + FALSE_WORDS)}"]})
