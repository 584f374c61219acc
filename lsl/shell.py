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
import time
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
# Notices wait at most this long for a connection's snapshot (the server re-sends a lost one after 5 s).
REDRAW_WAIT = 5.0
INPUT_BUFFER = 4096  # keystrokes held while reconnecting; beyond this they are dropped (and we say so)
RECONNECT_OPEN_TIMEOUT = 10.0  # one reconnect handshake may take this long (never past the give-up time)
# Why a session ended without an exit code → lsl's exit code (anything else: 1).
REASON_EXIT = {"access_revoked": AUTH, "server_error": SERVER_ERROR}
# Why a session ended (the `exit` frame's `reason`, protocol §2), as lsl says it.
END_REASONS = {
    "exited": "the shell exited",
    "ended": "ended by a user",
    "idle": "ended for being idle",
    "environment_stopped": "the environment was stopped",
    "environment_deleted": "the environment was deleted",
    "access_revoked": "your access to the environment was revoked",
    "server_lost": "the server holding the terminal went away and nobody reattached in time",
    "server_error": "the terminal could not be started (server error)",
}


def end_text(message: dict[str, Any]) -> str:
    """`session ended: REASON` for an `exit` frame; `by` (who ended it) is shown when the server sends it."""
    reason = str(message.get("reason") or "ended")
    text = END_REASONS.get(reason, reason.replace("_", " "))
    code = message.get("code")
    if reason == "exited" and isinstance(code, int) and not isinstance(code, bool) and code != 0:
        text += f" with code {code}"  # a shell killed by a stop has a code too (129): the reason says it all
    by = message.get("by") or message.get("ended_by")
    if by and reason == "ended":
        text = f"ended by {by}"
    return f"session ended: {text}"


def terminal_size() -> tuple[int, int]:
    """The window's (columns, rows). A terminal that reports no size (a pty nobody sized says 0x0,
    e.g. under some CI runners or `script`), or no terminal at all, gets $COLUMNS x $LINES, else
    80x24: the server refuses sizes below 1, and a shell sized 0x0 wraps every character."""
    columns = rows = 0
    for fd in (1, 0, 2):  # stdout, stdin, stderr: the process's own, whatever sys.* were swapped for
        try:
            size = os.get_terminal_size(fd)
        except OSError:
            continue
        columns, rows = size.columns, size.lines
        if columns > 0 and rows > 0:
            break
    return (columns if columns > 0 else _env_size("COLUMNS", 80)), (rows if rows > 0 else _env_size("LINES", 24))


def _env_size(name: str, default: int) -> int:
    try:
        value = int(os.environ.get(name, ""))
    except ValueError:
        return default
    return value if 1 <= value <= 1000 else default


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


ESC = 0x1B
# Input escape sequences that terminals send by themselves, in answer to a query from the remote
# program, rather than because someone typed: they must not count as typing for `Enter ~ .`.
# BusyBox ash (Alpine) asks for the cursor position (`ESC[6n`) after every prompt, so the answer
# (`ESC[row;colR`) lands on stdin right after Enter; counting it as typing made `~.` unusable there.
# OSC, DCS and APC strings on input are replies (colours, XTVERSION, DA3, XTGETTCAP, kitty graphics),
# but ESC ] / ESC P / ESC _ alone are also Alt-] / Alt-P / Alt-_: a string is taken for one only
# when its next byte is one a reply starts with, and a control other than its terminators (Enter)
# ends it as typing.
_STRING_STARTS = {ord("]"): b"0123456789", ord("P"): b"0123456789!>=+$|", ord("_"): b"G"}
_MAX_SEQUENCE = 4096  # a longer "sequence" is not one: give up classifying it (its bytes were sent anyway)
PASTE_START, PASTE_END = b"\x1b[200~", b"\x1b[201~"


def classify_csi(params: bytes, intermediates: bytes, final: int) -> str:
    """What a complete input CSI sequence is: "reply" (the terminal answering a query, or a mouse
    report: not typing), "paste" (bracketed paste begins: typing), or "key" (a key press: typing)."""
    char = chr(final)
    if char in "Mm" and params.startswith(b"<"):
        return "reply"  # an SGR mouse report: a click moves nothing off the start of the line
    if char == "R":
        return "reply"  # cursor position report, ESC[row;colR (DECXCPR: ESC[?row;colR)
    if char == "c" and params[:1] in (b"?", b">", b"="):
        return "reply"  # primary / secondary / tertiary device attributes
    if char == "n":
        return "reply"  # device status report (ESC[0n)
    if char in "IO" and not params and not intermediates:
        return "reply"  # focus in / focus out
    if char == "y" and intermediates == b"$":
        return "reply"  # DECRPM: a mode's state
    if char == "t":
        return "reply"  # window size / position reports (XTWINOPS)
    if char == "u" and params.startswith(b"?"):
        return "reply"  # the kitty keyboard protocol's flags
    if char == "~" and params == b"200" and not intermediates:
        return "paste"
    return "key"  # arrows, function keys, ESC[201~ without a start...


class DetachDetector:
    """ssh-style escapes: `~` right after Enter starts one; `~.` detaches, `~~` sends a single `~`.

    Unlike ssh it reads escape sequences on the input, because not everything arriving on stdin
    was typed: what the terminal sends by itself (cursor position and device attribute reports,
    focus events, colour replies in OSC strings, DCS replies, mouse reports) is passed through but
    leaves "at the start of a line" as it was. A key press that sends a sequence (arrows, Alt-x,
    function keys) is typing, as in ssh. A bracketed paste is typing too, and what it carries is
    never an escape: pasting text that holds a line `~.` does not detach.

    Nothing is held back except a `~` at the start of a line (until the next key says what it
    is) and, while such a `~` waits, an escape sequence until it is known to be a reply (sent,
    the `~` keeps waiting) or a key (sent after the `~`).
    """

    def __init__(self) -> None:
        self.at_line_start = True
        self.tilde_pending = False
        self.state = "ground"  # ground, esc, csi, ss3, string_intro, string, string_esc, mouse, paste
        self.sequence = bytearray()  # the escape sequence being read (for classification)
        self.mouse_left = 0  # raw bytes left in an X10 mouse report (ESC [ M b x y)
        self.held = bytearray()  # sequence bytes held while a `~` waits
        self.paste_matched = 0  # bytes of PASTE_END matched so far inside a paste

    def feed(self, data: bytes) -> tuple[bytes, bool]:
        """Returns (bytes to send, detach?). Bytes after a detaching `~.` are dropped."""
        out = bytearray()
        for byte in data:
            if self._byte(byte, out):
                return bytes(out), True
        return bytes(out), False

    # --- one byte ------------------------------------------------------------------------------

    def _byte(self, byte: int, out: bytearray) -> bool:
        """Handle one byte; True means detach."""
        if self.state == "paste":
            out.append(byte)
            self._paste_byte(byte)
            return False
        if self.state != "ground":
            self._sequence_byte(byte, out)
            return False
        if byte == ESC:
            self.state = "esc"
            self.sequence = bytearray([byte])
            self._emit_sequence_byte(byte, out)
            return False
        if self.tilde_pending:
            self.tilde_pending = False
            if byte == ord("."):
                return True
            out.append(ord("~"))
            if byte == ord("~"):
                self.at_line_start = False
                return False
        elif self.at_line_start and byte == ord("~"):
            self.tilde_pending = True
            return False
        out.append(byte)
        self.at_line_start = byte in (10, 13)
        return False

    def _emit_sequence_byte(self, byte: int, out: bytearray) -> None:
        (self.held if self.tilde_pending else out).append(byte)

    def _sequence_byte(self, byte: int, out: bytearray) -> None:
        state = self.state
        if state == "string_esc" and byte != ord("\\"):
            # ESC + something other than `\`: the string ended there, and a new sequence began with
            # that ESC (already sent, or held with the reply) and goes on with this byte.
            self._finish("reply", out)
            self.state, self.sequence = "esc", bytearray([ESC])
            self._sequence_byte(byte, out)
            return
        if state == "string_intro" and byte not in _STRING_STARTS[self.sequence[1]]:
            self._finish("key", out)  # Alt-] and the like, then this byte afresh
            self._byte(byte, out)
            return
        if state == "string" and byte < 0x20 and byte not in (0x07, ESC, 0x18, 0x1A):
            self._finish("key", out)  # replies carry no Enter: someone is typing after an Alt-]
            self._byte(byte, out)
            return
        if state in ("esc", "csi", "ss3", "string_intro") and (byte < 0x20 or byte >= 0x80):
            # A control (Enter, another ESC...) or a non-ASCII byte cuts the sequence short: what came
            # before was a key (a lone Escape, Alt-[...); the byte itself starts afresh.
            self._finish("key", out)
            self._byte(byte, out)
            return
        self._emit_sequence_byte(byte, out)
        self.sequence.append(byte)
        if state == "esc":
            if byte == ord("["):
                self.state = "csi"
            elif byte == ord("O"):
                self.state = "ss3"  # ESC O A: an arrow key in application mode
            elif byte in _STRING_STARTS:
                self.state = "string_intro"
            else:
                self._finish("key", out)  # Alt-x
        elif state == "ss3":
            self._finish("key", out)
        elif state == "string_intro":
            self.state = "string"
        elif state == "csi":
            if 0x40 <= byte <= 0x7E:
                body = bytes(self.sequence[2:-1])
                split = len(body) - len(body.lstrip(b"0123456789:;<=>?"))
                params, intermediates = body[:split], body[split:]
                if chr(byte) == "M" and not params and not intermediates:
                    self.state, self.mouse_left = "mouse", 3  # X10 mouse report: three raw bytes follow
                    return
                self._finish(classify_csi(params, intermediates, byte), out)
            elif len(self.sequence) > 64:
                self._finish("key", out)
        elif state == "mouse":
            self.mouse_left -= 1
            if self.mouse_left == 0:
                self._finish("reply", out)
        elif state == "string":
            if byte == 0x07:
                self._finish("reply", out)  # BEL ends an OSC (xterm's colour replies use it)
            elif byte == ESC:
                self.state = "string_esc"
            elif byte in (0x18, 0x1A) or len(self.sequence) > _MAX_SEQUENCE:
                self._finish("reply", out)  # CAN / SUB cancel it; an endless one is given up on
        elif state == "string_esc":
            self._finish("reply", out)  # ESC \ (ST) ends the string

    def _finish(self, kind: str, out: bytearray) -> None:
        """A sequence is complete: `kind` is "reply" (not typing), "key" or "paste" (typing)."""
        self.state = "ground"
        self.sequence = bytearray()
        if kind == "reply":
            if self.tilde_pending:
                out += self.held  # sent now; the `~` goes on waiting for a key
                self.held.clear()
            return
        if self.tilde_pending:
            self.tilde_pending = False
            out.append(ord("~"))  # `~` + a key is not an escape: both go through, in order
            out += self.held
            self.held.clear()
        self.at_line_start = False
        if kind == "paste":
            self.state = "paste"
            self.paste_matched = 0

    def _paste_byte(self, byte: int) -> None:
        if byte == PASTE_END[self.paste_matched]:
            self.paste_matched += 1
            if self.paste_matched == len(PASTE_END):
                self.state = "ground"  # the paste was typing: at_line_start stays False
                self.at_line_start = False
        else:
            self.paste_matched = 1 if byte == ESC else 0


# --- where lsl's own lines may go: the screen as the session's output left it ----------------

_ALT_SCREEN_MODES = frozenset({b"?1049", b"?1047", b"?47"})
# Escape sequences that a line can hold and still be written again from its first column with
# the same result: colours (SGR), erase to the end of the line, cursor left/right, modes (bash
# turns bracketed paste on before each prompt).
_REPLAYABLE_CSI = frozenset(b"mKCDhl")
MAX_REPLAY = 512  # a longer current line is not written again (it would wrap, or it is not a prompt)


class ScreenTracker:
    """Follows the session's output just enough to put a line of lsl's own on the screen cleanly.

    * Full-screen programs (vim, less, htop) run on the alternate screen: a line written there
      would scribble over them, so notices wait until the program leaves it (`alt_screen`).
    * On the main screen, the current line (from the last newline: usually the prompt and what has
      been typed after it) is kept while it is short and holds nothing but text, colours, erasing
      and left/right moves: lsl then erases it, writes its notice there and writes the line again
      below it, so the prompt and the cursor end up exactly as the shell left them, one line down.
      Otherwise the notice goes on a fresh line of its own (`\\r\\n` first unless the cursor is at
      the start of a line).
    """

    def __init__(self, cols: int = 80) -> None:
        self.cols = cols
        self.alt_screen = False
        self.line = bytearray()  # the current line's bytes (main screen), while replayable
        self.replayable = True
        self.column0 = True  # nothing printed since the last \r or \n
        self.state = "ground"  # ground, esc, csi, string, string_esc
        self.sequence = bytearray()

    def feed(self, data: bytes) -> int:
        """Follow `data`; stops right after a sequence that leaves the alternate screen (so that
        waiting notices can be written there, before the rest). Returns how many bytes it took."""
        for index, byte in enumerate(data):
            if self._byte(byte):
                return index + 1
        return len(data)

    def notice_bytes(self, text: str, *, last: bool = False) -> bytes:
        """What to write (on the main screen) to show `text` on a line of its own. `last`: lsl is
        leaving the session (detached, ended), so the prompt is left where it is, not drawn again."""
        line = text.encode("utf-8", "replace")
        if (not last and self.replayable and self.state == "ground"
                and self._visible(self.line) < max(1, self.cols - 1)):
            # Erase the current line, write the notice there, and the line again below it.
            return b"\r\x1b[K" + line + b"\r\n" + bytes(self.line)
        at_start = self.column0
        self.line.clear()
        self.replayable, self.column0 = True, True  # after the notice: an empty line, at its start
        if at_start:
            return line + b"\x1b[K\r\n"  # whatever was drawn to the right of the cursor goes
        return b"\r\n" + line + b"\x1b[K\r\n"

    @staticmethod
    def _visible(line: bytes) -> int:
        """Roughly the columns `line` takes: its printable characters (UTF-8 continuations not counted)."""
        count, in_escape = 0, False
        for byte in line:
            if in_escape:
                in_escape = not (0x40 <= byte <= 0x7E and byte != ord("["))
            elif byte == 0x1B:
                in_escape = True
            elif byte >= 0x20 and not 0x80 <= byte < 0xC0:
                count += 1
        return count

    def _remember(self, byte: int) -> None:
        if self.replayable:
            self.line.append(byte)
            if len(self.line) > MAX_REPLAY:
                self.replayable = False
                self.line.clear()

    def _byte(self, byte: int) -> bool:
        """Follow one output byte; True when it ended a sequence that left the alternate screen."""
        if self.state == "ground":
            if byte == 0x1B:
                self.state, self.sequence = "esc", bytearray()
            if self.alt_screen:
                return False  # the main screen's line and cursor wait, as the terminal keeps them
            if byte == ord("\n"):
                self.line.clear()
                self.replayable, self.column0 = True, True
                return False
            if byte == ord("\r"):
                self.column0 = True
            elif byte >= 0x20 or byte in (0x08, 0x09):
                self.column0 = False
            self._remember(byte)
            return False
        if not self.alt_screen:
            self._remember(byte)
        if self.state == "esc":
            if byte == ord("["):
                self.state = "csi"
            elif byte in b"]P_^X":
                self.state = "string"  # a title (prompts often set one), DCS...: harmless to write again
            elif 0x20 <= byte <= 0x2F:
                self.sequence.append(byte)  # ESC ( B and the like: a charset, harmless too
            else:
                self.state = "ground"
                if byte == ord("c"):  # RIS, a full reset (a snapshot starts with one): back to the main screen
                    left, self.alt_screen = self.alt_screen, False
                    self.line.clear()
                    self.replayable, self.column0 = True, True
                    return left
                if not self.sequence and byte not in b"=>" and not self.alt_screen:
                    self.replayable = False  # ESC 7, ESC 8, ESC M...: cursor moves, not something to write again
            return False
        if self.state == "csi":
            if 0x40 <= byte <= 0x7E:
                self.state = "ground"
                return self._csi(bytes(self.sequence), byte)
            self.sequence.append(byte)
            if len(self.sequence) > 64:
                self.state, self.replayable = "ground", False
            return False
        if self.state == "string":
            if byte == 0x07:
                self.state = "ground"
            elif byte == 0x1B:
                self.state = "string_esc"
            return False
        # string_esc: ESC \ ends the string; anything else ends it too and is read afresh
        self.state = "ground"
        return False if byte == ord("\\") else self._byte(byte)

    def _csi(self, params: bytes, final: int) -> bool:
        if final in (ord("h"), ord("l")) and params.startswith(b"?"):
            modes = {b"?" + mode for mode in params[1:].split(b";")}
            if modes & _ALT_SCREEN_MODES:
                entering = final == ord("h")
                left = self.alt_screen and not entering
                if entering and not self.alt_screen:
                    del self.line[-(len(params) + 3):]  # this sequence is no part of the main screen's line
                elif left and b"?1049" not in modes:
                    # 1049 restores the cursor saved on entering (the line we followed is good again);
                    # 47 and 1047 leave it wherever the program had it.
                    self.line.clear()
                    self.replayable, self.column0 = False, False
                self.alt_screen = entering
                return left
        if self.alt_screen:
            return False  # a full-screen program's drawing: the main screen's line is not touched
        if final in b"nc":
            # A query (ash asks for the cursor position after its prompt): written again, it would
            # make the terminal answer again, to a question nobody asked. Not part of the line.
            del self.line[-(len(params) + 3):]
        elif final not in _REPLAYABLE_CSI:
            self.replayable = False
        return False


# --- who is here: presence lists → "[lsl] bob joined (viewer, web)" -----------------------------

PRESENCE_LINES_MAX = 4  # more changes at once than this (a class arriving) are summed up in one line
RETURN_GRACE = 30.0  # after a reconnect, people who were here before and come back within this are not news


def _who(participant: dict[str, Any]) -> tuple[str, str, str]:
    return (str(participant.get("user") or "?"), str(participant.get("role") or "?"),
            str(participant.get("client") or "?"))


class PresenceTracker:
    """Turns the server's `presence` lists (everyone attached, sent on every join, leave and change
    of typist) into lines about what changed, keyed by each participant's `id` (one per connection:
    the same person attached twice is two participants).

    The first list on a connection is only a baseline: the caller shows who is there in one line.
    After a reconnect the participant ids are new (ours too, and everybody's after a server
    restart), so for RETURN_GRACE seconds a participant who looks like someone who was here before
    (same user, role and client) is taken as coming back, not as news; and nobody is said to have
    left during the outage (we cannot tell who did).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.current: dict[str, tuple[str, str, str]] = {}
        self.started = False  # a baseline has been taken on this connection
        self.seen_any = False  # any list at all (the very first one is shown by the caller, not here)
        self.returning: list[tuple[str, str, str]] = []  # who was here before the outage
        self.returning_until = 0.0

    def reconnected(self) -> None:
        """A new connection: its first list is a baseline again, and the old faces may come back."""
        self.returning = list(self.current.values()) if self.started else self.returning
        self.returning_until = self.clock() + RETURN_GRACE
        self.current = {}
        self.started = False

    def update(self, participants: list[dict[str, Any]]) -> list[str] | None:
        """Lines to show for this list; None for the first list of the first connection."""
        listed: dict[str, tuple[str, str, str]] = {}
        for index, participant in enumerate(participants):
            if isinstance(participant, dict):
                key = str(participant.get("id") or f"#{index}:{'/'.join(_who(participant))}")
                listed[key] = _who(participant)
        first_ever, baseline = not self.seen_any, not self.started
        previous, self.current, self.started, self.seen_any = self.current, listed, True, True
        if first_ever:
            return None
        if self.clock() > self.returning_until:
            self.returning = []
        joined = [who for key, who in listed.items() if key not in previous]
        left = [] if baseline else [who for key, who in previous.items() if key not in listed]
        changed = [(previous[key], who) for key, who in listed.items()
                   if key in previous and previous[key][1] != who[1]]
        news = []
        for who in joined:
            if who in self.returning:
                self.returning.remove(who)  # back after the outage (ourselves included): not news
            else:
                news.append(who)
        lines = [f"{user} joined ({role}, {client})" for user, role, client in news]
        lines += [f"{user} left" for user, _, _ in left]
        lines += [f"{user} is now {new[1]}" for (user, _, _), new in changed]
        if len(lines) > PRESENCE_LINES_MAX:
            parts = [f"{count} {what}" for count, what in ((len(news), "joined"), (len(left), "left"),
                                                          (len(changed), "changed role")) if count]
            lines = [f"{', '.join(parts)}; {len(listed)} here now"]
        return lines


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
        try:
            self.stderr = sys.stderr.fileno()
        except (AttributeError, OSError, ValueError):  # a stand-in stream (tests capture it) has no descriptor
            self.stderr = -1
        # lsl's own lines go to stderr (stdout carries the session's bytes and nothing else, as with
        # ssh); placed with the screen in mind only when both are the terminal the session is drawn on.
        self.placed = self.raw and os.isatty(self.stdout) and self.stderr >= 0 and os.isatty(self.stderr)
        self.screen = ScreenTracker(self.url_size[0])
        self.presence = PresenceTracker()
        self.deferred: list[str] = []  # notices waiting for a full-screen program to leave the alternate screen
        self.write_lock = threading.Lock()  # output and lsl's own lines: whole writes, never interleaved
        # From a connection's `hello` until its snapshot is drawn: the snapshot starts with a full reset,
        # which would wipe a notice written before it (the join line, a presence change), so they wait.
        self.redraw_due = True
        self.redraw_due_since = time.monotonic()
        self.snapshot_next = False  # the next binary frame is the snapshot
        self.greeted = False  # this connection's `hello` has come
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
            self._leave_screen()
            self._notice(f"detached; the session keeps running (rejoin: lsl shell {self.env['name']} "
                         f"--session {self.session['id']})", last=True)
            return 0
        receiver.join(timeout=5)
        self._leave_screen()
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
        self.screen.cols = cols
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
            self.screen.cols = cols
            self.presence.reconnected()  # everyone's participant id is new on this connection, ours too
            self.greeted = False
            self.received = self.acked = 0  # flow control counts per connection
            self.snapshot_pending = False
            return True  # `hello` ends the outage (_on_hello), then the snapshot redraws the screen

    def _on_output(self, data: bytes) -> None:
        # A snapshot's frame is a full redraw (it starts with its own reset sequence): written as-is too.
        with self.write_lock:
            if self.snapshot_next or (self.redraw_due and time.monotonic() - self.redraw_due_since > REDRAW_WAIT):
                self.redraw_due = self.snapshot_next = False  # notices may go on the screen from now on
            rest = memoryview(data)
            while rest:
                # The tracker stops right after a full-screen program leaves the alternate screen:
                # the notices that waited for it go there, before the shell's next prompt.
                taken = self.screen.feed(rest)
                write_all(self.stdout, rest[:taken])
                rest = rest[taken:]
                if self.deferred and not self.screen.alt_screen and not self.redraw_due:
                    self._write_deferred()
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
            self.snapshot_next = True
        elif kind == "presence":
            self._on_presence(message)
        elif kind == "exit":
            self.exit_message = message
        elif kind == "error":
            self._on_error(message)

    def _on_hello(self, message: dict[str, Any]) -> None:
        if not self.greeted:  # a connection's first `hello` (a role change sends another, with no snapshot)
            self.greeted = True
            with self.write_lock:
                self.redraw_due, self.redraw_due_since = True, time.monotonic()
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
        participants = message.get("participants")
        lines = self.presence.update(participants if isinstance(participants, list) else [])
        for line in lines or []:
            self._notice(line, wait_for_main_screen=True)
        if self.presence_shown:
            return  # the summary once, on joining; after that, only what changes
        self.presence_shown = True
        people = ", ".join(f"{p.get('user')} ({p.get('client')})" for p in message.get("participants") or [])
        mode = "read-only, Ctrl-C or " + DETACH_HINT if self.read_only else DETACH_HINT
        label = self.session.get("name") or str(self.session["id"])[:8]
        self._notice(f"{self.env['name']}: session {label} as {self.role}; here: {people or 'just you'}; {mode}",
                     wait_for_main_screen=True)

    def _on_error(self, message: dict[str, Any]) -> None:
        code = str(message.get("code"))
        if code == "server_restarting" and self.redial is not None:
            return  # the close (4012) follows at once, and with it our "reconnecting" line
        if code in self.notified:
            return
        self.notified.add(code)
        self._notice(f"server: {message.get('detail') or code}")

    def _notice(self, text: str, *, wait_for_main_screen: bool = False, last: bool = False) -> None:
        """`[lsl] TEXT` on a line of its own. With `wait_for_main_screen`, a notice that would land on
        a full-screen program (vim, less: the alternate screen) waits until the program is left.
        `last`: lsl is leaving the session, and the shell's prompt stays above this line."""
        self._line(f"[lsl] {text}", defer=wait_for_main_screen, last=last)

    def _status(self, text: str) -> None:
        """A connection-state line: `lsl: TEXT`, on a line of its own (at once, whatever the screen)."""
        self._line(f"lsl: {text}", defer=False)

    def _line(self, text: str, *, defer: bool, last: bool = False) -> None:
        with self.write_lock:
            if not self.placed:
                # In raw mode "\n" does not return the carriage, and the cursor may be mid-line.
                sys.stderr.write(f"\r\n{text}\r\n" if self.raw else f"{text}\n")
                sys.stderr.flush()
            elif defer and (self.screen.alt_screen or self.redraw_due):
                self.deferred.append(text)
            else:
                write_all(self.stderr, self.screen.notice_bytes(text, last=last))

    def _write_deferred(self) -> None:
        """The notices that waited for the main screen (call with `write_lock` held)."""
        deferred, self.deferred = self.deferred, []
        if len(deferred) > PRESENCE_LINES_MAX:
            deferred = deferred[-PRESENCE_LINES_MAX:]
            deferred.insert(0, "[lsl] (earlier changes of who is here not shown)")
        for text in deferred:
            write_all(self.stderr, self.screen.notice_bytes(text))

    def _leave_screen(self) -> None:
        """At the end (detached, or the session is over): a full-screen program that was running
        must not leave this terminal on its alternate screen; then the notices that waited."""
        with self.write_lock:
            if self.placed and self.screen.alt_screen:
                write_all(self.stdout, b"\x1b[?1049l")
                self.screen.feed(b"\x1b[?1049l")
            if self.deferred:
                self._write_deferred()

    # --- the end ---------------------------------------------------------------------------

    def _exit_code(self) -> int:
        if self.exit_message is not None:
            self._notice(end_text(self.exit_message), last=True)
            code = self.exit_message.get("code")
            reason = str(self.exit_message.get("reason") or "exited")
            # The shell's own code only when the shell itself ended the session: one hung up by a
            # stop may or may not have reported 129 before the end (a race on the server), and lsl's
            # exit must say what happened (the reason), the same way every time.
            if reason == "exited" and isinstance(code, int) and not isinstance(code, bool):
                return code
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
