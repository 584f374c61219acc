"""The websockets under attack, against a real daphne: what an outside probe tries.

- A page on another origin of the same host (another port, another scheme) must not ride a
  logged-in user's session cookie: the Origin is compared as scheme + host + port.
- Malformed text frames (Infinity, NaN, numbers overflowing to them, nesting that exhausts the
  parser, values that are not objects, huge frames, sizes of the wrong type) are answered with an
  `error` frame `bad_message`, never with a crashed consumer (close 1011 and a traceback); the
  session keeps working afterwards.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import time
from typing import Any
from urllib.parse import urlsplit

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.conftest import free_port
from tests.test_sessions import Cast
from tests.wsclient import TermClient

pytestmark = [pytest.mark.django_db(transaction=True, serialized_rollback=True), pytest.mark.usefixtures("engine", "catalog")]


@pytest.fixture()
def cast(people: Any, make_env: Any, live_server_proc: Any) -> Cast:
    return Cast(people, make_env, live_server_proc)


def browser_cookie(user: Any) -> str:
    """The session cookie a logged-in browser of `user` holds."""
    from django.conf import settings
    from django.test import Client

    client = Client()
    client.force_login(user)
    return f"{settings.SESSION_COOKIE_NAME}={client.cookies[settings.SESSION_COOKIE_NAME].value}"


def handshake(server_url: str, path: str, headers: list[tuple[str, str]], host: str | None = None) -> int:
    """A hand-written websocket handshake (any Host, repeated headers...): the HTTP status answered."""
    netloc = urlsplit(server_url).netloc
    address, port = netloc.rsplit(":", 1)
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [f"GET {path} HTTP/1.1", f"Host: {host or netloc}", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13", *(f"{k}: {v}" for k, v in headers)]
    with socket.create_connection((address, int(port)), timeout=15) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        data = b""
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
        assert data.startswith(b"HTTP/1.1 "), data[:200]
        status = int(data.split(b" ", 2)[1])
        if status == 101:  # accepted: take the first frame (hello) before hanging up, as a client would
            while b"\r\n\r\n" not in data or data.endswith(b"\r\n\r\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
    return status


def session_path(session: dict[str, Any]) -> str:
    return urlsplit(session["ws_url"]).path


def other_port(server_url: str) -> int:
    own = int(urlsplit(server_url).port or 0)
    port = free_port()
    return port if port != own else port + 1


# --- Origin: scheme + host + port --------------------------------------------------------------

def test_cookie_from_a_foreign_port_or_scheme_is_refused(cast: Cast) -> None:
    session = cast.open_session()
    cookie = browser_cookie(cast.people.owner)
    url = cast.server.url  # http://127.0.0.1:PORT
    port = urlsplit(url).port
    foreign = other_port(url)

    # The right origin (the page the server itself serves) is accepted: a real client gets hello.
    ok = TermClient(session["ws_url"], cookie=cookie, origin=url)
    assert ok.wait_event("hello")["user"] == "alice"
    ok.close()
    assert handshake(url, session_path(session), [("Cookie", cookie), ("Origin", url)]) == 101

    refused = {
        "another port of the same host": f"http://127.0.0.1:{foreign}",
        "the same host without a port (80)": "http://127.0.0.1",
        "another scheme, same host and port": f"https://127.0.0.1:{port}",
        "another allowed host name than the one addressed": f"http://localhost:{port}",
        "a foreign site": "http://evil.example.com",
        "a foreign site on the right port": f"http://evil.example.com:{port}",
        "a sandboxed page": "null",
        "an origin with a path": f"{url}/evil",
        "credentials in the origin": f"http://attacker@127.0.0.1:{port}",
        "a websocket scheme": f"ws://127.0.0.1:{port}",
    }
    for what, origin in refused.items():
        with pytest.raises(InvalidStatus) as denied:
            TermClient(session["ws_url"], cookie=cookie, origin=origin)
        assert denied.value.response.status_code == 403, what
        assert handshake(url, session_path(session), [("Cookie", cookie), ("Origin", origin)]) == 403, what
    # An Origin daphne (autobahn) cannot even parse is refused before LSL sees it: 400.
    assert handshake(url, session_path(session), [("Cookie", cookie), ("Origin", "http://127.0.0.1:99999")]) in (400, 403)

    # No Origin at all with a cookie: refused too; two of them (one good): daphne refuses it itself (400).
    assert handshake(url, session_path(session), [("Cookie", cookie)]) == 403
    assert handshake(url, session_path(session), [("Cookie", cookie), ("Origin", url),
                                                  ("Origin", f"http://127.0.0.1:{foreign}")]) in (400, 403)
    # A forged Host header naming a host the server does not serve does not make its origin "own".
    assert handshake(url, session_path(session), [("Cookie", cookie), ("Origin", f"http://evil.example.com:{port}")],
                     host=f"evil.example.com:{port}") == 403
    # The request's own origin comes from its Host header: a page served as http://localhost:PORT
    # (another allowed name of this server) may open the socket at that address.
    assert handshake(url, session_path(session), [("Cookie", cookie), ("Origin", f"http://localhost:{port}")],
                     host=f"localhost:{port}") == 101

    # The event stream uses the same check.
    assert handshake(url, "/ws/events/", [("Cookie", cookie), ("Origin", f"http://127.0.0.1:{foreign}")]) == 403
    assert handshake(url, "/ws/events/", [("Cookie", cookie), ("Origin", f"https://127.0.0.1:{port}")]) == 403
    assert handshake(url, "/ws/events/", [("Cookie", cookie), ("Origin", url)]) == 101


def test_token_clients_need_no_origin_but_a_cookie_alongside_is_checked(cast: Cast) -> None:
    session = cast.open_session()
    cookie = browser_cookie(cast.people.owner)
    foreign = f"http://127.0.0.1:{other_port(cast.server.url)}"

    cli = TermClient(session["ws_url"], token=cast.tokens["alice"])  # lsl shell: no Origin, no cookie
    assert cli.wait_event("hello")["user"] == "alice"
    cli.close()
    # A token in a header cannot be ridden by a foreign page (it cannot set headers on a websocket).
    scripted = TermClient(session["ws_url"], token=cast.tokens["alice"], origin=foreign)
    scripted.wait_event("hello")
    scripted.close()
    # ... but a cookie sent along is the browser's, so the browser's rule applies.
    with pytest.raises(InvalidStatus) as denied:
        TermClient(session["ws_url"], token=cast.tokens["alice"], cookie=cookie, origin=foreign)
    assert denied.value.response.status_code == 403
    with pytest.raises(InvalidStatus):
        TermClient(session["ws_url"], token=cast.tokens["alice"], cookie=cookie)
    # A bad token is still a refusal, Origin or not.
    with pytest.raises(InvalidStatus):
        TermClient(session["ws_url"], token="lsl_000000000000_not-a-real-key", origin=cast.server.url)


# --- malformed frames ------------------------------------------------------------------------

RESIZE = '{{"type": "resize", "cols": {cols}, "rows": 24}}'
HOSTILE_FRAMES: dict[str, str] = {
    "Infinity": RESIZE.format(cols="Infinity"),
    "-Infinity": RESIZE.format(cols="-Infinity"),
    "NaN": RESIZE.format(cols="NaN"),
    "1e309": RESIZE.format(cols="1e309"),
    "-1e309": RESIZE.format(cols="-1e309"),
    "NaN in a ping": '{"type": "ping", "t": NaN}',
    "1e309 in a ping": '{"type": "ping", "t": 1e309}',
    "100000 levels of [": "[" * 100000,
    "60000 levels of [ (under the size cap)": "[" * 60000,
    "30000 levels of [] in a ping (valid JSON)": '{"type": "ping", "t": ' + "[" * 30000 + "]" * 30000 + "}",
    "100000 levels of {": '{"a":' * 100000,
    "a JSON string": '"resize"',
    "a JSON number": "80",
    "a JSON array": '[{"type": "resize", "cols": 80, "rows": 24}]',
    "JSON null": "null",
    "JSON true": "true",
    "an object without type": "{}",
    "type null": '{"type": null}',
    "type a list": '{"type": ["resize"]}',
    "type an object": '{"type": {"resize": 1}}',
    "type a number": '{"type": 1}',
    "not JSON": '{"type": ',
    "an empty frame": "",
    "a NUL": "\x00",
    "a lone surrogate escape in type": '{"type": "\\ud800"}',
    "an unknown type": '{"type": "exec", "command": "id"}',
    "a 1 MiB text frame": "x" * (1024 * 1024),
    "a 1 MiB valid JSON frame": '{"type": "ping", "t": "' + "x" * (1024 * 1024 - 25) + '"}',
    "a 5000-digit integer": RESIZE.format(cols="9" * 5000),
    "resize cols=1.5": RESIZE.format(cols="1.5"),
    "resize cols=true": RESIZE.format(cols="true"),
    'resize cols="80"': RESIZE.format(cols='"80"'),
    "resize cols=10**30": RESIZE.format(cols=str(10**30)),
    "resize cols=-80": RESIZE.format(cols="-80"),
    "resize cols=0": RESIZE.format(cols="0"),
    "resize cols=1001": RESIZE.format(cols="1001"),
    "resize cols=null": RESIZE.format(cols="null"),
    "resize cols=[80]": RESIZE.format(cols="[80]"),
    'resize cols={"n": 80}': RESIZE.format(cols='{"n": 80}'),
    "resize without rows": '{"type": "resize", "cols": 80}',
    "ack bytes=true": '{"type": "ack", "bytes": true}',
    'ack bytes="5"': '{"type": "ack", "bytes": "5"}',
    "ack bytes=-1": '{"type": "ack", "bytes": -1}',
    "ack bytes=10**30": '{"type": "ack", "bytes": ' + str(10**30) + "}",
    "ack bytes=0.5": '{"type": "ack", "bytes": 0.5}',
}


def _bad_messages(client: TermClient) -> int:
    return sum(1 for e in client.events if e["type"] == "error" and e.get("code") == "bad_message")


def test_malformed_frames_get_bad_message_and_the_session_keeps_working(cast: Cast) -> None:
    session = cast.open_session(cols=80, rows=24)
    log_start = cast.server.log.stat().st_size
    alice = cast.join(session, "alice", cols=80, rows=24)
    for what, frame in HOSTILE_FRAMES.items():
        before = _bad_messages(alice)
        alice.ws.send(frame)
        alice.wait(lambda c, before=before: _bad_messages(c) > before or c.closed.is_set(), what=f"an error for {what}")
        assert not alice.closed.is_set(), f"{what}: the server closed the connection ({alice.close_code})"
        error = [e for e in alice.events if e["type"] == "error"][-1]
        assert error["code"] == "bad_message" and isinstance(error.get("detail"), str) and error["detail"], what

    # Still the same live session: a ping is answered, no resize got through, typing works.
    alice.send_json({"type": "ping", "t": 42})
    alice.wait_event("pong", t=42)
    alice.send_input("stty size; echo still-$((6*7))\r")
    alice.wait_output(b"still-42")
    assert b"24 80" in alice.output
    assert not any(e["type"] == "resize" and e.get("cols") != 80 for e in alice.events)
    alice.close()

    # A second participant joining afterwards is served normally too.
    bob = cast.join(session, "bob")
    bob.send_input("echo bob-$((2+3))\r")
    bob.wait_output(b"bob-5")
    bob.close()

    time.sleep(0.2)
    log = cast.server.log.read_bytes()[log_start:].decode(errors="replace")
    assert "Traceback" not in log, log[-4000:]


def test_a_viewers_malformed_frames_are_answered_too(cast: Cast) -> None:
    """A viewer (no write access) probing the same frames gets the same answers."""
    session = cast.open_session()
    victor = cast.join(session, "victor")
    for what in ("Infinity", "100000 levels of [", "a JSON array", "resize cols=1.5", "a 1 MiB text frame"):
        before = _bad_messages(victor)
        victor.ws.send(HOSTILE_FRAMES[what])
        victor.wait(lambda c, before=before: _bad_messages(c) > before or c.closed.is_set(), what=f"an error for {what}")
        assert not victor.closed.is_set(), what
    victor.send_json({"type": "ping", "t": "v"})
    victor.wait_event("pong", t="v")
    victor.close()


def test_the_event_stream_answers_malformed_frames(cast: Cast) -> None:
    log_start = cast.server.log.stat().st_size
    url = f"{cast.server.ws_url}/ws/events/"
    with connect(url, additional_headers={"Authorization": f"Token {cast.tokens['alice']}"}, max_size=None,
                 open_timeout=10) as ws:

        def next_answer() -> dict[str, Any]:
            deadline = time.monotonic() + 15
            while True:
                frame = json.loads(ws.recv(timeout=max(0.1, deadline - time.monotonic())))
                if frame["type"] in ("error", "pong"):
                    return frame  # events about the environment may come in between

        hello = json.loads(ws.recv(timeout=10))
        assert hello["type"] == "hello"
        for what, frame in HOSTILE_FRAMES.items():
            if what.startswith(("resize", "ack")):
                continue  # not messages of this endpoint: "unknown type", already covered below
            ws.send(frame)
            answer = next_answer()
            assert answer["type"] == "error" and answer["code"] == "bad_message", (what, answer)
        ws.send('{"type": "resize", "cols": 1.5}')
        assert next_answer()["code"] == "bad_message"
        ws.send(json.dumps({"type": "ping", "t": 7}))
        assert next_answer() == {"type": "pong", "t": 7}
    log = cast.server.log.read_bytes()[log_start:].decode(errors="replace")
    assert "Traceback" not in log, log[-4000:]
