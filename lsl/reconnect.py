"""When `lsl shell` reconnects after losing its websocket, and how long it waits (docs/protocol.md §2.1).

Pure logic, no I/O: `lsl.shell` asks it what to do; tests/test_reconnect_logic.py pins it down. The
browser's terminal page (frontend/src/reconnect.js) follows the same rules with the same numbers.

* A close that says the session is over is final: an `exit` frame came first, or the close code is
  1000 (normal end), 4403 (access revoked) or 4410 (session ended).
* A close that says the server or the network went away is retried: 1001 (going away), 1005 (no
  status), 1006 (abnormal: the server was killed, the network dropped, or the connection failed),
  1011 (server error, or our own keep-alive timed out), 1012 (service restart: the graceful
  shutdown, after an `error` `server_restarting`), 1013 (try again later).
* 4408 (kicked for falling behind) is retried once: a second 4408 within KICK_WINDOW of the
  first gives up, as a client that cannot keep up would only be kicked again.
* Any other code is final: it is not something waiting can fix.
* Retries wait BACKOFF_FIRST, doubling to BACKOFF_MAX, each with ±20% jitter (so a restarted server
  is not hit by every client at the same instant), until GIVE_UP_AFTER seconds have passed since
  the connection was lost. The outage ends when a new connection gets its `hello`.
* A handshake that fails while retrying is retried too (refused, reset, timed out, 5xx from a proxy,
  a server that closed mid-handshake), except HTTP 401/403/404: no access any more, or no session.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

BACKOFF_FIRST = 0.25
BACKOFF_MAX = 4.0
JITTER = 0.2  # each delay is scaled by a random factor in [1 - JITTER, 1 + JITTER] (and capped at BACKOFF_MAX)
GIVE_UP_AFTER = 120.0
KICK_WINDOW = 300.0

CLOSE_NORMAL = 1000
CLOSE_ABNORMAL = 1006  # what a connection that died without a close frame reports
CLOSE_REVOKED = 4403
CLOSE_TOO_SLOW = 4408
CLOSE_ENDED = 4410
RECONNECT_CLOSE_CODES = frozenset({1001, 1005, 1006, 1011, 1012, 1013, 4012, 4013})  # 4012/4013: LSL's own 1012/1013 (daphne sends only 1000 and 3000-4999)
FINAL_CLOSE_CODES = frozenset({CLOSE_NORMAL, CLOSE_REVOKED, CLOSE_ENDED})
FINAL_HANDSHAKE_STATUSES = frozenset({401, 403, 404})


def is_transient(code: int | None) -> bool:
    """A close that waiting may fix (the server or the network went away). None: no close code at all."""
    return (CLOSE_ABNORMAL if code is None else code) in RECONNECT_CLOSE_CODES


def handshake_retryable(status: int | None) -> bool:
    """May a failed reconnect handshake be tried again? `status` is the HTTP answer, None when there was none."""
    return status not in FINAL_HANDSHAKE_STATUSES


def backoff_delay(attempt: int, rand: Callable[[], float] = random.random) -> float:
    """The wait before retry number `attempt` (0 for the first): 0.25 s, 0.5 s, 1 s, 2 s, 4 s, 4 s…, jittered."""
    base = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** min(attempt, 16))
    return min(BACKOFF_MAX, base * (1 - JITTER + 2 * JITTER * rand()))


class ReconnectPolicy:
    """The state of one attachment's reconnects: call `on_close` when a connection ends, then
    `next_delay` before each attempt until it returns None (give up), and `on_connected` on `hello`."""

    def __init__(self, *, give_up_after: float = GIVE_UP_AFTER, clock: Callable[[], float] = time.monotonic,
                 rand: Callable[[], float] = random.random) -> None:
        self.give_up_after = give_up_after
        self.clock = clock
        self.rand = rand
        self.lost_at: float | None = None  # when the current outage began; None while connected
        self.attempt = 0  # retries so far in this outage
        self.last_kick: float | None = None  # when we were last closed with 4408

    @property
    def reconnecting(self) -> bool:
        return self.lost_at is not None

    def on_close(self, code: int | None, *, exited: bool = False) -> bool:
        """A connection closed (or a reconnected one closed again before its `hello`): retry it?"""
        if exited:
            return False  # the session is over, whatever the close code says
        now = self.clock()
        if code == CLOSE_TOO_SLOW:
            if self.last_kick is not None and now - self.last_kick < KICK_WINDOW:
                return False
            self.last_kick = now
        elif not is_transient(code):
            return False
        if self.lost_at is None:
            self.lost_at = now
            self.attempt = 0
        return True

    def next_delay(self) -> float | None:
        """Seconds to wait before the next attempt, or None when GIVE_UP_AFTER has passed since the loss."""
        if self.lost_at is None:
            return 0.0
        remaining = self.lost_at + self.give_up_after - self.clock()
        if remaining <= 0:
            return None
        delay = min(backoff_delay(self.attempt, self.rand), remaining)
        self.attempt += 1
        return delay

    def remaining(self) -> float:
        """Seconds left in this outage before giving up (GIVE_UP_AFTER while connected)."""
        if self.lost_at is None:
            return self.give_up_after
        return max(0.0, self.lost_at + self.give_up_after - self.clock())

    def on_connected(self) -> None:
        """A (re)connection got its `hello`: the outage is over."""
        self.lost_at = None
        self.attempt = 0
