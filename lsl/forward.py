"""`lsl forward ENV [LOCAL:]REMOTE ...`: local TCP ports forwarded to ports inside an environment.

Nothing is published on the container and no host networking is involved: every accepted local
connection gets its own websocket to the server (`/ws/environments/<id>/forward/<port>/`), where
the environment's keeper connects to 127.0.0.1:<port> inside the container. The protocol,
flow control included, is in environments/forward.py's docstring; this is its client.

One asyncio loop in the main thread. Per forwarded port, a *control* websocket is opened before
anything is bound and kept open: it checks access first (a viewer, an outsider or a stopped
environment fails at once with the server's message), it is how the server audits one forward
rather than one row per TCP connection, and it is how lsl learns that the environment stopped or
that access was revoked while nothing is connected. Then per connection: local bytes → binary
frames (at most WINDOW unacknowledged), frames → local socket (delivered by their own task, acked
every ACK_EVERY bytes), `{"type": "eof"}` for half-closes. Ctrl-C (or SIGTERM) ends it: exit 0.

A connection's websocket is taken from a few kept ready per port (Spares: authenticated and
checked ahead of need, reused when a connection ends cleanly), so a new local connection only
waits for the server to open its tunnel; its first bytes are sent without waiting for `ready`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import signal
import sys
import uuid
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from lsl.client import Client
from lsl.errors import (
    AuthError,
    Conflict,
    LslError,
    NotFound,
    ServerError,
    Unreachable,
    UsageFailure,
)

WINDOW = 4 << 20  # unacknowledged bytes in flight per direction and connection (the server's too)
ACK_EVERY = 1024 * 1024
READ_SIZE = 256 * 1024
OPEN_TIMEOUT = 15.0
RECONNECT_FOR = 120.0  # a control connection lost to a server restart is re-opened for this long
SPARES = 2  # websockets kept ready per forwarded port (class Spares)
SPARE_KEEP = 8  # spares kept per port after a burst of connections ended
SPARE_MAX_AGE = 60.0  # seconds; the server's limit too
SPARE_RETRY = (0.5, 30.0)  # seconds before re-opening a spare that could not be opened: first, most
MAX_PORT = 65535
CLOSE_BAD_REQUEST, CLOSE_FORBIDDEN, CLOSE_NOT_FOUND, CLOSE_UNAVAILABLE = 4400, 4403, 4404, 4409


# --- pure ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Spec:
    local: int  # 0: any free port
    remote: int


def _port(text: str, what: str, spec: str, allow_zero: bool) -> int:
    low = 0 if allow_zero else 1
    if not (text.isascii() and text.isdigit()) or len(text) > 5 or not low <= int(text) <= MAX_PORT:
        zero = " (0: any free port)" if allow_zero else ""
        raise UsageFailure(f"{spec!r}: the {what} port must be a number from {low} to {MAX_PORT}{zero}, "
                           f"not {text!r}; expected [LOCAL:]REMOTE, e.g. 3000 or 8080:3000")
    return int(text)


def parse_spec(text: str) -> Spec:
    """`REMOTE` (the same port locally), `LOCAL:REMOTE`, or `0:REMOTE` (any free local port)."""
    parts = text.strip().split(":")
    if len(parts) == 1:
        remote = _port(parts[0], "remote", text, allow_zero=False)
        return Spec(remote, remote)
    if len(parts) == 2:
        return Spec(_port(parts[0], "local", text, allow_zero=True), _port(parts[1], "remote", text, allow_zero=False))
    raise UsageFailure(f"{text!r}: expected [LOCAL:]REMOTE, e.g. 3000 or 8080:3000 (lsl forward listens on "
                       f"127.0.0.1 only)")


def parse_specs(texts: Iterable[str]) -> list[Spec]:
    specs = [parse_spec(text) for text in texts]
    if not specs:
        raise UsageFailure("name at least one port to forward, e.g. lsl forward dev 3000")
    seen: set[int] = set()
    for spec in specs:
        if spec.local and spec.local in seen:
            raise UsageFailure(f"local port {spec.local} is given twice")
        seen.add(spec.local)
    return specs


def forward_url(server_url: str, environment_id: str, port: int, *, session: str, control: bool = False,
                spare: bool = False) -> str:
    base = server_url.rstrip("/")
    base = "ws" + base[4:] if base.startswith("http") else base
    query = {"session": session, **({"control": "1"} if control else {}), **({"spare": "1"} if spare else {})}
    return f"{base}/ws/environments/{environment_id}/forward/{port}/?{urlencode(query)}"


def parse_refusal(text: str) -> tuple[str, str] | None:
    """(code, detail) of a server's `{"error": {...}}` frame, else None."""
    try:
        message = json.loads(text)
    except ValueError:
        return None
    error = message.get("error") if isinstance(message, dict) else None
    if not isinstance(error, dict):
        return None
    return str(error.get("code") or "error"), str(error.get("detail") or error.get("code") or "refused")


def refusal_error(close_code: int | None, code: str, detail: str) -> LslError:
    """A refusal as the error (and exit code) lsl ends with: the same table as every command."""
    if close_code == CLOSE_NOT_FOUND or code in ("not_found", "environment_deleted"):
        return NotFound(detail)
    if close_code == CLOSE_FORBIDDEN or code == "permission_denied":
        return AuthError(detail)
    if close_code == CLOSE_UNAVAILABLE:
        return Conflict(detail, code=code)
    if close_code == CLOSE_BAD_REQUEST:
        return UsageFailure(detail)
    return LslError(detail, code=code)


class Window:
    """One direction's flow control: bytes sent, bytes the far side says it delivered."""

    def __init__(self, limit: int = WINDOW) -> None:
        self.limit, self.sent, self.acked = limit, 0, 0

    @property
    def open(self) -> bool:
        return self.sent - self.acked < self.limit

    def ack(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value > self.sent:
            return False
        self.acked = max(self.acked, value)
        return True


def due_ack(delivered: int, last_acked: int, every: int = ACK_EVERY) -> bool:
    return delivered - last_acked >= every


class EnvironmentStopped(LslError):
    """The environment stopped (or was deleted, or access went) while forwarding."""


# --- the forwarder ---------------------------------------------------------------------------------

_EOF, _CLOSED = object(), object()


class Forwarder:
    def __init__(self, client: Client, env: dict[str, Any], specs: list[Spec], *, as_json: bool) -> None:
        self.client, self.env, self.specs, self.as_json = client, env, specs, as_json
        self.name = str(env.get("name") or env["id"])
        self.session = uuid.uuid4().hex
        self.stop = asyncio.Event()
        self.failure: LslError | None = None
        self.connections: set[asyncio.Task[None]] = set()
        self.spares: dict[int, Spares] = {}  # by remote port

    # --- websockets ------------------------------------------------------------------------------

    async def _dial(self, port: int, control: bool, spare: bool = False) -> Any:
        from websockets.asyncio.client import connect
        from websockets.exceptions import InvalidHandshake, InvalidStatus, InvalidURI

        url = forward_url(self.client.url, str(self.env["id"]), port, session=self.session, control=control,
                          spare=spare)
        try:
            return await connect(url, additional_headers={"Authorization": f"Token {self.client.token}"},
                                 user_agent_header="lsl-cli", open_timeout=OPEN_TIMEOUT, compression=None,
                                 max_size=4 * WINDOW, max_queue=16,
                                 ping_interval=20 if control or spare else None)
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status in (401, 403):
                raise AuthError("the server refused the connection (not logged in, or a bad or revoked token)") from None
            if status in (404, 500) :
                raise ServerError(f"the server at {self.client.url} cannot forward ports (HTTP {status} to the "
                                  "websocket); is it older than this lsl?") from None
            raise ServerError(f"websocket handshake failed with HTTP {status}") from None
        except (InvalidURI, InvalidHandshake) as exc:
            raise ServerError(f"websocket handshake failed: {exc}") from None
        except (OSError, TimeoutError) as exc:
            raise Unreachable(f"cannot reach the server at {self.client.url} ({exc})") from None

    async def _open(self, port: int, control: bool, spare: bool = False) -> tuple[Any, dict[str, Any]]:
        """A websocket and its `ready` message (a spare's: `standby`; a server older than spares
        says `ready`); a refusal raises its LslError."""
        from websockets.exceptions import ConnectionClosed

        ws = await self._dial(port, control, spare)
        try:
            first = await asyncio.wait_for(ws.recv(), timeout=OPEN_TIMEOUT + 5)
        except ConnectionClosed:
            await ws.close()
            raise refusal_error(ws.close_code, "closed", f"the server closed the connection to port {port} "
                                                          f"(code {ws.close_code})") from None
        except asyncio.TimeoutError:
            await ws.close()
            raise Unreachable(f"the server did not answer for port {port} in time") from None
        if isinstance(first, str):
            refusal = parse_refusal(first)
            if refusal is not None:
                try:
                    await asyncio.wait_for(ws.wait_closed(), timeout=5)
                except asyncio.TimeoutError:
                    pass
                await ws.close()
                raise refusal_error(ws.close_code, *refusal)
            try:
                message = json.loads(first)
            except ValueError:
                message = None
            if isinstance(message, dict) and message.get("type") in (("standby", "ready") if spare else ("ready",)):
                return ws, message
        await ws.close()
        raise ServerError(f"unexpected first message from the server: {str(first)[:80]!r}")

    # --- the run -------------------------------------------------------------------------------------

    async def run(self) -> int:
        # Access first, once per port, before anything is bound.
        controls: dict[int, Any] = {}
        warnings: list[str] = []
        try:
            for spec in self.specs:
                if spec.remote in controls:
                    continue
                ws, ready = await self._open(spec.remote, control=True)
                controls[spec.remote] = ws
                if ready.get("listening") is False:
                    warnings.append(f"note: nothing listens on port {spec.remote} in {self.name} yet; connections "
                                    "to it are refused until something does")
            servers = await self._bind()
        except BaseException:
            for ws in controls.values():
                await ws.close()
            raise
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop.set)
        bound = [(spec, server.sockets[0].getsockname()[1]) for spec, server in servers]
        self._announce(bound, warnings)
        watchers = [asyncio.create_task(self._watch_control(port, ws)) for port, ws in controls.items()]
        for port in controls:
            self.spares[port] = Spares(self, port)
        try:
            await self.stop.wait()
        finally:
            for _, server in servers:
                server.close()
            await asyncio.gather(*(spare.close() for spare in self.spares.values()), return_exceptions=True)
            for task in [*watchers, *self.connections]:
                task.cancel()
            await asyncio.gather(*watchers, *self.connections, return_exceptions=True)
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
        if self.failure is not None:
            raise self.failure
        _note("stopped forwarding")
        return 0

    async def _bind(self) -> list[tuple[Spec, asyncio.Server]]:
        servers: list[tuple[Spec, asyncio.Server]] = []
        for spec in self.specs:
            try:
                server = await asyncio.start_server(lambda r, w, s=spec: self._accept(s, r, w), "127.0.0.1", spec.local,
                                                    reuse_address=True)
            except OSError as exc:
                for _, other in servers:
                    other.close()
                why = exc.strerror or str(exc)
                hint = " (choose another LOCAL port, or 0 for any free one)" if spec.local else ""
                raise LslError(f"cannot listen on 127.0.0.1:{spec.local}: {why}{hint}") from None
            servers.append((spec, server))
        return servers

    def _announce(self, bound: list[tuple[Spec, int]], warnings: list[str]) -> None:
        if self.as_json:
            sys.stdout.write(json.dumps([{"local": port, "remote": spec.remote, "url": f"http://127.0.0.1:{port}/"}
                                         for spec, port in bound]) + "\n")
            sys.stdout.flush()
        else:
            for spec, port in bound:
                _note(f"Forwarding 127.0.0.1:{port} -> {self.name}:{spec.remote}")
            _note("Ctrl-C to stop")
        for warning in warnings:
            _note(warning)

    async def _watch_control(self, port: int, ws: Any) -> None:
        """Wait for the control connection to end: the environment stopped, access went (final), or
        the server went away (re-open it for RECONNECT_FOR seconds)."""
        from websockets.exceptions import ConnectionClosed

        while True:
            refusal: tuple[str, str] | None = None
            try:
                async for message in ws:
                    if isinstance(message, str):
                        refusal = parse_refusal(message) or refusal
            except ConnectionClosed:
                pass
            code = ws.close_code
            if refusal is not None or code in (CLOSE_NOT_FOUND, CLOSE_FORBIDDEN, CLOSE_UNAVAILABLE):
                what, detail = refusal or ("closed", f"the server ended the forward (code {code})")
                self._fail(self._ended(refusal_error(code, what, detail)))
                return
            deadline = asyncio.get_running_loop().time() + RECONNECT_FOR
            delay = 0.25
            _note(f"lost the connection to the server (code {code}); reconnecting")
            while True:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 4.0)
                try:
                    ws, _ready = await self._open(port, control=True)
                    _note("reconnected")
                    break
                except (Unreachable, ServerError) as exc:
                    if asyncio.get_running_loop().time() > deadline:
                        self._fail(Unreachable(f"lost the server and it is not back after {RECONNECT_FOR:.0f} s "
                                               f"({exc.message}); stopped forwarding"))
                        return
                except LslError as exc:
                    self._fail(self._ended(exc))
                    return

    def _ended(self, exc: LslError) -> LslError:
        if isinstance(exc, Conflict):
            return EnvironmentStopped(f"{self.name}: {exc.message} Stopped forwarding.")
        exc.args = (f"{self.name}: {exc.message} Stopped forwarding.",)
        return exc

    def _fail(self, exc: LslError) -> None:
        if self.failure is None:
            self.failure = exc
        self.stop.set()

    # --- one connection ---------------------------------------------------------------------------

    def _refused(self, label: str, exc: LslError) -> None:
        """A connection refused: said; the end of the forward if the environment or access is gone."""
        _note(f"{label}: {exc.message}")
        if isinstance(exc, (NotFound, AuthError)):
            self._fail(self._ended(exc))

    def _accept(self, spec: Spec, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.create_task(self._connection(spec, reader, writer))
        self.connections.add(task)
        task.add_done_callback(self.connections.discard)

    async def _connection(self, spec: Spec, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        from websockets.exceptions import ConnectionClosed

        local = writer.get_extra_info("sockname")
        label = f"127.0.0.1:{local[1] if local else spec.local} -> {self.name}:{spec.remote}"
        spare = self.spares.get(spec.remote)
        ws = await spare.take() if spare is not None else None
        from_spare = ws is not None
        if ws is None:  # none ready (a burst of connections, or the server is older than spares)
            try:
                ws, _ready = await self._open(spec.remote, control=False)
            except LslError as exc:
                self._refused(label, exc)
                writer.transport.abort()  # refused: the local client sees a reset, as from a closed port
                return
        window = Window()
        window_open = asyncio.Event()
        window_open.set()
        inbox: asyncio.Queue[Any] = asyncio.Queue()
        # A spare's `ready` (or its refusal) comes while the first bytes are already on their way:
        # the server holds them until the tunnel is open and the check passed.
        state: dict[str, Any] = {"eof": False, "ready": not from_spare, "refusal": None, "recycled": False,
                                 "eof_in": False}

        async def upstream() -> None:  # local socket → websocket
            try:
                while True:
                    if not window.open:
                        window_open.clear()
                        await window_open.wait()
                    data = await reader.read(READ_SIZE)
                    if not data:
                        await ws.send(json.dumps({"type": "eof"}))
                        return
                    window.sent += len(data)
                    await ws.send(data)
            except (ConnectionError, OSError):
                await ws.close()  # the local client reset: end the remote connection too
            except ConnectionClosed:
                pass

        async def receive() -> None:  # websocket → inbox (acks and eof at once)
            try:
                async for message in ws:
                    if isinstance(message, bytes):
                        inbox.put_nowait(message)
                        continue
                    try:
                        parsed = json.loads(message)
                    except ValueError:
                        continue
                    if not isinstance(parsed, dict):
                        continue
                    kind = parsed.get("type")
                    if kind == "standby" and state["eof_in"]:
                        state["recycled"] = True  # the server ended this connection and kept the websocket
                        return
                    if kind == "ready":
                        state["ready"] = True
                    elif kind == "ack":
                        window.ack(parsed.get("bytes"))
                        if window.open:
                            window_open.set()
                    elif kind == "eof":
                        state["eof_in"] = True
                        inbox.put_nowait(_EOF)
                    elif "error" in parsed or kind == "error":
                        refusal = parse_refusal(message)
                        detail = refusal[1] if refusal else str(parsed.get("detail") or "error")
                        if state["ready"] or refusal is None:
                            _note(f"{label}: {detail}")
                        else:
                            state["refusal"] = refusal
            except ConnectionClosed:
                pass
            finally:
                if not state["ready"]:  # a spare refused when opened: as a refused connection
                    closed = f"the server closed the connection to port {spec.remote} (code {ws.close_code})"
                    what, detail = state["refusal"] or ("closed", closed)
                    self._refused(label, refusal_error(ws.close_code, what, detail))
                inbox.put_nowait(_CLOSED)

        async def deliver() -> None:  # inbox → local socket, acked once drained
            delivered = acked = 0
            while True:
                item = await inbox.get()
                if item is _CLOSED:
                    return
                if item is _EOF:
                    state["eof"] = True
                    if writer.can_write_eof():
                        writer.write_eof()
                    continue
                writer.write(item)
                await writer.drain()
                delivered += len(item)
                if due_ack(delivered, acked):
                    acked = delivered
                    try:
                        await ws.send(json.dumps({"type": "ack", "bytes": delivered}))
                    except ConnectionClosed:
                        pass

        tasks = [asyncio.create_task(upstream()), asyncio.create_task(receive())]
        try:
            await deliver()
        except (ConnectionError, OSError):
            pass  # the local client went away
        finally:
            recycled = state["eof"] and state["recycled"]
            if recycled:  # the server has our eof: upstream has sent everything
                await asyncio.wait(tasks, timeout=2)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if from_spare:
                spare.release(ws, recycled)
            else:
                await _close_quietly(ws)  # closing anyway: a peer already gone is fine
            if state["eof"]:
                writer.close()
            else:
                writer.transport.abort()  # the remote end did not finish cleanly: say so with a reset


class Spares:
    """Websockets to one forwarded port that are authenticated, access-checked and watched by the
    server but have no tunnel yet (`?spare=1`: the server says `standby`). A new local connection
    takes one and says `open`: the server only opens the tunnel (re-checking access alongside if
    its check is more than a couple of seconds old) and the client's first bytes follow at once.
    The TCP and websocket handshake, the token lookup and the access check, most of what a new
    connection cost, are paid ahead of need, or not at all: a connection that ends cleanly (eof
    both ways) leaves its websocket a spare again (the server says `standby` once more), so a
    client that opens one connection after another reuses one websocket, like HTTP keep-alive.

    SPARES are kept ready per port; up to SPARE_KEEP come back after a burst. A connection that
    finds none idle waits for one being opened (it is ahead of any new dial), else dials a spare
    of its own. A spare lives at most SPARE_MAX_AGE from its handshake (the server refuses to open
    older ones: it was authenticated once, and must not outlive a revoked token for long)."""

    def __init__(self, forwarder: Forwarder, port: int, size: int = SPARES) -> None:
        self.forwarder, self.port, self.size = forwarder, port, size
        self.idle: collections.deque[tuple[Any, float]] = collections.deque()  # (websocket, handshake time)
        self.born: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()
        self.waiters: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.filling: set[asyncio.Task[None]] = set()
        self.in_use = 0
        self.delay = 0.0
        self.supported = True
        self.replenish()

    def replenish(self) -> None:
        while (self.supported and not self.forwarder.stop.is_set()
               and len(self.idle) + len(self.filling) + self.in_use < self.size + len(self.waiters)):
            task = asyncio.create_task(self._fill())
            self.filling.add(task)
            task.add_done_callback(self.filling.discard)

    async def _dial(self) -> Any:
        """A new spare; None if it could not be had (refused, unreachable, a server without spares)."""
        try:
            ws, first = await self.forwarder._open(self.port, control=False, spare=True)
        except LslError:  # connections dial on their own meanwhile, and say why
            self.delay = min(max(2 * self.delay, SPARE_RETRY[0]), SPARE_RETRY[1])
            return None
        if first.get("type") != "standby":  # a server older than spares opened a tunnel: not kept
            self.supported = False
            await _close_quietly(ws)
            return None
        self.delay = 0.0
        self.born[ws] = asyncio.get_running_loop().time()
        return ws

    async def _fill(self) -> None:
        if self.delay:
            await asyncio.sleep(self.delay)
        ws = await self._dial()
        if ws is not None:
            self._put(ws)
            return
        while self.waiters and not self.supported:
            self._hand(None)
        if self.waiters:
            self._hand(None)
        asyncio.get_running_loop().call_soon(self.replenish)

    def _hand(self, ws: Any) -> bool:
        """Give `ws` (None: dial yourself) to the connection waiting longest; False if none waits."""
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(ws)
                return True
        return False

    def _put(self, ws: Any) -> None:
        if self._hand(ws):
            self.in_use += 1
        elif len(self.idle) < SPARE_KEEP and not self.forwarder.stop.is_set():
            self.idle.append((ws, self.born.get(ws, 0.0)))
        else:
            asyncio.create_task(_close_quietly(ws))

    async def take(self) -> Any:
        """A spare, told to open its tunnel; None if none could be had (the caller dials as before)."""
        from websockets.exceptions import ConnectionClosed

        loop = asyncio.get_running_loop()
        while self.supported:
            ws = None
            while self.idle and ws is None:
                ws, born = self.idle.popleft()
                if loop.time() - born > SPARE_MAX_AGE - 5:
                    asyncio.create_task(_close_quietly(ws))
                    ws = None
            if ws is not None:
                self.in_use += 1
            elif self.filling and not self.delay:
                waiter = loop.create_future()
                self.waiters.append(waiter)
                try:
                    ws = await asyncio.wait_for(asyncio.shield(waiter), timeout=OPEN_TIMEOUT)
                except asyncio.TimeoutError:
                    return None
                finally:
                    if not waiter.done():
                        waiter.cancel()
                if ws is None:
                    return None
            else:
                ws = None if self.delay else await self._dial()
                if ws is None:
                    return None
                self.in_use += 1
            try:
                await ws.send(json.dumps({"type": "open"}))
                self.replenish()
                return ws
            except ConnectionClosed:  # the server restarted, or an event closed it: another
                self.in_use -= 1
        return None

    def release(self, ws: Any, recycled: bool) -> None:
        """A connection taken from here ended; `recycled`: cleanly, and the server kept its websocket."""
        self.in_use -= 1
        born = self.born.get(ws)
        if recycled and born is not None and asyncio.get_running_loop().time() - born < SPARE_MAX_AGE - 5:
            self._put(ws)
        else:
            asyncio.create_task(_close_quietly(ws))
        self.replenish()

    async def close(self) -> None:
        tasks = list(self.filling)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        idle, self.idle = list(self.idle), collections.deque()
        await asyncio.gather(*(_close_quietly(ws) for ws, _ in idle), return_exceptions=True)


async def _close_quietly(ws: Any) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(ws.close(), timeout=2)


def _note(text: str) -> None:
    sys.stderr.write(f"{text}\n")
    sys.stderr.flush()


def forward(client: Client, env: dict[str, Any], specs: list[Spec], *, as_json: bool) -> int:
    return asyncio.run(Forwarder(client, env, specs, as_json=as_json).run())
