"""A client for the server's event stream, `/ws/events/` (docs/protocol.md §3).

`EventStream` is one subscription that survives connection drops: it remembers the id of the
last event it handed out and reconnects with `?since=ID` (with exponential backoff), so the
server replays what happened while it was away. When the server cannot replay (events no longer
kept) it says `resync`, and so do we: the caller then refetches over REST.

Every wait is bounded: the handshake (`open_timeout`), reading `hello`, and `next(timeout)`.
Nothing here ever blocks longer than the caller asked for (plus at most one handshake), so a
silent or dead server can never hang the CLI. Single-threaded: one caller reads it.
"""

from __future__ import annotations

import json
import random
import time
from collections import deque
from collections.abc import Callable
from typing import Any, NoReturn
from urllib.parse import urlencode

from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.sync.client import ClientConnection, connect

from lsl.client import Client
from lsl.errors import AUTH, UNREACHABLE, LslError

OPEN_TIMEOUT = 5.0  # one handshake; a server that cannot answer in 5 s is treated as down
HELLO_TIMEOUT = 5.0  # `hello` is the first frame (after a possible `resync`)
BACKOFF_FIRST, BACKOFF_MAX = 0.5, 8.0
# Keep-alive pings find a connection that died silently (a NAT or proxy dropping it) within ~40 s.
PING_INTERVAL, PING_TIMEOUT = 20.0, 20.0
CLOSE_TIMEOUT = 2.0
MAX_FRAME = 4 * 1024 * 1024  # an `environment` payload carries progress and errors, never logs

Message = dict[str, Any]
Connector = Callable[..., ClientConnection]


class EventStreamUnavailable(LslError):
    """The event stream could not be opened (the caller may fall back to polling)."""

    exit_code = UNREACHABLE


def events_url(base_url: str, since: int | None = None) -> str:
    """`http(s)://host` → `ws(s)://host/ws/events/[?since=ID]`. Never a token in the URL (it would be logged)."""
    scheme, _, rest = base_url.rstrip("/").partition("://")
    ws_scheme = "wss" if scheme == "https" else "ws"
    query = f"?{urlencode({'since': since})}" if since is not None else ""
    return f"{ws_scheme}://{rest}/ws/events/{query}"


class EventStream:
    """One resumable subscription to `/ws/events/`.

    Use:
        with EventStream(client) as stream:
            stream.open()                      # raises EventStreamUnavailable
            message = stream.next(timeout=2)   # a frame, or None after 2 s

    `next` hands out `environment.*`, `session.*`, `access.changed`, `team.changed` frames as
    the server sent them, and `{"type": "resync", "reason": ...}` whenever what the caller shows
    may be stale (the server said so, or we reconnected without being able to resume). `hello`,
    `pong` and `error` frames are consumed here.
    """

    def __init__(self, client: Client, *, open_timeout: float = OPEN_TIMEOUT, connector: Connector = connect) -> None:
        self.client = client
        self.open_timeout = open_timeout
        self._connect_fn = connector
        self._ws: ClientConnection | None = None
        self._pending: deque[Message] = deque()
        self._failures = 0
        self._retry_at = 0.0
        self.last_id: int | None = None  # the newest event id handed out (or `hello`'s on a fresh start)
        self.connects = 0  # successful handshakes (tests and diagnostics)
        self._attempted = False  # any handshake tried yet (a later fresh start means: refetch)
        self.last_problem = ""  # why the last handshake or connection failed, for a one-line note

    # --- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        return self._ws is not None

    def open(self) -> int:
        """Connect now and read `hello`; returns its `last_id`. Raises `EventStreamUnavailable`.

        After a failure the stream is still usable: `next` keeps trying (with backoff) and, once
        connected, starts with a `resync` (the caller polled meanwhile and must refetch).
        """
        self._connect(self.open_timeout)
        assert self.last_id is not None
        return self.last_id

    def close(self) -> None:
        ws, self._ws = self._ws, None
        if ws is not None:
            try:
                ws.close()
            except Exception:  # noqa: BLE001 - closing a broken socket must not mask the real outcome
                pass

    # --- reading ---------------------------------------------------------------------------

    def next(self, timeout: float) -> Message | None:
        """The next frame for the caller, or None when `timeout` seconds pass without one.

        While disconnected it retries the handshake when the backoff allows, and otherwise sleeps
        (never past `timeout`); callers that poll as a fallback check `connected` after each call.
        """
        deadline = time.monotonic() + max(timeout, 0.0)
        while True:
            if self._pending:
                return self._pending.popleft()
            now = time.monotonic()
            if self._ws is None:
                if now >= self._retry_at:
                    try:
                        # A retry gets the time left (at least 1 s: a handshake cannot be shorter).
                        self._connect(min(self.open_timeout, max(deadline - now, 1.0)))
                    except EventStreamUnavailable:
                        pass  # _connect scheduled the next attempt
                    continue
                if now >= deadline:
                    return None
                time.sleep(min(deadline, self._retry_at) - now)
                continue
            try:
                raw = self._ws.recv(timeout=max(deadline - now, 0.0))
            except TimeoutError:
                return None
            except ConnectionClosed as exc:
                self._dropped(f"the event stream closed ({exc.rcvd.code if exc.rcvd else 'no close frame'})")
                continue
            message = self._parse(raw)
            if message is not None:
                return message

    def _parse(self, raw: str | bytes) -> Message | None:
        """A frame for the caller, or None for frames handled here."""
        try:
            message = json.loads(raw)
        except ValueError:
            return None  # the protocol sends JSON text only; ignore anything else rather than die
        if not isinstance(message, dict):
            return None
        kind = message.get("type")
        if kind in ("hello", "pong", "error"):
            return None  # `hello` after the handshake cannot happen; `error` answers a frame we never send
        event_id = message.get("id")
        if isinstance(event_id, int) and not isinstance(event_id, bool):
            self.last_id = max(self.last_id or 0, event_id)
        return message

    # --- connecting ------------------------------------------------------------------------

    def _connect(self, timeout: float) -> None:
        """One handshake, then frames up to `hello`. On failure: schedule a retry and raise."""
        resuming = self.last_id is not None
        # Connecting without `since` after a failed first attempt: the caller has been showing
        # what it polled meanwhile, and events in between are not replayed, so it must refetch.
        fresh_after_outage = not resuming and self._attempted
        self._attempted = True
        url = events_url(self.client.url, self.last_id)
        try:
            ws = self._connect_fn(
                url, additional_headers={"Authorization": f"Token {self.client.token}"}, user_agent_header="lsl-cli",
                open_timeout=timeout, ping_interval=PING_INTERVAL, ping_timeout=PING_TIMEOUT,
                close_timeout=CLOSE_TIMEOUT, max_size=MAX_FRAME)
        except InvalidStatus as exc:
            status = exc.response.status_code
            reason = "refused (bad token or no access)" if status in (401, 403) else f"HTTP {status}"
            self._failed(f"the event stream handshake was {reason}", AUTH if status in (401, 403) else UNREACHABLE)
        except (InvalidURI, InvalidHandshake) as exc:
            self._failed(f"the event stream handshake failed: {exc}")
        except (OSError, TimeoutError) as exc:
            self._failed(f"cannot open the event stream at {url.split('?')[0]} ({exc or type(exc).__name__})")
        try:
            self._read_hello(ws)
        except (ConnectionClosed, TimeoutError, OSError) as exc:
            try:
                ws.close()
            except Exception:  # noqa: BLE001
                pass
            self._failed(f"the event stream did not say hello ({exc or type(exc).__name__})")
        self._ws = ws
        self._failures = 0
        self.connects += 1
        self.last_problem = ""
        if fresh_after_outage:
            self._pending.append({"type": "resync", "reason": "the event stream is connected again"})
        # On the very first connection there is nothing to say: the caller fetches over REST next.

    def _read_hello(self, ws: ClientConnection) -> None:
        """Frames before `hello` (only `resync`) are queued; frames after it (the replay) are left to `next`."""
        deadline = time.monotonic() + HELLO_TIMEOUT
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("timed out")
            raw = ws.recv(timeout=remaining)
            try:
                message = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(message, dict):
                continue
            if message.get("type") != "hello":
                # Only `resync` precedes `hello` today; anything else is kept for the caller, not lost.
                handed = self._parse(raw)
                if handed is not None:
                    self._pending.append(handed)
            else:
                hello_id = message.get("last_id")
                if self.last_id is None and isinstance(hello_id, int):
                    # A fresh start: everything up to here is what REST will show us.
                    self.last_id = hello_id
                elif any(m.get("type") == "resync" for m in self._pending) and isinstance(hello_id, int):
                    # The replay was refused: we refetch, so continue from the newest id.
                    self.last_id = hello_id
                return

    def _failed(self, problem: str, exit_code: int = UNREACHABLE) -> NoReturn:
        self._schedule_retry(problem)
        raise EventStreamUnavailable(problem, exit_code=exit_code)

    def _dropped(self, problem: str) -> None:
        self.close()
        self._schedule_retry(problem)
        # The first retry after a drop is immediate-ish: a server restart or a proxy timeout
        # usually lets us straight back in, and a replay loses nothing meanwhile.
        self._retry_at = time.monotonic() + BACKOFF_FIRST * random.uniform(0.5, 1.0)

    def _schedule_retry(self, problem: str) -> None:
        self.last_problem = problem
        delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** self._failures)
        self._failures += 1
        self._retry_at = time.monotonic() + delay * random.uniform(0.8, 1.2)  # jitter: not every client at once
