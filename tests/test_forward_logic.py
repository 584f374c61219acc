"""`lsl forward`'s pure parts: port specs, URLs, refusals and their exit codes, flow-control windows.

No engine, no server: tests/test_forward.py drives the whole thing for real.
"""

from __future__ import annotations

import json

import pytest
from rest_framework import exceptions as drf

from environments import forward as server
from environments.ports import PortClosed, PortUnavailable
from lsl import forward as cli
from lsl.errors import AUTH, CONFLICT, NOT_FOUND, USAGE, UsageFailure
from lsl_site.errors import InvalidInput


@pytest.mark.parametrize(("text", "local", "remote"), [
    ("3000", 3000, 3000), ("8080:3000", 8080, 3000), ("0:8000", 0, 8000), (" 22 ", 22, 22), ("65535:1", 65535, 1),
])
def test_specs(text: str, local: int, remote: int) -> None:
    assert cli.parse_spec(text) == cli.Spec(local, remote)


@pytest.mark.parametrize(("text", "message"), [
    ("", "remote port must be a number"), ("0", "from 1 to 65535"), ("65536", "not '65536'"),
    ("http", "not 'http'"), ("3000:", "remote port"), (":3000", "local port"), ("-1:80", "local port"),
    ("1:2:3", "expected [LOCAL:]REMOTE"), ("localhost:3000:3000", "127.0.0.1 only"), ("٣٠٠٠", "remote port"),
    ("000003000", "remote port"),
])
def test_bad_specs_are_usage_errors(text: str, message: str) -> None:
    with pytest.raises(UsageFailure) as caught:
        cli.parse_spec(text)
    assert message in caught.value.message and caught.value.exit_code == USAGE


def test_spec_lists() -> None:
    assert cli.parse_specs(["3000", "0:8000", "0:9000", "8080:3000"]) == [
        cli.Spec(3000, 3000), cli.Spec(0, 8000), cli.Spec(0, 9000), cli.Spec(8080, 3000)]
    with pytest.raises(UsageFailure, match="local port 3000 is given twice"):
        cli.parse_specs(["3000", "3000:4000"])
    with pytest.raises(UsageFailure, match="at least one port"):
        cli.parse_specs([])


def test_urls_carry_no_token() -> None:
    url = cli.forward_url("https://lsl.example.com/", "abc", 3000, session="s" * 32, control=True)
    assert url == f"wss://lsl.example.com/ws/environments/abc/forward/3000/?session={'s' * 32}&control=1"
    assert cli.forward_url("http://127.0.0.1:8000", "abc", 80, session="x" * 8) == \
        "ws://127.0.0.1:8000/ws/environments/abc/forward/80/?session=xxxxxxxx"


def test_server_refusals_and_the_cli_exit_codes_they_become() -> None:
    cases = [
        (drf.NotFound("No such environment."), "not_found", 4404, NOT_FOUND),
        (drf.PermissionDenied("This needs the member role on the environment; you are viewer."), "permission_denied",
         4403, AUTH),
        (PortUnavailable("The environment is stopped; start it to reach its ports."), "port_unavailable", 4409, CONFLICT),
        (PortClosed("nothing is listening on port 3000 in this environment"), "port_closed", 4409, CONFLICT),
        (InvalidInput({"port": ["A port is a whole number from 1 to 65535."]}), "invalid", 4400, USAGE),
    ]
    for exc, code, close_code, exit_code in cases:
        refusal = server.refusal_for(exc)
        assert refusal is not None and (refusal.code, refusal.close_code) == (code, close_code), exc
        frame = json.loads(refusal.frame())
        assert frame == {"error": {"code": code, "detail": refusal.detail}}
        parsed = cli.parse_refusal(refusal.frame())
        assert parsed == (code, refusal.detail)
        error = cli.refusal_error(close_code, *parsed)
        assert error.exit_code == exit_code and error.message == refusal.detail
    assert "member role" in server.refusal_for(cases[1][0]).detail  # type: ignore[union-attr]
    assert "port: A port is a whole number" in server.refusal_for(cases[4][0]).detail  # type: ignore[union-attr]
    assert server.refusal_for(ValueError("a bug")) is None


@pytest.mark.parametrize("text", ["", "nope", "[]", '{"type": "ready"}', '{"error": "flat"}', "1e999"])
def test_frames_that_are_not_refusals(text: str) -> None:
    assert cli.parse_refusal(text) is None


def test_requests() -> None:
    request = server.parse_request(3000, b"session=0123456789abcdef&control=1")
    assert request == server.Request(3000, True, "0123456789abcdef")
    assert server.parse_request(0, b"").port is None
    assert server.parse_request(70000, b"").port is None
    assert server.parse_request(22, b"control=0&session=short").session is None  # too short to be ours
    assert server.parse_request(22, b"session=" + b"a" * 65).session is None
    assert server.parse_request(22, b"session=%27%3B--aaaaaaaa").session is None
    assert server.parse_request(22, b"").control is False
    assert server.parse_request(22, b"spare=1").spare is True
    assert server.parse_request(22, b"spare=1&control=1").spare is False  # a control connection is never a spare
    assert server.parse_request(22, b"").spare is False
    assert "spare=1" in cli.forward_url("http://h", "e", 22, session="s" * 16, spare=True)


@pytest.mark.parametrize("window_class", [server.Window, cli.Window])
def test_windows(window_class: type) -> None:
    window = window_class(limit=100)
    assert window.open
    window.sent = 100
    assert not window.open
    assert not window.ack(101) and not window.ack(-1) and not window.ack(True) and not window.ack("50") \
        and not window.ack(50.0) and not window.ack(None)
    assert window.ack(30) and window.open and window.acked == 30
    assert window.ack(10) and window.acked == 30  # an old ack never moves the window back
    window.sent = 130
    assert not window.open
    assert window.ack(130) and window.sent - window.acked == 0


def test_acks_are_due_every_quarter_window() -> None:
    for module in (server, cli):
        assert module.ACK_EVERY * 4 == module.WINDOW  # the peer's window never fills between acks
        assert not module.due_ack(module.ACK_EVERY - 1, 0)
        assert module.due_ack(module.ACK_EVERY, 0)
        assert module.due_ack(3 * module.ACK_EVERY + 5, 2 * module.ACK_EVERY)
    assert server.WINDOW == cli.WINDOW
    assert server.READ_SIZE < 1 << 20  # a frame stays under daphne's 1 MiB cap


def test_listening_hint() -> None:
    scanned = [{"port": 22, "loopback_only": False}, {"port": 8000, "loopback_only": True}]
    assert server.listening_from(scanned, True, 8000) is True
    assert server.listening_from(scanned, True, 3000) is False
    assert server.listening_from(scanned, False, 8000) is None  # never scanned: no claim either way
    assert server.listening_from(None, True, 8000) is False
