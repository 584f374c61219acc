"""A process owning a terminal dies and is not restarted: its sessions end with a reason, nothing stuck.

Real processes: two daphnes share sessions through a real redis-server; the one holding the PTY is
killed with -9 while a participant is attached through the other. The worker's reaper must end the
session as `server_lost` within 10 s, the surviving participant must be told why, and the orphaned
shell must not be left running in the container (Docker cannot kill an exec: LSL does).
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from sessions.models import TerminalSession
from tests.conftest import docker_cli, start_daphne, stop_daphne
from tests.test_sessions import Cast
from tests.wsclient import TermClient

pytestmark = [pytest.mark.django_db(transaction=True, serialized_rollback=True), pytest.mark.usefixtures("engine", "catalog")]


def shell_alive(container_id: str, pid: str) -> bool:
    return docker_cli("exec", container_id, "kill", "-0", pid).returncode == 0


def test_killed_owner_ends_its_sessions_as_server_lost(people: Any, make_env: Any, redis_url: str) -> None:
    env = {"LSL_REDIS_URL": redis_url}
    owner, survivor = start_daphne(env, "daphne-owner"), start_daphne(env, "daphne-survivor")
    try:
        cast = Cast(people, make_env, owner)
        session = cast.open_session()
        alice = cast.join(session, "alice")  # the PTY now lives in `owner`
        bob = TermClient(session["ws_url"].replace(owner.ws_url, survivor.ws_url), token=cast.tokens["bob"])
        bob.wait_event("snapshot")
        alice.send_input("echo alive-$((40+2))\r")
        bob.wait_output(b"alive-42")
        pid = docker_cli("exec", cast.env.container_id, "cat", f"/tmp/.lsl-session-{session['id']}.pid").stdout.strip()
        assert pid and shell_alive(cast.env.container_id, pid)

        owner.proc.kill()  # kill -9: no clean-up, no goodbye
        killed_at = time.monotonic()
        exit_frame = bob.wait_event("exit", timeout=15)
        told_after = time.monotonic() - killed_at
        assert exit_frame["reason"] == "server_lost", exit_frame
        row = TerminalSession.objects.get(pk=session["id"])
        assert row.ended_at is not None and row.end_reason == "server_lost"
        assert told_after < 10, f"the participant was told only after {told_after:.1f}s"
        assert not row.participations.filter(left_at__isnull=True).exists(), "nobody counts as attached any more"

        deadline = time.monotonic() + 5
        while shell_alive(cast.env.container_id, pid):  # the reaper HUPs, then KILLs a second later
            assert time.monotonic() < deadline, "the orphaned shell is still running"
            time.sleep(0.2)
        # Rejoining an ended session says so at once, instead of waiting on a dead hub.
        late = TermClient(session["ws_url"].replace(owner.ws_url, survivor.ws_url), token=cast.tokens["alice"])
        assert late.wait_event("exit", timeout=5)["reason"] == "server_lost"
    finally:
        stop_daphne(survivor)
        if owner.proc.poll() is None:
            stop_daphne(owner)
