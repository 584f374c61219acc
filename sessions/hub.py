"""The process-side owner of one session's PTY.

Exactly one Hub per live session, in whichever daphne process claimed it
(`services.claim_hub`). It reads the exec socket, keeps the screen model and
the recording, and fans output out to every participant through the channel
layer group `term.<id>`; participants anywhere reach it through its own channel
(`hub.join`, `hub.input`, `hub.resize`, ...). Every output chunk carries its
stream offset so consumers can detect loss and ask for a resync.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

from channels.db import database_sync_to_async
from channels.exceptions import ChannelFull
from channels.layers import get_channel_layer
from django.conf import settings

from environments import runtime
from environments.services import shell_session_identity
from lsl_site import events
from sessions import services
from sessions.models import AuditKind, EndReason, TerminalSession
from sessions.recording import Recorder
from sessions.screen import ScreenState

log = logging.getLogger(__name__)

# Docker SDK calls block: they get their own threads, never the event loop or
# Django's thread-sensitive executor (where they would serialise with DB calls).
DOCKER_EXECUTOR = ThreadPoolExecutor(max_workers=16, thread_name_prefix="lsl-docker")
# Terminal emulation is CPU-bound Python; one thread keeps it ordered per process.
SCREEN_EXECUTOR = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lsl-screen")

READ_SIZE = 256 * 1024
# After passing on a chunk of at least BATCH_FROM bytes, the reader waits
# OUTPUT_BATCH before reading again. The engine hands over a flood in ~4 KiB
# pieces; read as they come, that is thousands of channel messages a second, more
# than consumers drain, so their queues fill and drop (each drop costs a participant
# a resync). Waiting lets a flood gather into chunks of ~24 KiB (measured), a sixth
# as many messages. Echoes and prompts are a few bytes: they never wait, so typing,
# even back to back, keeps its latency. A flood of tiny writes still batches: while
# the loop is busy, each read finds more than BATCH_FROM waiting.
OUTPUT_BATCH = 0.002
BATCH_FROM = 1024
RESIZE_DEBOUNCE = 0.1
QUIET_FLUSH = 0.05
HEARTBEAT = 2.0  # services.HUB_STALE_AFTER is three of these
TYPING_PRESENCE_EVERY = 1.0

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
    def __init__(self, session: TerminalSession, container_id: str, channel: str) -> None:
        self.session_id = str(session.pk)
        self.group = session.group_name
        self.container_id = container_id
        self.channel = channel
        self.command = services.session_command(session.pk, session.command[0] if session.command else "/bin/sh")
        self.cols, self.rows = session.cols, session.rows
        self.layer = get_channel_layer()
        self.screen = ScreenState(self.cols, self.rows)
        self.recorder = Recorder(self.session_id, self.cols, self.rows, title=session.environment_name)
        self.members: dict[str, Member] = {}
        self.offset = 0
        self.exec: runtime.ExecSocket | None = None
        self.tasks: list[asyncio.Task[Any]] = []
        self.finished = asyncio.Event()
        self.end_reason: str | None = None
        self.last_typed_by: str | None = None
        self._last_typing_presence = 0.0
        self._resize_task: asyncio.Task[Any] | None = None
        self._idle_task: asyncio.Task[Any] | None = None
        self._flush_handle: asyncio.TimerHandle | None = None
        self._pending_input: dict[int, bytearray] = {}
        self._bus: events.EventBus | None = None
        self._bus_key: int | None = None

    # --- life cycle -------------------------------------------------------------

    async def start(self) -> None:
        user, user_env = await database_sync_to_async(shell_session_identity)(self.container_id)  # the environment user
        self.exec = await in_docker_thread(runtime.exec_open_tty, self.container_id, self.command,
                                           cols=self.cols, rows=self.rows, workdir=runtime.WORKSPACE_PATH, user=user, environment=user_env)
        self.exec.sock.setblocking(False)
        HUBS[self.session_id] = self
        # Whoever ends the session (a user, a stopped environment, the worker), in whichever
        # process, records it and publishes `session.ended`; the owner hangs up when it hears it.
        self._bus = await events.bus()
        self._bus_key = self._bus.subscribe(self._on_event)
        for coro in (self._read_pty(), self._receive(), self._heartbeat(), self._flush_recording()):
            self.tasks.append(asyncio.create_task(coro))
        self._arm_idle_timer()

    async def _read_pty(self) -> None:
        assert self.exec is not None
        loop = asyncio.get_running_loop()
        sock = self.exec.sock
        try:
            while True:
                data = await loop.sock_recv(sock, READ_SIZE)
                if not data:
                    break
                start = self.offset
                self.offset += len(data)
                self.screen.append(data)
                self.recorder.output(data)
                await self.layer.group_send(self.group, {"type": "term.output", "offset": start, "data": data})
                self._schedule_quiet_flush()
                await asyncio.sleep(OUTPUT_BATCH if len(data) >= BATCH_FROM else 0)
        except (OSError, asyncio.CancelledError) as exc:
            if isinstance(exc, asyncio.CancelledError):
                raise
            log.info("session %s: PTY read ended: %s", self.session_id, exc)
        await self._on_pty_closed()

    def _schedule_quiet_flush(self) -> None:
        """Emulate queued output once it goes quiet, so snapshots stay cheap and exact."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        loop = asyncio.get_running_loop()

        def flush() -> None:
            reset, data = self.screen.detach()
            loop.run_in_executor(SCREEN_EXECUTOR, self.screen.feed, reset, data)

        self._flush_handle = loop.call_later(QUIET_FLUSH, flush)

    async def _on_pty_closed(self) -> None:
        code = None
        if self.exec is not None:
            try:
                code = await in_docker_thread(runtime.exec_exit_code, self.exec.exec_id)
            except runtime.EngineError:
                code = None
        reason = self.end_reason
        if reason is None:
            reason = EndReason.EXITED
            try:
                state = await in_docker_thread(runtime.container_state, self.container_id)
            except runtime.EngineError:
                state = None
            if state is None:
                reason = EndReason.ENVIRONMENT_DELETED
            elif not state.running:
                reason = EndReason.ENVIRONMENT_STOPPED
        await self._finish(reason, code)

    def _on_event(self, record: events.EventRecord) -> None:
        if record.kind == "session.ended" and record.session_id == self.session_id and not self.finished.is_set():
            reason = str(record.payload.get("reason") or EndReason.ENDED)
            self.tasks.append(asyncio.create_task(self.terminate(reason)))

    async def _finish(self, reason: str, code: int | None) -> None:
        if self.finished.is_set():
            return
        self.finished.set()
        HUBS.pop(self.session_id, None)
        if self._bus is not None and self._bus_key is not None:
            self._bus.unsubscribe(self._bus_key)
        self.recorder.close()
        await database_sync_to_async(services.mark_ended)(self.session_id, reason, code)
        # The DB may hold an earlier reason (e.g. the environment was stopped): report that one.
        ended = await database_sync_to_async(TerminalSession.objects.values("end_reason", "exit_code").get)(pk=self.session_id)
        await self.layer.group_send(self.group, {"type": "term.exit", "code": ended["exit_code"] if ended["exit_code"] is not None else code,
                                                 "reason": ended["end_reason"] or reason})
        await self._flush_input_audit()
        for task in self.tasks:
            if task is not asyncio.current_task():
                task.cancel()
        if self.exec is not None:
            try:
                self.exec.sock.close()
            except OSError:
                pass

    async def terminate(self, reason: str) -> None:
        """Kill the shell (HUP, then KILL): Docker has no API to kill an exec."""
        if self.end_reason is None:
            self.end_reason = reason
        try:
            await in_docker_thread(runtime.exec_run, self.container_id, services.kill_shell_command(self.session_id))
        except runtime.EngineError as exc:
            log.info("session %s: kill failed (%s); closing the socket", self.session_id, exc)
        await asyncio.sleep(0.5)
        if not self.finished.is_set() and self.exec is not None:
            try:
                self.exec.sock.close()  # the reader sees EOF and finishes
            except OSError:
                pass
            await asyncio.sleep(0.2)
            if not self.finished.is_set():
                await self._finish(reason, None)

    # --- messages from participants ------------------------------------------------

    async def _receive(self) -> None:
        handlers = {
            "hub.join": self._on_join, "hub.leave": self._on_leave, "hub.input": self._on_input,
            "hub.resize": self._on_resize, "hub.snapshot": self._on_snapshot, "hub.terminate": self._on_terminate,
            "hub.role": self._on_role,
        }
        while not self.finished.is_set():
            message = await self.layer.receive(self.channel)
            handler = handlers.get(message.get("type", ""))
            if handler is None:
                log.warning("session %s: unknown hub message %r", self.session_id, message.get("type"))
                continue
            try:
                await handler(message)
            except Exception:
                log.exception("session %s: handling %s failed", self.session_id, message.get("type"))

    async def _on_join(self, message: dict[str, Any]) -> None:
        member = Member(channel=message["channel"], user_id=message["user_id"], username=message["username"],
                        role=message["role"], client=message["client"], participation_id=message["participation_id"],
                        cols=message.get("cols"), rows=message.get("rows"))
        self.members[member.channel] = member
        if self._idle_task is not None:
            self._idle_task.cancel()
            self._idle_task = None
        await self._send_snapshot(member.channel)
        await self._broadcast_presence()
        self._schedule_resize()

    async def _on_leave(self, message: dict[str, Any]) -> None:
        self.members.pop(message["channel"], None)
        await self._broadcast_presence()
        self._schedule_resize()
        self._arm_idle_timer()

    async def _on_role(self, message: dict[str, Any]) -> None:
        member = self.members.get(message["channel"])
        if member is not None:
            member.role = message["role"]
            await self._broadcast_presence()
            self._schedule_resize()

    async def _on_input(self, message: dict[str, Any]) -> None:
        member = self.members.get(message["channel"])
        if member is None or not member.can_write or self.exec is None:
            return  # defence in depth: consumers already refuse viewers' input
        data: bytes = message["data"]
        await asyncio.get_running_loop().sock_sendall(self.exec.sock, data)
        if settings.LSL_SESSION_RECORD_INPUT:
            self.recorder.input(data)
            self._pending_input.setdefault(member.user_id, bytearray()).extend(data)
        if self.last_typed_by != member.username or time.monotonic() - self._last_typing_presence > TYPING_PRESENCE_EVERY:
            changed = self.last_typed_by != member.username
            self.last_typed_by = member.username
            self._last_typing_presence = time.monotonic()
            if changed:
                await self._broadcast_presence()

    async def _on_resize(self, message: dict[str, Any]) -> None:
        member = self.members.get(message["channel"])
        if member is not None:
            member.cols, member.rows = message["cols"], message["rows"]
            self._schedule_resize()

    async def _on_snapshot(self, message: dict[str, Any]) -> None:
        await self._send_snapshot(message["channel"])

    async def _on_terminate(self, message: dict[str, Any]) -> None:
        await self.terminate(message.get("reason") or EndReason.ENDED)

    # --- outputs --------------------------------------------------------------------

    async def _send_snapshot(self, channel: str) -> None:
        loop = asyncio.get_running_loop()
        # Offset and screen must match: both are taken here, on the loop, before any
        # further output is appended; the worker emulates exactly those bytes.
        offset = self.offset
        reset, pending = self.screen.detach()

        def render() -> bytes:
            self.screen.feed(reset, pending)
            return self.screen.render()

        data = await loop.run_in_executor(SCREEN_EXECUTOR, render)
        try:
            await self.layer.send(channel, {"type": "term.snapshot", "offset": offset, "data": data,
                                            "cols": self.cols, "rows": self.rows})
        except ChannelFull:
            # The participant's queue is full of output it has not consumed yet; it asks
            # again if no snapshot arrives (see TerminalConsumer.SNAPSHOT_RETRY).
            log.warning("session %s: snapshot for %s dropped, its channel is full", self.session_id, channel)

    async def _broadcast_presence(self) -> None:
        participants = [{"id": m.participation_id, "user": m.username, "role": m.role, "client": m.client,
                         "typing": m.username == self.last_typed_by} for m in self.members.values()]
        await self.layer.group_send(self.group, {"type": "term.control", "payload": {
            "type": "presence", "participants": participants, "last_typed_by": self.last_typed_by}})

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
        assert self.exec is not None
        await in_docker_thread(runtime.exec_resize, self.exec.exec_id, cols=cols, rows=rows)
        reset, pending = self.screen.detach()

        def resize() -> None:
            self.screen.feed(reset, pending)
            self.screen.resize(cols, rows)

        await asyncio.get_running_loop().run_in_executor(SCREEN_EXECUTOR, resize)
        self.recorder.resize(cols, rows)
        await database_sync_to_async(services.set_size)(self.session_id, cols, rows, None)
        await self.layer.group_send(self.group, {"type": "term.control", "payload": {"type": "resize", "cols": cols, "rows": rows}})

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
                renewed = await database_sync_to_async(services.heartbeat)(self.session_id, self.channel)
            except Exception as exc:  # the database restarting: try again; a long outage makes us stale
                log.warning("session %s: heartbeat failed: %s", self.session_id, exc)
                renewed = True
            if not renewed:
                # Fenced: another process declared us lost and ended the session (its reaper killed
                # the shell). Serving on would be split brain: stop now.
                log.warning("session %s: lost ownership; closing the PTY", self.session_id)
                if self.exec is not None:
                    try:
                        self.exec.sock.close()
                    except OSError:
                        pass
                await self._finish(EndReason.SERVER_LOST, None)
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
            await database_sync_to_async(services.record_event)(
                self.session_id, AuditKind.INPUT, user_id, text=bytes(data).decode("utf-8", errors="replace"))


async def ensure_hub(session_id: str) -> str:
    """Return the channel of the session's hub, starting one in this process if nobody owns it.

    Raises LookupError if the session is over (or its owner process died).
    """
    hub = HUBS.get(session_id)
    if hub is not None and not hub.finished.is_set():
        return hub.channel
    # A plain (not process-local "!") channel: channels-redis serves process-local
    # channels through one shared receive loop, and a hub that receives there next
    # to its own consumers starved them in testing. One reader per plain channel is fine.
    channel = f"lslhub.{uuid.UUID(session_id).hex}.{uuid.uuid4().hex[:12]}"
    outcome = await database_sync_to_async(services.claim_hub)(session_id, channel)
    session = await database_sync_to_async(TerminalSession.objects.select_related("environment").get)(pk=session_id)
    if outcome == "remote":
        return session.hub_channel
    if outcome != "claimed":
        raise LookupError(session.end_reason or "ended")
    env = session.environment
    if env is None or not env.container_id:
        await database_sync_to_async(services.mark_ended)(session_id, EndReason.SERVER_ERROR, None)
        raise LookupError(EndReason.SERVER_ERROR)
    hub = Hub(session, env.container_id, channel)
    try:
        await hub.start()
    except runtime.EngineError as exc:
        log.warning("session %s: could not open the terminal: %s", session_id, exc)
        hub.recorder.close()
        await database_sync_to_async(services.mark_ended)(session_id, EndReason.SERVER_ERROR, None)
        raise LookupError(EndReason.SERVER_ERROR) from exc
    return channel
