"""The engine dies under LSL: kill -9 of a (private) dockerd mid-create, reads while it is down, recovery.

Runs a whole LSL of its own (tests/stack.py) against a private engine (tests/engines.py) so the crash
touches nothing else. The workspace's bytes are checksummed across the crash.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import pytest

from tests.engines import PrivateEngine, private_engine_fixture  # noqa: F401  (registers `private_engine`)
from tests.stack import Stack


def wait_status(stack: Stack, env_id: str, wanted: set[str], timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        response = stack.api("GET", f"environments/{env_id}/")
        assert response.status_code == 200, response.text  # reads answer, engine or not
        data = response.json()
        # `recorded_status`: while the node is marked unavailable, `status` reads node_unavailable.
        if data["recorded_status"] in wanted:
            return data
        if time.monotonic() > deadline:
            raise AssertionError(f"environment stuck in {data['status']!r} (wanted {wanted}): {data['last_error']!r}")
        time.sleep(0.1)


def wait_available(stack: Stack, env_id: str, timeout: float = 15) -> None:
    """Until the worker's node check has seen the engine answer again (actions 503 before that)."""
    deadline = time.monotonic() + timeout
    while stack.api("GET", f"environments/{env_id}/").json()["status"] == "node_unavailable":
        assert time.monotonic() < deadline, "the node was not marked available again"
        time.sleep(0.1)


def list_latency(stack: Stack, rounds: int = 20) -> float:
    times = []
    for _ in range(rounds):
        started = time.monotonic()
        response = stack.api("GET", "environments/")
        times.append(time.monotonic() - started)
        assert response.status_code == 200, response.text
    return statistics.median(times)


@pytest.mark.own_database
def test_engine_killed_mid_create_then_start_recovers(private_engine: PrivateEngine, tmp_path: Path) -> None:
    stack = Stack(tmp_path / "lsl", {**private_engine.env(), "LSL_ENGINE_RETRY_FOR": "3"}).start()
    try:
        with_engine = list_latency(stack)
        response = stack.api("POST", "environments/", json={"name": "crash", "template": "busybox"})
        assert response.status_code == 202, response.text
        env_id = response.json()["id"]
        private_engine.kill()  # while the worker provisions it

        # With the engine dead: no row stays `creating`, reads answer from the database, actions say why.
        data = wait_status(stack, env_id, {"error", "running"}, timeout=60)
        without_engine = list_latency(stack)
        print(f"GET /environments/ median: engine up {with_engine * 1000:.1f} ms, engine down {without_engine * 1000:.1f} ms")
        action = stack.api("POST", f"environments/{env_id}/start/")
        # engine_unavailable until the worker's node check marks the (only) node down, node_unavailable after.
        assert action.status_code == 503 and action.json()["error"]["code"] in ("engine_unavailable", "node_unavailable"), \
            action.text

        private_engine.restart()
        wait_available(stack, env_id)
        response = stack.api("POST", f"environments/{env_id}/start/")
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "running", data
        ours = private_engine.docker("ps", "-aq", "--no-trunc", "--filter", f"label=lsl.environment={env_id}").stdout.split()
        assert ours == [response.json()["container_id"]], "exactly one container: a half-made one was adopted or replaced"

        # The workspace survives an engine crash byte for byte.
        container = ours[0]
        private_engine.docker("exec", container, "sh", "-c", "head -c 1048576 /dev/urandom > /workspace/blob && sync")
        before = private_engine.docker("exec", container, "md5sum", "/workspace/blob").stdout.split()[0]
        private_engine.kill()
        private_engine.restart()
        stopped = wait_status(stack, env_id, {"stopped", "missing"}, timeout=15)  # the worker's reconnect reconcile
        assert stopped["recorded_status"] == "stopped", stopped
        wait_available(stack, env_id)
        assert stack.api("POST", f"environments/{env_id}/start/").status_code == 200
        after = private_engine.docker("exec", container, "md5sum", "/workspace/blob").stdout.split()[0]
        assert before == after
    finally:
        stack.stop()
