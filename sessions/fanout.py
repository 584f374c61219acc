"""A session's stream to its participants: O(1) work per chunk per process.

The hub publishes each message (output, marks, presence, resizes, the exit) once. In every
process, the participants of that session are *taps* registered here; a message is handed to
each local tap directly, as the same Python object (no channel layer, no per-member copies, no
task hand-off: a tap's `on_stream` writes to its websocket, which never blocks because every
tap bounds what it has in flight with its flow-control window).

Across processes (LSL_REDIS_URL set), the hub's process also PUBLISHes each message once, on
`lsl:term:<session>`; every process with taps of that session subscribes to that channel once
(one Redis connection per process) and hands what it hears to its local taps the same way. A
process ignores its own publications: its taps were served directly. Publishing is pipelined by
one task per process, so a hub never waits for Redis between two chunks.

Nothing here is reliable delivery, and it need not be: every output message carries its stream
offset, taps detect a gap (a Redis connection lost, a publish queue overflowed) and resync from a
snapshot. A tap is told when its process's subscription was lost (`on_stream_lost`).

Threading contract: every function runs on the process's one event loop.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import defaultdict
from typing import Any, Protocol

import msgpack
from django.conf import settings

log = logging.getLogger(__name__)

# Identifies this process's publications, which its own subscription must ignore.
PROCESS_ID = uuid.uuid4().hex
SUBSCRIBE_WAIT = 2.0
PUBLISH_QUEUE = 2048  # messages waiting for Redis; beyond this they are dropped (taps resync)
CHANNEL_PREFIX = "lsl:term:"


class Tap(Protocol):
    channel_name: str

    @property
    def backlog(self) -> int | None:
        """Bytes sent to this participant and not acknowledged yet (None: not receiving live output)."""

    async def on_stream(self, message: dict[str, Any]) -> None:
        """Deliver one message to this participant. Must not block (write and return)."""

    async def on_stream_lost(self) -> None:
        """Messages may have been lost on the way to this process: resync."""


_taps: dict[str, dict[str, Tap]] = defaultdict(dict)  # session id -> channel name -> tap
_by_channel: dict[str, Tap] = {}


async def join(session_id: str, tap: Tap) -> None:
    """Start receiving the session's stream (idempotent). With Redis, returns once this process is
    subscribed, so nothing published after the return is missed (a bounded wait: Redis down, it
    returns after SUBSCRIBE_WAIT and the tap resyncs once the subscription is back)."""
    _taps[session_id][tap.channel_name] = tap
    _by_channel[tap.channel_name] = tap
    if settings.REDIS_URL:
        try:
            await asyncio.wait_for(_relay().want(session_id), SUBSCRIBE_WAIT)
        except asyncio.TimeoutError:
            log.warning("session %s: not subscribed to its stream within %gs (Redis down?)", session_id, SUBSCRIBE_WAIT)


def leave(session_id: str, tap: Tap) -> None:
    """Stop receiving it (idempotent). A paused participant leaves, so it costs nothing per chunk."""
    taps = _taps.get(session_id)
    if taps is not None:
        taps.pop(tap.channel_name, None)
        if not taps:
            del _taps[session_id]
            if settings.REDIS_URL:
                relay = _relay()
                relay.track(asyncio.create_task(relay.unwant(session_id)))


def joined(session_id: str, tap: Tap) -> bool:
    """Whether the tap receives the session's stream now (a paused participant has left it)."""
    return _taps.get(session_id, {}).get(tap.channel_name) is tap


def forget(tap: Tap) -> None:
    """The participant is gone: no more direct messages either (see `local_tap`)."""
    _by_channel.pop(tap.channel_name, None)


def local_tap(channel_name: str) -> Tap | None:
    """The participant behind a channel name, if it lives in this process (for point-to-point
    messages such as its snapshot, which then need no channel layer either)."""
    return _by_channel.get(channel_name)


def local_count(session_id: str) -> int:
    return len(_taps.get(session_id, ()))


def backlogs(session_id: str) -> list[int | None]:
    """Each local participant's unacknowledged bytes (for the hub's pacing)."""
    return [tap.backlog for tap in _taps.get(session_id, {}).values()]


async def publish(session_id: str, message: dict[str, Any]) -> None:
    """Hand `message` to every participant of the session, in every process."""
    await deliver_local(session_id, message)
    if settings.REDIS_URL:
        _relay().publish(session_id, message)


async def deliver_local(session_id: str, message: dict[str, Any]) -> None:
    taps = _taps.get(session_id)
    if not taps:
        return
    for tap in list(taps.values()):
        try:
            await tap.on_stream(message)
        except Exception:  # one participant's failure is not everyone's
            log.exception("session %s: delivering %s to %s failed", session_id, message.get("type"), tap.channel_name)


class _Relay:
    """This process's one Redis connection for session streams: a publisher task and a subscriber."""

    def __init__(self) -> None:
        self.wanted: set[str] = set()
        self.subscribed: set[str] = set()
        self.queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(PUBLISH_QUEUE)
        self.dropped = 0
        self.pubsub: Any = None
        self._connected = asyncio.Event()
        self._commands = asyncio.Lock()  # subscribe/unsubscribe, one at a time
        self._tasks = [asyncio.create_task(self._publisher()), asyncio.create_task(self._subscriber())]

    def track(self, task: "asyncio.Task[Any]") -> None:
        self._tasks.append(task)
        self._tasks[:] = [t for t in self._tasks if not t.done()]

    # --- publishing ---

    def publish(self, session_id: str, message: dict[str, Any]) -> None:
        payload = msgpack.packb({"o": PROCESS_ID, "m": message}, use_bin_type=True)
        try:
            self.queue.put_nowait((CHANNEL_PREFIX + session_id, payload))
        except asyncio.QueueFull:
            self.dropped += 1  # remote participants see the gap in offsets and resync
            if self.dropped in (1, 100) or self.dropped % 10000 == 0:
                log.warning("sessions: Redis is not keeping up; %d stream messages dropped so far", self.dropped)

    async def _publisher(self) -> None:
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=1, socket_timeout=5)
        while True:
            batch = [await self.queue.get()]
            while not self.queue.empty() and len(batch) < 256:
                batch.append(self.queue.get_nowait())
            try:
                async with client.pipeline(transaction=False) as pipe:
                    for channel, payload in batch:
                        pipe.publish(channel, payload)
                    await pipe.execute()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis down: these are lost (taps resync); keep going
                self.dropped += len(batch)
                log.warning("sessions: publishing to Redis failed (%s); %d messages lost", exc.__class__.__name__, len(batch))
                await asyncio.sleep(0.5)

    # --- subscribing ---

    async def want(self, session_id: str) -> None:
        """Subscribe to the session's channel (once per process); returns when subscribed, so a
        participant that then asks for its snapshot misses nothing published after it."""
        self.wanted.add(session_id)
        await self._connected.wait()
        async with self._commands:
            if session_id in self.wanted and session_id not in self.subscribed and self.pubsub is not None:
                try:
                    await self.pubsub.subscribe(CHANNEL_PREFIX + session_id)
                    self.subscribed.add(session_id)
                except Exception as exc:  # the listener notices the lost connection and resubscribes
                    log.warning("sessions: subscribing to %s failed: %r", session_id, exc)

    async def unwant(self, session_id: str) -> None:
        self.wanted.discard(session_id)
        async with self._commands:
            if session_id not in self.wanted and session_id in self.subscribed and self.pubsub is not None:
                self.subscribed.discard(session_id)
                try:
                    await self.pubsub.unsubscribe(CHANNEL_PREFIX + session_id)
                except Exception:
                    pass

    async def _subscriber(self) -> None:
        import redis.asyncio as aioredis

        backoff = 0.2
        while True:
            client = aioredis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=1)
            pubsub = client.pubsub()
            try:
                async with self._commands:
                    # A subscription needs at least one channel before it can be listened to.
                    wanted = set(self.wanted)
                    await pubsub.subscribe(CHANNEL_PREFIX + "-", *(CHANNEL_PREFIX + s for s in wanted))
                    self.pubsub, self.subscribed = pubsub, wanted
                self._connected.set()
                backoff = 0.2
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5.0)
                    if message is not None and message.get("type") == "message":
                        await self._dispatch(message)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("sessions: Redis stream subscription lost (%s); participants here will resync",
                            exc.__class__.__name__)
            finally:
                self._connected.clear()
                self.pubsub = None
                try:
                    await client.aclose()
                except Exception:
                    pass
            lost, self.subscribed = self.subscribed, set()
            for session_id in lost:
                for tap in list(_taps.get(session_id, {}).values()):
                    try:
                        await tap.on_stream_lost()
                    except Exception:
                        log.exception("sessions: telling %s of a lost stream failed", tap.channel_name)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 3.0)

    async def _dispatch(self, message: dict[str, Any]) -> None:
        envelope = msgpack.unpackb(message["data"], raw=False)
        if envelope.get("o") == PROCESS_ID:
            return  # our own: delivered directly
        channel = message["channel"]
        channel = channel.decode() if isinstance(channel, bytes) else channel
        await deliver_local(channel[len(CHANNEL_PREFIX):], envelope["m"])


_relay_instance: _Relay | None = None
_relay_loop: asyncio.AbstractEventLoop | None = None


def _relay() -> _Relay:
    global _relay_instance, _relay_loop
    loop = asyncio.get_running_loop()
    if _relay_instance is None or _relay_loop is not loop:
        _relay_instance, _relay_loop = _Relay(), loop
    return _relay_instance
