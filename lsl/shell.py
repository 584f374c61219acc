"""`lsl shell`: attach the local terminal to a shared session (protocol: docs/protocol.md).

Two threads: the main one reads the keyboard (raw mode) and SIGWINCH and sends
input/resize messages; a receiver thread writes PTY output to stdout, acks it
(flow control) and handles control messages. `Enter ~ .` detaches (as in ssh)
and leaves the shell running for everyone else.

When the connection drops because the server or the network went away (a restart, kill -9, a
dead link), the receiver thread reconnects by itself (policy: lsl/reconnect.py, docs/protocol.md
§2.1): one line on stderr says so, keystrokes typed meanwhile are held (up to INPUT_BUFFER bytes)
and sent once the new connection's `hello` has come, and the new connection's snapshot redraws the
screen. The detach escape and window-size changes keep working while it does.
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import termios
import threading
import tty
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI, WebSocketException
from websockets.sync.client import ClientConnection, connect

from lsl.client import Client
from lsl.errors import (
    AUTH,
    GENERIC,
    SERVER_ERROR,
    AuthError,
    Conflict,
    LslError,
    NotFound,
    ServerError,
    Unreachable,
)
from lsl.reconnect import ReconnectPolicy, handshake_retryable

DEFAULT_WINDOW = 1 << 20  # the protocol's default; `hello` tells us the real one
# After a burst, ack everything once output pauses this long: a server that paused us
# (we fell behind) only resumes when we have acked every byte it sent.
ACK_IDLE = 0.05
PING_INTERVAL = 30.0
DETACH_HINT = "Enter ~ . to detach"
INPUT_BUFFER = 4096  # keystrokes held while reconnecting; beyond this they are dropped (and we say so)
RECONNECT_OPEN_TIMEOUT = 10.0  # one reconnect handshake may take this long (never past the give-up time)
# Why a session ended without an exit code → lsl's exit code.
REASON_EXIT = {"access_revoked": AUTH, "server_error": SERVER_ERROR}


def terminal_size() -> tuple[int, int]:
    for fd in (sys.stdout.fileno(), sys.stdin.fileno(), sys.stderr.fileno()):
        try:
            size = os.get_terminal_size(fd)
            return size.columns, size.lines
        except OSError:
            continue
    return 80, 24


def pick_session(client: Client, env: dict[str, Any], session_id: str | None, new: bool) -> dict[str, Any]:
    """The session to join: the one named, else the newest live one, else a new one."""
    if session_id:
        session = client.get(f"sessions/{session_id}/")
        if session.get("live") is False:
            raise Conflict(f"session {session_id} has already ended ({session.get('end_reason') or 'ended'})")
        return session
    if not new:
        live = [s for s in client.get_all(f"environments/{env['id']}/sessions/", live="true") if s.get("live", True)]
        if live:
            return live[0]
    cols, rows = terminal_size()
    return client.post(f"environments/{env['id']}/sessions/", {"cols": cols, "rows": rows})


def websocket_url(client: Client, session: dict[str, Any], cols: int, rows: int) -> str:
    base = session.get("ws_url") or f"{client.url.replace('http', 'ws', 1)}/ws/sessions/{session['id']}/"
    return f"{base}{'&' if '?' in base else '?'}{urlencode({'client': 'cli', 'cols': cols, 'rows': rows})}"


def dial(client: Client, url: str, timeout: float = 15) -> ClientConnection:
    """Open the websocket with `Authorization: Token` (never a token in the URL); raises websockets' errors."""
    return connect(url, additional_headers={"Authorization": f"Token {client.token}"},
                   open_timeout=timeout, max_size=64 * 1024 * 1024, user_agent_header="lsl-cli")


def handshake_status(exc: BaseException) -> int | None:
    """The HTTP status of a refused handshake, None when the server gave no HTTP answer."""
    return exc.response.status_code if isinstance(exc, InvalidStatus) else None


def handshake_error(exc: BaseException, url: str) -> LslError:
    """A failed handshake as the error (and exit code) lsl reports."""
    if isinstance(exc, InvalidStatus):
        status = exc.response.status_code
        if status in (401, 403):
            return AuthError("the server refused to attach you to this session (no access, or a bad token)")
        if status == 404:
            return NotFound("no such session on the server")
        return ServerError(f"websocket handshake failed with HTTP {status}")
    if isinstance(exc, (InvalidURI, InvalidHandshake)):
        return ServerError(f"websocket handshake failed: {exc}")
    return Unreachable(f"cannot open a websocket to {url.split('?')[0]} ({exc})")


def websocket_url_base(session: dict[str, Any]) -> str:
    return str(session.get("ws_url") or f"/ws/sessions/{session['id']}/")


def open_websocket(client: Client, url: str) -> ClientConnection:
    """The first connection: any failure is final, mapped to an exit code."""
    try:
        return dial(client, url)
    except (InvalidURI, InvalidHandshake, OSError, TimeoutError) as exc:
        raise handshake_error(exc, url) from None


def attach(client: Client, env: dict[str, Any], session: dict[str, Any], *, read_only: bool,
           ping: Callable[[], Any]) -> int:
    cols, rows = terminal_size()
    ws = open_websocket(client, websocket_url(client, session, cols, rows))

    def redial(cols: int, rows: int, timeout: float) -> ClientConnection:
        return dial(client, websocket_url(client, session, cols, rows), timeout)

    attachment = Attachment(ws, env, session, read_only=read_only, redial=redial, size=(cols, rows))
    stop_pinging = _start_pinger(ping)
    try:
        with RawTerminal(sys.stdin.fileno()):
            return attachment.run()
    finally:
        stop_pinging.set()
        attachment.close()


def _start_pinger(ping: Callable[[], Any]) -> threading.Event:
    """Ping the server every 30 s while attached (admins see live CLI clients); failures are not fatal."""
    stop = threading.Event()

    def loop() -> None:
        while True:
            try:
                ping()
            except Exception:  # noqa: BLE001 - a missed ping must never break the terminal
                pass
            if stop.wait(PING_INTERVAL):
                return

    threading.Thread(target=loop, name="lsl-ping", daemon=True).start()
    return stop


class RawTerminal:
    """Raw mode on a tty stdin for the duration; a no-op for pipes."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.saved: list[Any] | None = None

    def __enter__(self) -> RawTerminal:
        if os.isatty(self.fd):
            self.saved = termios.tcgetattr(self.fd)
            tty.setraw(self.fd, termios.TCSANOW)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.saved is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)


class DetachDetector:
    """ssh-style escapes: `~` right after Enter starts one; `~.` detaches, `~~` sends a single `~`."""

    def __init__(self) -> None:
        self.at_line_start = True
        self.tilde_pending = False

    def feed(self, data: bytes) -> tuple[bytes, bool]:
        """Returns (bytes to send, detach?)."""
        out = bytearray()
        for byte in data:
            if self.tilde_pending:
                self.tilde_pending = False
                if byte == ord("."):
                    return bytes(out), True
                out.append(ord("~"))
                if byte == ord("~"):
                    self.at_line_start = False
                    continue
            elif self.at_line_start and byte == ord("~"):
                self.tilde_pending = True
                continue
            out.append(byte)
            self.at_line_start = byte in (10, 13)
        return bytes(out), False


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class Attachment:
    """One attached terminal: keyboard → websocket in the caller's thread, websocket → screen in another.

    The receiver thread also reconnects (when `redial` is given and lsl/reconnect.py says so) and
    swaps `ws`; `lock` guards the swap, `connected` and the keystrokes held meanwhile.
    """

    def __init__(self, ws: ClientConnection, env: dict[str, Any], session: dict[str, Any], *, read_only: bool,
                 redial: Callable[[int, int, float], ClientConnection] | None = None,
                 size: tuple[int, int] | None = None, policy: ReconnectPolicy | None = None) -> None:
        self.ws = ws
        self.env = env
        self.session = session
        self.read_only = read_only
        self.redial = redial  # opens a new connection at (cols, rows) within timeout; None: never reconnect
        self.policy = policy or ReconnectPolicy()
        self.url_size = size or terminal_size()  # the size the current connection's URL announced
        self.stdin = sys.stdin.fileno()
        self.stdout = sys.stdout.fileno()
        self.raw = os.isatty(self.stdin)
        self.window = DEFAULT_WINDOW
        self.received = 0
        self.acked = 0
        self.snapshot_pending = False
        self.role = "?"
        self.exit_message: dict[str, Any] | None = None
        self.presence_shown = False
        self.notified: set[str] = set()
        self.done = threading.Event()
        self.wake_r, self.wake_w = os.pipe()
        self.resized = False
        self.detector = DetachDetector()
        self.lock = threading.Lock()
        self.connected = True  # False from a lost connection until the new one's `hello`: input is held
        self.held = bytearray()  # keystrokes typed while reconnecting (at most INPUT_BUFFER bytes)
        self.dropped = 0  # keystrokes beyond that, dropped (and said so)
        self.stopping = threading.Event()  # detached: stop reconnecting
        self.failure: LslError | None = None  # why reconnecting ended for good, if it did

    # --- main thread: keyboard and resizes -------------------------------------------

    def run(self) -> int:
        receiver = threading.Thread(target=self._receive, name="lsl-recv", daemon=True)
        receiver.start()
        previous = signal.signal(signal.SIGWINCH, self._on_winch)
        try:
            detached = self._input_loop()
        finally:
            signal.signal(signal.SIGWINCH, previous)
        if detached:
            self.close()  # before our own notice, so the others' presence updates at once
            self._notice(f"detached; the session keeps running (rejoin: lsl shell {self.env['name']} "
                         f"--session {self.session['id']})")
            return 0
        receiver.join(timeout=5)
        return self._exit_code()

    def close(self) -> None:
        """Stop reconnecting and close the current connection."""
        self.stopping.set()
        with self.lock:
            ws = self.ws
        ws.close()

    def _input_loop(self) -> bool:
        """Forward keystrokes until the session ends (False) or the user detaches (True)."""
        input_open = True
        while not self.done.is_set():
            watched = [self.wake_r] + ([self.stdin] if input_open else [])
            try:
                ready, _, _ = select.select(watched, [], [], 1.0)
            except InterruptedError:
                continue
            if self.wake_r in ready:
                os.read(self.wake_r, 1024)
            if self.resized:
                self.resized = False
                self._send_size()
            if self.stdin in ready:
                data = os.read(self.stdin, 65536)
                if not data:
                    input_open = False  # piped input ran out: keep watching until the session ends
                    continue
                if self._on_keys(data):
                    return True
        return False

    def _on_keys(self, data: bytes) -> bool:
        to_send, detach = self.detector.feed(data)
        if self.read_only:
            # Nothing we type reaches the shell, so Ctrl-C can safely mean "leave".
            return detach or b"\x03" in to_send
        if to_send:
            self._send_input(to_send)
        return detach

    def _on_winch(self, signum: int, frame: Any) -> None:
        self.resized = True
        os.write(self.wake_w, b"w")

    def _send_size(self) -> None:
        cols, rows = terminal_size()
        with self.lock:
            if not self.connected:
                return  # reconnecting: the new connection announces the size it is opened with
            ws = self.ws
        try:
            ws.send(json.dumps({"type": "resize", "cols": cols, "rows": rows}))
        except ConnectionClosed:
            pass  # the receiver thread sees the close too, and reconnects

    def _send_input(self, data: bytes) -> None:
        with self.lock:
            if self.connected:
                try:
                    self.ws.send(data)
                    return
                except ConnectionClosed:
                    self.connected = False  # the receiver thread sees the close too, and reconnects
            self._hold(data)

    def _hold(self, data: bytes) -> None:
        """Keep keystrokes typed while reconnecting, up to INPUT_BUFFER bytes (call with `lock` held)."""
        room = INPUT_BUFFER - len(self.held)
        self.held += data[:max(0, room)]
        if len(data) > room:
            if not self.dropped:
                self._status(f"input buffer full ({INPUT_BUFFER} bytes) while reconnecting: "
                             "further keystrokes are dropped")
            self.dropped += len(data) - max(0, room)

    # --- receiver thread ----------------------------------------------------------------

    def _receive(self) -> None:
        try:
            while True:
                self._pump()
                if self.stopping.is_set() or not self._reconnect():
                    return
        finally:
            self.done.set()
            os.write(self.wake_w, b"x")

    def _pump(self) -> None:
        """Handle the current connection's frames until it closes."""
        ws = self.ws
        try:
            while True:
                try:
                    # While output is unacked, wait briefly: a lull means we caught up, so ack it all.
                    message = ws.recv(timeout=ACK_IDLE if self.received > self.acked else None)
                except TimeoutError:
                    self._ack()
                    continue
                if isinstance(message, bytes):
                    self._on_output(message)
                else:
                    self._on_control(message)
        except ConnectionClosed:
            pass

    def _reconnect(self) -> bool:
        """The connection closed: open a new one if the policy says so. False: the attachment is over."""
        if self.redial is None:
            return False
        first_loss = not self.policy.reconnecting
        if not self.policy.on_close(self.ws.close_code, exited=self.exit_message is not None):
            return False
        with self.lock:
            self.connected = False
        if first_loss:
            self._status("connection lost, reconnecting…")
        while True:
            delay = self.policy.next_delay()
            if delay is None:
                self.failure = Unreachable(
                    f"lost the connection to the server and could not reconnect within "
                    f"{self.policy.give_up_after:g} s; the shell may still be running "
                    f"(rejoin: lsl shell {self.env['name']} --session {self.session['id']})")
                return False
            if self.stopping.wait(delay):
                return False
            cols, rows = terminal_size()
            timeout = max(1.0, min(RECONNECT_OPEN_TIMEOUT, self.policy.remaining()))
            try:
                ws = self.redial(cols, rows, timeout)
            except (WebSocketException, OSError, TimeoutError, EOFError) as exc:
                if not isinstance(exc, InvalidURI) and handshake_retryable(handshake_status(exc)):
                    continue  # refused, reset, timed out, 5xx, closed mid-handshake: the server is not back yet
                self.failure = handshake_error(exc, websocket_url_base(self.session))
                return False
            if self.stopping.is_set():
                ws.close()
                return False
            with self.lock:
                self.ws = ws
            self.url_size = (cols, rows)
            self.received = self.acked = 0  # flow control counts per connection
            self.snapshot_pending = False
            return True  # `hello` ends the outage (_on_hello), then the snapshot redraws the screen

    def _on_output(self, data: bytes) -> None:
        # A snapshot's frame is a full redraw (it starts with its own reset sequence): written as-is too.
        write_all(self.stdout, data)
        self.received += len(data)
        # Ack well before window/2 so a client that keeps up is never paused by the server;
        # a snapshot (a resync) is acked at once so live output resumes without waiting.
        # Every 64 KiB at most: the server bounds a participant's lag in time as well as bytes (docs/protocol.md).
        if self.snapshot_pending or self.received - self.acked >= max(1, min(self.window // 4, 64 * 1024)):
            self.snapshot_pending = False
            self._ack()

    def _ack(self) -> None:
        self.acked = self.received
        try:
            self.ws.send(json.dumps({"type": "ack", "bytes": self.received}))
        except ConnectionClosed:
            pass  # the next recv sees the close

    def _on_control(self, text: str) -> None:
        try:
            message = json.loads(text)
        except ValueError:
            return
        kind = message.get("type")
        if kind == "hello":
            self._on_hello(message)
        elif kind == "snapshot":
            self.snapshot_pending = True
        elif kind == "presence":
            self._on_presence(message)
        elif kind == "exit":
            self.exit_message = message
        elif kind == "error":
            self._on_error(message)

    def _on_hello(self, message: dict[str, Any]) -> None:
        self.window = int(message.get("window") or DEFAULT_WINDOW)
        self.role = str(message.get("role") or "?")
        if not message.get("can_write", True) and not self.read_only:
            self.read_only = True
        if self.policy.reconnecting:
            self._on_reconnected()

    def _on_reconnected(self) -> None:
        """A new connection's `hello`: say so (the snapshot that follows redraws the screen over it),
        catch the server up on our size, and send what was typed meanwhile."""
        self.policy.on_connected()
        self._status("reconnected")
        if terminal_size() != self.url_size:
            self.url_size = terminal_size()
            cols, rows = self.url_size
            self.ws.send(json.dumps({"type": "resize", "cols": cols, "rows": rows}))
        with self.lock:
            held, dropped = bytes(self.held), self.dropped
            self.held.clear()
            self.dropped = 0
            if held and not self.read_only:
                try:
                    self.ws.send(held)
                except ConnectionClosed:
                    self.held += held  # keep it for the next connection; the next recv sees the close
                    return
            self.connected = True
        if held and self.read_only:
            self._status(f"you are read-only now: {len(held)} bytes typed while reconnecting were not sent")
        elif dropped:
            self._status(f"{dropped} bytes typed while reconnecting did not fit the buffer and were dropped")

    def _on_presence(self, message: dict[str, Any]) -> None:
        if self.presence_shown:
            return  # one line on join only: later lines would scribble over full-screen programs
        self.presence_shown = True
        people = ", ".join(f"{p.get('user')} ({p.get('client')})" for p in message.get("participants") or [])
        mode = "read-only, Ctrl-C or " + DETACH_HINT if self.read_only else DETACH_HINT
        label = self.session.get("name") or str(self.session["id"])[:8]
        self._notice(f"{self.env['name']}: session {label} as {self.role}; here: {people or 'just you'}; {mode}")

    def _on_error(self, message: dict[str, Any]) -> None:
        code = str(message.get("code"))
        if code == "server_restarting" and self.redial is not None:
            return  # the close (1012) follows at once, and with it our "reconnecting" line
        if code in self.notified:
            return
        self.notified.add(code)
        self._notice(f"server: {message.get('detail') or code}")

    def _notice(self, text: str) -> None:
        # In raw mode "\n" does not return the carriage, and the cursor may be mid-line.
        sys.stderr.write(f"\r\n[lsl] {text}\r\n" if self.raw else f"[lsl] {text}\n")
        sys.stderr.flush()

    def _status(self, text: str) -> None:
        """A connection-state line: `lsl: TEXT`, on a line of its own."""
        sys.stderr.write(f"\r\nlsl: {text}\r\n" if self.raw else f"lsl: {text}\n")
        sys.stderr.flush()

    # --- the end ---------------------------------------------------------------------------

    def _exit_code(self) -> int:
        if self.exit_message is not None:
            code = self.exit_message.get("code")
            if isinstance(code, int):
                return code
            reason = str(self.exit_message.get("reason") or "ended")
            self._notice(f"session ended ({reason.replace('_', ' ')})")
            return REASON_EXIT.get(reason, GENERIC)
        if self.failure is not None:
            raise self.failure
        close_code = self.ws.close_code
        if close_code == 4403:
            raise AuthError("your access to this environment was revoked")
        if close_code == 4408:
            raise LslError("disconnected: this terminal fell too far behind the session's output")
        if close_code == 4410:
            raise Conflict("the session has already ended")
        if close_code == 1000:
            return 0
        raise Unreachable(f"lost the connection to the server (websocket close code {close_code})")
