"""A real websocket client for tests and benchmarks (speaks docs/protocol.md)."""

from __future__ import annotations

import copy
import json
import threading
import time
from typing import Any, Callable

import pyte
from websockets.sync.client import connect

ALT_SCREEN_MODES = {47, 1047, 1049}


class AltScreen(pyte.Screen):
    """pyte.Screen plus the alternate screen buffer (modes 47/1047/1049), which pyte ignores.

    Full-screen programs (vim, less, top) draw on the alternate screen and restore
    the main one on exit; without this a late joiner would see their leftovers.
    """

    def __init__(self, columns: int, lines: int) -> None:
        super().__init__(columns, lines)
        self.in_alt = False
        self._saved: tuple[Any, Any] | None = None

    def set_mode(self, *modes: int, **kwargs: Any) -> None:
        if kwargs.get("private") and ALT_SCREEN_MODES & set(modes) and not self.in_alt:
            self._saved = ({y: dict(line) for y, line in self.buffer.items()}, copy.copy(self.cursor))
            self.in_alt = True
            self.erase_in_display(2)
            modes = tuple(m for m in modes if m not in ALT_SCREEN_MODES)
        super().set_mode(*modes, **kwargs)

    def reset_mode(self, *modes: int, **kwargs: Any) -> None:
        if kwargs.get("private") and ALT_SCREEN_MODES & set(modes) and self.in_alt:
            self.in_alt = False
            saved, cursor = self._saved or ({}, self.cursor)
            self.buffer.clear()
            for y, line in saved.items():
                if y < self.lines:
                    self.buffer[y].update({x: ch for x, ch in line.items() if x < self.columns})
            self.cursor = cursor
            self.cursor.x = min(self.cursor.x, self.columns - 1)
            self.cursor.y = min(self.cursor.y, self.lines - 1)
            self.dirty.update(range(self.lines))
            modes = tuple(m for m in modes if m not in ALT_SCREEN_MODES)
        super().reset_mode(*modes, **kwargs)



ACK_EVERY = 64 * 1024


class TermClient:
    """Connects, reads in a background thread, acks what it consumes and renders the screen with pyte."""

    def __init__(self, url: str, *, token: str | None = None, cookie: str | None = None, origin: str | None = None,
                 client: str = "cli", cols: int = 80, rows: int = 24, render: bool = True, auto_ack: bool = True) -> None:
        headers = {}
        if token:
            headers["Authorization"] = f"Token {token}"
        if cookie:
            headers["Cookie"] = cookie
        self.ws = connect(f"{url}?client={client}&cols={cols}&rows={rows}", additional_headers=headers, origin=origin,
                          max_size=None, compression=None, open_timeout=10)
        self.render = render
        self.auto_ack = auto_ack
        self.screen = AltScreen(cols, rows)
        self.stream = pyte.ByteStream(self.screen)
        self.output = bytearray()  # live output only (not snapshots)
        self.received = 0
        self.events: list[dict[str, Any]] = []
        self.closed = threading.Event()
        self.close_code: int | None = None
        self._expect_snapshot = False
        self._acked = 0
        self._cond = threading.Condition()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for message in self.ws:
                with self._cond:
                    if isinstance(message, bytes):
                        self.received += len(message)
                        if self._expect_snapshot:
                            self._expect_snapshot = False
                            if self.render:
                                self.screen.reset()
                                self.stream.feed(message)
                        else:
                            self.output += message
                            if self.render:
                                self.stream.feed(message)
                        # Ack in batches, as a real client would (the protocol asks for one every window/2).
                        if self.auto_ack and self.received - self._acked >= ACK_EVERY:
                            self._acked = self.received
                            self.ws.send(json.dumps({"type": "ack", "bytes": self.received}))
                    else:
                        event = json.loads(message)
                        self.events.append(event)
                        if event["type"] == "snapshot":
                            self._expect_snapshot = True
                            if self.render:
                                self.screen.resize(event["rows"], event["cols"])
                        elif event["type"] == "resize" and self.render:
                            self.screen.resize(event["rows"], event["cols"])
                    self._cond.notify_all()
        except Exception:
            pass
        finally:
            self.close_code = self.ws.close_code
            self.closed.set()
            with self._cond:
                self._cond.notify_all()

    def send_input(self, data: str | bytes) -> None:
        self.ws.send(data.encode() if isinstance(data, str) else data)

    def send_json(self, payload: dict[str, Any]) -> None:
        self.ws.send(json.dumps(payload))

    def wait(self, predicate: Callable[["TermClient"], bool], timeout: float = 15.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"timed out waiting for {what}; screen={self.text()!r} events={self.events[-5:]}")
                self._cond.wait(min(remaining, 0.2))

    def wait_output(self, needle: bytes, timeout: float = 15.0) -> None:
        # Search only what arrived since the last look: floods are tens of MB.
        scanned = 0

        def found(c: "TermClient") -> bool:
            nonlocal scanned
            hit = c.output.find(needle, max(0, scanned - len(needle))) >= 0
            scanned = len(c.output)
            return hit

        self.wait(found, timeout, f"output {needle!r}")

    def wait_event(self, kind: str, timeout: float = 15.0, **match: Any) -> dict[str, Any]:
        def found(c: "TermClient") -> bool:
            return any(e["type"] == kind and all(e.get(k) == v for k, v in match.items()) for e in c.events)

        self.wait(found, timeout, f"event {kind} {match}")
        return [e for e in self.events if e["type"] == kind and all(e.get(k) == v for k, v in match.items())][-1]

    def text(self) -> list[str]:
        with self._cond:
            return [line.rstrip() for line in self.screen.display]

    def close(self) -> None:
        self.ws.close()
        self.thread.join(timeout=5)
