"""Benchmark clients for bench/terminal.py, run as their own processes (no Django here).

    python bench/term_clients.py      # then one JSON command per line on stdin, one JSON answer per line on stdout

One process holds several connections of one kind:

* ``lsl``: a participant of an LSL session (docs/protocol.md §2): it acks as real clients do (every
  64 KiB, and whenever output pauses for 50 ms), and tells a ``snapshot``'s redraw apart from live
  output;
* ``terminado``: a client of terminado's ``TermSocket`` (``["stdout", text]`` frames, no flow control);
* ``direct``: a TTY ``docker exec`` of /bin/bash, read straight from the engine's socket (the floor).

Commands (every answer echoes the command's ``seq``; ``ok: false`` with ``error`` when it failed):

``join``       connect ``count`` participants and wait until each has joined (LSL: its join snapshot
               received and processed; terminado: ``setup`` and its replay; direct: the prompt)
``arm``        start measuring a flood whose markers carry ``id``: counters are reset
``type``       the first participant types ``data`` (the flood command)
``collect``    wait (at most ``timeout`` s) until every participant has seen the end marker or was
               closed, then report each one (see ``Participant.report``)
``keystrokes`` the first participant types ``warmup + count`` single keys, timing each echo
``status``     how many connections are open, close codes so far
``leave``      the first participant types ^C (and ``exit`` if asked), then every connection is closed
``quit``       end the process

A flood is ``printf START-marker; yes | head -c N; printf END-marker``. The end counts as seen when
the end marker arrives in live output *or* in a snapshot's redraw (the screen that shows it), so a
participant that was resynced during the flood still finishes. Only live bytes (binary frames that
are not a snapshot's redraw; terminado's stdout payload, UTF-8 encoded) count as delivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import resource
import sys
import time
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

ACK_EVERY = 64 * 1024  # bytes: ack at least this often (docs/protocol.md, lag bound)
ACK_IDLE = 0.05  # seconds: and whenever output paused this long
TAIL = 96  # bytes kept from the previous frame, so a marker split over two frames is still found
HANDSHAKES = 8  # concurrent websocket handshakes per process (people arrive over time, not in one burst)
FINAL_STATUS = (401, 403, 404)  # a refused handshake that is not retried (docs/protocol.md §2.1)
FINAL_CLOSE = (1000, 4403, 4410)  # closed before joining with these: not retried either
PRESENCE = '{"type": "presence"'  # presence lists are not measured: not worth parsing (500 x 500 entries)
ESCAPES = re.compile(rb"\x1b(?:\[[0-9;?<>=!]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[()*+][0-9A-Za-z]|[ -/]*[0-~])")


def start_marker(run_id: str) -> re.Pattern[bytes]:
    return re.compile(rb"BENCH-START-" + run_id.encode() + rb" (\d+\.\d+)")


def end_marker(run_id: str) -> bytes:
    return b"BENCH-END-" + run_id.encode()


class Participant:
    """What every kind of client measures; subclasses connect, read and type."""

    kind = "?"

    def __init__(self, index: int) -> None:
        self.index = index
        self.joined = asyncio.Event()
        self.finished = asyncio.Event()  # the end marker seen, or the connection closed
        self.data_event = asyncio.Event()  # live output arrived (for keystroke echoes)
        self.connect_at: float | None = None
        self.joined_at: float | None = None
        self.close_code: int | None = None
        self.closed_at: float | None = None
        self.errors: list[str] = []  # `error` frames' codes
        self.exit_reason: str | None = None
        self.echo: bytearray | None = None  # live output kept while timing keystrokes
        self.task: asyncio.Task[None] | None = None
        self.retries = 0  # handshakes (or joins) that failed and were retried
        self.arm(None)

    def reset_connection(self) -> None:
        """Before a retried join: forget the failed connection."""
        self.joined.clear()
        self.finished.clear()
        self.close_code = self.closed_at = None

    # --- measuring ---------------------------------------------------------------------------
    def arm(self, run_id: str | None) -> None:
        self.run_id = run_id
        self.start_re = start_marker(run_id) if run_id else None
        self.end_bytes = end_marker(run_id) if run_id else b""
        self.live = 0  # live bytes since arm, up to the end marker
        self.snapshots = self.snapshot_bytes = self.lagging = 0
        self.lagging_at: list[float] = []  # when `lagging` frames came (first few)
        self.snapshots_at: list[float] = []  # when resync snapshots came (first few)
        self.start_epoch: float | None = None  # the producer's clock when it printed the start marker
        self.end_at: float | None = None
        self.end_via: str | None = None
        self.round_errors: list[str] = []
        self.closed_in_round = False
        self.tail = b""
        self.last_redraw = b""
        self.last_live_at: float | None = None
        if self.close_code is None:
            self.finished.clear()

    def on_live(self, data: bytes, now: float) -> None:
        if self.echo is not None:
            self.echo += data
            self.data_event.set()
        if self.run_id is None or self.end_at is not None:
            return
        self.live += len(data)
        self.last_live_at = now
        window = self.tail + data
        self._scan(window, now, "live")
        self.tail = window[-TAIL:]

    def on_snapshot(self, data: bytes, now: float) -> None:
        """A redraw: the join snapshot, or a resync (output was skipped)."""
        if not self.joined.is_set():
            self.joined_at = now
            self.joined.set()
            return
        if self.run_id is None or self.end_at is not None:
            return
        self.snapshots += 1
        self.snapshot_bytes += len(data)
        if len(self.snapshots_at) < 5:
            self.snapshots_at.append(now)
        self.tail = b""  # the live stream restarts after the redraw
        self.last_redraw = ESCAPES.sub(b"", data)
        self._scan(self.last_redraw, now, "snapshot")

    def _scan(self, data: bytes, now: float, via: str) -> None:
        if self.start_epoch is None and self.start_re is not None:
            match = self.start_re.search(data)
            if match:
                self.start_epoch = float(match.group(1))
        if data.find(self.end_bytes) >= 0:
            self.end_at, self.end_via = now, via
            self.finished.set()

    def on_error(self, code: str) -> None:
        self.errors.append(code)
        if self.run_id is not None:
            self.round_errors.append(code)

    def on_closed(self, code: int | None) -> None:
        self.close_code = code if code is not None else 1006
        self.closed_at = time.time()
        if self.run_id is not None and self.end_at is None:
            self.closed_in_round = True
        self.joined.set()  # unblocks a join that is waiting: it sees the close code
        self.finished.set()
        self.data_event.set()

    def report(self) -> dict[str, Any]:
        unfinished = {} if self.end_at is not None else {  # to tell why it did not finish
            "last_live_at": self.last_live_at, "tail": self.tail[-80:].decode(errors="replace"),
            "last_redraw_end": self.last_redraw.rstrip()[-200:].decode(errors="replace")}
        return {**unfinished, "index": self.index, "live": self.live, "snapshots": self.snapshots, "snapshot_bytes": self.snapshot_bytes,
                "lagging": self.lagging, "lagging_at": self.lagging_at, "snapshots_at": self.snapshots_at, "errors": self.round_errors, "close_code": self.close_code if self.closed_in_round else None,
                "end_at": self.end_at, "end_via": self.end_via, "start_epoch": self.start_epoch, "exit_reason": self.exit_reason}

    async def wait_echo(self, needle: bytes, timeout: float) -> None:
        assert self.echo is not None
        deadline = time.monotonic() + timeout
        while needle not in self.echo:
            if self.close_code is not None:
                raise ConnectionError(f"closed ({self.close_code})")
            self.data_event.clear()
            await asyncio.wait_for(self.data_event.wait(), max(0.001, deadline - time.monotonic()))

    # --- per kind ----------------------------------------------------------------------------
    async def connect(self, target: str, token: str, cols: int, rows: int) -> None:
        """Open the connection (the handshake); `wait_joined` then waits for the join."""
        raise NotImplementedError

    async def send_input(self, data: bytes) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def wait_joined(self) -> None:
        await self.joined.wait()
        if self.close_code is not None:
            raise ConnectionError(f"closed before joining ({self.close_code}, errors {self.errors})")


class LSLParticipant(Participant):
    kind = "lsl"
    ws: ClientConnection

    async def connect(self, target: str, token: str, cols: int, rows: int) -> None:
        self.ws = await connect(f"{target}?client=cli&cols={cols}&rows={rows}", additional_headers={"Authorization": f"Token {token}"},
                                max_size=None, compression=None, open_timeout=None)
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        ws, received, acked, redraw_next = self.ws, 0, 0, False
        try:
            while True:
                if received > acked:
                    try:
                        async with asyncio.timeout(ACK_IDLE):
                            message = await ws.recv()
                    except TimeoutError:  # output paused: ack what we have, as real clients do
                        acked = received
                        await ws.send(json.dumps({"type": "ack", "bytes": received}))
                        continue
                else:
                    message = await ws.recv()
                now = time.time()
                if isinstance(message, str):
                    if message.startswith(PRESENCE):
                        continue
                    frame = json.loads(message)
                    kind = frame.get("type")
                    if kind == "snapshot":
                        redraw_next = True
                    elif kind == "lagging":
                        self.lagging += 1
                        if self.run_id is not None and len(self.lagging_at) < 5:
                            self.lagging_at.append(now)
                    elif kind == "error":
                        self.on_error(str(frame.get("code")))
                    elif kind == "exit":
                        self.exit_reason = frame.get("reason")
                    continue
                received += len(message)
                if redraw_next:
                    redraw_next = False
                    self.on_snapshot(message, now)
                    acked = received
                    await ws.send(json.dumps({"type": "ack", "bytes": received}))
                    continue
                self.on_live(message, now)
                if received - acked >= ACK_EVERY:
                    acked = received
                    await ws.send(json.dumps({"type": "ack", "bytes": received}))
        except ConnectionClosed as exc:
            self.on_closed(exc.rcvd.code if exc.rcvd else None)
        except Exception as exc:  # noqa: BLE001 - reported as a close
            self.on_error(f"client: {exc.__class__.__name__}: {exc}")
            self.on_closed(None)

    async def send_input(self, data: bytes) -> None:
        await self.ws.send(data)

    async def close(self) -> None:
        await self.ws.close()


class TerminadoParticipant(Participant):
    kind = "terminado"
    ws: ClientConnection
    REPLAY_WAIT = 0.5  # seconds: terminado replays its buffer right after `setup`; nothing may come

    async def connect(self, target: str, token: str, cols: int, rows: int) -> None:
        self.setup = asyncio.Event()
        self.replayed = asyncio.Event()
        self.ws = await connect(target, max_size=None, compression=None, open_timeout=None)
        self.task = asyncio.create_task(self._read())
        await self.ws.send(json.dumps(["set_size", rows, cols]))
        await self.setup.wait()
        try:
            await asyncio.wait_for(self.replayed.wait(), self.REPLAY_WAIT)
        except TimeoutError:
            pass
        self.on_snapshot(b"", time.time())  # joined: what follows is live

    async def _read(self) -> None:
        try:
            async for message in self.ws:
                now = time.time()
                kind, *rest = json.loads(message)
                if kind == "stdout":
                    if self.joined.is_set():
                        self.on_live(rest[0].encode(), now)
                    else:
                        self.replayed.set()
                elif kind == "setup":
                    self.setup.set()
                elif kind == "disconnect":
                    self.exit_reason = "disconnect"
            self.on_closed(self.ws.close_code)
        except ConnectionClosed as exc:
            self.on_closed(exc.rcvd.code if exc.rcvd else None)
        except Exception as exc:  # noqa: BLE001
            self.on_error(f"client: {exc.__class__.__name__}: {exc}")
            self.on_closed(None)
        finally:
            self.setup.set()

    async def send_input(self, data: bytes) -> None:
        await self.ws.send(json.dumps(["stdin", data.decode()]))

    async def close(self) -> None:
        await self.ws.close()


class DirectParticipant(Participant):
    """A TTY `docker exec` of bash, as `docker exec -it` opens it, read from the engine's socket."""

    kind = "direct"

    async def connect(self, target: str, token: str, cols: int, rows: int) -> None:
        import docker

        def open_exec() -> Any:
            api = docker.from_env(version=os.environ.get("LSL_DOCKER_API_VERSION", "1.41"), timeout=60).api
            exec_id = api.exec_create(target, ["/bin/bash"], stdin=True, stdout=True, stderr=True, tty=True,
                                      environment={"TERM": "xterm-256color"})["Id"]
            sock = api.exec_start(exec_id, tty=True, socket=True)._sock
            try:
                api.exec_resize(exec_id, height=rows, width=cols)
            except docker.errors.APIError:
                pass
            return sock

        sock = await asyncio.to_thread(open_exec)
        sock.setblocking(False)
        self.reader, self.writer = await asyncio.open_connection(sock=sock, limit=1 << 20)
        self.task = asyncio.create_task(self._read())
        self.echo = bytearray()
        await self.send_input(b"export PS1='$ '\r")
        try:
            await self.wait_echo(b"$ ", 30)
        finally:
            self.echo = None
        self.on_snapshot(b"", time.time())

    async def _read(self) -> None:
        try:
            while True:
                data = await self.reader.read(65536)
                if not data:
                    break
                self.on_live(data, time.time())
        except Exception as exc:  # noqa: BLE001
            self.on_error(f"client: {exc.__class__.__name__}: {exc}")
        self.on_closed(1000)

    async def send_input(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def close(self) -> None:
        self.writer.close()


KINDS: dict[str, type[Participant]] = {"lsl": LSLParticipant, "terminado": TerminadoParticipant, "direct": DirectParticipant}


class ClientProcess:
    """The connections this process holds, and the commands that drive them."""

    def __init__(self) -> None:
        self.participants: list[Participant] = []

    async def handle(self, command: dict[str, Any]) -> dict[str, Any]:
        op = command["op"]
        handler = getattr(self, f"op_{op}", None)
        if handler is None:
            return {"ok": False, "error": f"unknown op {op!r}"}
        return await handler(command)

    async def op_join(self, command: dict[str, Any]) -> dict[str, Any]:
        cls = KINDS[command["kind"]]
        gate = asyncio.Semaphore(command.get("handshakes", HANDSHAKES))
        first = command.get("first_index", 0)
        fresh = [cls(first + i) for i in range(command["count"])]
        self.participants += fresh

        async def join(p: Participant) -> None:
            """Connect; a failed handshake or a close before joining is retried as real clients do:
            0.25 s doubling to 4 s, +-20% (docs/protocol.md §2.1), until the join's timeout."""
            delay = 0.25
            while True:
                try:
                    async with gate:  # the handshake; the join snapshot is waited for outside the gate
                        p.connect_at = p.connect_at or time.time()  # the first attempt: attach time counts from it
                        await p.connect(command["target"], command.get("token", ""), command["cols"], command["rows"])
                    await p.wait_joined()
                    return
                except InvalidStatus as exc:
                    if exc.response.status_code in FINAL_STATUS:
                        raise
                except ConnectionError:
                    if p.close_code in FINAL_CLOSE:
                        raise
                except (InvalidHandshake, OSError, TimeoutError, ConnectionClosed):
                    pass
                p.retries += 1
                p.reset_connection()
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(4.0, delay * 2)

        outcomes = await asyncio.gather(*(asyncio.wait_for(join(p), command["timeout"]) for p in fresh), return_exceptions=True)
        failures = [f"{o.__class__.__name__}: {o}"[:200] for o in outcomes if isinstance(o, BaseException)]
        gave_up = [p for p, o in zip(fresh, outcomes) if isinstance(o, BaseException)]
        for p in gave_up:  # a connection still on its way must not join later, unseen
            p.joined_at = None
            await self.drop(p)
        self.participants = [p for p in self.participants if p not in gave_up]
        return {"ok": not failures, "joined": len(fresh) - len(failures), "failures": failures[:5],
                "retries": sum(p.retries for p in fresh),
                "connect_at": [p.connect_at for p in fresh], "joined_at": [p.joined_at for p in fresh]}

    async def op_arm(self, command: dict[str, Any]) -> dict[str, Any]:
        for p in self.participants:
            p.arm(command["id"])
        return {"ok": True}

    async def op_type(self, command: dict[str, Any]) -> dict[str, Any]:
        sent_at = time.time()
        await self.participants[0].send_input(command["data"].encode())
        return {"ok": True, "sent_at": sent_at}

    async def op_collect(self, command: dict[str, Any]) -> dict[str, Any]:
        waits = [asyncio.create_task(p.finished.wait()) for p in self.participants]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=command["timeout"])
            for task in pending:
                task.cancel()
        return {"ok": True, "participants": [p.report() for p in self.participants]}

    async def op_keystrokes(self, command: dict[str, Any]) -> dict[str, Any]:
        """Type one key at a time; the round trip is until its echo arrives (^U every 50 keys clears the line)."""
        p = self.participants[0]
        p.echo = bytearray()
        try:
            await p.send_input(b"export PS1='$ '\r")
            await p.wait_echo(b"$ ", 10)
            await asyncio.sleep(0.3)
            rtts: list[float] = []
            for i in range(command["warmup"] + command["count"]):
                p.echo = bytearray()
                start = time.perf_counter()
                await p.send_input(b"a")
                await p.wait_echo(b"a", command.get("timeout", 5))
                if i >= command["warmup"]:
                    rtts.append(time.perf_counter() - start)
                if i % 50 == 49:
                    await p.send_input(b"\x15")
                    await asyncio.sleep(0.05)
            await p.send_input(b"\x15")
            return {"ok": True, "rtts": rtts}
        finally:
            p.echo = None

    async def op_status(self, command: dict[str, Any]) -> dict[str, Any]:
        codes: dict[str, int] = {}
        for p in self.participants:
            if p.close_code is not None:
                codes[str(p.close_code)] = codes.get(str(p.close_code), 0) + 1
        errors = sorted({e for p in self.participants for e in p.errors})
        open_now = sum(1 for p in self.participants if p.joined_at is not None and p.close_code is None)
        return {"ok": True, "open": open_now, "close_codes": codes, "errors": errors}

    async def op_leave(self, command: dict[str, Any]) -> dict[str, Any]:
        status = await self.op_status(command)
        typist = self.participants[0] if self.participants else None
        if typist is not None and typist.joined_at is not None and typist.close_code is None:
            with contextlib.suppress(Exception):  # leaving anyway
                await typist.send_input(b"\x03")  # a flood that did not finish in time stops here
                if command.get("exit"):
                    await asyncio.sleep(0.1)
                    await typist.send_input(b"exit\r")
                await asyncio.sleep(0.2)

        await asyncio.wait_for(asyncio.gather(*(self.drop(p) for p in self.participants)), command.get("timeout", 20))
        self.participants = []
        return status

    @staticmethod
    async def drop(p: Participant) -> None:
        with contextlib.suppress(Exception):  # e.g. it never connected
            await p.close()
        if p.task is not None:
            p.task.cancel()

    async def op_cpu(self, command: dict[str, Any]) -> dict[str, Any]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {"ok": True, "cpu": usage.ru_utime + usage.ru_stime}


async def serve() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 24)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    process = ClientProcess()
    while line := await reader.readline():
        command = json.loads(line)
        if command["op"] == "quit":
            break
        try:
            answer = await process.handle(command)
        except Exception as exc:  # noqa: BLE001 - reported, the process carries on
            answer = {"ok": False, "error": f"{exc.__class__.__name__}: {exc}"[:500]}
        answer["seq"] = command.get("seq")
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    asyncio.run(serve())
