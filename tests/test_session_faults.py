"""A process serving a terminal dies: the shell lives on in the keeper, and nothing is left stuck.

Real processes throughout: daphnes sharing sessions through a real redis-server, the worker (its
reaper), and the session keeper in a real container.
* The owner is killed with -9 while a participant is attached through another process: that
  participant follows the session to the survivor, which takes it over: same shell, same state.
* The owner is killed and nobody comes back: within the reattach grace the worker ends the session
  as `server_lost` and the keeper kills the shell; nothing stays `live` with nobody serving it.
* The only server is killed with -9 (or stopped) and started again on the same port: `lsl shell`
  and a browser-protocol client reconnect by themselves and find the same screen, the same shell,
  and a background job's output.
* Redis dies for 15 s under two daphnes: terminals say why and reconnect; afterwards every session
  resumes, and `end` ends it.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from environments import keeper, runtime
from sessions.models import TerminalSession
from tests.conftest import docker_cli, start_daphne, stop_daphne
from tests.test_cli import Cli, finish, spawn_shell
from tests.test_sessions import Cast
from tests.wsclient import TermClient

pytestmark = [pytest.mark.django_db(transaction=True, serialized_rollback=True), pytest.mark.usefixtures("engine", "catalog")]


def kept(cast: Cast, session_id: str) -> keeper.KeptSession | None:
    return keeper.list_sessions(runtime.local(), cast.env.container_id, cast.env.id).get(session_id)


def process_alive(container_id: str, pid: int) -> bool:
    return docker_cli("exec", container_id, "kill", "-0", str(pid)).returncode == 0


def snapshots(client: TermClient) -> int:
    return sum(1 for e in client.events if e["type"] == "snapshot")


def wait_until(predicate: Any, timeout: float, what: str) -> float:
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, f"not within {timeout}s: {what}"
        time.sleep(0.1)
    return time.monotonic() - start


def workspace_digest(container_id: str) -> str:
    out = docker_cli("exec", container_id, "sha256sum", "/workspace/data.bin").stdout.split()
    assert out, "no /workspace/data.bin"
    return out[0]


def test_killed_owner_is_taken_over_and_the_shell_lives_on(people: Any, make_env: Any, redis_url: str) -> None:
    env = {"LSL_REDIS_URL": redis_url}
    owner, survivor = start_daphne(env, "daphne-owner"), start_daphne(env, "daphne-survivor")
    try:
        cast = Cast(people, make_env, owner)
        session = cast.open_session()
        sid = session["id"]
        alice = cast.join(session, "alice")  # the terminal is now served by `owner`
        bob = TermClient(session["ws_url"].replace(owner.ws_url, survivor.ws_url), token=cast.tokens["bob"])
        bob.wait_event("snapshot")
        alice.send_input("cd /tmp; X=42; head -c 65536 /dev/urandom > /workspace/data.bin; echo set-$X\r")
        bob.wait_output(b"set-42")
        digest = workspace_digest(cast.env.container_id)
        shell = kept(cast, sid)
        assert shell is not None and shell.alive and shell.attached

        owner.proc.kill()  # kill -9: no clean-up, no goodbye
        cast.server = survivor  # API calls from here on
        before = snapshots(bob)
        took = wait_until(lambda: snapshots(bob) > before, 12, "bob redrawn by the session's new owner")
        assert took < 10, f"bob was back only after {took:.1f}s"
        bob.send_input("echo back-$X-$PWD\r")
        bob.wait_output(b"back-42-/tmp")  # the same shell: its variables and directory are intact

        row = TerminalSession.objects.get(pk=sid)
        assert row.ended_at is None and row.hub_channel, "served again"
        assert cast.api("alice", "get", f"sessions/{sid}/").json()["detached"] is False
        again = kept(cast, sid)
        assert again is not None and again.pid == shell.pid and again.alive, "no second shell was started"
        assert not row.participations.filter(user__username="alice", left_at__isnull=True).exists(), \
            "alice went with the killed process: she no longer counts as attached"
        assert row.participations.filter(user__username="bob", left_at__isnull=True).exists()
        assert workspace_digest(cast.env.container_id) == digest
        # `end` still ends it, and the shell goes with it.
        assert cast.api("alice", "post", f"sessions/{sid}/end/").status_code == 200
        assert bob.wait_event("exit", timeout=10)["reason"] == "ended"
        wait_until(lambda: not process_alive(cast.env.container_id, shell.pid), 5, "the shell killed")
    finally:
        stop_daphne(survivor)
        if owner.proc.poll() is None:
            stop_daphne(owner)


def test_session_nobody_comes_back_to_ends_as_server_lost(people: Any, make_env: Any, redis_url: str,
                                                          worker_proc: Any) -> None:
    worker_proc.extra_env = {**(worker_proc.extra_env or {}), "LSL_SESSION_REATTACH_GRACE": "1"}
    worker_proc.restart()
    env = {"LSL_REDIS_URL": redis_url}
    owner, survivor = start_daphne(env, "daphne-owner"), start_daphne(env, "daphne-survivor")
    try:
        cast = Cast(people, make_env, owner)
        session = cast.open_session()
        sid = session["id"]
        alice = cast.join(session, "alice")
        alice.send_input("echo alive-$((40+2))\r")
        alice.wait_output(b"alive-42")
        shell = kept(cast, sid)
        assert shell is not None and process_alive(cast.env.container_id, shell.pid)

        owner.proc.kill()
        took = wait_until(lambda: TerminalSession.objects.get(pk=sid).ended_at is not None, 12, "the session ended")
        assert took < 10, f"ended only after {took:.1f}s"
        row = TerminalSession.objects.get(pk=sid)
        assert row.end_reason == "server_lost"
        assert not row.participations.filter(left_at__isnull=True).exists(), "nobody counts as attached any more"
        wait_until(lambda: not process_alive(cast.env.container_id, shell.pid), 5, "the orphaned shell killed")
        # Rejoining an ended session says so at once, through any process.
        late = TermClient(session["ws_url"].replace(owner.ws_url, survivor.ws_url), token=cast.tokens["alice"])
        assert late.wait_event("exit", timeout=5)["reason"] == "server_lost"
    finally:
        worker_proc.extra_env = {k: v for k, v in (worker_proc.extra_env or {}).items() if k != "LSL_SESSION_REATTACH_GRACE"}
        worker_proc.restart()
        stop_daphne(survivor)
        if owner.proc.poll() is None:
            stop_daphne(owner)


def reconnecting_client(url: str, token: str, deadline: float) -> TermClient:
    """What the browser page and `lsl shell` do after an abnormal close: try again with backoff."""
    delay = 0.25
    while True:
        try:
            client = TermClient(url, token=token)
            client.wait_event("snapshot", timeout=10)
            return client
        except Exception:
            assert time.monotonic() < deadline, "could not reconnect in time"
            time.sleep(delay)
            delay = min(delay * 2, 2.0)


@pytest.mark.parametrize("how", ["kill", "sigterm"])
def test_server_restart_loses_no_shell(people: Any, make_env: Any, how: str, tmp_path: Any) -> None:
    """`lsl shell` (alice, in a real pseudo-terminal) and a browser-protocol client (bob) share a
    shell; the only server is killed (or stopped) and started again on the same port."""
    server = start_daphne(None, "daphne-restart")
    port = server.url.rsplit(":", 1)[1]
    shell = None
    try:
        cast = Cast(people, make_env, server)
        session = cast.open_session()
        sid = session["id"]
        shell = spawn_shell(Cli(server.url, tmp_path / "alice", token=cast.tokens["alice"]), cast.env.name, "--session", sid)
        shell.expect(r"\[lsl\] .*Enter ~ \. to detach")
        bob = cast.join(session, "bob")
        shell.send("cd /tmp; X=42; head -c 65536 /dev/urandom > /workspace/data.bin; (sleep 6; echo done-$X) &\r")
        shell.send("echo ready-$X\r")
        bob.wait_output(b"ready-42")
        digest = workspace_digest(cast.env.container_id)
        pid = kept(cast, sid).pid  # type: ignore[union-attr]

        if how == "kill":
            server.proc.kill()
        else:
            server.proc.terminate()
            reason = bob.wait_event("error", timeout=5)
            assert reason["code"] == "server_restarting", reason
        server.proc.wait(timeout=10)
        assert bob.closed.wait(5)
        shell.expect_exact("connection lost, reconnecting", timeout=10)
        restarted_at = time.monotonic()
        server = start_daphne(None, "daphne-restart", port=int(port))
        shell.expect_exact("lsl: reconnected", timeout=10)
        bob = reconnecting_client(session["ws_url"], cast.tokens["bob"], restarted_at + 10)
        back = time.monotonic() - restarted_at
        assert back < 10, f"clients back only after {back:.1f}s"
        wait_until(lambda: "ready-42" in "\n".join(bob.text()), 5, "the same screen for bob")  # the snapshot's bytes
        shell.expect_exact("ready-42", timeout=5)  # lsl shell redrew it from the snapshot
        # The background job of the shell that lived on (its output may be on the snapshot already).
        wait_until(lambda: "done-42" in "\n".join(bob.text()), 15, "done-42 on bob's screen")
        shell.expect_exact("done-42", timeout=15)
        shell.send("echo again-$X-$PWD\r")
        shell.expect_exact("again-42-/tmp")
        bob.wait_output(b"again-42-/tmp")
        assert kept(cast, sid).pid == pid  # type: ignore[union-attr]
        assert workspace_digest(cast.env.container_id) == digest
        assert TerminalSession.objects.get(pk=sid).ended_at is None
        shell.send("\r~.")
        assert finish(shell) == 0
    finally:
        if shell is not None and shell.isalive():
            shell.terminate(force=True)
        if server.proc.poll() is None:
            stop_daphne(server)


def test_terminals_degrade_then_heal_across_a_redis_outage(people: Any, make_env: Any, redis_server: Any) -> None:
    """Two daphnes share a session through Redis; Redis is killed for 15 s mid-session."""
    env = {"LSL_REDIS_URL": redis_server.url}
    owner, other = start_daphne(env, "daphne-a"), start_daphne(env, "daphne-b")
    try:
        cast = Cast(people, make_env, owner)
        session = cast.open_session()
        sid = session["id"]
        alice = cast.join(session, "alice")  # served by `owner`
        bob_url = session["ws_url"].replace(owner.ws_url, other.ws_url)
        bob = TermClient(bob_url, token=cast.tokens["bob"])
        bob.wait_event("snapshot")
        alice.send_input("X=42; echo set-$X\r")
        bob.wait_output(b"set-42")
        pid = kept(cast, sid).pid  # type: ignore[union-attr]

        redis_server.stop()  # kill -9
        down_at = time.monotonic()
        for client in (alice, bob):  # told why, then closed so that they reconnect with backoff
            error = client.wait_event("error", timeout=10, code="unavailable")
            assert "Redis" in error["detail"]
            assert client.closed.wait(5) and client.close_code == 4013
        for server in (owner, other):  # the API answers meanwhile: no 5xx
            listed = requests.get(f"{server.url}/api/v1/environments/", timeout=10,
                                  headers={"Authorization": f"Token {cast.tokens['alice']}"})
            assert listed.status_code == 200, listed.text[:300]
        time.sleep(max(0.0, 15 - (time.monotonic() - down_at)))
        redis_server.start()  # same port, empty: every group membership is gone
        back_at = time.monotonic()

        alice = reconnecting_client(session["ws_url"], cast.tokens["alice"], back_at + 10)
        bob = reconnecting_client(bob_url, cast.tokens["bob"], back_at + 10)
        wait_until(lambda: "set-42" in "\n".join(bob.text()), 5, "the same screen for bob")
        bob.send_input("echo still-$X\r")
        alice.wait_output(b"still-42")  # output flows to both again: no zombie hub
        assert kept(cast, sid).pid == pid  # type: ignore[union-attr]
        # And `end` ends it, for everyone, shell included.
        assert cast.api("alice", "post", f"sessions/{sid}/end/").status_code == 200
        for client in (alice, bob):
            assert client.wait_event("exit", timeout=10)["reason"] == "ended"
        wait_until(lambda: not process_alive(cast.env.container_id, pid), 5, "the shell killed")
    finally:
        stop_daphne(other)
        stop_daphne(owner)


def test_a_killed_keeper_ends_its_sessions_with_a_reason_and_start_recovers(people: Any, make_env: Any,
                                                                           live_server_proc: Any) -> None:
    """The keeper is the container's main process: kill -9 of it stops the container. Its sessions
    end with that reason (nobody waits on a dead terminal), and starting the environment brings a
    fresh keeper; the workspace is untouched."""
    cast = Cast(people, make_env, live_server_proc)
    session = cast.open_session()
    alice = cast.join(session, "alice")
    alice.send_input("head -c 65536 /dev/urandom > /workspace/data.bin; echo ok-$((6*7))\r")
    alice.wait_output(b"ok-42")
    digest = workspace_digest(cast.env.container_id)

    # (the quotes split the pattern so this shell's own command line does not match it)
    killed = docker_cli("exec", cast.env.container_id, "sh", "-c", 'for d in /proc/[0-9]*; do '
                        'case "$(tr "\\0" " " < $d/cmdline 2>/dev/null)" in *"keeper se""rve"*) kill -9 ${d#/proc/};; esac; done')
    assert killed.returncode == 0, killed.stderr
    assert alice.wait_event("exit", timeout=10)["reason"] == "environment_stopped"
    wait_until(lambda: cast.api("alice", "get", f"environments/{cast.env.id}/").json()["status"] == "stopped", 10,
               "the environment shown as stopped")
    row = TerminalSession.objects.get(pk=session["id"])
    assert row.ended_at is not None and not row.participations.filter(left_at__isnull=True).exists()

    started = cast.api("alice", "post", f"environments/{cast.env.id}/start/")
    assert started.status_code == 200, started.text
    again = cast.open_session()
    bob = cast.join(again, "bob")
    bob.send_input("echo back-$((6*7))\r")
    bob.wait_output(b"back-42")
    assert workspace_digest(cast.env.container_id) == digest


def children(pid: int) -> list[tuple[int, str, str]]:
    """(pid, state, command line) of each child of `pid`, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state, ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:2]
            args = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError):
            continue
        if int(ppid) == pid:
            found.append((int(entry.name), state, args))
    return found


def emulator_pids(daphne_pid: int) -> list[int]:
    """The live node child of a daphne that runs its screen model (sessions/emulator.py)."""
    return [pid for pid, state, args in children(daphne_pid) if "emulator.cjs" in args and state != "Z"]


def test_a_killed_screen_model_is_rebuilt_and_late_joiners_still_see_the_screen(people: Any, make_env: Any,
                                                                               live_server_proc: Any) -> None:
    """kill -9 of the node process that holds the screen model (one per server process): output
    keeps flowing (delivery never waited on it), the next snapshot comes from a new node rebuilt
    from each terminal's kept tail, and no zombie is left."""
    cast = Cast(people, make_env, live_server_proc)
    session = cast.open_session()
    alice = cast.join(session, "alice")
    alice.send_input("printf '\\033[1;32m%s\\033[0m\\n' painted-$((6*7))\r")
    alice.wait_output(b"painted-42")
    [node] = emulator_pids(live_server_proc.proc.pid)

    os.kill(node, signal.SIGKILL)
    alice.send_input("echo still-$((6*7))\r")
    alice.wait_output(b"still-42")  # the live stream does not depend on the screen model

    bob = cast.join(session, "bob")  # a late joiner: his screen is a snapshot
    bob.wait(lambda c: any("painted-42" in line for line in c.text()) and any("still-42" in line for line in c.text()),
             what="the late joiner's screen shows what was printed before and after the kill")
    painted = next(y for y, line in enumerate(bob.text()) if "painted-42" in line)
    assert bob.screen.buffer[painted][0].fg == "green" and bob.screen.buffer[painted][0].bold, "colours survive the rebuild"
    wait_until(lambda: len(emulator_pids(live_server_proc.proc.pid)) == 1 and node not in emulator_pids(live_server_proc.proc.pid),
               10, "one new screen-model process")
    assert not [c for c in children(live_server_proc.proc.pid) if c[1] == "Z"], "no zombie left"
