"""schemathesis against a live server of its own: the OpenAPI schema (/api/schema/) must be the truth.

A Stack (tests/stack.py: its own database, the test catalog, a user with an API token) runs daphne
only, no worker, so a fuzzed environment creation is a row that never becomes a container. The
schemathesis CLI then generates at least MIN_CASES requests from the schema (examples, coverage,
fuzzing and stateful phases, within FUZZ_SECONDS) with the token and fails on:

* any 5xx (not_a_server_error);
* a response whose status, Content-Type, headers or body the schema does not document;
* an input the schema forbids that is accepted (negative_data_rejection), a missing required
  header not refused, an unsupported method not answered 405, a request without credentials
  not answered 401 (ignored_auth);
* an input the schema allows refused for a reason it could have stated (tests/schemathesis_hooks.py).

The run is killed after HARD_TIMEOUT seconds (a failure). LSL_FUZZ_SEED=<n> replays a run's choices
(its seed is in the report printed on failure).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO
from tests.stack import Stack

MIN_CASES = 1000
FUZZ_SECONDS = int(os.environ.get("LSL_FUZZ_SECONDS", "120"))
HARD_TIMEOUT = FUZZ_SECONDS + 90  # schema loading, the last test cases' shrinking, the report
# Revoking the credential the run authenticates with would turn the rest of it into 401s; its one
# input is the token itself (tests/test_permissions.py covers it).
EXCLUDED_PATHS = ["/api/v1/tokens/revoke-current/"]
# Every check runs (schemathesis' default) but these, for the reasons given.
CONFIG = """
[checks]
# Fails on any 400 to a schema-valid request, even for rules no schema can state (a template that does
# not exist): tests/schemathesis_hooks.py's refused_valid_input replaces it.
positive_data_acceptance.enabled = false
# Needs two users' credentials; tests/test_permissions.py covers who may see what.
object_level_authorization.enabled = false

[[operations]]
# DELETE revokes a token, which stays listed (revoked_at says when): not a use after free.
include-path = "/api/v1/tokens/{id}/"
checks.use_after_free.enabled = false
"""


# Lines of the server log that every 4xx writes (daphne's access log, Django's "Not Found: /x").
ROUTINE = re.compile(r'^(127\.0\.0\.1:\d+ - - \[.*\] ".*" [1-4]\d\d |(?!Internal Server Error)[A-Z][A-Za-z ]+: /)')


def server_errors(stack: Stack, limit: int = 8000) -> str:
    """The server log without its routine lines: the tracebacks behind any 5xx."""
    assert stack.web is not None
    lines = stack.web.log.read_text(errors="replace").splitlines()
    return "\n".join(line for line in lines if not ROUTINE.match(line))[-limit:]


@pytest.fixture()
def stack(tmp_path: Path) -> Any:
    stack = Stack(tmp_path / "lsl", {
        # ignored_auth sends bad credentials on purpose: a 429 for them would hide the 401 it checks.
        "LSL_THROTTLE_AUTH_FAILURES": "1000000/min",
        "LSL_THROTTLE_USER": "1000000/min",
        "LSL_THROTTLE_ANON": "1000000/min",
    }).start(worker=False)
    yield stack
    stack.stop()
    # A fuzzed team volume (or environment workspace) is a real Docker volume labelled with the stack.
    stack._manage("shell", "-c", "from environments import runtime; runtime.local().remove_instance_resources()")


@pytest.mark.own_database
def test_the_api_keeps_the_promises_of_its_openapi_schema(stack: Stack, tmp_path: Path) -> None:
    assert stack.web is not None
    [token] = stack.api("GET", "tokens/").json()["results"]
    # Something for well-formed ids to find (tests/schemathesis_hooks.py): an environment that stays
    # `creating` (no worker) and a team.
    environment = stack.api("POST", "environments/", json={"name": "fuzzed", "template": "busybox"})
    team = stack.api("POST", "teams/", json={"name": "Fuzzers"})
    assert (environment.status_code, team.status_code) == (202, 201), (environment.text, team.text)
    report_dir = tmp_path / "report"
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    command = [
        str(Path(sys.executable).parent / "schemathesis"), "--config-file", str(config),
        "run", f"{stack.web.url}/api/schema/",
        "--header", f"Authorization: Token {stack.token}",
        *[arg for path in EXCLUDED_PATHS for arg in ("--exclude-path", path)],
        "--phases", "examples,coverage,fuzzing,stateful",
        "--max-time", str(FUZZ_SECONDS), "--max-examples", "25",
        "--request-timeout", "20",
        "--generation-database", "none",
        "--report", "json", "--report-dir", str(report_dir),
        "--no-color", "--output-truncate", "true",
    ]
    if os.environ.get("LSL_FUZZ_SEED"):
        command += ["--seed", os.environ["LSL_FUZZ_SEED"]]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.schemathesis_hooks", "PYTHONPATH": str(REPO),
           "LSL_FUZZ_TOKEN_ID": str(token["id"]), "LSL_FUZZ_ENVIRONMENT_ID": environment.json()["id"],
           "LSL_FUZZ_TEAM_SLUG": team.json()["slug"]}
    started = time.monotonic()
    # Its own process group, so a hard time-out kills schemathesis and anything it started.
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=HARD_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"schemathesis ran past {HARD_TIMEOUT} s and was killed:\n{output[-20000:]}", pytrace=False)
    elapsed = time.monotonic() - started

    reports = list(report_dir.glob("json-*.json"))
    assert reports, f"schemathesis wrote no report (exit {proc.returncode}):\n{output[-20000:]}"
    report = json.loads(reports[0].read_text())
    cases = report["test_cases"]["generated"]
    summary = (f"{cases} cases in {elapsed:.0f} s over {report['operations']['tested']} operations, "
               f"seed {report['seed']}, server log {stack.web.log}")
    print(summary)
    assert proc.returncode == 0 and not report["failures"] and not report["errors"], \
        f"schemathesis found problems ({summary}):\n{output[-30000:]}\n--- server errors ---\n{server_errors(stack)}"
    assert report["operations"]["tested"] == report["operations"]["selected"], output[-10000:]
    assert cases >= MIN_CASES, f"only {summary}; at least {MIN_CASES} are required"
    # The run kept its credential (a revoked token would have made most of it 401s).
    assert stack.api("GET", "me/").status_code == 200


# --- what the fuzzing found, pinned (the run above is random; these are not) ---------------------

@pytest.fixture()
def schema() -> dict[str, Any]:
    from drf_spectacular.generators import SchemaGenerator

    return SchemaGenerator().get_schema(request=None, public=True)


def test_the_schema_names_the_token_scheme_and_every_operation_its_errors(schema: dict[str, Any]) -> None:
    schemes = schema["components"]["securitySchemes"]
    assert schemes["tokenAuth"] == {**schemes["tokenAuth"], "type": "apiKey", "in": "header", "name": "Authorization"}
    assert "cookieAuth" in schemes
    error_ref = {"$ref": "#/components/schemas/Error"}
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            where = f"{method.upper()} {path}"
            errors = {code: r for code, r in operation["responses"].items() if code[0] in "45"}
            assert errors, where
            for code, response in errors.items():
                assert response["content"]["application/json"]["schema"] == error_ref, (where, code)
            if path != "/api/v1/auth/token/":
                assert {"401", "403"} <= set(errors) and {"tokenAuth": []} in operation["security"], where
            if "{" in path:
                assert "404" in errors, where
            if "requestBody" in operation:
                assert {"400", "413", "415"} <= set(errors), where
                # JSON, the file transfer's bytes and tars, from-yaml's raw YAML: never a form encoding.
                assert set(operation["requestBody"]["content"]) <= {
                    "application/json", "application/octet-stream", "application/x-tar", "application/yaml",
                    "application/x-yaml", "text/yaml", "text/plain"}, where


def test_the_pagination_parameters_say_what_they_accept(schema: dict[str, Any]) -> None:
    parameters = {p["name"]: p for p in schema["paths"]["/api/v1/tokens/"]["get"]["parameters"]}
    assert parameters["limit"]["schema"] == {"type": "string", "example": "50"}
    assert "at most 200" in parameters["limit"]["description"]


@pytest.mark.django_db
@pytest.mark.parametrize(("method", "path", "body", "field"), [
    ("post", "/api/v1/ping/", {"client_id": "6f1c5a38-0d4b-4d43-9a55-3e4b8b6fe0aa", "hostname": 42}, "hostname"),
    ("post", "/api/v1/ping/", {"client_id": 5}, "client_id"),
    ("post", "/api/v1/teams/", {"name": "x", "slug": " padded"}, "slug"),
    ("post", "/api/v1/volumes/", {"team": 0, "name": "cache"}, "team"),
    ("post", "/api/v1/environments/", {"name": "e", "template": 3}, "template"),
    ("post", "/api/v1/environments/", {"name": "e", "template": "busybox", "team": ""}, "team"),
    ("post", "/api/v1/environments/", {"name": "e", "template": "busybox", "mounts": [{"source": "/x", "target": "/y", "read_only": "no"}]}, "mounts"),
    ("get", "/api/v1/environments/?status=sleeping", None, "status"),
    ("get", "/api/v1/monitor/?stats=maybe", None, "stats"),
])
def test_an_input_the_schema_forbids_is_a_400(people: Any, catalog: None, method: str, path: str, body: Any,
                                             field: str) -> None:
    from accounts.services import add_member, create_team
    from tests.conftest import api_client

    add_member(create_team("Zero", owner=people.staff, slug="0"), people.owner)
    response = getattr(api_client(people.owner), method)(path, body, format="json")
    assert response.status_code == 400, (response.status_code, response.content)
    assert set(response.json()["error"]["fields"]) == {field}, response.json()


@pytest.mark.django_db
def test_the_api_speaks_json_only_and_its_unknown_paths_answer_json(people: Any) -> None:
    from tests.conftest import api_client

    client = api_client(people.owner)
    form = client.post("/api/v1/teams/", {"name": "Formed"}, format="multipart")
    assert form.status_code == 415 and form.json()["error"]["code"] == "unsupported_media_type", form.content
    for path in ("/api/v1/nothing-here/", "/api/v1/environments/not-an-id/", "/api/v1/tokens/99999999999999999999/"):
        missing = client.post(path, {}, format="json")
        assert missing.status_code == 404 and missing["Content-Type"] == "application/json", (path, missing.content)
        assert missing.json()["error"]["code"] == "not_found"


@pytest.mark.django_db
def test_a_grant_id_too_long_for_sql_is_a_404_not_a_500(people: Any, catalog: None) -> None:
    from tests.conftest import api_client

    client = api_client(people.owner)
    created = client.post("/api/v1/environments/", {"name": "granted", "template": "busybox"}, format="json")
    assert created.status_code == 202, created.content
    access = f"/api/v1/environments/{created.json()['id']}/access/"
    for grant_id in ("user-" + "9" * 19, "team-00090597008000022005400987007000", "user-" + "9" * 18):
        response = client.delete(f"{access}{grant_id}/")
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found", (grant_id, response.content)
