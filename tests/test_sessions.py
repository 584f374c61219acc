"""Shared terminal sessions against a real daphne, a real websocket client and a real container."""

from __future__ import annotations

import time
from typing import Any

import pyte
import pytest
import requests
from websockets.exceptions import InvalidStatus

from environments.models import Role
from environments.services import grant_access, revoke_access
from tests.wsclient import AltScreen
from tests.conftest import make_token
from tests.wsclient import TermClient

pytestmark = [pytest.mark.django_db(transaction=True, serialized_rollback=True), pytest.mark.usefixtures("engine", "catalog")]


class Cast:
    """An environment shared with a member (bob) and a viewer (victor), plus tokens for everyone."""

    def __init__(self, people: Any, make_env: Any, server: Any, template: str = "busybox") -> None:
        self.server = server
        self.env = make_env(people.owner, template=template)
        assert self.env.status == "running", self.env.last_error
        grant_access(self.env, role=Role.MEMBER, user=people.teammate)
        grant_access(self.env, role=Role.VIEWER, user=people.viewer)
        self.people = people
        self.tokens = {u.username: make_token(u) for u in (people.owner, people.teammate, people.viewer, people.outsider)}

    def api(self, username: str, method: str, path: str, **kwargs: Any) -> requests.Response:
        headers = {"Authorization": f"Token {self.tokens[username]}"}
        return requests.request(method, f"{self.server.url}/api/v1/{path}", headers=headers, timeout=30, **kwargs)

    def open_session(self, username: str = "alice", **body: Any) -> dict[str, Any]:
        response = self.api(username, "post", f"environments/{self.env.id}/sessions/", json=body)
        assert response.status_code == 201, response.text
        return response.json()

    def join(self, session: dict[str, Any], username: str, **kwargs: Any) -> TermClient:
        client = TermClient(session["ws_url"], token=self.tokens[username], **kwargs)
        client.wait_event("snapshot")
        return client


@pytest.fixture()
def cast(people: Any, make_env: Any, live_server_proc: Any) -> Cast:
    return Cast(people, make_env, live_server_proc)


def test_typing_is_shared_and_viewers_are_read_only(cast: Cast) -> None:
    session = cast.open_session()
    assert session["ws_url"].startswith(cast.server.ws_url)
    alice = cast.join(session, "alice")
    bob = cast.join(session, "bob")
    victor = cast.join(session, "victor")
    hello = victor.wait_event("hello")
    assert hello["role"] == "viewer" and hello["can_write"] is False
    assert alice.wait_event("hello")["can_write"] is True

    alice.send_input("printf 'h%s\\n' i\r")  # the shell prints "hi"; the echoed command line does not contain it
    for participant in (alice, bob, victor):
        participant.wait_output(b"\r\nhi\r\n")

    victor.send_input("echo viewer-was-here\r")
    victor.wait_event("error", code="read_only")
    bob.send_input("printf 'b%sb-typed\\n' o\r")
    alice.wait_output(b"bob-typed")
    assert b"viewer-was-here" not in alice.output

    presence = alice.wait_event("presence")
    users = {(p["user"], p["role"]) for p in alice.events[-1]["participants"]} if alice.events[-1]["type"] == "presence" else None
    alice.wait(lambda c: any(e["type"] == "presence" and e.get("last_typed_by") == "bob" for e in c.events), what="bob typing")
    assert {(p["user"], p["role"]) for p in presence["participants"]} >= {("alice", "admin")}
    del users

    listed = cast.api("victor", "get", f"environments/{cast.env.id}/sessions/?live=true").json()
    assert {p["user"] for p in listed[0]["participants"]} == {"alice", "bob", "victor"}
    for participant in (alice, bob, victor):
        participant.close()


def test_outsider_and_foreign_origin_are_refused(cast: Cast) -> None:
    session = cast.open_session()
    with pytest.raises(InvalidStatus) as refused:
        TermClient(session["ws_url"], token=cast.tokens["mallory"])
    assert refused.value.response.status_code == 403
    with pytest.raises(InvalidStatus):
        TermClient(session["ws_url"], token="lsl_000000000000_not-a-real-key")
    with pytest.raises(InvalidStatus):
        TermClient(session["ws_url"])  # anonymous

    # A browser (cookie) handshake from a foreign page is refused even for a legitimate user.
    login = requests.Session()
    from django.test import Client

    django_client = Client()
    django_client.force_login(cast.people.owner)
    cookie = f"sessionid={django_client.cookies['sessionid'].value}"
    with pytest.raises(InvalidStatus) as foreign:
        TermClient(session["ws_url"], cookie=cookie, origin="http://evil.example.com")
    assert foreign.value.response.status_code == 403
    # The page's own origin: scheme, host and port (tests/test_hostile_websockets.py tries the others).
    ok = TermClient(session["ws_url"], cookie=cookie, origin=cast.server.url)
    ok.wait_event("hello")
    ok.close()
    login.close()


FULL_SCREEN_APP = (
    r"printf '\033[?1049h\033[2J\033[H\033[1;33mTOP-LEFT\033[0m\033[12;30H\033[44mcentre \344\270\255\346\226\207\033[0m"
    r"\033[24;70Hcorner'; sleep 0.3; printf '\033[5;5H\033[7mmoved\033[0m\033[2;1H\033[2Kline-two'"
)


def test_late_joiner_sees_the_same_screen(cast: Cast) -> None:
    session = cast.open_session(cols=80, rows=24)
    early = cast.join(session, "alice", cols=80, rows=24)
    early.send_input("clear; echo before-app\r")
    early.wait_output(b"before-app\r\n")
    early.send_input(FULL_SCREEN_APP + "\r")
    early.wait(lambda c: "line-two" in "\n".join(c.text()), what="app drawn")
    time.sleep(0.3)

    late = cast.join(session, "bob", cols=80, rows=24)
    late.wait(lambda c: c.text() == early.text(), what="late joiner's screen to match")
    assert any("centre 中文" in line for line in late.text())

    # Leaving the alternate screen restores the main one, for both.
    early.send_input("printf '\\033[?1049l'; echo aft''er-app\r")
    early.wait_output(b"after-app\r\n")
    later = cast.join(session, "victor", cols=80, rows=24)
    later.wait(lambda c: c.text() == early.text() and any("before-app" in line for line in c.text()), what="main screen")
    for client in (early, late, later):
        client.close()


def test_exit_code_reaches_everyone_and_recording_replays(cast: Cast) -> None:
    session = cast.open_session()
    alice = cast.join(session, "alice")
    bob = cast.join(session, "bob")
    alice.send_input("printf '\\033[1;32mgreen\\033[0m done\\n'; exit 3\r")
    for client in (alice, bob):
        assert client.wait_event("exit")["code"] == 3
        client.closed.wait(5)
    detail = cast.api("bob", "get", f"sessions/{session['id']}/").json()
    assert detail["live"] is False and detail["exit_code"] == 3 and detail["end_reason"] == "exited"

    cast_file = cast.api("victor", "get", f"sessions/{session['id']}/recording/")
    assert cast_file.status_code == 200
    import json

    lines = cast_file.text.splitlines()
    header = json.loads(lines[0])
    assert header["version"] == 2
    replay = AltScreen(header["width"], header["height"])
    stream = pyte.Stream(replay)
    for line in lines[1:]:
        _, kind, data = json.loads(line)
        if kind == "o":
            stream.feed(data)
        elif kind == "r":
            cols, rows = map(int, data.split("x"))
            replay.resize(rows, cols)
    assert [l.rstrip() for l in replay.display] == alice.text()
    assert any("green done" in line for line in alice.text())


def test_revoked_participant_is_disconnected_quickly(cast: Cast) -> None:
    session = cast.open_session()
    bob = cast.join(session, "bob")
    started = time.monotonic()
    revoke_access(cast.env, f"user-{cast.people.teammate.pk}")
    assert bob.closed.wait(5), "bob was still connected 5 s after losing access"
    assert time.monotonic() - started < 5
    assert bob.close_code == 4403
    assert any(e["type"] == "exit" and e["reason"] == "access_revoked" for e in bob.events)


def test_stopping_the_environment_ends_sessions(cast: Cast) -> None:
    session = cast.open_session()
    alice = cast.join(session, "alice")
    response = cast.api("alice", "post", f"environments/{cast.env.id}/stop/")
    assert response.status_code == 200
    exit_event = alice.wait_event("exit", timeout=20)
    assert exit_event["reason"] == "environment_stopped"
    refused = cast.api("alice", "post", f"environments/{cast.env.id}/sessions/", json={})
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "not_running"


def test_last_leaver_keeps_shell_and_end_endpoint_kills_it(cast: Cast) -> None:
    session = cast.open_session()
    alice = cast.join(session, "alice")
    alice.send_input("export MARK=still-here\r")
    time.sleep(0.3)
    alice.close()
    time.sleep(0.5)
    bob = cast.join(session, "bob")
    bob.send_input("echo $MARK-ok\r")
    bob.wait_output(b"still-here-ok")
    assert cast.api("bob", "post", f"sessions/{session['id']}/end/").status_code == 403  # not creator, not admin
    assert cast.api("alice", "post", f"sessions/{session['id']}/end/").status_code == 200
    assert bob.wait_event("exit", timeout=10)["reason"] == "ended"


def test_resize_takes_smallest_writer_and_ignores_viewers(cast: Cast) -> None:
    session = cast.open_session(cols=100, rows=30)
    alice = cast.join(session, "alice", cols=100, rows=30)
    bob = cast.join(session, "bob", cols=90, rows=40)
    alice.wait_event("resize", cols=90, rows=30)
    victor = cast.join(session, "victor", cols=20, rows=10)
    victor.send_json({"type": "resize", "cols": 20, "rows": 10})
    alice.send_input("stty size\r")
    alice.wait_output(b"30 90")
    bob.close()
    alice.wait_event("resize", cols=100, rows=30)
    victor.wait_event("resize", cols=100, rows=30)
    alice.close()
    victor.close()


def test_audit_trail_records_who_did_what(cast: Cast) -> None:
    from sessions.models import AuditEvent

    session = cast.open_session()
    alice = cast.join(session, "alice")
    victor = cast.join(session, "victor")
    victor.send_input("x")
    victor.wait_event("error", code="read_only")
    victor.close()
    alice.send_input("exit 0\r")
    alice.wait_event("exit")
    deadline = time.monotonic() + 10
    while not AuditEvent.objects.filter(session_id=session["id"], kind="end").exists():
        assert time.monotonic() < deadline
        time.sleep(0.1)
    events = [(e.kind, e.user.username if e.user else None) for e in AuditEvent.objects.filter(session_id=session["id"])]
    for expected in [("open", "alice"), ("join", "alice"), ("join", "victor"), ("role_denied", "victor"),
                     ("leave", "victor"), ("end", None)]:
        assert expected in events, (expected, events)


def test_input_is_recorded_and_attributed_only_when_configured(people: Any, make_env: Any) -> None:
    import json

    from sessions.models import AuditEvent
    from tests.conftest import start_daphne, stop_daphne

    server = start_daphne({"LSL_SESSION_RECORD_INPUT": "true"}, "daphne-input")
    try:
        cast = Cast(people, make_env, server)
        session = cast.open_session()
        bob = cast.join(session, "bob")
        bob.send_input("echo typed-by-bob\r")
        bob.wait_output(b"typed-by-bob\r\n/workspace")
        bob.send_input("exit\r")
        bob.wait_event("exit")
        recording = cast.api("alice", "get", f"sessions/{session['id']}/recording/").text.splitlines()
        inputs = "".join(json.loads(line)[2] for line in recording[1:] if json.loads(line)[1] == "i")
        assert "echo typed-by-bob" in inputs
        deadline = time.monotonic() + 10
        while not AuditEvent.objects.filter(session_id=session["id"], kind="input").exists():
            assert time.monotonic() < deadline, "no input audit event"
            time.sleep(0.1)
        typed = AuditEvent.objects.get(session_id=session["id"], kind="input")
        assert typed.user == people.teammate and "typed-by-bob" in typed.data["text"]
    finally:
        stop_daphne(server)


def test_input_is_not_recorded_by_default(cast: Cast) -> None:
    import json

    from sessions.models import AuditEvent

    session = cast.open_session()
    alice = cast.join(session, "alice")
    alice.send_input("echo private\r")
    alice.wait_output(b"private\r\n/workspace")
    alice.send_input("exit\r")
    alice.wait_event("exit")
    recording = cast.api("alice", "get", f"sessions/{session['id']}/recording/").text.splitlines()
    assert all(json.loads(line)[1] != "i" for line in recording[1:])
    assert not AuditEvent.objects.filter(session_id=session["id"], kind="input").exists()


def test_a_participant_who_leaves_is_gone_from_everyones_presence(cast: Cast) -> None:
    """A browser that navigates away closes its websocket: the others' "here now" must drop it at once."""
    session = cast.open_session()
    alice = cast.join(session, "alice")
    bob = cast.join(session, "bob")

    def here(c: TermClient) -> set[str] | None:
        latest = [e for e in c.events if e["type"] == "presence"]
        return {p["user"] for p in latest[-1]["participants"]} if latest else None

    alice.wait(lambda c: here(c) == {"alice", "bob"}, what="bob in alice's presence")
    bob.close()
    alice.wait(lambda c: here(c) == {"alice"}, timeout=5, what="bob gone from alice's presence")
    alice.close()
