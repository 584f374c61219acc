"""`/ws/events/`: the permission-filtered stream of LSL's events (protocol: docs/protocol.md).

A client gets every event about environments it may view (status, progress, sessions opened and
ended, presence, access changes) and events addressed to it. It may resume with `?since=ID` (the
last id it saw): what happened in between is replayed first, or, when that is no longer kept, it
is told to `resync` (refetch over REST). A client too slow to take its events is told to resync
too, never silently skipped.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from typing import Any
from urllib.parse import parse_qs

from autobahn.exception import Disconnected
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer

from environments.models import Environment
from lsl_site import events

log = logging.getLogger(__name__)

QUEUE_MAX = 2000
CATCH_UP_MAX = 2000
# Events that may change what this user can see: recompute the visible set when one concerns them.
VISIBILITY_KINDS = {"access.changed", "team.changed", "environment.created"}


MAX_TEXT_FRAME = 64 * 1024  # bytes of UTF-8: client messages are a few dozen


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e309
        raise ValueError("number out of range")
    return value


def parse_client_message(text_data: str | None) -> tuple[dict[str, Any] | None, str]:
    """A client's text frame as a JSON object with a string `type`, or (None, why not).

    Hostile input is an answer, never an exception: binary or oversized frames, Infinity/NaN
    (and numbers that overflow to them), nesting deep enough to exhaust the stack, and values
    that are not objects. Shared by the event stream and the terminal consumer.
    """
    if text_data is None:
        return None, "expected a text frame holding a JSON object"
    if len(text_data) > MAX_TEXT_FRAME // 4 and len(text_data.encode("utf-8", "surrogatepass")) > MAX_TEXT_FRAME:
        return None, f"text frames are limited to {MAX_TEXT_FRAME} bytes"
    try:
        message = json.loads(text_data, parse_constant=_no_constant, parse_float=_finite_float)
    except RecursionError:
        return None, "JSON nested too deeply"
    except ValueError as exc:  # json.JSONDecodeError, Infinity/NaN, huge floats, ints past Python's digit limit
        return None, f"invalid JSON: {str(exc)[:200]}"
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        return None, "text frames must be JSON objects with a string 'type'"
    return message, ""


@database_sync_to_async
def _visible_ids(user: Any) -> set[str] | None:
    """Environment ids `user` may view; None means all of them (staff and superusers)."""
    if user.is_superuser or user.is_staff:
        return None
    return {str(pk) for pk in Environment.objects.visible_to(user).values_list("pk", flat=True)}


@database_sync_to_async
def _catch_up(since: int, until: int) -> tuple[list[events.EventRecord], bool]:
    """Events (since, until], and whether they are complete (False: pruned or too many: resync)."""
    if since < events.oldest_id() - 1:
        return [], False
    rows = [row for row in events.events_since(since, limit=CATCH_UP_MAX + 1) if row.id <= until]
    return rows[:CATCH_UP_MAX], len(rows) <= CATCH_UP_MAX


class EventStreamConsumer(AsyncWebsocketConsumer):
    # No channel layer: events arrive through events.bus() (its own Redis subscription, or polling
    # while Redis is down). With one, channels' dispatch loop also waits on the layer's receive,
    # which raises while Redis is down and ended the stream with 1011 in the middle of an outage.
    channel_layer_alias = "lsl-events-have-no-channel-layer"

    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close()  # before accept: the handshake is refused with HTTP 403
            return
        self.user = user
        query = parse_qs(self.scope.get("query_string", b"").decode())
        raw_since = (query.get("since") or [""])[0]
        since: int | None = int(raw_since) if raw_since.isdigit() else None
        self.visible = await _visible_ids(user)
        self.queue: asyncio.Queue[events.EventRecord | None] = asyncio.Queue(maxsize=QUEUE_MAX)
        self.overflowed = False
        self.refreshing: asyncio.Task[None] | None = None
        bus = await events.bus()
        self.bus_key = bus.subscribe(self._on_event)
        assert bus.cursor is not None
        upto = bus.cursor.last_id
        await self.accept()
        replayed: list[events.EventRecord] = []
        if since is not None and since < upto:
            replayed, complete = await _catch_up(since, upto)
            if not complete:
                await self._send_json({"type": "resync", "reason": "events since that id are no longer kept"})
                replayed = []
        await self._send_json({"type": "hello", "user": user.get_username(), "last_id": upto})
        self.replayed_ids = {row.id for row in replayed}
        for row in replayed:
            if self._allowed(row):
                await self._send_json(row.as_message())
        self.sender = asyncio.create_task(self._send_loop())

    async def disconnect(self, code: int) -> None:
        key = getattr(self, "bus_key", None)
        if key is not None:
            (await events.bus()).unsubscribe(key)
        sender = getattr(self, "sender", None)
        if sender is not None:
            sender.cancel()

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        message, problem = parse_client_message(text_data)
        if message is None:
            await self._send_json({"type": "error", "code": "bad_message", "detail": problem})
            return
        kind = message["type"]
        if kind == "ping":
            try:
                await self._send_json({"type": "pong", "t": message.get("t")})
            except (RecursionError, ValueError):
                await self._send_json({"type": "error", "code": "bad_message", "detail": "ping.t cannot be echoed"})
        else:
            await self._send_json({"type": "error", "code": "bad_message", "detail": f"unknown message type {kind[:64]!r}"})

    # --- bus → client ------------------------------------------------------------------------

    def _on_event(self, record: events.EventRecord) -> None:
        """Called on the loop by the bus: must not block."""
        if record.kind in VISIBILITY_KINDS and self.visible is not None:
            # A grant given or taken, or a team joined or left, concerns the users it names. A new
            # environment is visible to others than its owner only through its team (grants come
            # later, as access.changed): other creations cost this client nothing.
            concerns_me = record.kind != "environment.created" and self.user.pk in record.user_ids
            new_for_my_team = (record.kind == "environment.created" and record.environment_id not in self.visible
                               and (record.payload.get("environment") or {}).get("team"))
            if concerns_me or new_for_my_team:
                self._refresh_visibility()
        if self.overflowed:
            return
        try:
            self.queue.put_nowait(record)
        except asyncio.QueueFull:
            self.overflowed = True

    def _refresh_visibility(self) -> None:
        async def refresh() -> None:
            self.visible = await _visible_ids(self.user)

        if self.refreshing is None or self.refreshing.done():
            self.refreshing = asyncio.create_task(refresh())

    def _allowed(self, record: events.EventRecord) -> bool:
        if self.user.pk in record.user_ids:
            return True
        if record.environment_id is None:
            return False
        return self.visible is None or record.environment_id in self.visible

    async def _send_loop(self) -> None:
        while True:
            record = await self.queue.get()
            if self.overflowed:
                # The client did not keep up: rather than drop events silently, say so and start afresh.
                while not self.queue.empty():
                    self.queue.get_nowait()
                self.overflowed = False
                await self._send_json({"type": "resync", "reason": "too many events queued for this client"})
                continue
            if record is None or record.id in self.replayed_ids:
                continue
            if self.refreshing is not None and not self.refreshing.done():
                await self.refreshing  # decide on the fresh visible set
            if self._allowed(record):
                await self._send_json(record.as_message())

    async def _send_json(self, payload: dict[str, Any]) -> None:
        try:
            await self.send(text_data=json.dumps(payload, default=str))
        except Disconnected:
            pass
