"""asciicast v2 recordings (https://docs.asciinema.org/manual/asciicast/v2/), one file per session."""

from __future__ import annotations

import codecs
import json
import time
from pathlib import Path
from typing import IO

from django.conf import settings


def recording_path(session_id: str) -> Path:
    return Path(settings.VAR_DIR) / "recordings" / f"{session_id}.cast"


class Recorder:
    """Appends events as they happen; output bytes are decoded incrementally so a
    UTF-8 character split across two reads is not mangled."""

    def __init__(self, session_id: str, cols: int, rows: int, title: str, started_at: float | None = None) -> None:
        self.path = recording_path(session_id)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Times count from the session's start (wall clock), so a process that takes a session over
        # appends to the same recording with times that go on, not from zero.
        self.start = started_at if started_at is not None else time.time()
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.file: IO[str] | None = self.path.open("a", encoding="utf-8")
        if self.path.stat().st_size == 0:
            header = {"version": 2, "width": cols, "height": rows, "timestamp": int(self.start),
                      "title": title, "env": {"TERM": "xterm-256color"}}
            self.file.write(json.dumps(header) + "\n")

    def _event(self, kind: str, data: str) -> None:
        if self.file is not None:
            self.file.write(json.dumps([round(max(0.0, time.time() - self.start), 6), kind, data]) + "\n")

    def output(self, data: bytes) -> None:
        text = self.decoder.decode(data)
        if text:
            self._event("o", text)

    def input(self, data: bytes) -> None:
        self._event("i", data.decode("utf-8", errors="replace"))

    def resize(self, cols: int, rows: int) -> None:
        self._event("r", f"{cols}x{rows}")

    def flush(self) -> None:
        if self.file is not None:
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            tail = self.decoder.decode(b"", final=True)
            if tail:
                self._event("o", tail)
            self.file.close()
            self.file = None
