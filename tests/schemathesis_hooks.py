"""Hooks for the schemathesis run of tests/test_schemathesis.py (loaded by the CLI through SCHEMATHESIS_HOOKS).

* `refused_valid_input`: the stricter half of schemathesis' own positive_data_acceptance. That check
  fails on any 400 to a schema-valid request, but some rules no schema can state (a template slug
  that does not exist, a name already taken, a mount source outside the allowed roots), so it would
  fail on every fuzzed create. This one fails when a schema-valid request is refused for a reason the
  schema *could* have stated: a missing or blank field, a length, a range, a type, a format, a choice,
  a NUL byte, unparsable JSON. Those are the schema's lies.
* The token the run authenticates with is never revoked by a fuzzed `DELETE /api/v1/tokens/{id}/`.
* Half of the well-formed environment ids and team slugs in paths are replaced by ones that exist
  (LSL_FUZZ_ENVIRONMENT_ID, LSL_FUZZ_TEAM_SLUG), or nearly every request under them would be a 404.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from typing import Any

import schemathesis

# DRF's own messages for what JSON Schema can express (rest_framework/fields.py, serializers.py, parsers).
STATED_REASONS = re.compile("|".join([
    r"This field is required\.",
    r"This field may not be blank\.",
    r"This field may not be null\.",
    r"Null characters are not allowed\.",
    r"Surrogate characters are not allowed",
    r"Ensure this field has (no more|at least) ",
    r"Ensure this value is (less|greater) than",
    r"Ensure this field has no more than \d+ elements",
    r"A valid (integer|number) is required\.",
    r"Must be a valid (boolean|UUID)\.",
    r"Not a valid string\.",
    r"Expected a (list|dictionary) of items",
    r"Invalid data\. Expected a dictionary",
    r"is not a valid choice\.",
    r"Enter a valid ",
    r"Datetime has wrong format",
    r"This list may not be empty\.",
    r"JSON parse error",
    r"Incorrect type\.",
]))
# Never a sensible answer to a request the schema allows (401/403/404/409/429 may be: state, not shape).
SHAPE_STATUSES = {405, 406, 411, 413, 414, 415, 422}


def _messages(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [m for v in value.values() for m in _messages(v)]
    if isinstance(value, list):
        return [m for v in value for m in _messages(v)]
    return []


@schemathesis.check
def refused_valid_input(ctx: Any, response: Any, case: Any) -> bool | None:
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive:
        return None
    if response.status_code in SHAPE_STATUSES:
        raise AssertionError(f"A schema-valid request was refused with {response.status_code}:\n{response.text[:2000]}")
    if response.status_code != 400:
        return None
    try:
        error = json.loads(response.text)["error"]
    except (ValueError, KeyError, TypeError):
        return None  # not the error shape: response_schema_conformance reports that
    stated = [m for m in _messages(error.get("fields") or error.get("detail")) if STATED_REASONS.search(m)]
    if stated:
        raise AssertionError("A schema-valid request was refused for a reason the schema could state:\n"
                             + json.dumps(error, ensure_ascii=False)[:2000])
    return None


PROTECTED_TOKEN_ID = os.environ.get("LSL_FUZZ_TOKEN_ID", "")
# Objects the test created, so that half of the well-formed ids reach past the 404 into the views.
ENVIRONMENT_ID = os.environ.get("LSL_FUZZ_ENVIRONMENT_ID", "")
TEAM_SLUG = os.environ.get("LSL_FUZZ_TEAM_SLUG", "")
UUID_SHAPED = re.compile(r"^[0-9a-fA-F-]{32,36}$")


# Case hooks, not per-part ones (filter_path_parameters...): the coverage phase applies only these.
@schemathesis.hook
def filter_case(ctx: Any, case: Any) -> bool:
    path, method, params = case.operation.path, case.method.upper(), case.path_parameters or {}
    if method == "DELETE" and path == "/api/v1/tokens/{id}/" and str(params.get("id")) == PROTECTED_TOKEN_ID:
        return False
    if method == "DELETE" and path == "/api/v1/environments/{id}/" and params.get("id") == ENVIRONMENT_ID:
        return False  # the stateful phase finds its id in a list: the rest of the run still needs it
    # `?follow=<yes>` on a setup log streams until setup ends, which (no worker runs) is never: a request
    # that ends only with the client's time-out says nothing about the schema.
    return not (path.endswith("/setup-log/") and (case.query or {}).get("follow") in ("1", "true", "True", "yes"))


@schemathesis.hook
def map_case(ctx: Any, case: Any) -> Any:
    path, params = case.operation.path, case.path_parameters
    if not params or case.method.upper() == "DELETE" and path in (
            "/api/v1/environments/{id}/", "/api/v1/teams/{slug}/members/{username}/"):
        return case  # deleting the test's objects would send the rest of the run back to 404s
    # Only well-formed values, chosen by the value itself (the same choice when a case is shrunk or
    # replayed): a value the schema forbids stays, so a negative case is still negative.
    for name in ("id", "env_id"):
        value = params.get(name)
        if (ENVIRONMENT_ID and path.startswith("/api/v1/environments/{") and isinstance(value, str)
                and UUID_SHAPED.match(value) and zlib.crc32(value.encode()) % 2 == 0):
            params[name] = ENVIRONMENT_ID
    value = params.get("slug")
    if (TEAM_SLUG and path.startswith("/api/v1/teams/{slug}/") and isinstance(value, str)
            and re.match(r"^[-\w]+$", value) and zlib.crc32(value.encode()) % 2 == 0):
        params["slug"] = TEAM_SLUG
    return case
