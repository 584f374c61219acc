"""Several web processes behind a real nginx, sharing sessions through a real Redis.

Real processes throughout: two daphnes (tests/proxy.py's WebFarm) behind a private nginx (Debian's),
a redis-server, the worker (restarted with the same LSL_REDIS_URL, as a deployment runs it), the
session keeper in a real container, `lsl shell` in a real pseudo-terminal and browser-protocol
clients (tests/wsclient.py).

How a session spans processes (docs/protocol.md §2): the first process a participant reaches claims
the session in the database and holds the keeper link (its *hub*); it publishes each output chunk once
on Redis (`lsl:term:<session>`), which every other process with participants of that session hears and
hands to its own; input, resizes and role changes from participants elsewhere reach the hub through
the channel layer. Chunks carry the keeper's stream offsets, so a process that changes hands mid-stream
or misses a message resyncs its participants from a snapshot.

* Participants on different processes share one terminal, both when they connect to each process
  directly and when the proxy spreads them: output, typed input, resizes, presence and roles.
* A rolling restart (SIGTERM web1, start it again, then web2) through the proxy: `lsl shell` and a
  browser-protocol client keep the same shell, its state and its background job; nothing is typed
  into the void while one process is down.
* kill -9 of the process holding the keeper link: the survivor takes the session over, same shell.
* An API write on one process (share, role change, revoke, end) reaches participants on the other.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pexpect
import pytest
import requests

from sessions.models import TerminalSession
from tests.conftest import WorkerProcess
from tests.proxy import WebFarm
from tests.test_cli import Cli, finish, spawn_shell
from tests.test_session_faults import kept, process_alive, wait_until
from tests.test_sessions import Cast
from tests.wsclient import TermClient

pytestmark = [pytest.mark.django_db(transaction=True, serialized_rollback=True), pytest.mark.usefixtures("engine", "catalog")]

WAIT = 30.0  # seconds any one thing may take to show up (a takeover after kill -9 takes up to ~12 s)
RECONNECT_CODES = {1001, 1005, 1006, 1011, 1012, 1013, 4012, 4013}  # docs/protocol.md §2.1


@pytest.fixture()
def redis_worker(worker_proc: WorkerProcess, redis_url: str) -> Iterator[WorkerProcess]:
    """The session's worker, restarted with LSL_REDIS_URL like the web processes (its reaper's
    `session.detached` then travels the same way as in a deployment); restored afterwards."""
    previous = worker_proc.extra_env
    worker_proc.extra_env = {**(previous or {}), "LSL_REDIS_URL": redis_url}
    worker_proc.restart()
    try:
        yield worker_proc
    finally:
        worker_proc.extra_env = previous
        worker_proc.restart()


@pytest.fixture()
def farm(redis_url: str, redis_worker: WorkerProcess, tmp_path: Path) -> Iterator[WebFarm]:
    farm = WebFarm(2, tmp_path / "nginx", {"LSL_REDIS_URL": redis_url})
    try:
        yield farm
    finally:
        farm.stop()


def api(server_url: str, token: str, method: str, path: str, **kwargs: Any) -> requests.Response:
    return requests.request(method, f"{server_url}/api/v1/{path}", headers={"Authorization": f"Token {token}"},
                            timeout=30, **kwargs)


def upstream(client: TermClient, farm: WebFarm) -> int:
    """Which web process the proxy handed this websocket to (nginx's X-Upstream: the last one tried)."""
    header = client.ws.response.headers.get("X-Upstream")
    assert header, "no X-Upstream header: not connected through the proxy?"
    return farm.index_of(header.split(",")[-1].strip())


def connect(url: str, token: str, **kwargs: Any) -> TermClient:
    client = TermClient(url, token=token, **kwargs)
    client.wait_event("snapshot", timeout=WAIT)
    return client


def reconnect(url: str, token: str, timeout: float = WAIT) -> TermClient:
    """What the browser page does after an abnormal close (docs/protocol.md §2.1): try again with
    backoff (0.25 s doubling to 4 s), bounded."""
    deadline = time.monotonic() + timeout
    delay = 0.25
    while True:
        try:
            return connect(url, token)
        except Exception as exc:
            assert time.monotonic() < deadline, f"could not reconnect within {timeout:g}s: {exc!r}"
            time.sleep(delay)
            delay = min(delay * 2, 4.0)


def screen_has(client: TermClient, text: str) -> bool:
    return any(text in line for line in client.text())


def test_participants_on_two_processes_share_one_session(people: Any, make_env: Any, farm: WebFarm) -> None:
    web1, web2 = farm.webs
    cast = Cast(people, make_env, web1)
    tokens = cast.tokens
    session = cast.open_session()
    sid = session["id"]

    # Directly, for determinism: alice (first, so web1 holds the keeper link) on web1, bob on web2.
    alice = connect(session["ws_url"], tokens["alice"])
    bob = connect(session["ws_url"].replace(web1.ws_url, web2.ws_url), tokens["bob"])
    assert TerminalSession.objects.get(pk=sid).hub_channel, "served"

    alice.send_input("cd /tmp; X=42; printf 'from-%s\\n' alice\r")
    bob.wait_output(b"\r\nfrom-alice\r\n")  # web1's output, on web2, through Redis
    bob.send_input("echo typed-by-bob-$((X+1))\r")
    alice.wait_output(b"typed-by-bob-43")  # web2's input reached the shell on web1's link, and back
    alice.wait(lambda c: any(e["type"] == "presence" and e.get("last_typed_by") == "bob"
                             and {p["user"] for p in e["participants"]} == {"alice", "bob"} for e in c.events),
               WAIT, "presence on web1: bob (on web2) is here and typing")

    # A resize from web2: the PTY takes the smallest writer's size; everyone is told.
    bob.send_json({"type": "resize", "cols": 70, "rows": 20})
    for client in (alice, bob):
        client.wait_event("resize", timeout=WAIT, cols=70, rows=20)
    alice.send_input("stty size\r")
    bob.wait_output(b"\r\n20 70\r\n")

    # Through the proxy: the session's API answers with the proxy's own ws:// URL (Host is passed on),
    # and the proxy spreads participants over both processes; each sees the others' typing.
    proxied = api(farm.url, tokens["alice"], "get", f"sessions/{sid}/").json()
    assert proxied["ws_url"] == f"{farm.ws_url}/ws/sessions/{sid}/"
    viaproxy: dict[int, TermClient] = {}
    for _ in range(6):  # round robin: two consecutive handshakes go to different processes
        client = connect(proxied["ws_url"], tokens["alice"], cols=70, rows=20)
        where = upstream(client, farm)
        if where in viaproxy:
            client.close()
        else:
            viaproxy[where] = client
        if len(viaproxy) == 2:
            break
    assert set(viaproxy) == {0, 1}, "the proxy used both web processes"
    viaproxy[1].send_input("echo proxied-$((X*2))\r")
    for client in (alice, bob, viaproxy[0], viaproxy[1]):
        client.wait_output(b"proxied-84")
    assert kept(cast, sid) is not None and kept(cast, sid).alive  # type: ignore[union-attr]

    # The end, asked of web2, reaches everyone on both processes.
    assert api(web2.url, tokens["alice"], "post", f"sessions/{sid}/end/").status_code == 200
    for client in (alice, bob, *viaproxy.values()):
        assert client.wait_event("exit", timeout=WAIT)["reason"] == "ended"


def test_an_api_write_on_one_process_reaches_participants_on_the_other(people: Any, make_env: Any,
                                                                        farm: WebFarm) -> None:
    web1, web2 = farm.webs
    cast = Cast(people, make_env, web1)
    tokens = cast.tokens
    session = cast.open_session()
    on_web2 = session["ws_url"].replace(web1.ws_url, web2.ws_url)
    alice = connect(session["ws_url"], tokens["alice"])  # web1 holds the keeper link
    bob = connect(on_web2, tokens["bob"])
    victor = connect(on_web2, tokens["victor"])
    assert bob.wait_event("hello")["role"] == "member" and victor.wait_event("hello")["role"] == "viewer"

    # web1 demotes bob: his process (web2) hears the event, re-checks, says hello again; the hub (web1)
    # is told too, so his keystrokes stop reaching the shell.
    demoted = api(web1.url, tokens["alice"], "post", f"environments/{cast.env.id}/access/",
                  json={"user": "bob", "role": "viewer"})
    assert demoted.status_code == 201, demoted.text
    hello = bob.wait_event("hello", timeout=WAIT, role="viewer")
    assert hello["can_write"] is False
    bob.send_input("echo bob-still-$((6*7))\r")
    bob.wait_event("error", timeout=WAIT, code="read_only")

    # web2 promotes victor (he is on web2, the shell on web1): his input now reaches the shell.
    promoted = api(web2.url, tokens["alice"], "post", f"environments/{cast.env.id}/access/",
                   json={"user": "victor", "role": "member"})
    assert promoted.status_code == 201, promoted.text
    victor.wait_event("hello", timeout=WAIT, role="member")
    alice.wait(lambda c: any(e["type"] == "presence" and {(p["user"], p["role"]) for p in e["participants"]}
                             >= {("bob", "viewer"), ("victor", "member")} for e in c.events),
               WAIT, "the hub's presence on web1 shows both role changes")
    victor.send_input("echo victor-types-$((6*7))\r")
    alice.wait_output(b"victor-types-42")
    assert b"bob-still-42" not in alice.output

    # Revoked on web1: victor (web2) is told and closed with 4403; bob stays.
    grants = api(web1.url, tokens["alice"], "get", f"environments/{cast.env.id}/access/").json()
    grant = next(g for g in grants if g["name"] == "victor")
    assert api(web1.url, tokens["alice"], "delete", f"environments/{cast.env.id}/access/{grant['id']}/").status_code == 204
    assert victor.wait_event("exit", timeout=WAIT)["reason"] == "access_revoked"
    assert victor.closed.wait(WAIT) and victor.close_code == 4403
    alice.send_input("echo after-revoke-$((6*7))\r")
    bob.wait_output(b"after-revoke-42")
    assert not bob.closed.is_set()


def test_rolling_restart_through_the_proxy_drops_no_shell(people: Any, make_env: Any, farm: WebFarm,
                                                          tmp_path: Path) -> None:
    """web1 then web2 are stopped (SIGTERM) and started again on the same port, one at a time, while
    `lsl shell` and a browser-protocol client are attached through the proxy."""
    cast = Cast(people, make_env, farm)  # the API through the proxy too
    tokens = cast.tokens
    session = cast.open_session()
    sid = session["id"]
    assert session["ws_url"].startswith(farm.ws_url)
    bob = connect(session["ws_url"], tokens["bob"])  # first: his process holds the keeper link
    shell = spawn_shell(Cli(farm.url, tmp_path / "alice", token=tokens["alice"]), cast.env.name, "--session", sid)
    shell.logfile_read = seen = io.StringIO()
    try:
        shell.expect(r"\[lsl\] .*Enter ~ \. to detach", timeout=WAIT)
        shell.send("cd /tmp; X=42; (sleep 12; echo bg-done-$X) &\r")
        shell.send("echo ready-$X\r")
        bob.wait_output(b"ready-42", timeout=WAIT)
        pid = kept(cast, sid).pid  # type: ignore[union-attr]

        for i in (0, 1):
            bob_was_here = upstream(bob, farm) == i
            farm.terminate(i)
            if bob_was_here:
                # Told why, closed with 4012; the browser page reconnects: through the proxy, to the other.
                bob.wait_event("error", timeout=WAIT, code="server_restarting")
                assert bob.closed.wait(WAIT) and bob.close_code in RECONNECT_CODES, bob.close_code
                bob = reconnect(session["ws_url"], tokens["bob"])
            assert upstream(bob, farm) != i
            # One process down: the other serves everyone; lsl shell is back (if it was dropped at all).
            shell.send(f"echo while-web{i + 1}-down-$X-$PWD\r")
            bob.wait_output(f"while-web{i + 1}-down-42-/tmp".encode(), timeout=WAIT)
            shell.expect_exact(f"while-web{i + 1}-down-42-/tmp", timeout=WAIT)
            farm.start(i)
            shell.send(f"echo after-web{i + 1}-back-$X\r")
            bob.wait_output(f"after-web{i + 1}-back-42".encode(), timeout=WAIT)
            shell.expect_exact(f"after-web{i + 1}-back-42", timeout=WAIT)

        # Each process was restarted once, so every client was disconnected at least once, and came back.
        assert "connection lost, reconnecting" in seen.getvalue() and "reconnected" in seen.getvalue(), seen.getvalue()[-2000:]
        # The shell's background job, started before both restarts, still prints into the same shell.
        wait_until(lambda: screen_has(bob, "bg-done-42") or b"bg-done-42" in bob.output, WAIT, "the background job")
        shell.expect_exact("bg-done-42", timeout=WAIT)
        again = kept(cast, sid)
        assert again is not None and again.pid == pid and again.alive, "the same shell, never a second one"
        assert TerminalSession.objects.get(pk=sid).ended_at is None
        shell.send("\r~.")
        assert finish(shell) == 0
    finally:
        if shell.isalive():
            shell.terminate(force=True)


def test_kill_9_of_the_keeper_link_owner_through_the_proxy(people: Any, make_env: Any, farm: WebFarm,
                                                          tmp_path: Path) -> None:
    """The process holding the session's keeper link dies without a word; the survivor takes over."""
    cast = Cast(people, make_env, farm)
    tokens = cast.tokens
    session = cast.open_session()
    sid = session["id"]
    bob = connect(session["ws_url"], tokens["bob"])
    owner = upstream(bob, farm)  # bob joined first: his process claimed the session
    survivor = 1 - owner
    # Alice's lsl shell, and a second browser-protocol client on the survivor (direct, for determinism).
    shell = spawn_shell(Cli(farm.url, tmp_path / "alice", token=tokens["alice"]), cast.env.name, "--session", sid)
    shell.logfile_read = io.StringIO()
    victor = connect(session["ws_url"].replace(farm.ws_url, farm.webs[survivor].ws_url), tokens["victor"])
    try:
        shell.expect(r"\[lsl\] .*Enter ~ \. to detach", timeout=WAIT)
        shell.send("cd /tmp; X=42; echo set-$X\r")
        victor.wait_output(b"set-42", timeout=WAIT)
        pid = kept(cast, sid).pid  # type: ignore[union-attr]

        farm.kill(owner)
        snapshots = sum(1 for e in victor.events if e["type"] == "snapshot")
        assert bob.closed.wait(WAIT) and bob.close_code in RECONNECT_CODES, bob.close_code
        bob = reconnect(session["ws_url"], tokens["bob"])  # through the proxy: the survivor
        assert upstream(bob, farm) == survivor
        # victor never lost his connection: he follows the session to its new owner and is redrawn.
        victor.wait(lambda c: sum(1 for e in c.events if e["type"] == "snapshot") > snapshots, WAIT,
                    "victor redrawn by the new owner")
        assert not victor.closed.is_set()
        shell.send("echo back-$X-$PWD\r")
        for client in (bob, victor):
            client.wait_output(b"back-42-/tmp", timeout=WAIT)
        shell.expect_exact("back-42-/tmp", timeout=WAIT)
        again = kept(cast, sid)
        assert again is not None and again.pid == pid and again.alive, "the same shell"
        row = TerminalSession.objects.get(pk=sid)
        assert row.ended_at is None and row.hub_channel, "served again"

        # The killed process comes back; the session is unaffected, and its end reaches everyone.
        farm.start(owner)
        assert api(farm.webs[owner].url, tokens["alice"], "post", f"sessions/{sid}/end/").status_code == 200
        for client in (bob, victor):
            assert client.wait_event("exit", timeout=WAIT)["reason"] == "ended"
        shell.expect_exact("session ended", timeout=WAIT)  # lsl shell says so, and exits
        finish(shell)
        wait_until(lambda: not process_alive(cast.env.container_id, pid), 10, "the shell killed with the session")
    finally:
        if shell.isalive():
            shell.terminate(force=True)
        if isinstance(shell, pexpect.spawn) and not shell.closed:
            shell.close(force=True)



def snapshots(client: TermClient) -> int:
    return sum(1 for e in client.events if e["type"] == "snapshot")


def test_a_process_shutting_down_takes_no_session_back(people: Any, make_env: Any, farm: WebFarm) -> None:
    """SIGTERM of the process serving a session: it hands the session back and announces it; its own
    participants, still attached for a moment, must not follow it straight back into the dying
    process (that claim outlived the process: the session froze until it went stale, and what the
    participants elsewhere typed meanwhile was lost). Several rounds: it was a race."""
    cast = Cast(people, make_env, farm.webs[1])
    tokens = cast.tokens
    for round in range(4):
        session = cast.open_session()
        on_web1 = f"{farm.webs[0].ws_url}/ws/sessions/{session['id']}/"
        alice = connect(on_web1, tokens["alice"])  # web1 serves the session
        bob = connect(on_web1.replace(farm.webs[0].ws_url, farm.webs[1].ws_url), tokens["bob"])
        alice.send_input("X=42\r")
        bob.wait_output(b"X=42")
        before = snapshots(bob)
        alice.send_input("true\r")  # and at once SIGTERM: the race was likelier with output on its way
        farm.terminate(0)
        after_sigterm = farm.webs[0].log_tail(1_000_000).split("shutting down", 1)[-1]
        assert "taken over" not in after_sigterm, f"round {round}: the dying process claimed the session:\n{after_sigterm}"
        bob.wait(lambda c, before=before: snapshots(c) > before, WAIT, "bob follows the session to web2 and is redrawn")
        bob.send_input(f"echo round-{round}-$X\r")
        bob.wait_output(f"round-{round}-42".encode(), timeout=WAIT)
        alice.close()
        bob.close()
        farm.start(0)
