"""scripts/demo_api.py against a real daphne: every action, its JSON output, and its failures.

The script is run as a user would run it (its own process, only --url and --token), so what it prints
is what the API answered over HTTP; the rows it causes (a pinged client) are checked in the database.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from typing import Any

import pytest

from tests.conftest import REPO, free_port, make_token

# The tests against the live server need its rows (catalog, users) committed; the usage and unreachable-server
# tests need neither, and skip the cost of a transactional database.
live = [pytest.mark.usefixtures("engine", "catalog"), pytest.mark.django_db(transaction=True, serialized_rollback=True)]


def with_live_server(test: Any) -> Any:
    for mark in live:
        test = mark(test)
    return test

SCRIPT = REPO / "scripts" / "demo_api.py"


def demo(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    # LSL_URL/LSL_TOKEN/LSL_METRICS_TOKEN from the caller's shell must not stand in for missing flags.
    clean = {k: v for k, v in os.environ.items() if k not in ("LSL_URL", "LSL_TOKEN", "LSL_METRICS_TOKEN")}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60,
                          env={**clean, **(env or {})}, check=False)


@pytest.fixture()
def alice_env(people: Any, make_env: Any) -> Any:
    """A running environment of alice's, so monitor has a row (and figures) to show."""
    env = make_env(people.owner, name="demo-dev")
    assert env.status == "running", env.last_error
    return env


@with_live_server
def test_config(people: Any, live_server_proc: Any) -> None:
    result = demo("--url", live_server_proc.url, "--token", make_token(people.owner), "--action", "config")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "== config: GET /api/v1/config/" in out
    assert "user       alice (staff: no)" in out
    assert f"websocket  {live_server_proc.ws_url}/ws/" in out
    assert "busybox" in out and "lsl-test/busybox:latest" in out  # the test catalog's templates
    assert out.rstrip().endswith("ok: config")

    # --url and --token default to LSL_URL and LSL_TOKEN, like the lsl CLI.
    from_env = demo("--action", "config", env={"LSL_URL": live_server_proc.url, "LSL_TOKEN": make_token(people.owner, "env")})
    assert from_env.returncode == 0, from_env.stderr
    assert "user       alice" in from_env.stdout


@with_live_server
def test_ping_records_this_client(people: Any, live_server_proc: Any) -> None:
    from accounts.models import Client as PingedClient

    client_id = uuid.uuid4()
    result = demo("--url", live_server_proc.url, "--token", make_token(people.owner), "--action", "ping",
                  "--client-id", str(client_id))
    assert result.returncode == 0, result.stderr
    assert f"client     {client_id}" in result.stdout
    assert "round trip" in result.stdout and result.stdout.rstrip().endswith("ok: ping")
    pinged = PingedClient.objects.get(client_id=client_id)
    assert pinged.user == people.owner and pinged.version == "demo_api/1"

    # Without --client-id, the id is derived from the host name: a second run updates the same row.
    token = make_token(people.owner, "again")
    for _ in range(2):
        assert demo("--url", live_server_proc.url, "--token", token, "--action", "ping").returncode == 0
    assert PingedClient.objects.filter(user=people.owner).count() == 2


@with_live_server
def test_monitor_shows_host_and_environments(people: Any, live_server_proc: Any, alice_env: Any) -> None:
    result = demo("--url", live_server_proc.url, "--token", make_token(people.owner), "--action", "monitor")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "== monitor: GET /api/v1/monitor/" in out
    assert "host       cpu " in out and " GiB" in out
    assert "environments  1" in out
    assert "demo-dev" in out and "running" in out and "busybox" in out

    # Another user sees none of alice's environments: the script shows what the API filters.
    other = demo("--url", live_server_proc.url, "--token", make_token(people.outsider), "--action", "monitor")
    assert other.returncode == 0, other.stderr
    assert "environments  0" in other.stdout and "demo-dev" not in other.stdout


@with_live_server
def test_all_runs_every_action_in_order_and_json_gives_the_answers(people: Any, live_server_proc: Any, alice_env: Any) -> None:
    token = make_token(people.owner)
    result = demo("--url", live_server_proc.url, "--token", token, "--action", "all")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    heads = [out.index("== config:"), out.index("== ping:"), out.index("== monitor:")]
    assert heads == sorted(heads)
    assert out.rstrip().endswith("ok: config, ping, monitor")

    result = demo("--url", live_server_proc.url, "--token", token, "--json")  # --action all is the default
    assert result.returncode == 0, result.stderr
    answers = json.loads(result.stdout)
    assert set(answers) == {"config", "ping", "monitor"}
    assert answers["config"]["user"]["username"] == "alice"
    assert [env["name"] for env in answers["monitor"]["environments"]] == ["demo-dev"]
    assert "cpu_count" in answers["monitor"]["host"]


# --- failures: non-zero, one line on stderr saying why ---------------------------------------------

@with_live_server
def test_a_refused_token_exits_3(people: Any, live_server_proc: Any) -> None:
    from accounts.models import APIToken
    from accounts.services import create_token, revoke_token

    result = demo("--url", live_server_proc.url, "--token", "lsl_not-a-real-token", "--action", "all")
    assert result.returncode == 3
    assert result.stderr.startswith("demo_api: error: config: GET /api/v1/config/: HTTP 401"), result.stderr
    assert "Traceback" not in result.stderr
    assert "== ping" not in result.stdout  # `all` stops at the first failure

    token, key = create_token(people.owner, "revoked")
    revoke_token(APIToken.objects.get(pk=token.pk))
    result = demo("--url", live_server_proc.url, "--token", key, "--action", "ping")
    assert result.returncode == 3 and "HTTP 401" in result.stderr, result.stderr


def test_an_unreachable_server_exits_6() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = demo("--url", url, "--token", "lsl_x", "--action", "config", "--timeout", "5")
    assert result.returncode == 6
    assert f"cannot reach the server at {url}" in result.stderr, result.stderr


@with_live_server
def test_a_wrong_metrics_token_fails_monitor(people: Any, live_server_proc: Any) -> None:
    # The live server has no LSL_METRICS_TOKEN: /metrics refuses every bearer token, and says why.
    result = demo("--url", live_server_proc.url, "--token", make_token(people.owner), "--action", "monitor",
                  "--metrics-token", "guess")
    assert result.returncode == 3, result.stderr
    assert "GET /metrics: HTTP 403" in result.stderr and "LSL_METRICS_TOKEN" in result.stderr


def test_usage_errors_exit_2() -> None:
    assert demo("--token", "lsl_x").returncode == 2  # no --url, no LSL_URL
    bad = demo("--url", "127.0.0.1:8000", "--token", "lsl_x")
    assert bad.returncode == 2 and "http://" in bad.stderr
    assert demo("--url", "http://127.0.0.1:1", "--token", "lsl_x", "--action", "get_config").returncode == 2
