"""Pure tests of when terminal clients reconnect, and how (lsl/reconnect.py, frontend/src/reconnect.js).

No server, no engine, no network: the policy's decisions with a fake clock, `lsl shell`'s receiver
thread driven by scripted fake connections, and a check that the browser page's copy of the policy
(run under node) decides every close code the same way. Tests that kill real servers live elsewhere.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed, InvalidMessage, InvalidStatus
from websockets.frames import Close
from websockets.http11 import Response

from lsl import errors, reconnect, shell
from lsl.reconnect import (
    BACKOFF_FIRST,
    BACKOFF_MAX,
    GIVE_UP_AFTER,
    KICK_WINDOW,
    ReconnectPolicy,
    backoff_delay,
    handshake_retryable,
    is_transient,
)

ROOT = Path(__file__).resolve().parent.parent
RECONNECT_CODES = [1001, 1005, 1006, 1011, 1012, 1013, 4012, 4013]
FINAL_CODES = [1000, 4403, 4410]
OTHER_CODES = [1002, 1003, 1007, 1008, 1009, 1010, 1015, 4000, 4400, 4999]


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# --- the policy -------------------------------------------------------------------------------

@pytest.mark.parametrize("code", [*RECONNECT_CODES, None])
def test_server_gone_or_network_dropped_reconnects(code: int | None) -> None:
    assert is_transient(code)
    assert ReconnectPolicy().on_close(code)


@pytest.mark.parametrize("code", FINAL_CODES + OTHER_CODES)
def test_session_over_revoked_or_unknown_never_reconnects(code: int) -> None:
    policy = ReconnectPolicy()
    assert not policy.on_close(code)
    assert not policy.reconnecting


@pytest.mark.parametrize("code", [*RECONNECT_CODES, 4408, None])
def test_an_exit_frame_is_final_whatever_the_close_code(code: int | None) -> None:
    assert not ReconnectPolicy().on_close(code, exited=True)


def test_too_slow_reconnects_once_then_gives_up() -> None:
    clock = Clock()
    policy = ReconnectPolicy(clock=clock)
    assert policy.on_close(4408)
    policy.on_connected()
    clock.now += 90  # kicked again (a stall takes a minute): it would only happen again
    assert not policy.on_close(4408)
    clock.now += KICK_WINDOW  # long after: one more try is fine
    assert policy.on_close(4408)
    policy.on_connected()
    assert policy.on_close(1006), "other drops between kicks are not limited"


def test_backoff_doubles_from_a_quarter_second_to_four_seconds() -> None:
    middle = [backoff_delay(n, rand=lambda: 0.5) for n in range(8)]
    assert middle == [0.25, 0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0]
    assert BACKOFF_FIRST == 0.25 and BACKOFF_MAX == 4.0
    # ±20% jitter, never beyond the cap, and no overflow however long it goes on.
    assert backoff_delay(0, rand=lambda: 0.0) == pytest.approx(0.2)
    assert backoff_delay(0, rand=lambda: 1.0) == pytest.approx(0.3)
    assert backoff_delay(3, rand=lambda: 0.0) == pytest.approx(1.6)
    assert all(backoff_delay(n, rand=lambda: 1.0) <= BACKOFF_MAX for n in range(2000))


def test_retries_for_two_minutes_then_gives_up() -> None:
    clock = Clock()
    policy = ReconnectPolicy(clock=clock, rand=lambda: 1.0)
    assert policy.next_delay() == 0.0  # not in an outage: nothing to wait for
    assert policy.on_close(1006)
    waited, attempts = 0.0, 0
    while (delay := policy.next_delay()) is not None:
        assert 0 < delay <= BACKOFF_MAX
        clock.now += delay + 0.01  # the attempt itself takes a little time, and fails
        waited += delay
        attempts += 1
        assert policy.on_close(1006), "a failed attempt does not end the outage"
        assert attempts < 100
    assert GIVE_UP_AFTER - 1 <= waited <= GIVE_UP_AFTER
    assert attempts > 25  # most of the two minutes at the 4 s cap
    assert policy.remaining() == 0.0


def test_the_last_wait_never_passes_the_deadline() -> None:
    clock = Clock()
    policy = ReconnectPolicy(clock=clock, rand=lambda: 1.0)
    policy.on_close(1012)
    for _ in range(6):
        policy.next_delay()  # up to the 4 s cap
    clock.now += GIVE_UP_AFTER - 1.5
    assert policy.next_delay() == pytest.approx(1.5)
    clock.now += 1.5
    assert policy.next_delay() is None


def test_a_connection_that_drops_before_hello_does_not_restart_the_clock() -> None:
    clock = Clock()
    policy = ReconnectPolicy(clock=clock)
    policy.on_close(1012)
    lost_at = policy.lost_at
    clock.now += 30
    policy.next_delay()
    assert policy.on_close(1006)  # the handshake worked, then the restarting server closed it again
    assert policy.lost_at == lost_at and policy.remaining() == pytest.approx(GIVE_UP_AFTER - 30)
    policy.on_connected()  # a `hello`: the outage is over, and the next one gets the full budget
    assert not policy.reconnecting and policy.attempt == 0
    clock.now += 500
    policy.on_close(1006)
    assert policy.remaining() == GIVE_UP_AFTER
    assert policy.next_delay() == pytest.approx(BACKOFF_FIRST, rel=0.21)


@pytest.mark.parametrize(("status", "retry"), [
    (None, True), (500, True), (502, True), (503, True), (504, True), (429, True),
    (401, False), (403, False), (404, False),
])
def test_which_failed_handshakes_are_retried(status: int | None, retry: bool) -> None:
    assert handshake_retryable(status) is retry


# --- the browser page follows the same rules -------------------------------------------------------

NODE_PROBE = """
import { ReconnectPolicy, backoffDelay, BACKOFF_FIRST_MS, BACKOFF_MAX_MS, GIVE_UP_AFTER_MS, KICK_WINDOW_MS }
  from "./src/reconnect.js";
const codes = JSON.parse(process.argv[1]);
const decisions = {};
for (const code of codes) decisions[code] = new ReconnectPolicy().onClose(code === "none" ? undefined : code);
const exited = new ReconnectPolicy().onClose(1006, { exited: true });
let now = 0;
const kicks = new ReconnectPolicy({ now: () => now });
const kick = [kicks.onClose(4408)];
kicks.onConnected();
now += 90000;
kick.push(kicks.onClose(4408));
now += KICK_WINDOW_MS;
kick.push(kicks.onClose(4408));
const delays = [0, 1, 2, 3, 4, 5, 9].map((n) => backoffDelay(n, () => 0.5));
const jitter = [backoffDelay(0, () => 0), backoffDelay(0, () => 1), backoffDelay(20, () => 1)];
now = 0;
const budget = new ReconnectPolicy({ now: () => now, random: () => 1 });
budget.onClose(1012);
let waited = 0, d;
while ((d = budget.nextDelay()) !== null) { waited += d; now += d + 10; budget.onClose(1006); }
console.log(JSON.stringify({ decisions, exited, kick, delays, jitter, waited,
  constants: [BACKOFF_FIRST_MS, BACKOFF_MAX_MS, GIVE_UP_AFTER_MS, KICK_WINDOW_MS] }));
"""


def test_the_browser_page_decides_like_lsl_shell() -> None:
    node = shutil.which("node")
    assert node, "node is needed to build the browser assets (make assets), and to run this test"
    codes: list[Any] = [*RECONNECT_CODES, *FINAL_CODES, *OTHER_CODES, 4408, "none"]
    result = subprocess.run([node, "--input-type=module", "-e", NODE_PROBE, json.dumps(codes)],
                            check=False, cwd=ROOT / "frontend", capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    js = json.loads(result.stdout)
    python = {str(code): ReconnectPolicy().on_close(None if code == "none" else code) for code in codes}
    assert js["decisions"] == python
    assert js["exited"] is False
    assert js["kick"] == [True, False, True]
    assert js["delays"] == [backoff_delay(n, rand=lambda: 0.5) * 1000 for n in (0, 1, 2, 3, 4, 5, 9)]
    assert js["jitter"] == pytest.approx([200, 300, 4000])
    assert js["constants"] == [BACKOFF_FIRST * 1000, BACKOFF_MAX * 1000, GIVE_UP_AFTER * 1000, KICK_WINDOW * 1000]
    assert GIVE_UP_AFTER * 1000 - 1000 <= js["waited"] <= GIVE_UP_AFTER * 1000


# --- `lsl shell`'s receiver thread, with scripted fake connections -----------------------------------

def closed(code: int | None) -> ConnectionClosed:
    return ConnectionClosed(Close(code, "") if code is not None else None, None)


class FakeConnection:
    """Plays a script: str/bytes frames to return from recv, callables to run, then the close."""

    def __init__(self, *script: Any, close_code: int | None = 1006) -> None:
        self.script = list(script)
        self.close_code_after = close_code
        self.close_code: int | None = None
        self.sent: list[str | bytes] = []

    def recv(self, timeout: float | None = None) -> str | bytes:
        while self.script:
            item = self.script.pop(0)
            if callable(item):
                item()
                continue
            return json.dumps(item) if isinstance(item, dict) else item
        self.close_code = self.close_code_after if self.close_code_after is not None else 1006
        raise closed(self.close_code_after)

    def send(self, message: str | bytes) -> None:
        if self.close_code is not None:
            raise closed(self.close_code)
        self.sent.append(message)

    def close(self) -> None:
        self.close_code = self.close_code or 1000

    def controls(self) -> list[dict[str, Any]]:
        return [json.loads(m) for m in self.sent if isinstance(m, str)]

    def keys(self) -> bytes:
        return b"".join(m for m in self.sent if isinstance(m, bytes))


HELLO = {"type": "hello", "role": "member", "can_write": True, "window": 1 << 20, "cols": 80, "rows": 24}
SNAPSHOT = {"type": "snapshot", "cols": 80, "rows": 24, "bytes": 9}
SCREEN = b"\x1bcscreen!"
RESTARTING = {"type": "error", "code": "server_restarting", "detail": "the server is restarting"}


class Dialer:
    """Stands in for `redial`: each call takes the next outcome (a connection, or an exception to raise)."""

    def __init__(self, *outcomes: Any) -> None:
        self.outcomes = list(outcomes)
        self.calls: list[tuple[int, int, float]] = []

    def __call__(self, cols: int, rows: int, timeout: float) -> Any:
        self.calls.append((cols, rows, timeout))
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


class Fd:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd


FDS: dict[str, int] = {}  # this test's stand-ins for stdin and stdout (see `terminal`)


@pytest.fixture()
def terminal(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """stdin and stdout as plain files (not a tty), so the attachment runs without a terminal; yields
    the file the "screen" is written to. stderr stays pytest's, for capsys."""
    stdin_r, stdin_w = os.pipe()
    screen = tmp_path / "screen"
    out = open(screen, "wb")  # noqa: SIM115 - closed below
    FDS.update(stdin=stdin_r, stdout=out.fileno())
    monkeypatch.setattr(shell, "terminal_size", lambda: (80, 24))
    monkeypatch.setattr(reconnect, "backoff_delay", lambda attempt, rand=None: 0.001)  # no real waiting
    yield screen
    FDS.clear()
    out.close()
    os.close(stdin_r)
    os.close(stdin_w)


def attachment(first: FakeConnection, dialer: Dialer | None, policy: ReconnectPolicy | None = None) -> shell.Attachment:
    # pytest's capturing swaps sys.stdin/stdout back at each test phase, so patch them just for the constructor.
    with mock.patch.object(sys, "stdin", Fd(FDS["stdin"])), mock.patch.object(sys, "stdout", Fd(FDS["stdout"])):
        return shell.Attachment(first, {"id": "e1", "name": "dev"}, {"id": "s1", "name": None},  # type: ignore[arg-type]
                                read_only=False, redial=dialer, size=(80, 24),
                                policy=policy or ReconnectPolicy(rand=lambda: 0.0))


def fast_policy(clock: Callable[[], float] | None = None) -> ReconnectPolicy:
    return ReconnectPolicy(rand=lambda: 0.0, **({"clock": clock} if clock else {}))


def test_shell_reconnects_after_a_graceful_restart_redraws_and_sends_what_was_typed(
        terminal: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    first = FakeConnection(HELLO, SNAPSHOT, b"\x1bcbefore", RESTARTING, close_code=1012)
    attached: list[shell.Attachment] = []
    size = [(80, 24)]
    monkeypatch.setattr(shell, "terminal_size", lambda: size[0])

    def meanwhile() -> None:
        # Before the new connection's hello, the person types (held) and resizes the window (sent after hello).
        attached[0]._send_input(b"ls\r")
        size[0] = (100, 30)

    second = FakeConnection(meanwhile, HELLO, SNAPSHOT, SCREEN,
                            {"type": "exit", "code": 3, "reason": "exited"}, close_code=1000)
    dialer = Dialer(ConnectionRefusedError(111, "refused"), InvalidMessage("did not receive a valid HTTP response"),
                    InvalidStatus(Response(502, "Bad Gateway", Headers())), second)
    att = attachment(first, dialer)
    attached.append(att)
    att._send_input(b"echo hi\r")
    att._receive()

    err = capsys.readouterr().err
    assert err.count("lsl: connection lost, reconnecting…") == 1
    assert err.count("lsl: reconnected") == 1
    assert "server:" not in err, "server_restarting is not shown as a server error: the reconnect line says it"
    assert len(dialer.calls) == 4 and dialer.calls[-1][:2] == (80, 24)
    assert first.keys() == b"echo hi\r"
    assert second.keys() == b"ls\r", "typed while reconnecting: sent once the new connection said hello"
    assert {"type": "resize", "cols": 100, "rows": 30} in second.controls()
    assert {"type": "ack", "bytes": len(SCREEN)} in second.controls(), "flow control counts per connection"
    assert terminal.read_bytes().endswith(SCREEN), "the new connection's snapshot redraws the screen"
    assert att.done.is_set() and att._exit_code() == 3


def test_shell_lines_return_the_carriage_in_raw_mode(terminal: Path, capsys: pytest.CaptureFixture[str]) -> None:
    second = FakeConnection(HELLO, close_code=1000)
    att = attachment(FakeConnection(HELLO, close_code=1006), Dialer(second))
    att.raw = True
    att._receive()
    err = capsys.readouterr().err
    assert "\r\nlsl: connection lost, reconnecting…\r\n" in err and "\r\nlsl: reconnected\r\n" in err


@pytest.mark.parametrize(("code", "exit_code"), [(4410, errors.CONFLICT), (4403, errors.AUTH), (1000, 0)])
def test_shell_never_reconnects_when_the_session_is_over(terminal: Path, capsys: pytest.CaptureFixture[str],
                                                          code: int, exit_code: int) -> None:
    dialer = Dialer()
    att = attachment(FakeConnection(HELLO, close_code=code), dialer)
    att._receive()
    assert dialer.calls == []
    assert "reconnecting" not in capsys.readouterr().err
    if exit_code == 0:
        assert att._exit_code() == 0
    else:
        with pytest.raises(errors.LslError) as raised:
            att._exit_code()
        assert raised.value.exit_code == exit_code


def test_shell_exit_frame_wins_over_a_dropped_close(terminal: Path) -> None:
    dialer = Dialer()
    att = attachment(FakeConnection(HELLO, {"type": "exit", "code": 5, "reason": "exited"}, close_code=1006), dialer)
    att._receive()
    assert dialer.calls == [] and att._exit_code() == 5


def test_shell_gives_up_after_the_deadline_with_exit_6(terminal: Path, capsys: pytest.CaptureFixture[str]) -> None:
    clock = Clock()

    class Refused(Dialer):
        def __call__(self, cols: int, rows: int, timeout: float) -> Any:
            self.calls.append((cols, rows, timeout))
            assert 1.0 <= timeout <= shell.RECONNECT_OPEN_TIMEOUT
            clock.now += 20  # a slow failure: the two minutes run out after a few attempts
            raise ConnectionRefusedError(111, "refused")

    dialer = Refused()
    att = attachment(FakeConnection(HELLO, close_code=1006), dialer, fast_policy(clock))
    att._send_input(b"lost?")
    att._receive()
    assert 3 <= len(dialer.calls) <= 8
    with pytest.raises(errors.Unreachable) as raised:
        att._exit_code()
    assert raised.value.exit_code == errors.UNREACHABLE == 6
    assert "could not reconnect within 120 s" in raised.value.message
    assert "lsl shell dev --session s1" in raised.value.message
    assert capsys.readouterr().err.count("reconnecting") == 1


def test_shell_stops_when_access_is_refused_on_reconnect(terminal: Path) -> None:
    dialer = Dialer(ConnectionRefusedError(111, "refused"), InvalidStatus(Response(403, "Forbidden", Headers())))
    att = attachment(FakeConnection(HELLO, close_code=1012), dialer)
    att._receive()
    assert len(dialer.calls) == 2
    with pytest.raises(errors.AuthError):
        att._exit_code()


def test_shell_kicked_twice_for_being_slow_gives_up(terminal: Path) -> None:
    second = FakeConnection(HELLO, close_code=4408)
    dialer = Dialer(second)
    att = attachment(FakeConnection(HELLO, close_code=4408), dialer)
    att._receive()
    assert len(dialer.calls) == 1
    with pytest.raises(errors.LslError, match="fell too far behind"):
        att._exit_code()


def test_shell_holds_a_bounded_amount_of_input(terminal: Path, capsys: pytest.CaptureFixture[str]) -> None:
    att = attachment(FakeConnection(close_code=1006), None)
    att.connected = False
    att._send_input(b"x" * (shell.INPUT_BUFFER - 10))
    att._send_input(b"y" * 25)
    att._send_input(b"z" * 5)
    assert len(att.held) == shell.INPUT_BUFFER and att.dropped == 20
    assert capsys.readouterr().err.count("input buffer full") == 1


def test_shell_detach_while_reconnecting_stops_retrying(terminal: Path) -> None:
    dialer = Dialer()
    att = attachment(FakeConnection(HELLO, close_code=1006), dialer)
    att.stopping.set()  # Enter ~ . typed while the server was away
    att._receive()
    assert dialer.calls == []
