"""The process-side owner of one session's terminal.

Exactly one Hub per live session, in whichever daphne process claimed it
(`services.claim_hub`). The shell and its PTY live in the environment's session keeper
(environments/keeper.py), not here: the hub attaches to it, keeps the screen model and the
recording, and fans output out to every participant through the channel layer group
`term.<id>`; participants anywhere reach it through its own channel (`hub.join`, `hub.input`,
`hub.resize`, ...). Every output chunk carries its stream offset (the keeper's, so it survives a
change of owner) so consumers can detect loss and ask for a resync.

When this process dies or shuts down, the shell keeps running in the keeper; the next process a
participant reaches takes the session over (`claim_hub` says "taken_over"), attaches again and
rebuilds the screen from the output the keeper kept.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

from channels.exceptions import ChannelFull
from channels.layers import get_channel_layer
from django.conf import settings

from environments import keeper, nodes, runtime
from environments.services import shell_session_identity
from lsl_site import dbpool, events
from sessions import fanout, services
from sessions.emulator import EmulatorUnavailable, get_emulator
from sessions.models import AuditKind, EndReason, TerminalSession
from sessions.recording import Recorder

log = logging.getLogger(__name__)

# Docker SDK calls block: they get their own threads, never the event loop or
# Django's thread-sensitive executor (where they would serialise with DB calls).
DOCKER_EXECUTOR = ThreadPoolExecutor(max_workers=16, thread_name_prefix="lsl-docker")

# After a read that brought at least BATCH_FROM bytes, the reader waits OUTPUT_BATCH (more with
# many participants, below) before reading again. The keeper hands a flood over in pieces of a
# few KiB; passed on as they come, that is thousands of websocket frames a second per participant.
# Waiting lets a flood gather into chunks of tens of KiB. Echoes and prompts are a few bytes: they
# never wait, so typing, even back to back, keeps its latency. A flood of tiny writes still
# batches: while the loop is busy, each read finds more than BATCH_FROM waiting.
OUTPUT_BATCH = 0.002
BATCH_FROM = 1024
# Every participant costs a websocket frame per chunk (a few tens of µs of Python each): with many
# watching, a flood waits longer between reads and travels in proportionally bigger chunks, so the
# frames per second stay about what a handful of participants cost. (Up to 20 ms: still smooth.)
OUTPUT_BATCH_PER_PARTICIPANT = 0.0004
OUTPUT_BATCH_MAX = 0.02
PACE_BACKLOG = 1024 * 1024
PACE_MAX_WAIT = 1.0
PACE_POLL = 0.005
RESIZE_DEBOUNCE = 0.1
QUIET_MARK = 0.05
HEARTBEAT = 2.0  # services.HUB_STALE_AFTER is three of these
TYPING_PRESENCE_EVERY = 1.0
PRESENCE_DEBOUNCE = 0.05
PRESENCE_DEBOUNCE_PER_MEMBER = 0.001
PRESENCE_DEBOUNCE_MAX = 1.0

HUBS: dict[str, "Hub"] = {}


async def in_docker_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(DOCKER_EXECUTOR, lambda: fn(*args, **kwargs))


@dataclass
class Member:
    channel: str
    user_id: int
    username: str
    role: str
    client: str
    participation_id: int
    cols: int | None = None
    rows: int | None = None

    @property
    def can_write(self) -> bool:
        return self.role in ("member", "admin")


class Hub:
    def __init__(self, session: TerminalSession, container_id: str, channel: str, *, takeover: bool,
                 engine: runtime.Engine) -> None:
        self.session_id = str(session.pk)
        self.engine = engine  # the environment's node's
        self.environment_id = str(session.environment_id)
        self.container_id = container_id
        self.channel = channel
        self.takeover = takeover  # the shell exists already: attach to it, never start a new one
        self.command = list(session.command) or ["/bin/sh"]
        self.cols, self.rows = session.cols, session.rows
        self.layer = get_channel_layer()
        # The screen model lives in the process's emulator (xterm.js in a node child process): the
        # hub only hands it each chunk, in order, so it never competes with delivery here.
        self.emulator = get_emulator()
        self._snapshot: tuple[tuple[int, int, int, bool], "asyncio.Future[bytes]"] | None = None
        self.recorder = Recorder(self.session_id, self.cols, self.rows, title=session.environment_name,
                                 started_at=session.created_at.timestamp())
        self.members: dict[str, Member] = {}
        self.offset = 0
        self.record_from = 0  # output before this offset was recorded by an earlier owner
        self.link: keeper.KeeperLink | None = None
        self.exit_code: int | None = None
        self.superseded = False  # another process took the session over (or fenced us): stop quietly
        self._presence_pending = False
        self.tasks: list[asyncio.Task[Any]] = []
        self.finished = asyncio.Event()
        self.end_reason: str | None = None
        self.last_typed_by: str | None = None
        self._last_typing_presence = 0.0
        self._resize_task: asyncio.Task[Any] | None = None
        self._idle_task: asyncio.Task[Any] | None = None
        self._mark_handle: asyncio.TimerHandle | None = None
        self._pending_input: dict[int, bytearray] = {}
        self._bus: events.EventBus | None = None
        self._bus_key: int | None = None

    # --- life cycle -------------------------------------------------------------

    async def start(self) -> None:
        user, user_env = await dbpool.run(shell_session_identity, self.container_id)  # the environment user
        uid, _, gid = (user or "0:0").partition(":")
        request = keeper.open_request(
            self.session_id, argv=self.command, uid=int(uid), gid=int(gid or uid), cwd=runtime.WORKSPACE_PATH,
            env={"TERM": "xterm-256color", **user_env}, cols=self.cols, rows=self.rows, from_offset=0,
            create=not self.takeover)
        self.link, hello = await keeper.open_link(self.engine, self.container_id, self.environment_id, in_docker_thread, request)
        # The stream goes on at the keeper's offsets. Taking over, the keeper replays what it kept
        # (the last LSL_KEEPER_RING bytes) and the screen is rebuilt from it; the recording goes on
        # from what was new.
        self.offset = hello.sent_from
        self.record_from = hello.end if self.takeover else 0
        if self.takeover:
            log.info("session %s: taken over (keeper at %d, replaying from %d%s)", self.session_id, hello.end,
                     hello.sent_from, ", earlier output is gone" if hello.sent_from > 0 else "")
            self.cols, self.rows = hello.cols, hello.rows
        self.emulator.open(self.session_id, self.cols, self.rows)
        HUBS[self.session_id] = self
        # Whoever ends the session (a user, a stopped environment, the worker), in whichever
        # process, records it and publishes `session.ended`; the owner hangs up when it hears it.
        self._bus = await events.bus()
        self._bus_key = self._bus.subscribe(self._on_event)
        for coro in (self._read_pty(), self._receive(), self._heartbeat(), self._flush_recording()):
            self.tasks.append(asyncio.create_task(coro))
        self._arm_idle_timer()

    async def _read_pty(self) -> None:
        assert self.link is not None
        ended = False
        while not ended:
            try:
                frames = keeper.coalesce_output(await self.link.read_frames(), header=self.link.header)
            except EOFError as exc:
                log.info("session %s: keeper link closed: %s", self.session_id, exc)
                if self.end_reason is None and not self.finished.is_set() and await self._reattach():
                    continue
                break
            before = self.offset
            for kind, payload in frames:
                ended = await self._on_frame(kind, payload)
                if ended:
                    break
            if self.offset - before >= BATCH_FROM:
                # Once per read, not per piece: a wait per 256 KiB piece would cap a flood at piece/wait.
                await asyncio.sleep(self._batch_delay())
                await self._pace()
            else:
                await asyncio.sleep(0)
        if self.superseded:
            await self._stand_down()
        else:
            await self._on_pty_closed()

    async def _on_frame(self, kind: bytes, payload: bytes) -> bool:
        """Handle one frame from the keeper; True when the stream is over (exit, or taken over)."""
        if kind == b"D":
            assert self.link is not None
            start, read_at, data = self.link.output(payload)
            if start != self.offset:
                # Only possible at a takeover whose replay lost older bytes; say so in the log.
                log.info("session %s: stream jumps %d -> %d", self.session_id, self.offset, start)
            self.offset = start + len(data)
            self.emulator.feed(self.session_id, data)
            if self.offset > self.record_from:
                self.recorder.output(data[max(0, self.record_from - start):])
            # `t`: when the keeper read it from the PTY, so the lag bound counts every queue on the way.
            await self._broadcast({"type": "term.output", "offset": start, "data": data, "t": read_at or time.time()})
            self._schedule_mark()
        elif kind == b"X":
            self.exit_code = int.from_bytes(payload[:4], "big", signed=True)
            return True
        elif kind == b"T":
            # Another process attached to this session: it owns it now. Not an end.
            log.warning("session %s: taken over by another process; stopping here", self.session_id)
            self.superseded = True
            return True
        elif kind == b"E":
            log.warning("session %s: keeper error: %s", self.session_id, payload.decode(errors="replace"))
        return False

    async def _pace(self) -> None:
        """The PTY goes at the pace of the fastest participant here: while every one of them holds
        more than PACE_BACKLOG unacknowledged, reading waits (and the keeper's back-pressure slows
        the shell), as a single terminal would. A participant slower than the others is not waited
        for: it falls behind and is resynced (docs/protocol.md, flow control). Bounded by
        PACE_MAX_WAIT, so participants who stop acking altogether cannot hold the PTY up."""
        deadline = time.monotonic() + PACE_MAX_WAIT
        while True:
            backlogs = [b for b in fanout.backlogs(self.session_id) if b is not None]
            if not backlogs or min(backlogs) <= PACE_BACKLOG or time.monotonic() > deadline:
                return
            await asyncio.sleep(PACE_POLL)

    def _batch_delay(self) -> float:
        return min(OUTPUT_BATCH_MAX, OUTPUT_BATCH + OUTPUT_BATCH_PER_PARTICIPANT * len(self.members))

    async def _broadcast(self, message: dict[str, Any]) -> None:
        """Send to every participant, in every process (sessions/fanout.py): once per process, never
        once per participant. Nothing here waits for Redis; a message lost on the way shows as a gap
        in offsets, and its participants resync."""
        await fanout.publish(self.session_id, message)

    async def _reattach(self) -> bool:
        """The link broke but maybe not the keeper (a `docker exec` relay dies with its dockerd):
        attach again from where the stream is, if the container still runs."""
        for attempt in range(3):
            await asyncio.sleep(0.3 * (attempt + 1))
            try:
                state = await in_docker_thread(self.engine.container_state, self.container_id)
                if state is None or not state.running:
                    return False
                request = keeper.open_request(self.session_id, argv=self.command, uid=0, gid=0, cwd="/", env={},
                                              cols=self.cols, rows=self.rows, from_offset=self.offset, create=False)
                self.link, _hello = await keeper.open_link(self.engine, self.container_id, self.environment_id,
                                                           in_docker_thread, request)
                log.info("session %s: attached to the keeper again at %d", self.session_id, self.offset)
                return True
            except (runtime.EngineError, asyncio.TimeoutError, EOFError) as exc:
                log.info("session %s: attaching again failed: %s", self.session_id, exc)
        return False

    def _schedule_mark(self) -> None:
        """Once output goes quiet, tell everyone where the stream is: a participant whose last chunks
        were lost on the way (a Redis hiccup, a full channel) learns it here, not at the next output."""
        if self._mark_handle is not None:
            self._mark_handle.cancel()
        loop = asyncio.get_running_loop()

        def mark() -> None:
            self.tasks.append(asyncio.create_task(self._broadcast({"type": "term.mark", "offset": self.offset})))
            self.tasks[:] = [t for t in self.tasks if not t.done()]

        self._mark_handle = loop.call_later(QUIET_MARK, mark)

    async def _on_pty_closed(self) -> None:
        code = self.exit_code
        reason = self.end_reason
        if reason is None and code is None:
            # The keeper went away without an exit: the container stopped, or was removed.
            reason = EndReason.EXITED
            try:
                state = await in_docker_thread(self.engine.container_state, self.container_id)
            except runtime.EngineUnavailableError:
                reason, state = EndReason.NODE_UNAVAILABLE, None  # gone with its engine, or cut off from it
            except runtime.EngineError:
                state = None
            if reason is not None:
                pass
            elif state is None:
                reason = EndReason.ENVIRONMENT_DELETED
            elif not state.running:
                reason = EndReason.ENVIRONMENT_STOPPED
        await self._finish(reason or EndReason.EXITED, code)
        if code is not None:
            # The end is recorded: the keeper may drop what it kept of this session.
            await in_docker_thread(keeper.forget_session, self.engine, self.container_id, self.environment_id, self.session_id)

    def _on_event(self, record: events.EventRecord) -> None:
        if record.kind == "session.ended" and record.session_id == self.session_id and not self.finished.is_set():
            reason = str(record.payload.get("reason") or EndReason.ENDED)
            self.tasks.append(asyncio.create_task(self.terminate(reason)))

    async def _finish(self, reason: str, code: int | None) -> None:
        if not self._leave_process():
            return
        # The recording is complete before anyone can learn that the session ended.
        await asyncio.wrap_future(self._recording_closed)
        await dbpool.run(services.mark_ended, self.session_id, reason, code)
        # The DB may hold an earlier reason (e.g. the environment was stopped): report that one.
        ended = await dbpool.run(TerminalSession.objects.values("end_reason", "exit_code").get, pk=self.session_id)
        await self._broadcast({"type": "term.exit", "code": ended["exit_code"] if ended["exit_code"] is not None else code,
                               "reason": ended["end_reason"] or reason})
        await self._let_go()

    async def _stand_down(self) -> None:
        """Stop serving without ending the session: the shell stays in the keeper for whoever owns
        the session now (or next). Participants here are not told of an end: there is none."""
        if self._leave_process():
            await self._let_go()

    def _leave_process(self) -> bool:
        """Once per hub: off this process's books (HUBS, the event bus, the recording). False if done already."""
        if self.finished.is_set():
            return False
        self.finished.set()
        HUBS.pop(self.session_id, None)
        if self._bus is not None and self._bus_key is not None:
            self._bus.unsubscribe(self._bus_key)
        self._recording_closed = self.recorder.close()
        self.emulator.close(self.session_id)
        return True

    async def _let_go(self) -> None:
        await self._flush_input_audit()
        for task in self.tasks:
            if task is not asyncio.current_task():
                task.cancel()
        if self.link is not None:
            self.link.close()

    async def release(self) -> None:
        """Graceful shutdown of this process: hand the session back (the next process a participant
        reaches takes it over at once) and stop serving. The shell keeps running."""
        await self._stand_down()
        await dbpool.run(services.release_hub, self.session_id, self.channel)

    async def terminate(self, reason: str) -> None:
        """Kill the shell (the keeper HUPs its process group, then KILLs it)."""
        if self.end_reason is None:
            self.end_reason = reason
        if self.link is not None:
            self.link.kill()
            await self.link.drain()
        for _ in range(30):  # the keeper's exit frame normally comes within its 1.5 s kill grace
            if self.finished.is_set():
                return
            await asyncio.sleep(0.1)
        if not self.finished.is_set():
            await self._finish(reason, None)

    # --- messages from participants ------------------------------------------------

    async def handle(self, message: dict[str, Any]) -> None:
        """One message from a participant: called directly by participants in this process (the
        fewest hops on the keystroke path), and by `_receive` for those in other processes."""
        handler = HANDLERS.get(message.get("type", ""))
        if handler is None:
            log.warning("session %s: unknown hub message %r", self.session_id, message.get("type"))
            return
        try:
            await handler(self, message)
        except Exception:
            log.exception("session %s: handling %s failed", self.session_id, message.get("type"))

    async def _receive(self) -> None:
        backoff = 0.1
        while not self.finished.is_set():
            try:
                message = await self.layer.receive(self.channel)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis down: keep trying, or the hub turns deaf for good once it is back
                log.warning("session %s: channel layer receive failed (%s); retrying in %.1fs", self.session_id, exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            backoff = 0.1
            await self.handle(message)

    async def _on_join(self, message: dict[str, Any]) -> None:
        member = Member(channel=message["channel"], user_id=message["user_id"], username=message["username"],
                        role=message["role"], client=message["client"], participation_id=message["participation_id"],
                        cols=message.get("cols"), rows=message.get("rows"))
        self.members[member.channel] = member
        if self._idle_task is not None:
            self._idle_task.cancel()
            self._idle_task = None
        self._snapshot_soon(member.channel, joining=True)
        self._presence_soon()
        self._schedule_resize()

    async def _on_leave(self, message: dict[str, Any]) -> None:
        self.members.pop(message["channel"], None)
        self._presence_soon()
        self._schedule_resize()
        self._arm_idle_timer()

    async def _on_role(self, message: dict[str, Any]) -> None:
        member = self.members.get(message["channel"])
        if member is not None:
            member.role = message["role"]
            self._presence_soon()
            self._schedule_resize()

    async def _on_input(self, message: dict[str, Any]) -> None:
        member = self.members.get(message["channel"])
        if member is None or not member.can_write or self.link is None:
            return  # defence in depth: consumers already refuse viewers' input
        data: bytes = message["data"]
        self.link.input(data)
        await self.link.drain()
        if settings.LSL_SESSION_RECORD_INPUT:
            self.recorder.input(data)
            self._pending_input.setdefault(member.user_id, bytearray()).extend(data)
        if self.last_typed_by != member.username or time.monotonic() - self._last_typing_presence > TYPING_PRESENCE_EVERY:
            changed = self.last_typed_by != member.username
            self.last_typed_by = member.username
            self._last_typing_presence = time.monotonic()
            if changed:
                self._presence_soon()

    async def _on_resize(self, message: dict[str, Any]) -> None:
        member = self.members.get(message["channel"])
        if member is not None:
            member.cols, member.rows = message["cols"], message["rows"]
            self._schedule_resize()

    async def _on_snapshot(self, message: dict[str, Any]) -> None:
        self._snapshot_soon(message["channel"], joining=False)

    async def _on_terminate(self, message: dict[str, Any]) -> None:
        await self.terminate(message.get("reason") or EndReason.ENDED)

    # --- outputs --------------------------------------------------------------------

    def _snapshot_soon(self, channel: str, *, joining: bool) -> None:
        """In a task of its own: the request may come from inside a delivery (a participant resyncing
        as output reaches it), and the output must not wait for the screen model."""
        self.tasks.append(asyncio.create_task(self._send_snapshot(channel, joining=joining)))
        self.tasks[:] = [t for t in self.tasks if not t.done()]

    async def _send_snapshot(self, channel: str, *, joining: bool) -> None:
        try:
            offset, data = await self._current_snapshot(scrollback=joining)
        except (EmulatorUnavailable, KeyError) as exc:
            # The participant asks again after SNAPSHOT_RETRY; the emulator restarts meanwhile.
            log.error("session %s: no snapshot for %s: %s", self.session_id, channel, exc)
            return
        message = {"type": "term.snapshot", "offset": offset, "data": data, "cols": self.cols, "rows": self.rows}
        tap = fanout.local_tap(channel)
        if tap is not None:  # a participant in this process: no channel layer
            await tap.on_stream(message)
            return
        try:
            await self.layer.send(channel, message)
        except ChannelFull:
            # The participant's queue is full of output it has not consumed yet; it asks
            # again if no snapshot arrives (see TerminalConsumer.SNAPSHOT_RETRY).
            log.warning("session %s: snapshot for %s dropped, its channel is full", self.session_id, channel)

    async def _current_snapshot(self, *, scrollback: bool) -> tuple[int, bytes]:
        """The screen at the current offset. Participants joining together (a class of 500 opening
        the same session) share one: it is rendered once per offset and size, not once per joiner.
        A joiner's carries scrollback to scroll up in; a resync's does not (it would pile the same
        lines up again in a real terminal's own scrollback, `lsl shell`'s)."""
        key = (self.offset, self.cols, self.rows, scrollback)
        if self._snapshot is not None and self._snapshot[0] == key:
            return key[0], await asyncio.shield(self._snapshot[1])
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._snapshot = (key, future)
        try:
            # Awaited here, not in a task: the request is pinned now, at exactly the bytes fed up to key[0].
            data = await self.emulator.snapshot(self.session_id, scrollback=None if scrollback else 0)
        except asyncio.CancelledError:
            self._snapshot = None
            future.cancel()
            raise
        except Exception as exc:
            self._snapshot = None
            future.set_exception(exc)
            future.exception()  # retrieved: whoever shares it gets the error; nobody else need
            raise
        future.set_result(data)
        return key[0], data

    def _presence_soon(self) -> None:
        """Coalesced: a storm of joins (hundreds of participants arriving) sends one presence list
        every so often, not one per join to everyone (quadratic in frames). The list grows with the
        crowd, so the pause does too: 50 ms for a pair, half a second for 500."""
        if not self._presence_pending:
            self._presence_pending = True
            self.tasks.append(asyncio.create_task(self._broadcast_presence_later()))

    async def _broadcast_presence_later(self) -> None:
        await asyncio.sleep(min(PRESENCE_DEBOUNCE_MAX, PRESENCE_DEBOUNCE + PRESENCE_DEBOUNCE_PER_MEMBER * len(self.members)))
        self._presence_pending = False
        participants = [{"id": m.participation_id, "user": m.username, "role": m.role, "client": m.client,
                         "typing": m.username == self.last_typed_by} for m in self.members.values()]
        await self._control({"type": "presence", "participants": participants, "last_typed_by": self.last_typed_by})

    async def _control(self, payload: dict[str, Any]) -> None:
        """A JSON message for every participant, encoded once here (not once per participant)."""
        await self._broadcast({"type": "term.control", "payload": payload, "text": json.dumps(payload)})

    def _schedule_resize(self) -> None:
        if self._resize_task is not None:
            self._resize_task.cancel()
        self._resize_task = asyncio.create_task(self._apply_resize_later())

    async def _apply_resize_later(self) -> None:
        await asyncio.sleep(RESIZE_DEBOUNCE)
        sizes = [(m.cols, m.rows) for m in self.members.values() if m.can_write and m.cols and m.rows]
        if not sizes:
            return  # viewers never shrink the PTY; with no writer the size stays
        cols, rows = min(c for c, _ in sizes), min(r for _, r in sizes)
        if (cols, rows) == (self.cols, self.rows):
            return
        self.cols, self.rows = cols, rows
        assert self.link is not None
        self.link.resize(cols, rows)
        self.emulator.resize(self.session_id, cols, rows)
        self.recorder.resize(cols, rows)
        await dbpool.run(services.set_size, self.session_id, cols, rows, None)
        await self._control({"type": "resize", "cols": cols, "rows": rows})

    def _arm_idle_timer(self) -> None:
        if self.members or self.finished.is_set():
            return
        if self._idle_task is not None:
            self._idle_task.cancel()
        self._idle_task = asyncio.create_task(self._end_when_idle())

    async def _end_when_idle(self) -> None:
        await asyncio.sleep(settings.LSL_SESSION_IDLE_TIMEOUT)
        if not self.members:
            await self.terminate(EndReason.IDLE)

    async def _heartbeat(self) -> None:
        while not self.finished.is_set():
            try:
                # Not in the shared thread-sensitive executor: behind a queue of joins (hundreds of
                # participants arriving) a renewal came late enough for the reaper to release a live hub.
                renewed = await dbpool.run(services.heartbeat, self.session_id, self.channel)
            except Exception as exc:  # the database restarting: try again; a long outage makes us stale
                log.warning("session %s: heartbeat failed: %s", self.session_id, exc)
                renewed = True
            if not renewed:
                # Fenced: another process took the session over, or it was ended while we could
                # not renew. Serving on would be split brain: stop now (the shell is not ours to kill).
                log.warning("session %s: lost ownership; standing down", self.session_id)
                self.superseded = True
                await self._stand_down()
                return
            await self._flush_input_audit()
            await asyncio.sleep(HEARTBEAT)

    async def _flush_recording(self) -> None:
        while not self.finished.is_set():
            await asyncio.sleep(1.0)
            self.recorder.flush()

    async def _flush_input_audit(self) -> None:
        """Input is audited per user in batches, not per keystroke."""
        pending, self._pending_input = self._pending_input, {}
        for user_id, data in pending.items():
            await dbpool.run(services.record_event, self.session_id, AuditKind.INPUT, user_id,
                             text=bytes(data).decode("utf-8", errors="replace"))


HANDLERS: dict[str, Callable[[Hub, dict[str, Any]], Any]] = {
    "hub.join": Hub._on_join, "hub.leave": Hub._on_leave, "hub.input": Hub._on_input, "hub.resize": Hub._on_resize,
    "hub.snapshot": Hub._on_snapshot, "hub.terminate": Hub._on_terminate, "hub.role": Hub._on_role,
}


class ShuttingDown(Exception):
    """This process is shutting down (SIGTERM): it takes no session on; the client reconnects elsewhere."""


# Set by `release_all` (SIGTERM). From then on this process claims no session: the sessions it hands
# back are announced (`session.detached`), and its own participants, still attached for a moment,
# would otherwise follow them straight back here, claiming each for a process about to exit. The
# claim would outlive the process: the session frozen until it went stale (HUB_STALE_AFTER), and
# input sent to the dead owner meanwhile lost (seen in a rolling restart behind nginx).
_shutting_down = False


async def ensure_hub(session_id: str) -> str:
    """Return the channel of the session's hub, starting one in this process if nobody owns it.

    Raises LookupError if the session is over (or its owner process died), ShuttingDown if this
    process is on its way out.
    """
    if _shutting_down:
        raise ShuttingDown()
    hub = HUBS.get(session_id)
    if hub is not None and not hub.finished.is_set():
        return hub.channel
    # A plain (not process-local "!") channel: channels-redis serves process-local
    # channels through one shared receive loop, and a hub that receives there next
    # to its own consumers starved them in testing. One reader per plain channel is fine.
    channel = f"lslhub.{uuid.UUID(session_id).hex}.{uuid.uuid4().hex[:12]}"
    for _ in range(3):
        outcome = await dbpool.run(services.claim_hub, session_id, channel)
        session = await dbpool.run(TerminalSession.objects.select_related("environment", "environment__node").get, pk=session_id)
        if outcome != "remote" or session.hub_channel:
            break
        # Released between the claim and the read (its owner shut down, or the reaper): claim again.
    if outcome == "remote":
        if not session.hub_channel:
            raise LookupError(EndReason.SERVER_ERROR)
        return session.hub_channel
    if outcome not in ("claimed", "taken_over"):
        raise LookupError(session.end_reason or "ended")
    env = session.environment
    if env is None or not env.container_id:
        await dbpool.run(services.mark_ended, session_id, EndReason.SERVER_ERROR, None)
        raise LookupError(EndReason.SERVER_ERROR)
    try:
        engine = nodes.engine_for(env)
    except runtime.NodeUnavailableError as exc:
        await dbpool.run(services.mark_ended, session_id, EndReason.NODE_UNAVAILABLE, None)
        raise LookupError(EndReason.NODE_UNAVAILABLE) from exc
    hub = Hub(session, env.container_id, channel, takeover=outcome == "taken_over", engine=engine)
    try:
        await hub.start()
    except runtime.EngineError as exc:
        # Taking over, "no such session": the keeper lost the shell (its container restarted).
        reason = EndReason.SERVER_LOST if hub.takeover else EndReason.SERVER_ERROR
        log.warning("session %s: could not %s the terminal: %s", session_id,
                    "attach to" if hub.takeover else "open", exc)
        hub.recorder.close()
        await dbpool.run(services.mark_ended, session_id, reason, None)
        raise LookupError(reason) from exc
    if _shutting_down:
        # Claimed while `release_all` ran: hand it back too, or it would be frozen until it went stale.
        await hub.release()
        raise ShuttingDown()
    return channel


async def release_all() -> None:
    """On SIGTERM: hand every session this process owns back, shells untouched (see Hub.release),
    and take none on from now on (`_shutting_down`)."""
    global _shutting_down
    _shutting_down = True
    await asyncio.gather(*(hub.release() for hub in list(HUBS.values())), return_exceptions=True)
