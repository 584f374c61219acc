"""Sessions under load and across processes: backpressure, two daphnes + redis, idle timeout."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
from typing import Any
from urllib.parse import urlparse

import pytest

from tests.conftest import REPO, start_daphne, stop_daphne
from tests.test_sessions import Cast
from tests.wsclient import TermClient

pytestmark = [pytest.mark.django_db(transaction=True, serialized_rollback=True), pytest.mark.usefixtures("engine", "catalog")]

FLOOD_MB = int(os.environ.get("LSL_FLOOD_MB", "50"))  # the issue's `yes | head -c 50M`; smaller only for debugging


class StalledClient:
    """Completes the websocket handshake, then never reads another byte."""

    def __init__(self, ws_url: str, token: str) -> None:
        url = urlparse(ws_url)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.connect((url.hostname, url.port))
        key = base64.b64encode(os.urandom(16)).decode()
        request = (f"GET {url.path}?client=cli HTTP/1.1\r\nHost: {url.netloc}\r\nUpgrade: websocket\r\n"
                   f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                   f"Authorization: Token {token}\r\n\r\n")
        self.sock.sendall(request.encode())
        response = b""
        while b"\r\n\r\n" not in response:
            response += self.sock.recv(1)
        assert response.startswith(b"HTTP/1.1 101"), response

    def close(self) -> None:
        self.sock.close()


def flood_once(cast: Cast, session: dict[str, Any]) -> float:
    """Run the flood through a healthy participant in its own process; return seconds from START to END."""
    proc = subprocess.run([sys.executable, "-m", "tests.flood_client", session["ws_url"], cast.tokens["alice"], str(FLOOD_MB)],
                          cwd=REPO, capture_output=True, text=True, timeout=330)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert not result["resynced"], "the healthy participant fell behind and was resynced"
    assert result["intact"], f"bytes lost or reordered for the healthy participant: {result}"
    return float(result["elapsed"])


def test_stalled_participant_does_not_slow_others(cast_debian: Cast) -> None:
    cast = cast_debian
    session = cast.open_session()
    # Interleaved pairs, best of each: one flood's time varies by several percent on a
    # shared machine, which a single pair would read as the stalled participant's doing.
    alone, with_stall = [], []
    for _ in range(2):
        alone.append(flood_once(cast, session))
        stalled = StalledClient(session["ws_url"], cast.tokens["bob"])
        with_stall.append(flood_once(cast, session))
        stalled.close()
    ratio = min(alone) / min(with_stall)
    print(f"flood: alone {min(alone):.2f}s, with a stalled participant {min(with_stall):.2f}s (throughput ratio {ratio:.2f})")
    assert ratio >= 0.9, f"a stalled participant cut throughput to {ratio:.0%}"


@pytest.fixture()
def cast_debian(people: Any, make_env: Any, live_server_proc: Any) -> Cast:
    return Cast(people, make_env, live_server_proc, template="debian")


def test_participants_on_two_processes_share_a_session(people: Any, make_env: Any, redis_url: str) -> None:
    env = {"LSL_REDIS_URL": redis_url}
    first, second = start_daphne(env, "daphne-a"), start_daphne(env, "daphne-b")
    try:
        on_first = Cast(people, make_env, first)
        session = on_first.open_session()
        alice = on_first.join(session, "alice")  # the PTY now lives in the first process
        bob_url = session["ws_url"].replace(first.ws_url, second.ws_url)
        bob = TermClient(bob_url, token=on_first.tokens["bob"])
        bob.wait_event("snapshot")
        alice.send_input("printf 'from-%s\\n' alice\r")
        bob.wait_output(b"from-alice\r\n")
        bob.send_input("printf 'from-%s\\n' bob\r")
        alice.wait_output(b"from-bob\r\n")
        presence = alice.wait(lambda c: any(e["type"] == "presence" and len(e["participants"]) == 2 for e in c.events),
                              what="both in presence")
        del presence
        bob.send_input("exit 5\r")
        assert alice.wait_event("exit")["code"] == 5
        assert bob.wait_event("exit")["code"] == 5
    finally:
        stop_daphne(first)
        stop_daphne(second)


def test_idle_session_ends_after_timeout_but_survives_short_absence(people: Any, make_env: Any) -> None:
    # 4 s leaves bob 3 s to reconnect after a 1 s absence, even on a loaded machine.
    server = start_daphne({"LSL_SESSION_IDLE_TIMEOUT": "4"}, "daphne-idle")
    try:
        cast = Cast(people, make_env, server)
        session = cast.open_session()
        alice = cast.join(session, "alice")
        alice.close()
        time.sleep(1)
        bob = cast.join(session, "bob")  # back within the timeout: still the same shell
        bob.close()
        deadline = time.monotonic() + 10
        while cast.api("alice", "get", f"sessions/{session['id']}/").json()["live"]:
            assert time.monotonic() < deadline, "idle session was never ended"
            time.sleep(0.2)
        assert cast.api("alice", "get", f"sessions/{session['id']}/").json()["end_reason"] == "idle"
    finally:
        stop_daphne(server)


def test_slow_reader_is_resynced_to_the_final_screen(people: Any, make_env: Any) -> None:
    """A reader that acks late falls behind a small window, gets snapshots, and still ends on the true screen
    (output produced while a snapshot is being prepared must not be lost)."""
    server = start_daphne({"LSL_SESSION_WINDOW": "16384", "LSL_SESSION_STALL_TIMEOUT": "5"}, "daphne-slow")
    try:
        cast = Cast(people, make_env, server)
        session = cast.open_session()
        slow = TermClient(session["ws_url"], token=cast.tokens["alice"], auto_ack=False)
        slow.wait_event("snapshot")
        slow.send_json({"type": "ack", "bytes": slow.received})
        slow.send_input("seq 1 100000; echo end-of-$((6*7))\r")
        deadline = time.monotonic() + 30
        while "end-of-42" not in "\n".join(slow.text()):
            assert time.monotonic() < deadline, f"stuck on {slow.text()[-3:]}"
            time.sleep(0.3)
            slow.send_json({"type": "ack", "bytes": slow.received})
        assert sum(1 for e in slow.events if e["type"] == "snapshot") > 1, "the reader never fell behind"
        assert not slow.closed.is_set()
        slow.close()
    finally:
        stop_daphne(server)


def _read_line(proc: subprocess.Popen[str], deadline: float) -> str:
    import select

    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready:
            return proc.stdout.readline()  # type: ignore[union-attr]
        if proc.poll() is not None:
            break
    return ""


def test_a_crowd_of_200_stays_within_the_lag_bound(cast_debian: Cast) -> None:
    """200 participants (viewers, in 4 processes of their own) watch bursts of output that carry time
    markers. One daphne cannot feed them all at that rate; the server must then redraw the
    laggards (`lagging`, a snapshot) rather than let anyone drift behind: every marker delivered
    live arrives within the bound (LSL_SESSION_MAX_LAG in the server's queues, as much again in
    flight to the client), and everyone ends at END, or was closed as too slow."""
    from django.conf import settings

    cast = cast_debian
    session = cast.open_session()
    writer = cast.join(session, "alice")
    per_process, processes, limit = 50, 4, 150.0
    deadline = time.monotonic() + limit
    crowd = [subprocess.Popen([sys.executable, "-m", "tests.crowd_client", session["ws_url"], cast.tokens["victor"],
                               str(per_process), str(limit)], cwd=REPO, stdout=subprocess.PIPE, text=True)
             for _ in range(processes)]
    try:
        for proc in crowd:
            line = _read_line(proc, deadline).strip()
            if line != "ready":
                odd = [r for r in json.loads(_read_line(proc, deadline) or "[]") if r.get("end") or r.get("closed")]
                raise AssertionError(f"a crowd process could not join everyone: {odd[:3]}")
        # Bursts of 200 kB, 3 a second: the hub reads them as they come (the shell is never held up by
        # back-pressure, so a marker's time is when it reached the PTY), while sending every burst to
        # 200 participants is far more than one daphne can do at that pace.
        writer.send_input("for i in $(seq 1 30); do echo M=$(date +%s.%N); head -c 200000 /dev/zero | tr '\\0' x; echo; "
                          "sleep 0.3; done; echo EN''D\r")
        reports = [json.loads(_read_line(proc, deadline) or "[]") for proc in crowd]
    finally:
        for proc in crowd:
            proc.kill()
            proc.wait()
    participants = [r for report in reports for r in report]
    assert len(participants) == per_process * processes and not [r for r in participants if "error" in r], participants[:3]
    # The server sends a participant output only if it waited at most LSL_SESSION_MAX_LAG in the
    # server's queues (keeper, hub, channel layer) and the participant has not left more than
    # 64 KiB unacknowledged for longer than that: 2 x 2 s. What it cannot see comes on top, 6 s
    # allowed for it here: the shell held up by back-pressure between `date` and its output reaching
    # the PTY, daphne's socket buffers on a saturated core, and 200 clients reading on two cores.
    # Measured over a dozen runs: worst 3.0-6.2 s (without the bound, the issue saw ~50 s).
    bound = 2 * settings.LSL_SESSION_MAX_LAG + 6.0
    worst = max(r["max_lag"] for r in participants)
    print(f"crowd of {len(participants)}: worst live lag {worst:.2f}s (bound {bound:.1f}s), "
          f"{sum(r['markers'] for r in participants)} markers live, {sum(r['lagging'] for r in participants)} lagging, "
          f"{sum(r['resyncs'] for r in participants)} resyncs, {sum(r['too_slow'] for r in participants)} too slow")
    assert all(r["end"] or r["too_slow"] for r in participants), [r for r in participants if not (r["end"] or r["too_slow"])][:3]
    assert worst <= bound, f"a participant got output {worst:.1f}s late without a resync"
