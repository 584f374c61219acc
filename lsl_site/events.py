"""Events: every write publishes one here, on commit; every process hears them (Zulip style).

Publishing (sync, anywhere): `publish(kind, payload, environment_id=..., user_ids=...)` inserts an
`Event` row in the caller's transaction, so an event exists exactly when its change does, and
wakes the listeners once the transaction commits.

Listening (async, per process): one `EventBus` per process tails the table and calls its
subscribers on the event loop. There is one database read per wake-up or poll per *process*,
never per client. Wake-ups (lsl_site.wake) come at once from this process's own commits, from
other processes on this host through a Unix datagram socket, and from other hosts through Redis
pub/sub when LSL_REDIS_URL is set. Polling every LSL_EVENT_POLL_INTERVAL seconds (slower,
LSL_EVENT_POLL_SLOW, while Redis is healthy) is the fallback, so a lost wake-up or a Redis outage
slows events down but loses none.

Threading contract: `publish` may be called from any thread. `EventBus` lives on one event loop;
its subscribers are called on that loop, must not block, and may not raise (errors are logged).
Ids are not committed in order on PostgreSQL (a transaction that took id 10 may commit after
the one that took id 11), so the bus re-reads such gaps for GAP_WINDOW seconds before giving up
on them (a rolled-back transaction leaves a permanent gap).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.db import close_old_connections, transaction
from django.db.models import Q

from lsl_site import wake

log = logging.getLogger(__name__)

GAP_WINDOW = 10.0  # seconds a missing id is looked for again
FETCH_LIMIT = 500


@dataclass(frozen=True)
class EventRecord:
    id: int
    kind: str
    environment_id: str | None
    session_id: str | None
    user_ids: tuple[int, ...]
    payload: dict[str, Any]
    created_at: float

    def as_message(self) -> dict[str, Any]:
        """The JSON frame sent to event-stream clients (docs/protocol.md)."""
        message = {"type": self.kind, "id": self.id, **self.payload}
        if self.environment_id is not None:
            message.setdefault("environment", self.environment_id)
        if self.session_id is not None:
            message.setdefault("session", self.session_id)
        return message


def _record(row: Any) -> EventRecord:
    return EventRecord(id=row.id, kind=row.kind, environment_id=str(row.environment_id) if row.environment_id else None,
                       session_id=str(row.session_id) if row.session_id else None, user_ids=tuple(row.user_ids or ()),
                       payload=row.payload or {}, created_at=row.created_at.timestamp())


# --- publishing ----------------------------------------------------------------------

def publish(kind: str, payload: dict[str, Any] | None = None, *, environment_id: Any = None, session_id: Any = None,
            user_ids: Iterable[int] = ()) -> None:
    """Record an event in the current transaction; listeners are woken when it commits."""
    from lsl_site.models import Event

    Event.objects.create(kind=kind, payload=payload or {}, environment_id=_uuid(environment_id),
                         session_id=_uuid(session_id), user_ids=sorted(set(user_ids)))
    transaction.on_commit(wake_listeners)


def _uuid(value: Any) -> uuid.UUID | None:
    if value is None or value == "":
        return None
    return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))


def wake_listeners() -> None:
    """Wake this process's bus now, and every other process's (lsl_site.wake)."""
    bus = _BUS
    if bus is not None:
        bus.wake_threadsafe()
    wake.notify("events")


def latest_id() -> int:
    from lsl_site.models import Event

    return Event.objects.order_by("-id").values_list("id", flat=True).first() or 0


def events_since(after: int, limit: int = FETCH_LIMIT) -> list[EventRecord]:
    from lsl_site.models import Event

    return [_record(row) for row in Event.objects.filter(id__gt=after).order_by("id")[:limit]]


def oldest_id() -> int:
    from lsl_site.models import Event

    return Event.objects.order_by("id").values_list("id", flat=True).first() or 0


def prune(older_than_seconds: float) -> int:
    """Delete events older than the retention (run by the worker)."""
    from django.utils import timezone

    from lsl_site.models import Event

    cutoff = timezone.now() - timezone.timedelta(seconds=older_than_seconds)
    deleted, _ = Event.objects.filter(created_at__lt=cutoff).delete()
    return deleted


# --- listening ------------------------------------------------------------------------

Subscriber = Callable[[EventRecord], None]


@dataclass
class _Cursor:
    """Where the bus has read up to, and which lower ids it has not seen yet (see module doc)."""

    last_id: int
    gaps: dict[int, float] = field(default_factory=dict)  # id -> monotonic time first missed

    def advance(self, rows: list[EventRecord], now: float) -> list[EventRecord]:
        """Rows not delivered before, in id order; records and expires gaps."""
        fresh: list[EventRecord] = []
        for row in sorted(rows, key=lambda r: r.id):
            if row.id in self.gaps:
                del self.gaps[row.id]
                fresh.append(row)
            elif row.id > self.last_id:
                for missing in range(self.last_id + 1, row.id):
                    self.gaps.setdefault(missing, now)
                self.last_id = row.id
                fresh.append(row)
        for missing, since in list(self.gaps.items()):
            if now - since > GAP_WINDOW:
                del self.gaps[missing]
        return fresh


def _fetch(cursor: _Cursor) -> list[EventRecord]:
    from lsl_site.models import Event

    close_old_connections()
    condition = Q(id__gt=cursor.last_id)
    if cursor.gaps:
        condition |= Q(id__in=list(cursor.gaps))
    return [_record(row) for row in Event.objects.filter(condition).order_by("id")[:FETCH_LIMIT]]


class EventBus:
    """This process's tail of the event table (one per process, on the event loop that first needs it)."""

    def __init__(self) -> None:
        self._subscribers: dict[int, Subscriber] = {}
        self._next_key = 0
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._redis_task: asyncio.Task[None] | None = None
        self.cursor: _Cursor | None = None
        self.ready: asyncio.Event | None = None

    def subscribe(self, callback: Subscriber) -> int:
        self._next_key += 1
        self._subscribers[self._next_key] = callback
        return self._next_key

    def unsubscribe(self, key: int) -> None:
        self._subscribers.pop(key, None)

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    def wake_threadsafe(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is None or wake is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(wake.set)
        except RuntimeError:
            pass  # the loop is shutting down

    async def start(self) -> None:
        """Start tailing (idempotent); returns once the starting point is known."""
        if self._task is not None and not self._task.done():
            assert self.ready is not None
            await self.ready.wait()
            return
        from channels.db import database_sync_to_async

        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self.ready = asyncio.Event()
        self._task = asyncio.create_task(self._run(database_sync_to_async))
        await self.ready.wait()

    async def _run(self, db: Any) -> None:
        assert self._wake is not None and self.ready is not None
        self.cursor = _Cursor(last_id=await db(latest_id)())
        try:
            listener = wake.Listener("events")
            asyncio.get_running_loop().add_reader(listener.fileno(), lambda: (listener.drain(), self._wake.set()))  # type: ignore[union-attr]
            self._listener: wake.Listener | None = listener
        except OSError as exc:  # e.g. a read-only var dir: polling still works
            log.warning("events: no local wake-up socket (%s); polling only", exc)
            self._listener = None
        self.ready.set()
        if settings.REDIS_URL:
            self._redis_task = asyncio.create_task(self._listen_redis())
        fast = float(settings.LSL_EVENT_POLL_INTERVAL)
        slow = float(settings.LSL_EVENT_POLL_SLOW) if settings.REDIS_URL else fast
        failures = 0
        while True:
            try:
                rows = await db(_fetch)(self.cursor)
                failures = 0
            except Exception as exc:  # the database restarting must not kill the bus
                failures += 1
                log.warning("events: reading the event table failed (%s); retrying", exc)
                await asyncio.sleep(min(5.0, 0.2 * 2 ** min(failures, 5)))
                continue
            for record in self.cursor.advance(rows, time.monotonic()):
                self._dispatch(record)
            if len(rows) >= FETCH_LIMIT:
                continue
            interval = fast if (self.cursor.gaps or not self._redis_healthy()) else slow
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=interval)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()

    def _redis_healthy(self) -> bool:
        return self._redis_task is not None and not self._redis_task.done() and getattr(self, "_redis_connected", False)

    async def _listen_redis(self) -> None:
        import redis.asyncio as aioredis

        assert self._wake is not None
        backoff = 0.5
        while True:
            client = aioredis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=1)
            try:
                pubsub = client.pubsub()
                await pubsub.subscribe(wake.redis_channel("events"))
                self._redis_connected = True
                backoff = 0.5
                self._wake.set()  # anything published while we were away: read now
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        self._wake.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if getattr(self, "_redis_connected", True):
                    log.warning("events: Redis listener lost (%s); polling every %gs until it is back",
                                exc.__class__.__name__, settings.LSL_EVENT_POLL_INTERVAL)
                self._redis_connected = False
            finally:
                try:
                    await client.aclose()
                except Exception:
                    pass
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    def _dispatch(self, record: EventRecord) -> None:
        for callback in list(self._subscribers.values()):
            try:
                callback(record)
            except Exception:
                log.exception("events: a subscriber failed on %s", record.kind)


_BUS: EventBus | None = None


async def bus() -> EventBus:
    """This process's bus, started on first use."""
    global _BUS
    if _BUS is None or (_BUS._loop is not None and _BUS._loop is not asyncio.get_running_loop()):
        _BUS = EventBus()
    await _BUS.start()
    return _BUS
