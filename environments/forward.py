"""`ws/environments/<id>/forward/<port>/`: one TCP connection to a port inside an environment (`lsl forward`).

Wire protocol (docs/usage.md, "lsl forward"; the CLI side is lsl/forward.py):

* Handshake authenticated like every websocket (sessions/auth.py: `Authorization: Token` or the
  session cookie). Then the role and state are checked (ports.require_port_access): a refusal is
  one text frame `{"error": {"code", "detail"}}` and a close with 4404 (no such environment, or
  not visible), 4403 (viewer), 4409 (stopped, host network, nothing listening) or 4400 (bad port).
* Data connection (the default): the keeper opens a tunnel to 127.0.0.1:<port> inside the
  container (environments.keeper.open_tunnel: never anywhere else), the server says
  `{"type": "ready", "port": N}`, and binary frames carry the bytes both ways.
* Flow control, both ways, so that neither daphne nor the CLI holds more than a window per
  connection whatever the peers do: each side acknowledges the bytes it has *delivered* (written to
  its own TCP peer and drained) with `{"type": "ack", "bytes": total}` at least every ACK_EVERY
  bytes, and each sender keeps `sent - acked` at most WINDOW. Daphne queues incoming frames
  without limit, so the server's acks are what bounds an upload; the client's acks bound a
  download (daphne's outgoing buffer). Delivery runs in its own task on each side, so an ack is
  never stuck behind a write waiting for a slow peer (an echo server that only reads after its
  write went out would otherwise deadlock both directions).
* Half-close: `{"type": "eof"}` each way (the tunnel's or the local socket's write side is shut);
  the server closes with 1000 once both directions have ended. A websocket close ends both.
* Spare connection (`?spare=1`; the CLI keeps a few per forwarded port, lsl/forward.py Spares): the
  handshake, token and access check happen ahead of need and the server answers
  `{"type": "standby", "port": N}` with no tunnel, the connection being watched like an open one
  (below). The client's `{"type": "open"}` opens the tunnel, then `ready` and bytes as above; the
  client may send its first bytes right after `open`: they are held until the tunnel is open and
  the check passed. When both directions have ended cleanly the tunnel is closed and the server
  says `standby` again instead of closing: the next local connection reuses the websocket. A new
  TCP connection thus costs the tunnel (~1 ms) instead of a websocket handshake, token lookup and
  access check (~10 ms, mostly thread hops on a busy daphne). The check is re-run when a spare is
  opened more than RECHECK_AFTER after its last one (alongside the tunnel, which carries nothing
  until it passed), and a spare is not opened more than SPARE_MAX_AGE after its handshake.
* Passed checks are reused for CHECK_TTL seconds per (user, environment) (CheckCache), forgotten on
  any event that could change them: the same events that close open connections.
* Control connection (`?control=1`): the CLI keeps one per forwarded port for as long as it
  forwards. No tunnel: it checks access (so a viewer fails before anything is bound), says
  `{"type": "ready", "port": N, "control": true, "listening": bool|null}`, and is where the audit
  log records one `forward_opened` and one `forward_closed` (with the byte totals of the data
  connections that name it with `?session=`) per `lsl forward` of a port, rather than a pair per
  TCP connection (a page load is dozens).

A data connection that names no control connection of this process (another client, or the
control connection is served by another daphne) is audited on its own, but only as the first in
AUDIT_QUIET seconds for its (user, environment, port): the log stays readable, nobody's forward
goes unrecorded. Bytes and connections are counted in PortTraffic for every connection
(ports.record_traffic: at most every FLUSH_EVERY seconds per port, and when a connection closes).

Every open connection is closed when its environment stops or is deleted, or its user's role
drops below member (a grant revoked, a team left): the process's event bus says so (one
subscription per process), and the role is re-checked then, not polled.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qs

from autobahn.exception import Disconnected
from channels.consumer import get_handler_name
from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncWebsocketConsumer
from django.utils import timezone
from rest_framework import exceptions as drf

from environments import ports
from environments.consumers import parse_client_message
from environments.models import (
    Environment,
    PortAuditEvent,
    PortAuditKind,
    PortVia,
    Status,
)
from lsl_site import dbpool, events
from lsl_site.errors import DomainError

log = logging.getLogger(__name__)

WINDOW = 4 << 20  # unacknowledged bytes a sender may have in flight, per direction and connection
ACK_EVERY = 1024 * 1024
READ_SIZE = 256 * 1024  # one websocket frame at most: well under daphne's 1 MiB frame cap
FLUSH_EVERY = 5.0  # seconds between PortTraffic updates while bytes flow
AUDIT_QUIET = 60.0  # a data connection outside any control connection is audited if none was for this long
REFUSED_AUDIT_EVERY = 5.0  # one access_refused row per (user, environment, port) this often at most
TUNNEL_TIMEOUT = 15.0
RECHECK_AFTER = 2.0  # a spare's access check is re-run when it is opened if older than this (see the module doc)
CHECK_TTL = 2.0  # seconds a passed access check is reused for the same (user, environment): class CheckCache
SPARE_MAX_AGE = 60.0  # a spare is authenticated once: it is not opened after this many seconds
CLOSE_BAD_REQUEST, CLOSE_FORBIDDEN, CLOSE_NOT_FOUND, CLOSE_UNAVAILABLE = 4400, 4403, 4404, 4409
SESSION_RE = re.compile(r"^[A-Za-z0-9_-]{8,64}$")

# Docker SDK calls (the exec path of a tunnel) block: their own threads, never the loop or Django's
# thread-sensitive executor. Not sessions.hub's executor: environments does not import sessions.
DOCKER_EXECUTOR = ThreadPoolExecutor(max_workers=8, thread_name_prefix="lsl-forward-docker")


async def in_docker_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(DOCKER_EXECUTOR, lambda: fn(*args, **kwargs))


# --- pure ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Refusal:
    code: str
    detail: str
    close_code: int

    def frame(self) -> str:
        return json.dumps({"error": {"code": self.code, "detail": self.detail}})


def refusal_for(exc: Exception) -> Refusal | None:
    """What a client is told when the check or the tunnel raised `exc`; None: not a refusal (a bug)."""
    if isinstance(exc, drf.NotFound):
        return Refusal("not_found", str(exc.detail), CLOSE_NOT_FOUND)
    if isinstance(exc, drf.PermissionDenied):
        return Refusal("permission_denied", str(exc.detail), CLOSE_FORBIDDEN)
    if isinstance(exc, DomainError):
        if exc.status == 409:
            return Refusal(exc.code, exc.detail, CLOSE_UNAVAILABLE)
        if exc.status == 404:
            return Refusal(exc.code, exc.detail, CLOSE_NOT_FOUND)
        if exc.status == 403:
            return Refusal(exc.code, exc.detail, CLOSE_FORBIDDEN)
        detail = "; ".join(f"{k}: {' '.join(v)}" for k, v in (exc.fields or {}).items()) or exc.detail
        return Refusal(exc.code, detail, CLOSE_BAD_REQUEST)
    return None


@dataclass(frozen=True)
class Request:
    port: int | None  # None: not a port (the refusal says why)
    control: bool
    session: str | None
    spare: bool = False  # the tunnel waits for the client's {"type": "open"} (the module doc)


def parse_request(port: Any, query_string: bytes) -> Request:
    query = parse_qs(query_string.decode("latin-1"))
    control = (query.get("control") or [""])[0] in ("1", "true")
    spare = not control and (query.get("spare") or [""])[0] in ("1", "true")
    session = (query.get("session") or [""])[0]
    try:
        checked: int | None = ports.check_port(port)
    except DomainError:
        checked = None
    return Request(checked, control, session if SESSION_RE.match(session) else None, spare)


class Window:
    """One direction's flow control: bytes sent, bytes the far side says it delivered."""

    def __init__(self, limit: int = WINDOW) -> None:
        self.limit, self.sent, self.acked = limit, 0, 0

    @property
    def open(self) -> bool:
        return self.sent - self.acked < self.limit

    def ack(self, value: Any) -> bool:
        """Take an ack; False if it is not a byte count this side has sent (an int, not a bool)."""
        if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value > self.sent:
            return False
        self.acked = max(self.acked, value)
        return True


def due_ack(delivered: int, last_acked: int, every: int = ACK_EVERY) -> bool:
    return delivered - last_acked >= every


def listening_from(listening_ports: list[dict[str, Any]] | None, checked: bool, port: int) -> bool | None:
    """Whether `port` was listening at the last scan (None: never scanned)."""
    if not checked:
        return None
    return any(isinstance(p, dict) and p.get("port") == port for p in listening_ports or [])


# --- blocking (dbpool threads) -----------------------------------------------------------------

def _check(environment_id: Any, user: Any) -> Environment:
    env = Environment.objects.select_related("node").filter(pk=environment_id).first()
    if env is None:
        raise drf.NotFound("No such environment.")
    ports.require_port_access(user, env)
    return env


def _audit(environment_id: Any, user_id: Any, kind: str, port: int, **data: Any) -> None:
    ports.audit(environment_id, user_id, kind, port, via=PortVia.FORWARD, **data)


def _audit_opened_unless_recent(environment_id: Any, user_id: Any, port: int) -> bool:
    """Record forward_opened for a lone data connection unless one was in the last AUDIT_QUIET s."""
    since = timezone.now() - timedelta(seconds=AUDIT_QUIET)
    if PortAuditEvent.objects.filter(environment_id=environment_id, user_id=user_id, port=port,
                                     kind=PortAuditKind.FORWARD_OPENED, at__gte=since).exists():
        return False
    _audit(environment_id, user_id, PortAuditKind.FORWARD_OPENED, port, connection=True)
    return True


def _listening_now(env: Environment, port: int) -> bool | None:
    """Whether something listens on `port` now (asked of the keeper), else at the worker's last scan."""
    from environments import keeper, nodes, runtime

    try:
        return any(p.port == port for p in keeper.listening_ports(nodes.engine_for(env), env.container_id, env.id))
    except (runtime.EngineError, OSError) as exc:  # an old keeper, or a container on its way down: the scan
        log.debug("forward: listening ports of %s not read (%s)", env.pk, exc)
    return listening_from(env.listening_ports, env.ports_checked_at is not None, port)


# --- counting -------------------------------------------------------------------------------------

class TrafficCounter:
    """This process's counts not yet in PortTraffic, per (environment, port): written by one task
    every FLUSH_EVERY seconds and when a connection closes, never per chunk."""

    def __init__(self) -> None:
        self.pending: dict[tuple[str, int], list[int]] = {}  # [connections, to environment, from environment]
        self.flushed_at: dict[tuple[str, int], float] = {}
        self._task: asyncio.Task[None] | None = None

    def add(self, key: tuple[str, int], connections: int = 0, to_env: int = 0, from_env: int = 0) -> None:
        counts = self.pending.setdefault(key, [0, 0, 0])
        counts[0] += connections
        counts[1] += to_env
        counts[2] += from_env
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())

    async def closed(self, key: tuple[str, int]) -> None:
        """A connection of `key` closed: its counts are written now, unless they were less than
        FLUSH_EVERY ago (then by the periodic task, within FLUSH_EVERY). A page load closes dozens
        of connections at once: one write per burst, not one each, competing with the next
        connections' access checks for the database threads."""
        if time.monotonic() - self.flushed_at.get(key, -FLUSH_EVERY) >= FLUSH_EVERY:
            await self.flush(key)

    async def flush(self, key: tuple[str, int] | None = None) -> None:
        keys = [key] if key is not None else list(self.pending)
        now = time.monotonic()
        if len(self.flushed_at) > 10000:
            self.flushed_at.clear()
        for k in keys:
            self.flushed_at[k] = now
            counts = self.pending.pop(k, None)
            if counts and any(counts):
                try:
                    await dbpool.run(ports.record_traffic, k[0], k[1], PortVia.FORWARD, connections=counts[0],
                                     to_environment=counts[1], from_environment=counts[2])
                except Exception:  # a database hiccup loses a few seconds of counts, never a connection
                    log.exception("forward: counting traffic of %s:%s failed", *k)

    async def _run(self) -> None:
        while self.pending:
            await asyncio.sleep(FLUSH_EVERY)
            await self.flush()


COUNTER = TrafficCounter()


@dataclass
class ForwardSession:
    """One `lsl forward` of one port, as its control connection (in this process) sees it."""

    started: float = field(default_factory=time.monotonic)
    connections: int = 0
    to_env: int = 0
    from_env: int = 0


SESSIONS: dict[tuple[str, int, str, int], ForwardSession] = {}  # (session, user id, environment id, port)
_refused_at: dict[tuple[int, str, int], float] = {}


# --- who is told when an environment stops or access changes -----------------------------------

class Watchers:
    """The open forward connections of this process, by environment; one event-bus subscription."""

    def __init__(self) -> None:
        self.by_env: dict[str, set[ForwardConsumer]] = {}
        self._bus: events.EventBus | None = None
        self.bus_key: int | None = None

    async def add(self, consumer: ForwardConsumer) -> None:
        bus = await events.bus()
        if self._bus is not bus:
            self._bus, self.bus_key = bus, bus.subscribe(self._on_event)
        self.by_env.setdefault(consumer.environment_id, set()).add(consumer)

    def discard(self, consumer: ForwardConsumer) -> None:
        consumers = self.by_env.get(getattr(consumer, "environment_id", ""))
        if consumers is not None:
            consumers.discard(consumer)
            if not consumers:
                del self.by_env[consumer.environment_id]

    def _on_event(self, record: events.EventRecord) -> None:
        """On the loop, must not block."""
        CHECKS.on_event(record)
        if record.kind == "team.changed":
            concerned = [c for cs in self.by_env.values() for c in cs if c.user.pk in record.user_ids]
            if concerned:
                asyncio.create_task(_recheck(concerned))
            return
        consumers = list(self.by_env.get(record.environment_id or "", ()))
        if not consumers:
            return
        if record.kind == "environment.deleted":
            refusal = Refusal("environment_deleted", "The environment was deleted.", CLOSE_NOT_FOUND)
        elif record.kind == "environment.changed":
            status = (record.payload.get("environment") or {}).get("status")
            if status == Status.RUNNING:
                return
            refusal = Refusal("environment_stopped", f"The environment is {status or 'not running'}; "
                                                     "start it to reach its ports.", CLOSE_UNAVAILABLE)
        elif record.kind == "access.changed":
            asyncio.create_task(_recheck(consumers))
            return
        else:
            return
        for consumer in consumers:
            asyncio.create_task(consumer.refuse(refusal))


WATCHERS = Watchers()


class CheckCache:
    """Passed access checks, by (user, environment), reused for CHECK_TTL seconds: a page load opens
    dozens of connections, and each check is a database query through a thread (a hop that costs
    milliseconds on a busy daphne). Safe because it is forgotten on every event that can change the
    verdict, the very events that close open connections (Watchers), and kept only while this
    process hears them; a check that was running when such an event came is not kept."""

    FORGET_ON = ("environment.", "access.", "team.")  # environment.changed/deleted, access.changed, team.changed

    def __init__(self) -> None:
        self.entries: dict[tuple[int, str], tuple[float, Environment]] = {}
        self.generation = 0

    def get(self, user_id: int, environment_id: str) -> Environment | None:
        entry = self.entries.get((user_id, environment_id))
        if entry is None or time.monotonic() - entry[0] > CHECK_TTL:
            return None
        return entry[1]

    def put(self, user_id: int, environment_id: str, env: Environment, generation: int, at: float) -> None:
        if generation != self.generation or WATCHERS.bus_key is None:
            return
        if len(self.entries) > 10000:
            self.entries.clear()
        self.entries[(user_id, environment_id)] = (at, env)

    def on_event(self, record: events.EventRecord) -> None:
        if record.kind.startswith(self.FORGET_ON) and record.kind != "environment.ports":
            self.generation += 1
            self.entries.clear()


CHECKS = CheckCache()


async def checked_environment(environment_id: Any, user: Any, *, cached: bool = True) -> Environment:
    """The environment if `user` may reach its ports now (ports.require_port_access), else raises."""
    key = str(environment_id)
    if cached:
        env = CHECKS.get(user.pk, key)
        if env is not None:
            return env
    generation, at = CHECKS.generation, time.monotonic()
    env = await dbpool.run(_check, environment_id, user)
    CHECKS.put(user.pk, key, env, generation, at)
    return env


async def _recheck(consumers: list[ForwardConsumer]) -> None:
    """Check each (user, environment) once; close the connections of those who may no longer connect."""
    verdicts: dict[tuple[int, str], Refusal | None] = {}
    for consumer in consumers:
        key = (consumer.user.pk, consumer.environment_id)
        if key not in verdicts:
            try:
                await dbpool.run(_check, consumer.environment_id, consumer.user)
                verdicts[key] = None
            except Exception as exc:
                refusal = refusal_for(exc)
                if refusal is None:
                    log.exception("forward: re-checking %s on %s failed", consumer.user, consumer.environment_id)
                elif refusal.close_code == CLOSE_NOT_FOUND and refusal.code == "not_found":
                    # They could see it a moment ago: "no such environment" would puzzle them.
                    refusal = Refusal("access_revoked", "Your access to the environment was revoked.", CLOSE_FORBIDDEN)
                verdicts[key] = refusal
        refusal = verdicts[key]
        if refusal is not None:
            await consumer.refuse(refusal)


# --- the consumer ----------------------------------------------------------------------------------

def _discard_tunnel(task: asyncio.Future[Any]) -> None:
    """A tunnel being opened that will not be used: cancelled, or closed once it is open."""
    def close(done: asyncio.Future[Any]) -> None:
        if not done.cancelled() and done.exception() is None:
            done.result().close()

    if task.done():
        close(task)
    else:
        task.cancel()
        task.add_done_callback(close)


_EOF = object()


class ForwardConsumer(AsyncWebsocketConsumer):
    # No channel layer: nothing is ever sent to a forward connection by name, and a Redis channel
    # per TCP connection would cost a round trip per connection for nothing.
    channel_layer_alias = "lsl-forward-has-no-channel-layer"

    environment_id: str = ""
    closed = False

    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close()  # before accept: the handshake is refused with HTTP 403
            return
        self.user = user
        kwargs = self.scope["url_route"]["kwargs"]
        request = parse_request(kwargs.get("port"), self.scope.get("query_string", b""))
        await self.accept()
        if request.port is None:
            await self.refuse(Refusal("invalid", f"A port is a whole number from {ports.MIN_PORT} to {ports.MAX_PORT}; "
                                                 f"{kwargs.get('port')} is not.", CLOSE_BAD_REQUEST))
            return
        self.port, self.request = request.port, request
        try:
            # Control connections are checked afresh: they are one per forward, and say "listening".
            env = await checked_environment(kwargs["environment_id"], user, cached=not request.control)
        except Exception as exc:
            refusal = refusal_for(exc)
            if refusal is None:
                raise
            if refusal.close_code == CLOSE_FORBIDDEN:
                await self._audit_refused(kwargs["environment_id"], refusal)
            await self.refuse(refusal)
            return
        self.environment_id = str(env.pk)
        self.key = (self.environment_id, self.port)
        self.opened_at = time.monotonic()
        if request.control:
            await self._open_control(env)
        elif request.spare:
            await self._standby(env)
        else:
            await self._open_data(env)

    # --- control -------------------------------------------------------------------------------

    async def _open_control(self, env: Environment) -> None:
        session = self.request.session
        if session is not None:
            SESSIONS.setdefault((session, self.user.pk, self.environment_id, self.port), ForwardSession())
        await WATCHERS.add(self)
        await dbpool.run(_audit, env.pk, self.user.pk, PortAuditKind.FORWARD_OPENED, self.port, session=session)
        listening = await in_docker_thread(_listening_now, env, self.port)
        await self._send_json({"type": "ready", "port": self.port, "control": True, "listening": listening})

    async def _close_control(self) -> None:
        session = self.request.session
        tally = SESSIONS.pop((session, self.user.pk, self.environment_id, self.port), None) if session else None
        tally = tally or ForwardSession(started=self.opened_at)
        await dbpool.run(_audit, self.environment_id, self.user.pk, PortAuditKind.FORWARD_CLOSED, self.port,
                         session=session, connections=tally.connections, bytes_to_environment=tally.to_env,
                         bytes_from_environment=tally.from_env, seconds=round(time.monotonic() - tally.started, 1))

    # --- data --------------------------------------------------------------------------------

    async def _standby(self, env: Environment) -> None:
        """A spare: checked and watched now (an event closes it like any open connection), its
        tunnel opened when the client says `open`."""
        self.env, self.opening = env, None
        self.authenticated_at = self.checked_at = time.monotonic()
        await WATCHERS.add(self)
        await self._send_json({"type": "standby", "port": self.port})

    def _begin_data(self) -> None:
        """State of a data connection from the moment bytes may arrive (a spare's client sends them
        right after `open`): queued in the inbox, carried only once the tunnel is attached."""
        session = self.request.session
        self.tally = SESSIONS.get((session, self.user.pk, self.environment_id, self.port)) if session else None
        self.audit_task: asyncio.Future[bool] | None = None
        if self.tally is None:
            # In parallel, not before `ready`: the audit row is the log's business, not the connection's.
            self.audit_task = asyncio.ensure_future(
                dbpool.run(_audit_opened_unless_recent, self.environment_id, self.user.pk, self.port))
        self.to_env = self.from_env = 0
        self.out = Window()  # tunnel → client
        self.out_open = asyncio.Event()
        self.out_open.set()
        self.delivered = self.acked_to_client = 0  # client → tunnel, written and drained
        self.queued = 0
        self.inbox: asyncio.Queue[Any] = asyncio.Queue()
        self.client_eof = self.tunnel_eof = False

    async def _open_data(self, env: Environment) -> None:
        self._begin_data()
        await self._start_data(env, recheck=False)

    async def _open_spare(self) -> None:
        """The client took this spare for a new local connection."""
        self.opened_at = time.monotonic()
        self._begin_data()
        # The check passed at most RECHECK_AFTER ago, and any change of role or state since then
        # would have closed this connection (WATCHERS); older, it is re-run alongside the tunnel.
        recheck = time.monotonic() - self.checked_at > RECHECK_AFTER
        if recheck:
            self.checked_at = time.monotonic()
        await self._start_data(self.env, recheck=recheck)

    async def _start_data(self, env: Environment, recheck: bool) -> None:
        """Open the tunnel (with the access check in parallel when `recheck`), say `ready` and
        start carrying bytes. Nothing is carried before the check has passed: a refused check
        closes the tunnel unused."""
        from environments import keeper, nodes

        engine = nodes.engine_for(env)  # env.node came with the access check (NodeUnavailableError: 503)
        tunnel_task = asyncio.ensure_future(asyncio.wait_for(
            keeper.open_tunnel(engine, env.container_id, env.pk, in_docker_thread, self.port), timeout=TUNNEL_TIMEOUT))
        try:
            if recheck:
                try:
                    await checked_environment(self.environment_id, self.user)
                except Exception as exc:
                    _discard_tunnel(tunnel_task)
                    refusal = refusal_for(exc)
                    if refusal is None:
                        raise
                    if refusal.close_code == CLOSE_NOT_FOUND and refusal.code == "not_found":
                        # They could see it a moment ago: "no such environment" would puzzle them.
                        refusal = Refusal("access_revoked", "Your access to the environment was revoked.",
                                          CLOSE_FORBIDDEN)
                    if refusal.close_code == CLOSE_FORBIDDEN:
                        await self._audit_refused(self.environment_id, refusal)
                    await self.refuse(refusal)
                    return
            tunnel = await tunnel_task
            if self.closed:  # refused (an event) or the client went while the tunnel was opening
                tunnel.close()
                return
            self.tunnel = tunnel
            self.reader, self.writer = await tunnel.streams()
        except asyncio.TimeoutError:
            await self.refuse(Refusal("tunnel_failed", f"The environment did not connect to port {self.port} within "
                                                       f"{TUNNEL_TIMEOUT:.0f} s.", CLOSE_UNAVAILABLE))
            return
        except asyncio.CancelledError:
            _discard_tunnel(tunnel_task)
            raise
        except Exception as exc:
            refusal = refusal_for(exc)
            if refusal is None:
                if not isinstance(exc, (OSError, EOFError)) and exc.__class__.__name__ != "KeeperError":
                    log.exception("forward: tunnel to %s:%s failed", env.pk, self.port)
                refusal = Refusal("tunnel_failed", str(exc) or exc.__class__.__name__, CLOSE_UNAVAILABLE)
            await self.refuse(refusal)
            return
        self.attached = True
        COUNTER.add(self.key, connections=1)
        if self.tally is not None:
            self.tally.connections += 1
        if not self.request.spare:  # a spare is watched since its standby
            await WATCHERS.add(self)
        await self._send_json({"type": "ready", "port": self.port})
        self.pump_out = asyncio.create_task(self._tunnel_to_client())
        self.pump_in = asyncio.create_task(self._client_to_tunnel())

    async def _tunnel_to_client(self) -> None:
        try:
            while True:
                if not self.out.open:
                    self.out_open.clear()
                    await self.out_open.wait()
                data = await self.reader.read(READ_SIZE)
                if not data:
                    break
                self.out.sent += len(data)
                self._count(from_env=len(data))
                await self.send(bytes_data=data)
        except (ConnectionError, OSError) as exc:
            log.debug("forward %s:%s: tunnel read ended (%s)", self.environment_id, self.port, exc)
            await self.close(code=1000)
            return
        await self._send_json({"type": "eof"})
        self.tunnel_eof = True  # after the eof is sent: a recycled spare's `standby` must follow it
        await self._finish_if_done()

    async def _client_to_tunnel(self) -> None:
        """Delivers what the client sent, in order, and acks it once drained (see the module doc)."""
        try:
            while True:
                data = await self.inbox.get()
                if data is _EOF:
                    if self.writer.can_write_eof():
                        self.writer.write_eof()
                    self.client_eof = True
                    await self._finish_if_done()
                    return
                self.writer.write(data)
                await self.writer.drain()
                self.queued -= len(data)
                self.delivered += len(data)
                self._count(to_env=len(data))
                if due_ack(self.delivered, self.acked_to_client):
                    self.acked_to_client = self.delivered
                    await self._send_json({"type": "ack", "bytes": self.delivered})
        except (ConnectionError, OSError) as exc:
            log.debug("forward %s:%s: tunnel write ended (%s)", self.environment_id, self.port, exc)
            await self.close(code=1000)

    def _count(self, to_env: int = 0, from_env: int = 0) -> None:
        self.to_env += to_env
        self.from_env += from_env
        COUNTER.add(self.key, to_env=to_env, from_env=from_env)
        if self.tally is not None:
            self.tally.to_env += to_env
            self.tally.from_env += from_env

    async def _finish_if_done(self) -> None:
        if self.tunnel_eof and self.client_eof:
            if self.request.spare and not self.closed:
                await self._recycle()
            else:
                await self.close(code=1000)

    async def _recycle(self) -> None:
        """A spare whose connection ended cleanly (eof both ways) is a spare again: the client may
        open its next connection on it, without a new handshake. Called by the last pump to end."""
        self.tunnel.close()
        self._connection_ended()
        for name in ("inbox", "tunnel", "reader", "writer", "pump_out", "pump_in", "_eof_sent"):
            self.__dict__.pop(name, None)
        self.attached, self.opening = False, None
        await self._send_json({"type": "standby", "port": self.port})

    def _connection_ended(self) -> None:
        """Counted and audited off the critical path (a database write each, at most)."""
        if getattr(self, "attached", False):
            asyncio.create_task(COUNTER.closed(self.key))
        audit_task, self.audit_task = getattr(self, "audit_task", None), None
        if audit_task is not None:
            asyncio.create_task(self._audit_closed(audit_task, self.to_env, self.from_env, self.opened_at))

    async def _audit_closed(self, audit_task: asyncio.Future[bool], to_env: int, from_env: int, opened_at: float) -> None:
        try:
            if await audit_task:
                await dbpool.run(_audit, self.environment_id, self.user.pk, PortAuditKind.FORWARD_CLOSED, self.port,
                                 connections=1, bytes_to_environment=to_env, bytes_from_environment=from_env,
                                 seconds=round(time.monotonic() - opened_at, 1))
        except Exception:  # the row is lost, the connection was not
            log.exception("forward: auditing a connection to %s:%s failed", self.environment_id, self.port)

    # --- client → server ------------------------------------------------------------------------

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if self._idle_spare():
            await self._receive_standby(text_data, bytes_data)
            return
        if not hasattr(self, "inbox"):  # control, or refused and closing: nothing to take
            return
        if bytes_data is not None:
            if self._eof_queued():
                await self._error("bad_message", "bytes after eof")
                return
            self.queued += len(bytes_data)
            if self.queued > 2 * WINDOW:
                # A client that ignores the server's acks: it may not park unbounded data in daphne.
                await self.refuse(Refusal("flow_control", f"more than {2 * WINDOW} bytes sent without waiting for "
                                                          "the server's acks", CLOSE_BAD_REQUEST))
                return
            self.inbox.put_nowait(bytes_data)
            return
        message, problem = parse_client_message(text_data)
        if message is None:
            await self._error("bad_message", problem)
            return
        kind = message["type"]
        if kind == "ack":
            if not self.out.ack(message.get("bytes")):
                await self._error("bad_message", "ack.bytes must be an integer no larger than the bytes sent")
            elif self.out.open:
                self.out_open.set()
        elif kind == "eof":
            if not self._eof_queued():
                self._eof_sent = True
                self.inbox.put_nowait(_EOF)
        elif kind == "ping":
            await self._send_json({"type": "pong"})
        else:
            await self._error("bad_message", f"unknown message type {kind[:64]!r}")

    def _idle_spare(self) -> bool:
        """A spare not yet opened (its check passed: `env` is set only then)."""
        return getattr(self, "env", None) is not None and self.opening is None

    async def _receive_standby(self, text_data: str | None, bytes_data: bytes | None) -> None:
        if bytes_data is not None:
            await self.refuse(Refusal("bad_message", "bytes before open", CLOSE_BAD_REQUEST))
            return
        message, problem = parse_client_message(text_data)
        if message is None:
            await self._error("bad_message", problem)
        elif message["type"] == "open":
            if time.monotonic() - self.authenticated_at > SPARE_MAX_AGE:
                await self.refuse(Refusal("spare_expired", f"A spare connection is opened within {SPARE_MAX_AGE:.0f} s "
                                                           "of its handshake.", CLOSE_BAD_REQUEST))
                return
            # A task: the frames that follow `open` (the client's first bytes) are taken meanwhile.
            self.opening = asyncio.create_task(self._open_spare())
        elif message["type"] == "ping":
            await self._send_json({"type": "pong"})
        elif message["type"] != "ack":  # acks of the previous connection's last bytes may follow its end
            await self._error("bad_message", f"{message['type'][:64]!r} before open")

    def _eof_queued(self) -> bool:
        return getattr(self, "_eof_sent", False)

    # --- the end ----------------------------------------------------------------------------------

    async def refuse(self, refusal: Refusal) -> None:
        """Say why in a text frame, then close with the refusal's code."""
        if self.closed:
            return
        try:
            await self.send(text_data=refusal.frame())
        except Disconnected:
            pass
        await self.close(code=refusal.close_code)

    async def disconnect(self, code: int) -> None:
        self.closed = True
        WATCHERS.discard(self)
        for name in ("opening", "pump_out", "pump_in"):
            task = getattr(self, name, None)
            if task is not None:
                task.cancel()
        tunnel = getattr(self, "tunnel", None)
        if tunnel is not None:
            try:
                tunnel.close()
            except OSError:
                pass
        if not self.environment_id:
            return
        if getattr(self, "request", None) is not None and self.request.control:
            await self._close_control()
            return
        if getattr(self, "attached", False):
            await COUNTER.closed(self.key)
            self.attached = False
        audit_task, self.audit_task = getattr(self, "audit_task", None), None
        if audit_task is not None:
            await self._audit_closed(audit_task, self.to_env, self.from_env, self.opened_at)

    async def _audit_refused(self, environment_id: Any, refusal: Refusal) -> None:
        key = (self.user.pk, str(environment_id), self.port)
        now = time.monotonic()
        if now - _refused_at.get(key, -REFUSED_AUDIT_EVERY) >= REFUSED_AUDIT_EVERY:
            _refused_at[key] = now
            if len(_refused_at) > 10000:
                _refused_at.clear()
            await dbpool.run(_audit, environment_id, self.user.pk, PortAuditKind.ACCESS_REFUSED, self.port,
                             reason=refusal.detail)

    # --- plumbing --------------------------------------------------------------------------------

    async def dispatch(self, message: dict[str, Any]) -> None:
        """Channels' dispatch without its `aclose_old_connections()` before every message (a hop
        through the thread-sensitive executor per frame: it would cap a forward at a few thousand
        frames a second). Database calls here go through lsl_site.dbpool, which checks its own."""
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        await handler(message)

    async def websocket_disconnect(self, message: dict[str, Any]) -> None:
        """Channels' own without its `aclose_old_connections()`, for the same reason as dispatch:
        a hop through the thread-sensitive executor for every closed connection (no groups here)."""
        await self.disconnect(message["code"])
        raise StopConsumer()

    async def send(self, text_data: str | None = None, bytes_data: bytes | None = None, close: bool = False) -> None:
        try:
            await super().send(text_data=text_data, bytes_data=bytes_data, close=close)
        except Disconnected:
            pass  # the client went; disconnect() follows

    async def close(self, code: int | bool | None = None, reason: str | None = None) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            await super().close(code=code, reason=reason)
        except Disconnected:
            pass

    async def _send_json(self, payload: dict[str, Any]) -> None:
        await self.send(text_data=json.dumps(payload))

    async def _error(self, code: str, detail: str) -> None:
        await self._send_json({"type": "error", "code": code, "detail": detail})


__all__ = ["ForwardConsumer", "Refusal", "Window", "due_ack", "listening_from", "parse_request",
           "refusal_for"]

