"""Several Docker engines as nodes (issue 15), with real dockerd processes.

An LSL of its own (tests/stack.py: its own database, two daphne processes sharing Redis, a worker)
and two private engines (tests/engines.py: each in its own network namespace with its own data
root; never a second dockerd on the host's network namespace). The `local` node (the main engine) is
drained, so everything here lands on nodes b and c, which are reached as remote engines are: through
their API sockets only (no keeper socket directory: terminals go through `docker exec`).
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, start_daphne, stop_daphne
from tests.engines import TEST_IMAGE, PrivateEngine, private_engine
from tests.stack import Stack
from tests.wsclient import TermClient


@pytest.fixture()
def engines() -> Iterator[tuple[PrivateEngine, PrivateEngine]]:
    b, c = private_engine("node-b"), private_engine("node-c")
    try:
        for engine in (b, c):
            engine.start()
            engine.load_image(TEST_IMAGE)
        yield b, c
    finally:
        for engine in (b, c):
            engine.stop()


FAST_CHECKS = {"LSL_NODE_CHECK_INTERVAL": "0.5", "LSL_NODE_CHECK_TIMEOUT": "1", "LSL_NODE_FAILURES": "2",
               "LSL_ENGINE_RETRY_FOR": "3"}


def lsl_node(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "manage.py", "lsl_node", *args], cwd=REPO, env={**os.environ, **stack.env},
                          capture_output=True, text=True, timeout=60)


def wait_for(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        time.sleep(0.1)


def create(stack: Stack, name: str, template: str = "busybox", timeout: float = 90) -> dict[str, Any]:
    response = stack.api("POST", "environments/", json={"name": name, "template": template})
    assert response.status_code == 202, response.text
    env_id = response.json()["id"]

    def running() -> dict[str, Any] | None:
        data = stack.api("GET", f"environments/{env_id}/").json()
        assert data["status"] != "error", data["last_error"]
        return data if data["status"] == "running" else None

    return wait_for(running, timeout, f"{name} running")


def exec_output(stack: Stack, env_id: str, command: list[str]) -> tuple[int, bytes]:
    response = stack.api("POST", f"environments/{env_id}/exec/", json={"command": command}, timeout=60)
    assert response.status_code == 200, response.text
    output, code = b"", None
    for line in response.text.splitlines():
        item = json.loads(line)
        if "o" in item:
            output += base64.b64decode(item["o"])
        else:
            code = item["exit_code"]
    assert code is not None
    return code, output


def on_engine(engine: PrivateEngine, container_id: str) -> bool:
    listed = subprocess.run(["docker", "-H", engine.url, "ps", "-q", "--no-trunc"], capture_output=True, text=True,
                            timeout=30).stdout.split()
    return container_id in listed


@pytest.mark.own_database
def test_nodes_place_drain_survive_a_dead_engine_and_recover(engines: tuple[PrivateEngine, PrivateEngine],
                                                            redis_url: str, tmp_path: Path) -> None:
    b, c = engines
    stack = Stack(tmp_path / "lsl", {"LSL_REDIS_URL": redis_url, **FAST_CHECKS}).start()
    other = None
    try:
        # --- registering: a wrong address is refused at once, with the reason --------------------
        refused = lsl_node(stack, "add", "nowhere", "unix:///run/lsl-no-such-engine.sock")
        assert refused.returncode != 0 and "did not answer" in refused.stderr, refused
        refused = lsl_node(stack, "add", "plain", "tcp://127.0.0.1:2375")
        assert refused.returncode != 0 and "TLS client certificates" in refused.stderr, refused
        for name, engine in (("b", b), ("c", c)):
            # 8 CPUs each: room for everything this test makes, whatever LSL_NODE_CPU_OVERCOMMIT says.
            added = lsl_node(stack, "add", name, engine.url, "--label", "pool=test", "--cpus", "8")
            assert added.returncode == 0, added.stderr
        assert lsl_node(stack, "add", "b2", b.url).returncode != 0, "the same engine twice"
        assert lsl_node(stack, "drain", "local").returncode == 0

        # --- placement spreads; drain is respected ------------------------------------------------
        envs = [create(stack, f"spread-{i}") for i in range(4)]
        assert Counter(e["node"] for e in envs) == {"b": 2, "c": 2}, [e["node"] for e in envs]
        for env in envs:
            assert on_engine(b if env["node"] == "b" else c, env["container_id"]), env
        assert lsl_node(stack, "drain", "b").returncode == 0
        later = [create(stack, f"drained-{i}") for i in range(2)]
        assert {e["node"] for e in later} == {"c"}
        listing = lsl_node(stack, "list").stdout
        assert "draining" in listing and "pool=test" in listing and "arch=amd64" in listing, listing
        removal = lsl_node(stack, "remove", "b")
        assert removal.returncode != 0 and "still holds 2 environments" in removal.stderr, removal
        assert lsl_node(stack, "activate", "b").returncode == 0

        # --- a session on node c, joined through the web process that did not open it --------------
        on_b = next(e for e in envs if e["node"] == "b")
        on_c = next(e for e in envs if e["node"] == "c")
        other = start_daphne(stack.env, name=f"daphne2-{stack.instance}")
        assert stack.web is not None
        session = stack.api("POST", f"environments/{on_c['id']}/sessions/", json={}).json()
        alice = TermClient(session["ws_url"], token=stack.token)
        bob = TermClient(session["ws_url"].replace(stack.web.ws_url, other.ws_url), token=stack.token)
        for client in (alice, bob):
            client.wait_event("snapshot")
        alice.send_input("echo from-alice-$((6*7))\r")
        bob.wait_output(b"from-alice-42")
        bob.send_input("echo from-bob-$((7*7))\r")
        alice.wait_output(b"from-bob-49")

        # A terminal on b too: its shell dies with the engine, and it says why.
        session_b = stack.api("POST", f"environments/{on_b['id']}/sessions/", json={}).json()
        on_b_term = TermClient(session_b["ws_url"], token=stack.token)
        on_b_term.wait_event("snapshot")
        on_b_term.send_input("echo on-b-$((5*5))\r")
        on_b_term.wait_output(b"on-b-25")

        # --- node b's engine dies: only its environments are unavailable ----------------------------
        b.kill()
        started = time.monotonic()
        wait_for(lambda: stack.api("GET", f"environments/{on_b['id']}/").json()["status"] == "node_unavailable",
                 20, "node b's environment to read node_unavailable")
        marked_after = time.monotonic() - started
        for action in ("stop", "restart"):
            answer = stack.api("POST", f"environments/{on_b['id']}/{action}/")
            assert answer.status_code == 503, answer.text
            assert answer.json()["error"]["code"] == "node_unavailable" and answer.json()["error"]["node"] == "b"
        # Reads answer; everything on c works: exec, the shared terminal, creating more.
        listed = {e["id"]: e for e in stack.api("GET", "environments/").json()["results"]}
        assert {e["status"] for e in listed.values() if e["node"] == "b"} == {"node_unavailable"}
        assert {e["status"] for e in listed.values() if e["node"] == "c"} == {"running"}
        assert exec_output(stack, on_c["id"], ["echo", "c-is-fine"]) == (0, b"c-is-fine\n")
        alice.send_input("echo still-$((8*8))\r")
        bob.wait_output(b"still-64")
        assert create(stack, "while-b-is-down")["node"] == "c"
        assert on_b_term.wait_event("exit", timeout=30)["reason"] == "node_unavailable"
        on_b_term.close()
        ended = stack.api("GET", f"sessions/{session_b['id']}/").json()
        assert ended["end_reason"] == "node_unavailable" and not ended["live"], ended
        print(f"node b marked unavailable {marked_after:.1f}s after its dockerd was killed")

        # --- b comes back: it recovers by itself ------------------------------------------------------
        b.restart()
        back = wait_for(lambda: (d := stack.api("GET", f"environments/{on_b['id']}/").json())["status"] != "node_unavailable"
                        and d, 30, "node b's environment to come back")
        # dockerd stops its containers when it restarts (live-restore off). The node is reconciled
        # before it is marked available, so the first read after node_unavailable already says so
        # (it used to read the stale "running" for a moment, and an exec then got a 409).
        assert back["status"] == "stopped", back
        answer = stack.api("POST", f"environments/{on_b['id']}/start/")
        assert answer.status_code == 200, answer.text
        assert exec_output(stack, on_b["id"], ["echo", "b-is-back"]) == (0, b"b-is-back\n")
        alice.close()
        bob.close()

        # --- a snapshot made on c is usable on b (copied from c by the provisioning worker) ----------
        assert exec_output(stack, on_c["id"], ["sh", "-c", "echo kept > /workspace/marker"])[0] == 0
        snap = stack.api("POST", f"environments/{on_c['id']}/snapshot/", json={"slug": "snap-from-c"})
        assert snap.status_code == 201, snap.text
        assert lsl_node(stack, "drain", "c").returncode == 0
        copy = create(stack, "from-snapshot", template="snap-from-c")
        assert copy["node"] == "b"
        assert exec_output(stack, copy["id"], ["cat", "/workspace/marker"]) == (0, b"kept\n")

        # --- a node gone for good: its records are forgotten only when said, and only while it is down -
        refused = lsl_node(stack, "remove", "c", "--forget")
        assert refused.returncode != 0 and "answers" in refused.stderr, refused
        c.kill()
        wait_for(lambda: stack.api("GET", f"environments/{on_c['id']}/").json()["status"] == "node_unavailable",
                 20, "node c's environments to read node_unavailable")
        assert lsl_node(stack, "remove", "c").returncode != 0, "not empty"
        forgot = lsl_node(stack, "remove", "c", "--forget")
        assert forgot.returncode == 0 and "forgot 5 environments" in forgot.stdout, forgot
        left = {e["node"] for e in stack.api("GET", "environments/").json()["results"]}
        assert left == {"b"}, left
    finally:
        if other is not None:
            stop_daphne(other)
        stack.stop()


@pytest.mark.own_database
def test_an_unreachable_node_is_refused_with_its_reason(tmp_path: Path) -> None:
    """`lsl_node` errors are specific and leave nothing half-written."""
    stack = Stack(tmp_path / "lsl")
    bad_label = lsl_node(stack, "add", "x", "unix:///run/none.sock", "--label", "novalue")
    assert bad_label.returncode != 0 and "KEY=VALUE" in bad_label.stderr
    missing_key = lsl_node(stack, "add", "x", "tcp://127.0.0.1:2376", "--tls-cert", "/nonexistent/cert.pem")
    assert missing_key.returncode != 0 and "tls_key" in missing_key.stderr and "no such file" in missing_key.stderr
    bad_scheme = lsl_node(stack, "add", "x", "http://127.0.0.1:2375")
    assert bad_scheme.returncode != 0 and "unix://, tcp:// or ssh://" in bad_scheme.stderr
    unknown = lsl_node(stack, "drain", "nope")
    assert unknown.returncode != 0 and "no node named 'nope'" in unknown.stderr
    assert lsl_node(stack, "remove", "local").returncode != 0, "the only node"
    listing = lsl_node(stack, "list")
    assert listing.returncode == 0 and listing.stdout.count("\n") == 2, listing.stdout  # header + local
