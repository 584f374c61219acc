"""The websocket endpoint `/ws/sessions/{id}/` (protocol: docs/protocol.md).

Thin: authenticate, check the role, relay between the client and the session's
hub, and enforce per-participant flow control so a slow client never slows the
PTY or anyone else.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
import weakref
from typing import Any
from urllib.parse import parse_qs

from autobahn.exception import Disconnected
from channels.exceptions import ChannelFull
from channels.consumer import get_handler_name
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings

from environments.consumers import parse_client_message
from environments.models import Environment, Role
from environments.permissions import role_for
from lsl_site import dbpool, events
from sessions import fanout, services
from sessions import hub as hubs
from sessions.hub import ShuttingDown, ensure_hub
from sessions.models import AuditKind, ClientKind, TerminalSession

log = logging.getLogger(__name__)

WATCH_EVERY = 2.0  # stalled participants and lost snapshots are looked at this often (no database)
HUB_EXIT_GRACE = 1.0  # seconds a `session.ended` event waits for the hub's own exit frame
SNAPSHOT_RETRY = 5.0  # a snapshot request unanswered this long (its answer was dropped) is repeated
ROLE_DENIED_AUDIT_EVERY = 5.0
# The time bound applies once a client holds more than this unacknowledged (clients ack every 16-64 KiB
# or so, and when output pauses): below it, a quiet terminal's last chunk is simply not acked yet.
LAG_MIN_BYTES = 64 * 1024
# Close codes for "reconnect": RFC 6455's 1012 (service restart) and 1013 (try again later) in the
# application range, because autobahn (daphne) lets a server send only 1000 or 3000-4999.
CLOSE_RESTARTING = 4012
CLOSE_TRY_AGAIN = 4013  # the channel layer (Redis) is down

# This process's terminal consumers, for graceful shutdown.
LIVE: "weakref.WeakSet[TerminalConsumer]" = weakref.WeakSet()


_watchdog: "asyncio.Task[None] | None" = None


def _ensure_watchdog() -> None:
    """One task per process looks at every participant (not one sleeping task per participant:
    hundreds of idle viewers should cost next to nothing)."""
    global _watchdog
    if _watchdog is None or _watchdog.done():
        _watchdog = asyncio.create_task(_watch_all())


async def _watch_all() -> None:
    while LIVE:
        await asyncio.sleep(WATCH_EVERY)
        for consumer in list(LIVE):
            if consumer.paused_since is not None or consumer.awaiting_snapshot:
                try:
                    await consumer.watch()
                except Exception:
                    log.exception("session %s: watching %s failed", consumer.session_id, consumer.channel_name)


async def graceful_shutdown() -> None:
    """SIGTERM: hand every session this process serves back (the shells keep running in their keepers;
    participants on other processes follow the session to its next owner), then tell this process's
    participants why they are being disconnected, so their clients reconnect at once."""
    await hubs.release_all()
    for consumer in list(LIVE):
        await consumer._error("server_restarting", "the server is restarting; your shell keeps running: reconnect")
        await consumer.close(code=CLOSE_RESTARTING)


def _size(value: Any, default: int | None = None) -> int | None:
    """A terminal dimension (1-1000) from a query parameter (a string of digits) or a JSON number (an
    int, or a float with an integral value); anything else is `default`: bools, fractions, inf/nan,
    numbers out of range (however large), other types."""
    if isinstance(value, bool):
        return default
    if isinstance(value, str):
        value = value.strip()
        if not (value.isascii() and value.isdigit() and len(value) <= 9):
            return default
        value = int(value)
    elif isinstance(value, float):
        if not value.is_integer():  # also False for inf and nan
            return default
        value = int(value)
    elif not isinstance(value, int):
        return default
    return value if 1 <= value <= 1000 else default


def _json_size(value: Any) -> int | None:
    """A size in a client's JSON message: a JSON number only (`"80"` is a string, not a size)."""
    return None if isinstance(value, str) else _size(value)


def _load(session_id: str, user: Any) -> tuple[TerminalSession | None, Role | None]:
    session = TerminalSession.objects.select_related("environment", "environment__node").filter(pk=session_id).first()
    if session is None or session.environment is None:
        return session, None
    return session, role_for(user, session.environment)


def _current_role(environment_id: Any, user: Any) -> Role | None:
    env = Environment.objects.filter(pk=environment_id).first()
    return role_for(user, env) if env is not None else None


def _session_ended(session_id: str) -> dict[str, Any] | None:
    return TerminalSession.objects.filter(pk=session_id, ended_at__isnull=False).values("end_reason", "exit_code").first()


class TerminalConsumer(AsyncWebsocketConsumer):
    STREAM_HANDLERS: dict[str, Any]  # message type -> handler, set after the class body
    session_id: str
    hub_channel: str | None = None
    role: Role | None = None
    participation_id: int | None = None

    async def connect(self) -> None:
        self.session_id = str(self.scope["url_route"]["kwargs"]["session_id"])
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close()  # before accept: the handshake is refused with HTTP 403
            return
        session, role = await dbpool.run(_load, self.session_id, user)
        if session is None or role is None:
            await self.close()  # unknown session and no permission look the same
            return
        self.user, self.role, self.environment_id = user, role, session.environment_id
        query = parse_qs(self.scope.get("query_string", b"").decode())
        client = (query.get("client") or ["other"])[0]
        self.client_kind = client if client in ClientKind.values else ClientKind.OTHER
        self.window = int(settings.LSL_SESSION_WINDOW)
        self.sent = self.acked = 0
        self.inflight: collections.deque[tuple[int, float]] = collections.deque()  # (sent total, hub read time)
        self.expected_offset: int | None = None  # None until the first snapshot arrives
        self.paused_since: float | None = None
        self.awaiting_snapshot = False
        self.snapshot_requested_at = time.monotonic()
        self.kicked = False
        self.held: list[tuple[int, bytes, float | None]] = []
        self.held_bytes = 0
        self.held_overflow = False
        self._last_denied = 0.0
        await self.accept()
        if session.ended_at is not None:
            await self._send_exit(session.exit_code, session.end_reason, close_code=4410)
            return
        try:
            self.hub_channel = await ensure_hub(self.session_id)
        except ShuttingDown:
            # Reached a process on its way out (a proxy may hand a reconnect to it in its last
            # moments): the same answer as its other participants got, so the client tries again.
            await self._error("server_restarting", "the server is restarting; your shell keeps running: reconnect")
            await self.close(code=CLOSE_RESTARTING)
            return
        except LookupError as exc:
            ended = await dbpool.run(_session_ended, self.session_id) or {"exit_code": None, "end_reason": str(exc)}
            await self._send_exit(ended["exit_code"], ended["end_reason"], close_code=4410)
            return
        await fanout.join(self.session_id, self)
        remote = self.scope.get("client") or ["", 0]
        participation = await dbpool.run(services.join, self.session_id, user, role.label, self.client_kind,
                                         str(remote[0] or ""))
        self.participation_id = participation.pk
        cols, rows = _size((query.get("cols") or [None])[0]), _size((query.get("rows") or [None])[0])
        await self._send_json({"type": "hello", "session": self.session_id, "environment": str(session.environment_id),
                               "user": user.get_username(), "role": role.label, "can_write": self.can_write,
                               "cols": session.cols, "rows": session.rows, "window": self.window})
        self.awaiting_snapshot = True
        self.snapshot_requested_at = time.monotonic()
        self.size = (cols, rows)
        LIVE.add(self)
        await self._join_hub()
        # Access changes arrive as events (a grant revoked, a team membership changed): the role
        # is re-checked then, once, instead of polling the database per participant.
        self._recheck: asyncio.Task[None] | None = None
        self._bus = await events.bus()
        self._bus_key = self._bus.subscribe(self._on_event)
        _ensure_watchdog()

    async def send(self, text_data: str | None = None, bytes_data: bytes | None = None, close: bool = False) -> None:
        """Like the base send, but a client that has already gone is not an error.

        A broadcast (presence, output) can reach this consumer after its client closed
        and before daphne delivers `websocket.disconnect`. daphne then raises
        Disconnected; uncaught, it ends the consumer before disconnect() runs, so the
        hub would keep a ghost member and the session would never go idle.
        """
        try:
            await super().send(text_data=text_data, bytes_data=bytes_data, close=close)
        except Disconnected:
            log.debug("session %s: %s already gone, dropping a frame", getattr(self, "session_id", "?"), self.channel_name)

    async def close(self, code: int | bool | None = None, reason: str | None = None) -> None:
        try:
            await super().close(code=code, reason=reason)
        except Disconnected:
            pass  # already closed by the client

    async def dispatch(self, message: dict[str, Any]) -> None:
        """Channels' dispatch, without its `aclose_old_connections()` before every message: that is a
        hop through the thread-sensitive executor per keystroke, queued behind any database work of
        the process (hundreds of joins), and measured as the largest part of the server's share of
        echo latency. Every database call here goes through lsl_site.dbpool, which checks its
        connection itself before each call."""
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        await handler(message)

    @property
    def can_write(self) -> bool:
        return self.role is not None and self.role >= Role.MEMBER

    # The channel layer (Redis) going away must not kill the consumer with a traceback (1011, no
    # reason): channels' dispatch loop reads `channel_receive`, so its failures are turned into one
    # `layer.down` message, which tells the participant why and closes with 1013 (try again later);
    # clients reconnect with backoff and are resynced once the layer is back.
    @property
    def channel_receive(self) -> Any:
        return self._guarded_channel_receive

    @channel_receive.setter
    def channel_receive(self, receive: Any) -> None:
        self._raw_channel_receive = receive

    async def _guarded_channel_receive(self) -> dict[str, Any]:
        try:
            return await self._raw_channel_receive()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if getattr(self, "_layer_down", False):
                await asyncio.sleep(3600)  # already reported and closing: do not spin
            self._layer_down = True
            return {"type": "layer.down", "detail": str(exc) or exc.__class__.__name__}

    async def layer_down(self, event: dict[str, Any]) -> None:
        log.warning("session %s: channel layer unavailable for %s: %s", getattr(self, "session_id", "?"),
                    self.channel_name, event.get("detail"))
        await self._error("unavailable", "the server's message bus (Redis) is unavailable; reconnecting will resume "
                                         "the session once it is back (your shell keeps running)")
        await self.close(code=CLOSE_TRY_AGAIN)

    async def _join_hub(self) -> None:
        assert self.role is not None
        cols, rows = self.size
        await self._to_hub("hub.join", user_id=self.user.pk, username=self.user.get_username(), role=self.role.label,
                           client=self.client_kind, participation_id=self.participation_id, cols=cols, rows=rows)

    async def _follow_session(self) -> None:
        """The session may have changed owner (the old one died or shut down): find the current one
        (taking the session over here if nobody serves it), join it and redraw from a snapshot."""
        try:
            channel = await self._resolve_hub()
        except ShuttingDown:
            return  # this process is closing its participants with 4012: they reconnect elsewhere
        except LookupError as exc:
            ended = await dbpool.run(_session_ended, self.session_id) or {"exit_code": None, "end_reason": str(exc)}
            await self._send_exit(ended["exit_code"], ended["end_reason"], close_code=4410)
            return
        if channel != self.hub_channel:
            log.info("session %s: %s follows the session to %s", self.session_id, self.channel_name, channel)
            self.hub_channel = channel
            if self.participation_id is not None:
                await dbpool.run(services.rejoin, self.participation_id)
            await self._join_hub()
        await self._request_snapshot()

    async def disconnect(self, code: int) -> None:
        LIVE.discard(self)
        if getattr(self, "_bus_key", None) is not None:
            self._bus.unsubscribe(self._bus_key)
            self._bus_key = None
        fanout.leave(self.session_id, self)
        fanout.forget(self)
        if self.hub_channel is not None:
            await self._to_hub("hub.leave")
        if self.participation_id is not None:
            await dbpool.run(services.leave, self.participation_id)
            self.participation_id = None

    # --- client → server -------------------------------------------------------------

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if bytes_data is not None:
            await self._on_input(bytes_data)
            return
        # Anything a client can put in a text frame gets an answer, never a traceback (docs/protocol.md §2).
        message, problem = parse_client_message(text_data)
        if message is None:
            await self._error("bad_message", problem)
            return
        kind = message["type"]
        if kind == "resize":
            cols, rows = _json_size(message.get("cols")), _json_size(message.get("rows"))
            if cols is None or rows is None:
                await self._error("bad_message", "resize needs integer cols and rows between 1 and 1000")
                return
            await self._to_hub("hub.resize", cols=cols, rows=rows)
        elif kind == "ack":
            value = message.get("bytes")
            if isinstance(value, bool):  # an int to Python, not a byte count
                await self._error("bad_message", "ack.bytes must be an integer no larger than the bytes sent")
                return
            await self._on_ack(value)
        elif kind == "ping":
            try:
                await self._send_json({"type": "pong", "t": message.get("t")})
            except (RecursionError, ValueError):  # nested just short of the parser's limit
                await self._error("bad_message", "ping.t cannot be echoed")
        else:
            await self._error("bad_message", f"unknown message type {kind[:64]!r}")

    async def _on_input(self, data: bytes) -> None:
        if not self.can_write:
            await self._error("read_only", "you are a viewer in this session: your input is not sent")
            now = time.monotonic()
            if now - self._last_denied > ROLE_DENIED_AUDIT_EVERY:
                self._last_denied = now
                await dbpool.run(services.record_event, self.session_id, AuditKind.ROLE_DENIED, self.user.pk,
                                                                    role=self.role.label if self.role else None)
            return
        await self._to_hub("hub.input", data=data)

    async def _on_ack(self, value: Any) -> None:
        if not isinstance(value, int) or value < 0 or value > self.sent:
            await self._error("bad_message", "ack.bytes must be an integer no larger than the bytes sent")
            return
        self.acked = max(self.acked, value)
        if self._caught_up():
            await self._resume()

    def _caught_up(self) -> bool:
        """Paused, and the client has caught up (clients ack at least every window/2 bytes, so the
        last ack may trail what they hold by up to that much)."""
        return self.paused_since is not None and not self.kicked and self.sent - self.acked <= self.window // 2

    async def _resume(self) -> None:
        """End a pause: back into the session's stream, and redraw from the current screen.

        The pause ends here, not when the snapshot arrives: a client that has caught up is not
        stalled however long its snapshot takes (node starved on a busy machine); a snapshot that
        does not come is asked for again (`_retry_lost_snapshot`), never a reason to close it."""
        await fanout.join(self.session_id, self)  # still paused meanwhile: output that arrives is skipped
        if self.paused_since is None or self.kicked:
            return  # resumed meanwhile (the watchdog and an ack), or closed
        self.paused_since = None
        if not self.awaiting_snapshot:  # else the snapshot on its way redraws it
            await self._request_snapshot()

    # --- hub → client -----------------------------------------------------------------------
    # Stream messages come from sessions/fanout.py (`on_stream`, called directly by the hub or the
    # process's Redis relay); a remote hub's answers to this participant alone (its snapshot) come
    # through the channel layer. Both end in the same `term_*` handlers.

    async def on_stream(self, message: dict[str, Any]) -> None:
        handler = self.STREAM_HANDLERS.get(message["type"])
        if handler is not None and not getattr(self, "exited", False):
            await handler(self, message)

    @property
    def backlog(self) -> int | None:
        if self.paused_since is not None or self.awaiting_snapshot or self.expected_offset is None:
            return None
        return self.sent - self.acked

    async def on_stream_lost(self) -> None:
        """This process's subscription to the session's stream broke (Redis): output may be missing."""
        if not self.awaiting_snapshot and not self.kicked:
            await self._request_snapshot()

    async def term_output(self, event: dict[str, Any]) -> None:
        offset, data = event["offset"], event["data"]
        lag = time.time() - event.get("t", time.time())
        if lag > settings.LSL_SESSION_MAX_LAG and not self.awaiting_snapshot and self.expected_offset is not None:
            await self._on_lag(lag)
            return
        if self.awaiting_snapshot or self.expected_offset is None:
            # The snapshot on its way was taken at some offset we don't know yet:
            # keep what arrives meanwhile (bounded) and replay the part past it.
            if self.held_bytes + len(data) <= self.window:
                self.held.append((offset, data, event.get("t")))
                self.held_bytes += len(data)
            else:
                self.held_overflow = True
            return
        await self._deliver(offset, data, event.get("t"))

    def _unacked_since(self) -> float | None:
        """When the hub read the oldest output this client has not acknowledged yet (None: all acked)."""
        while self.inflight and self.inflight[0][0] <= self.acked:
            self.inflight.popleft()
        return self.inflight[0][1] if self.inflight else None

    def _behind_in_time(self) -> bool:
        """More than LAG_MIN_BYTES unacknowledged, the oldest of it read from the PTY more than
        LSL_SESSION_MAX_LAG ago: the client (or the network to it) is that far behind."""
        since = self._unacked_since()
        return (since is not None and self.sent - self.acked > LAG_MIN_BYTES
                and time.time() - since > settings.LSL_SESSION_MAX_LAG)

    async def term_mark(self, event: dict[str, Any]) -> None:
        """The hub's offset after output went quiet: anything short of it was lost on the way."""
        if (not self.awaiting_snapshot and self.paused_since is None and self.expected_offset is not None
                and self.expected_offset < event["offset"]):
            log.info("session %s: %s missed %d..%d, resyncing", self.session_id, self.channel_name,
                     self.expected_offset, event["offset"])
            await self._request_snapshot()

    async def _deliver(self, offset: int, data: bytes, t: float | None = None) -> None:
        end = offset + len(data)
        if self.expected_offset is None or end <= self.expected_offset:
            return  # already covered by a snapshot
        if self.paused_since is not None:
            # Out of the stream (the rest of what was held when a replay paused it): nothing more goes
            # out, and no snapshot is asked for, until the client catches up (`_resume`).
            self._check_stalled()
            return
        if offset > self.expected_offset:
            log.info("session %s: gap %d..%d for %s, resyncing", self.session_id, self.expected_offset, offset, self.channel_name)
            await self._request_snapshot()
            return
        data = data[self.expected_offset - offset:]
        self.expected_offset = end
        lagging = self._behind_in_time()
        if self.sent - self.acked > self.window or lagging:
            # Stop feeding it, and leave the group so a stalled participant costs the
            # process nothing per chunk; it rejoins and is resynced once it catches up.
            self.paused_since = time.monotonic()
            fanout.leave(self.session_id, self)
            log.info("session %s: %s fell %d bytes behind, pausing", self.session_id, self.user, self.sent - self.acked)
            if lagging:
                await self._count_lag_resync(time.time() - (self._unacked_since() or time.time()))
            return
        self.sent += len(data)
        self.inflight.append((self.sent, t if t is not None else time.time()))
        await self.send(bytes_data=data)

    async def _on_lag(self, lag: float) -> None:
        """This output waited longer than the bound in the server's own queues (a saturated process,
        not the client): skip what is queued and redraw from a snapshot; past a limit, give up."""
        if await self._count_lag_resync(lag):
            await self._request_snapshot()

    async def _count_lag_resync(self, lag: float) -> bool:
        """Say `lagging`; False (and closed with too_slow) past LSL_SESSION_MAX_LAG_RESYNCS a minute."""
        now = time.monotonic()
        self.lag_resyncs = [t for t in getattr(self, "lag_resyncs", []) if now - t < 60] + [now]
        log.info("session %s: %s is %.1fs behind; resyncing", self.session_id, self.channel_name, lag)
        if len(self.lag_resyncs) > settings.LSL_SESSION_MAX_LAG_RESYNCS:
            self.kicked = True
            self.awaiting_snapshot = True  # send nothing more
            await self._kick_slow()
            return False
        await self._send_json({"type": "lagging", "seconds": round(lag, 1)})
        return True

    async def _request_snapshot(self) -> None:
        self.awaiting_snapshot = True
        self.snapshot_requested_at = time.monotonic()
        self.held, self.held_bytes, self.held_overflow = [], 0, False
        await self._to_hub("hub.snapshot")

    def _check_stalled(self) -> None:
        if self.paused_since is not None and time.monotonic() - self.paused_since > settings.LSL_SESSION_STALL_TIMEOUT:
            asyncio.create_task(self._kick_slow())
            self.paused_since = None
            self.kicked = True
            self.awaiting_snapshot = True  # send nothing more

    async def _retry_lost_snapshot(self) -> None:
        """A full channel drops the hub's answer like any other message: ask again rather than wait forever.

        Ask whoever owns the session *now*: the owner may have died (then the session ends here, with
        its reason) or been replaced since we joined.
        """
        if self.awaiting_snapshot and not self.kicked and time.monotonic() - self.snapshot_requested_at > SNAPSHOT_RETRY:
            log.info("session %s: no snapshot for %s yet, asking again", self.session_id, self.channel_name)
            await self._follow_session()

    async def _resolve_hub(self) -> str:
        """The channel of the session's current owner (starting one here if it has none)."""
        return await ensure_hub(self.session_id)

    async def _kick_slow(self) -> None:
        await self._error("too_slow", "you fell too far behind the terminal output")
        await self.close(code=4408)

    async def term_snapshot(self, event: dict[str, Any]) -> None:
        if not self.awaiting_snapshot or self.kicked or getattr(self, "exited", False):
            return  # a duplicate answer to an earlier request, or nothing more is sent
        if not fanout.joined(self.session_id, self):
            # Asked for while paused, out of the session's stream (e.g. the session changed owner):
            # back into it first, or this snapshot would end the pause and no output, quiet mark or
            # resync would ever reach the participant again.
            await fanout.join(self.session_id, self)
            if not self.awaiting_snapshot or self.kicked:
                return  # another answer was taken meanwhile
        held, overflow = self.held, self.held_overflow
        self.awaiting_snapshot = False
        self.held, self.held_bytes, self.held_overflow = [], 0, False
        self.paused_since = None
        self.expected_offset = event["offset"]
        data = event["data"]
        await self._send_json({"type": "snapshot", "cols": event["cols"], "rows": event["rows"], "bytes": len(data)})
        self.sent += len(data)
        await self.send(bytes_data=data)
        for offset, chunk, t in held:
            if self.awaiting_snapshot:
                break  # a gap in what was held: a fresh snapshot is on its way and covers the rest
            await self._deliver(offset, chunk, t)
        if overflow and not self.awaiting_snapshot and self.paused_since is None:
            # Some output was not kept: redraw again. Not if replaying what was held paused it: it is
            # out of the stream, and is redrawn when it has caught up (`_resume`).
            await self._request_snapshot()

    async def term_control(self, event: dict[str, Any]) -> None:
        text = event.get("text")  # encoded once by the hub for everyone
        await self.send(text_data=text if text is not None else json.dumps(event["payload"]))

    async def term_exit(self, event: dict[str, Any]) -> None:
        await self._send_exit(event.get("code"), event.get("reason"))

    # --- helpers --------------------------------------------------------------------

    def _on_event(self, record: events.EventRecord) -> None:
        """From the bus, on the loop: re-check the role when an access change may concern us; pass on
        the end of our session when its hub cannot (it died, or lives in a process we cannot reach)."""
        if record.kind == "session.ended" and record.session_id == self.session_id:
            asyncio.create_task(self._exit_unless_hub_does(record.payload.get("exit_code"), record.payload.get("reason")))
            return
        if record.kind == "session.detached" and record.session_id == self.session_id and not self.kicked:
            asyncio.create_task(self._follow_session())
            return
        concerns_us = (record.kind == "access.changed" and record.environment_id == str(self.environment_id)) or \
            (record.kind == "team.changed" and self.user.pk in record.user_ids)
        if concerns_us and (self._recheck is None or self._recheck.done()):
            self._recheck = asyncio.create_task(self._recheck_role())

    async def _exit_unless_hub_does(self, code: int | None, reason: str | None) -> None:
        """A live hub sends the last output, then `term.exit`: give it that moment, so the end never
        overtakes output. A dead one sends nothing: then this is how the participant learns why."""
        await asyncio.sleep(HUB_EXIT_GRACE)
        await self._send_exit(code, reason)

    async def _recheck_role(self) -> None:
        role = await dbpool.run(_current_role, self.environment_id, self.user)
        if role is None:
            await self._send_exit(None, "access_revoked", close_code=4403)
            return
        if role != self.role:
            self.role = role
            await self._to_hub("hub.role", role=role.label)
            await self._send_json({"type": "hello", "session": self.session_id, "environment": str(self.environment_id),
                                   "user": self.user.get_username(), "role": role.label, "can_write": self.can_write,
                                   "window": self.window})

    async def watch(self) -> None:
        """Called every WATCH_EVERY by the process's watchdog."""
        if self._caught_up():
            # Its last ack came while it could not resume (a snapshot in flight): no other may come.
            await self._resume()
        self._check_stalled()
        await self._retry_lost_snapshot()

    async def _to_hub(self, kind: str, **fields: Any) -> None:
        if self.hub_channel is None:
            return
        message = {"type": kind, "channel": self.channel_name, **fields}
        hub = hubs.HUBS.get(self.session_id)
        if hub is not None and hub.channel == self.hub_channel and not hub.finished.is_set():
            # The hub lives in this process: a call, not a trip through the channel layer.
            await hub.handle(message)
            return
        try:
            await self.channel_layer.send(self.hub_channel, message)
        except asyncio.CancelledError:
            raise
        except ChannelFull:
            if kind == "hub.input":
                await self._error("busy", "the terminal is not keeping up with input; this input was dropped")
        except Exception as exc:  # the layer down: the hub never hears it
            if kind == "hub.leave":
                return  # leaving anyway; the hub's idle timer and the reaper cover it
            if not getattr(self, "_layer_down", False):
                self._layer_down = True
                await self.layer_down({"detail": str(exc) or exc.__class__.__name__})

    async def _send_json(self, payload: dict[str, Any]) -> None:
        await self.send(text_data=json.dumps(payload))

    async def _error(self, code: str, detail: str) -> None:
        await self._send_json({"type": "error", "code": code, "detail": detail})

    async def _send_exit(self, code: int | None, reason: str | None, close_code: int = 1000) -> None:
        if getattr(self, "exited", False):
            return  # the hub and the event stream may both tell us: say it once
        self.exited = True
        await self._send_json({"type": "exit", "code": code, "reason": reason or "ended"})
        await self.close(code=close_code)


TerminalConsumer.STREAM_HANDLERS = {
    "term.output": TerminalConsumer.term_output, "term.mark": TerminalConsumer.term_mark,
    "term.snapshot": TerminalConsumer.term_snapshot, "term.control": TerminalConsumer.term_control,
    "term.exit": TerminalConsumer.term_exit,
}
