"""Pure-logic tests of a participant's stream bookkeeping (offsets, held output, lost snapshots).

The consumer runs without a server here: its hub and websocket are replaced by lists,
which is all these paths touch. Everything end to end is in test_sessions*.py."""

from __future__ import annotations

import collections

import asyncio
import time
from typing import Any

from autobahn.exception import Disconnected

from sessions import consumers, fanout
from sessions.consumers import TerminalConsumer


class Harness(TerminalConsumer):
    """A consumer whose hub messages and websocket frames are recorded, not sent."""

    def __init__(self) -> None:
        self.session_id, self.channel_name, self.hub_channel = "s", "c", "hub"
        self.window, self.sent, self.acked = 1 << 20, 0, 0
        self.expected_offset: int | None = None
        self.paused_since = None
        self.awaiting_snapshot, self.kicked = True, False
        self.snapshot_requested_at = time.monotonic()
        self.held, self.held_bytes, self.held_overflow = [], 0, False
        self.inflight = collections.deque()
        self.to_hub: list[str] = []
        self.frames: list[Any] = []

    async def _resolve_hub(self) -> str:
        self.resolved = getattr(self, "resolved", 0) + 1
        return "hub"

    async def _to_hub(self, kind: str, **fields: Any) -> None:
        self.to_hub.append(kind)

    async def send(self, text_data: str | None = None, bytes_data: bytes | None = None, close: bool = False) -> None:
        self.frames.append(bytes_data if bytes_data is not None else text_data)

    def output(self) -> bytes:
        return b"".join(f for f in self.frames if isinstance(f, bytes))


def snapshot(offset: int, data: bytes = b"SCREEN") -> dict[str, Any]:
    return {"type": "term.snapshot", "offset": offset, "data": data, "cols": 80, "rows": 24}


def test_output_held_during_a_snapshot_is_replayed_past_its_offset() -> None:
    async def scenario() -> Harness:
        c = Harness()
        await c.term_output({"offset": 0, "data": b"abc"})  # before the snapshot's offset: covered by it
        await c.term_output({"offset": 3, "data": b"def"})  # straddles it
        await c.term_output({"offset": 6, "data": b"ghi"})
        await c.term_snapshot(snapshot(4))
        await c.term_output({"offset": 9, "data": b"jkl"})
        return c

    c = asyncio.run(scenario())
    assert c.output() == b"SCREEN" + b"ef" + b"ghi" + b"jkl"
    assert c.to_hub == [] and c.expected_offset == 12


def test_a_gap_in_held_output_asks_for_one_new_snapshot_not_one_per_chunk() -> None:
    async def scenario() -> Harness:
        c = Harness()
        await c.term_output({"offset": 10, "data": b"x"})  # 0..10 were dropped on the way
        await c.term_output({"offset": 11, "data": b"y"})
        await c.term_output({"offset": 12, "data": b"z"})
        await c.term_snapshot(snapshot(5))
        return c

    c = asyncio.run(scenario())
    assert c.to_hub == ["hub.snapshot"]
    assert c.awaiting_snapshot and c.output() == b"SCREEN"


def test_a_lost_snapshot_is_asked_for_again_after_the_retry_interval() -> None:
    async def scenario() -> Harness:
        c = Harness()
        await c._retry_lost_snapshot()  # just asked: wait for the answer
        c.snapshot_requested_at -= consumers.SNAPSHOT_RETRY + 0.1
        await c._retry_lost_snapshot()
        await c._retry_lost_snapshot()  # the new request restarted the clock
        return c

    harness = asyncio.run(scenario())
    assert harness.to_hub == ["hub.snapshot"]
    assert harness.resolved == 1, "asks whoever owns the session now, not the channel it joined"


def test_a_kicked_or_answered_participant_does_not_ask_again() -> None:
    async def scenario() -> tuple[Harness, Harness]:
        kicked, answered = Harness(), Harness()
        kicked.kicked = True
        await answered.term_snapshot(snapshot(0))
        for c in (kicked, answered):
            c.snapshot_requested_at -= consumers.SNAPSHOT_RETRY + 0.1
            await c._retry_lost_snapshot()
        return kicked, answered

    kicked, answered = asyncio.run(scenario())
    assert kicked.to_hub == [] and answered.to_hub == []


def test_a_frame_for_a_client_that_already_left_does_not_end_the_consumer() -> None:
    """A broadcast racing the client's close must not kill the consumer: its disconnect() still has to run
    (leave the group, tell the hub), or the session keeps a ghost member and never goes idle."""

    class Gone(Harness):
        send = TerminalConsumer.send
        close = TerminalConsumer.close

    async def closed_protocol(message: dict[str, Any]) -> None:
        raise Disconnected("Attempt to send on a closed protocol")

    async def scenario() -> None:
        c = Gone()
        c.base_send = closed_protocol
        await c.term_control({"type": "term.control", "payload": {"type": "presence", "participants": []}})
        await c.close(code=4408)

    asyncio.run(scenario())  # raises if Disconnected escapes


# --- pausing and resuming (flow control, docs/protocol.md) ---------------------------------

class FlowHarness(Harness):
    """A streaming participant with a tiny window, in the session's stream, and the hub's offset."""

    def __init__(self) -> None:
        super().__init__()
        self.window, self.user = 16, "alice"
        self.awaiting_snapshot, self.expected_offset = False, 0
        self.hub_offset = 0

    async def publish(self, data: bytes) -> None:
        """The hub publishes a chunk to everyone in the session's stream (this participant only if it is in it)."""
        await fanout.publish(self.session_id, {"type": "term.output", "offset": self.hub_offset, "data": data,
                                               "t": time.time()})
        self.hub_offset += len(data)

    async def answer_snapshot_requests(self) -> None:
        """The hub answers each request with the screen at its current offset."""
        while "hub.snapshot" in self.to_hub:
            self.to_hub.remove("hub.snapshot")
            await self.term_snapshot(snapshot(self.hub_offset))

    def in_stream(self) -> bool:
        return self.channel_name in {t.channel_name for t in fanout._taps.get(self.session_id, {}).values()}


def test_a_participant_paused_again_while_its_resync_is_replayed_gets_back_into_the_stream() -> None:
    """The flake of test_slow_reader_is_resynced_to_the_final_screen: a slow reader's resync snapshot comes
    late (node is busy), the output held meanwhile overflows, and replaying what was held pauses the reader
    again. The overflow used to ask for another snapshot right then, paused and out of the session's
    stream: its answer ended the pause without rejoining the stream, so the reader heard no output, no
    quiet mark and no resync ever again (and, no longer paused, nothing watched it)."""
    async def scenario() -> FlowHarness:
        c = FlowHarness()
        await fanout.join(c.session_id, c)
        try:
            await c.publish(b"a" * 20)  # sent, not acked
            await c.publish(b"b" * 4)  # 20 > 16 unacked: paused, out of the stream
            assert c.paused_since is not None and not c.in_stream()
            await c._on_ack(12)  # 8 behind <= window/2: back in the stream, a snapshot asked for
            assert c.to_hub == ["hub.snapshot"] and c.in_stream()
            for chunk in (b"c" * 8, b"d" * 8, b"e" * 8):  # the snapshot is slow: 16 bytes held, then overflow
                await c.publish(chunk)
            assert c.held_overflow
            c.to_hub.remove("hub.snapshot")
            await c.term_snapshot(snapshot(24))  # SCREEN + "c"*8 sent, "d"*8 would be 22 > 16 unacked: paused again
            assert c.paused_since is not None and not c.in_stream()
            for _ in range(3):  # the reader reads everything and acks it; the hub answers whatever it was asked
                await c._on_ack(c.sent)
                await c.answer_snapshot_requests()
                await c.watch()
            await c.publish(b"LIVE")
            return c
        finally:
            fanout.leave(c.session_id, c)

    c = asyncio.run(scenario())
    assert c.output().endswith(b"LIVE"), "the participant was left out of the session's stream for good"
    assert c.paused_since is None and not c.awaiting_snapshot and c.expected_offset == c.hub_offset


def test_a_caught_up_participant_is_not_kicked_while_its_resync_snapshot_is_slow(settings: Any) -> None:
    """Once the reader has caught up, the pause is over: a snapshot that takes longer than the stall timeout
    (node starved on a busy machine) is retried, never a reason to close the reader as too slow."""
    settings.LSL_SESSION_STALL_TIMEOUT = 5.0

    async def scenario() -> FlowHarness:
        c = FlowHarness()
        c.closed_with = None

        async def close(code: int | bool | None = None, reason: str | None = None) -> None:
            c.closed_with = code

        c.close = close  # type: ignore[method-assign]
        await fanout.join(c.session_id, c)
        try:
            await c.publish(b"a" * 20)
            await c.publish(b"b" * 4)  # paused
            await c._on_ack(c.sent)  # caught up: a snapshot is asked for
            if c.paused_since is not None:
                c.paused_since -= settings.LSL_SESSION_STALL_TIMEOUT + 1  # ...and it is this slow
            c.snapshot_requested_at -= consumers.SNAPSHOT_RETRY + 0.1
            await c.watch()
            await asyncio.sleep(0)  # a kick runs in a task of its own
            return c
        finally:
            fanout.leave(c.session_id, c)

    c = asyncio.run(scenario())
    assert not c.kicked and c.closed_with is None
    assert c.awaiting_snapshot and c.to_hub == ["hub.snapshot", "hub.snapshot"], "asked again, not kicked"


def test_a_paused_participant_whose_client_caught_up_is_resumed_by_the_watchdog() -> None:
    """The ack that caught the client up came while a snapshot was in flight, and that snapshot's replay
    paused it again without sending anything new: no further ack will come. The watchdog resumes it."""
    async def scenario() -> FlowHarness:
        c = FlowHarness()
        await fanout.join(c.session_id, c)
        try:
            await c.publish(b"a" * 20)
            await c.publish(b"b" * 4)  # paused
            c.acked = c.sent  # acked while it could not resume (the ack path is tested above)
            await c.watch()
            c.rejoined = c.in_stream()
            return c
        finally:
            fanout.leave(c.session_id, c)

    c = asyncio.run(scenario())
    assert c.to_hub == ["hub.snapshot"] and c.awaiting_snapshot and c.paused_since is None and c.rejoined


# --- the lag bound (docs/protocol.md, "Server-side lag bound") ------------------------------

class LagHarness(Harness):
    def __init__(self) -> None:
        super().__init__()
        self.closed_with, self.user = None, "alice"
        self.awaiting_snapshot, self.expected_offset = False, 0

    async def close(self, code: int | bool | None = None, reason: str | None = None) -> None:
        self.closed_with = code

    def texts(self) -> list[str]:
        return [f for f in self.frames if isinstance(f, str)]


def test_output_that_waited_too_long_in_the_server_is_skipped_for_a_snapshot(settings: Any) -> None:
    settings.LSL_SESSION_MAX_LAG = 2.0

    async def scenario() -> LagHarness:
        c = LagHarness()
        await c.term_output({"offset": 0, "data": b"fresh", "t": time.time()})
        await c.term_output({"offset": 5, "data": b"stale", "t": time.time() - 3})
        return c

    c = asyncio.run(scenario())
    assert c.output() == b"fresh" and c.to_hub == ["hub.snapshot"] and c.awaiting_snapshot
    assert '"lagging"' in c.texts()[0]


def test_a_client_that_holds_old_unacked_output_is_paused_then_resynced(settings: Any) -> None:
    settings.LSL_SESSION_MAX_LAG = 2.0
    chunk = b"x" * (40 * 1024)

    async def scenario() -> LagHarness:
        c = LagHarness()
        await fanout.join(c.session_id, c)  # the session's stream in this process (no Redis in tests)
        old = time.time() - 3  # read from the PTY 3 s ago, still unacked
        await c.term_output({"offset": 0, "data": chunk, "t": time.time()})
        c.inflight[0] = (c.inflight[0][0], old)
        await c.term_output({"offset": len(chunk), "data": chunk, "t": time.time()})  # 40 KiB unacked: not yet
        await c.term_output({"offset": 2 * len(chunk), "data": chunk, "t": time.time()})  # 80 KiB, oldest 3 s
        return c

    c = asyncio.run(scenario())
    assert c.output() == chunk * 2, "the third chunk is held back"
    # Paused, it left the stream: it costs the process nothing per chunk until it catches up.
    assert c.paused_since is not None and fanout.local_count(c.session_id) == 0 and '"lagging"' in c.texts()[0]
    # Nothing stale in flight once acked: a client that keeps up never trips it.
    fresh = LagHarness()
    asyncio.run(fresh.term_output({"offset": 0, "data": chunk * 3, "t": time.time()}))
    assert fresh.paused_since is None


def test_too_many_lag_resyncs_close_with_too_slow(settings: Any) -> None:
    settings.LSL_SESSION_MAX_LAG, settings.LSL_SESSION_MAX_LAG_RESYNCS = 1.0, 2

    async def scenario() -> LagHarness:
        c = LagHarness()
        for i in range(3):
            c.awaiting_snapshot = False
            await c.term_output({"offset": i, "data": b"s", "t": time.time() - 5})
        return c

    c = asyncio.run(scenario())
    assert c.kicked and c.closed_with == 4408 and any('"too_slow"' in t for t in c.texts())


def test_output_lost_at_the_end_of_a_burst_is_noticed_at_the_quiet_mark() -> None:
    async def scenario() -> LagHarness:
        c = LagHarness()
        await c.term_output({"offset": 0, "data": b"abc", "t": time.time()})
        await c.term_mark({"offset": 3})  # all there: nothing to do
        assert c.to_hub == []
        await c.term_mark({"offset": 9})  # 3..9 never came
        return c

    c = asyncio.run(scenario())
    assert c.to_hub == ["hub.snapshot"] and c.awaiting_snapshot


# --- fan-out (sessions/fanout.py) -----------------------------------------------------------

class Tap:
    backlog = None

    def __init__(self, name: str) -> None:
        self.channel_name, self.got, self.lost = name, [], 0

    async def on_stream(self, message: dict[str, Any]) -> None:
        self.got.append(message)

    async def on_stream_lost(self) -> None:
        self.lost += 1


def test_a_chunk_reaches_every_local_participant_as_one_object_and_leavers_get_nothing() -> None:
    async def scenario() -> list[Tap]:
        taps = [Tap(f"c{i}") for i in range(50)]
        for tap in taps:
            await fanout.join("fan", tap)
        fanout.leave("fan", taps[0])
        message = {"type": "term.output", "offset": 0, "data": b"x" * 65536, "t": time.time()}
        await fanout.publish("fan", message)
        for tap in taps[1:]:
            fanout.leave("fan", tap)
        return taps

    taps = asyncio.run(scenario())
    assert taps[0].got == []
    first = taps[1].got[0]
    # No per-participant copies: the very same message (and bytes) for all 49.
    assert all(len(t.got) == 1 and t.got[0] is first for t in taps[1:])
    assert fanout.local_count("fan") == 0


def test_a_relayed_message_from_this_process_is_not_delivered_twice() -> None:
    """With Redis, a process hears its own publications too; its participants were served directly."""
    async def scenario() -> tuple[Tap, Tap]:
        mine, theirs = Tap("mine"), Tap("theirs")
        await fanout.join("own", mine)
        await fanout.join("other", theirs)
        relay = object.__new__(fanout._Relay)  # only _dispatch is exercised: no Redis connection
        envelope = {"type": "message", "channel": b"lsl:term:own",
                    "data": fanout.msgpack.packb({"o": fanout.PROCESS_ID, "m": {"type": "term.mark", "offset": 1}})}
        await relay._dispatch(envelope)
        envelope = {"type": "message", "channel": b"lsl:term:other",
                    "data": fanout.msgpack.packb({"o": "another-process", "m": {"type": "term.mark", "offset": 2}})}
        await relay._dispatch(envelope)
        fanout.leave("own", mine)
        fanout.leave("other", theirs)
        return mine, theirs

    mine, theirs = asyncio.run(scenario())
    assert mine.got == [] and theirs.got == [{"type": "term.mark", "offset": 2}]


def test_the_pty_waits_for_the_fastest_participant_only_and_never_for_long(monkeypatch: Any) -> None:
    """hub._pace: reading waits while *every* local participant holds more than PACE_BACKLOG
    unacknowledged; one that keeps up is enough to go on; nobody acking holds it PACE_MAX_WAIT at most."""
    from sessions import hub as hubs

    monkeypatch.setattr(hubs, "PACE_BACKLOG", 100)
    monkeypatch.setattr(hubs, "PACE_MAX_WAIT", 3.0)
    monkeypatch.setattr(hubs, "PACE_POLL", 0.01)

    async def scenario() -> tuple[float, float, float]:
        hub = object.__new__(hubs.Hub)
        hub.session_id = "pace"
        slow, fast, paused = Tap("slow"), Tap("fast"), Tap("paused")
        for tap in (slow, fast, paused):
            await fanout.join("pace", tap)
        slow.backlog, fast.backlog, paused.backlog = 1000, 50, None
        t0 = time.monotonic()
        await hub._pace()  # the fast one keeps up: no wait, however far the slow one is behind
        no_wait = time.monotonic() - t0
        fast.backlog = 1000

        async def catch_up() -> None:
            await asyncio.sleep(0.1)
            fast.backlog = 0

        t0 = time.monotonic()
        await asyncio.gather(hub._pace(), catch_up())
        waited = time.monotonic() - t0
        fast.backlog = 1000
        monkeypatch.setattr(hubs, "PACE_MAX_WAIT", 0.3)
        t0 = time.monotonic()
        await hub._pace()  # nobody acks: bounded
        bounded = time.monotonic() - t0
        for tap in (slow, fast, paused):
            fanout.leave("pace", tap)
        return no_wait, waited, bounded

    no_wait, waited, bounded = asyncio.run(scenario())
    assert no_wait < 0.05
    assert 0.08 < waited < 2.0, "waits until the fastest participant has caught up, not PACE_MAX_WAIT"
    assert 0.28 < bounded < 2.0, "gives up after PACE_MAX_WAIT"
