"""asciicast v2 recordings (https://docs.asciinema.org/manual/asciicast/v2/), one file per session.

Threading contract: `output`, `input`, `resize`, `flush` and `close` are called on the event loop
and only queue (a tuple append per chunk); decoding, JSON encoding and writing happen in one
recording thread shared by the process, in the order queued (a single-worker executor), so a
flood's recording never competes with delivery on the loop.
"""

from __future__ import annotations

import codecs
import json
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import IO

from django.conf import settings

WRITER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lsl-recording")
# Output pieces closer than this are one asciicast event: a flood read in 4 KiB pieces would
# otherwise be thousands of JSON lines a second, with no visible difference on replay.
MERGE_WITHIN = 0.005


def recording_path(session_id: str) -> Path:
    return Path(settings.VAR_DIR) / "recordings" / f"{session_id}.cast"


class Recorder:
    """Appends events as they happen; output bytes are decoded incrementally so a
    UTF-8 character split across two reads is not mangled."""

    def __init__(self, session_id: str, cols: int, rows: int, title: str, started_at: float | None = None) -> None:
        self.path = recording_path(session_id)
        # Times count from the session's start (wall clock), so a process that takes a session over
        # appends to the same recording with times that go on, not from zero.
        self.start = started_at if started_at is not None else time.time()
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.queue: list[tuple[float, str, bytes | str]] = []
        self.closed = False
        self.file: IO[str] | None = None
        self.header = {"version": 2, "width": cols, "height": rows, "timestamp": int(self.start),
                       "title": title, "env": {"TERM": "xterm-256color"}}
        WRITER.submit(self._open)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = self.path.open("a", encoding="utf-8")
        if self.path.stat().st_size == 0:
            self.file.write(json.dumps(self.header) + "\n")

    def _now(self) -> float:
        return max(0.0, time.time() - self.start)

    def output(self, data: bytes) -> None:
        if not self.closed:
            self.queue.append((self._now(), "o", data))

    def input(self, data: bytes) -> None:
        if not self.closed:
            self.queue.append((self._now(), "i", data.decode("utf-8", errors="replace")))

    def resize(self, cols: int, rows: int) -> None:
        if not self.closed:
            self.queue.append((self._now(), "r", f"{cols}x{rows}"))

    def flush(self) -> None:
        """Hand what is queued to the recording thread (non-blocking)."""
        if self.queue:
            batch, self.queue = self.queue, []
            WRITER.submit(self._write, batch)

    def close(self) -> "Future[None]":
        """Write what is left and close; the future is done once the file is complete."""
        if not self.closed:
            self.flush()
            self.closed = True
            self._closed = WRITER.submit(self._close)
        return self._closed

    # --- the recording thread ---

    def _write(self, batch: list[tuple[float, str, bytes | str]]) -> None:
        if self.file is None:
            return
        lines: list[str] = []
        pending_at, pending = 0.0, []  # output being merged
        for at, kind, data in batch:
            if kind == "o":
                if pending and at - pending_at > MERGE_WITHIN:
                    lines.append(self._line(pending_at, "o", "".join(pending)))
                    pending = []
                if not pending:
                    pending_at = at
                assert isinstance(data, bytes)
                text = self.decoder.decode(data)
                if text:
                    pending.append(text)
                continue
            if pending:
                lines.append(self._line(pending_at, "o", "".join(pending)))
                pending = []
            lines.append(self._line(at, kind, str(data)))
        if pending:
            lines.append(self._line(pending_at, "o", "".join(pending)))
        self.file.write("".join(lines))
        self.file.flush()

    @staticmethod
    def _line(at: float, kind: str, data: str) -> str:
        return json.dumps([round(at, 6), kind, data]) + "\n"

    def _close(self) -> None:
        if self.file is not None:
            tail = self.decoder.decode(b"", final=True)
            if tail:
                self.file.write(self._line(self._now(), "o", tail))
            self.file.close()
            self.file = None
