"""The server's copy of each session's screen, for late joiners and resyncs.

pyte emulates the terminal; a snapshot renders its screen back into escape
sequences that reproduce it on a fresh terminal (xterm.js, a real tty).

pyte is pure Python (~0.4–1 MB/s), far slower than a PTY can print, so output is
fed lazily: bytes queue in `pending` and are emulated when output goes quiet or
a snapshot is needed. If `pending` grows past COMPACT_AT during a flood, its
head is dropped except for the "sticky" state it set (modes, colours, scroll
region), keeping a tail far longer than a screenful. Snapshots are exact unless
a flood of output was compacted; then they show the flood's last screenful.
"""

from __future__ import annotations

import copy
import re
import threading
from typing import Any

import pyte
from pyte import graphics

COMPACT_AT = 256 * 1024
ALT_SCREEN_MODES = {47, 1047, 1049}
_PRIVATE_MODE = re.compile(rb"\x1b\[\?([0-9;]+)([hl])")
_SGR = re.compile(rb"\x1b\[[0-9;:]*m")
_SCROLL_REGION = re.compile(rb"\x1b\[[0-9]*(?:;[0-9]*)?r")

_FG = {name: code for code, name in graphics.FG_ANSI.items()}
_FG.update({name: code for code, name in graphics.FG_AIXTERM.items()})
_BG = {name: code for code, name in graphics.BG_ANSI.items()}
_BG.update({name: code for code, name in graphics.BG_AIXTERM.items()})


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


def _sticky_state(head: bytes) -> bytes:
    """The escape sequences in `head` whose effect outlives it: last setting of each private mode, SGR, scroll region."""
    modes: dict[str, bytes] = {}
    for match in _PRIVATE_MODE.finditer(head):
        for mode in match.group(1).split(b";"):
            modes[mode.decode()] = b"\x1b[?" + mode + match.group(2)
    out = b"".join(modes.values())
    for pattern in (_SCROLL_REGION, _SGR):
        last = None
        for last in pattern.finditer(head):
            pass
        if last is not None:
            out += last.group(0)
    return out


def _sgr(char: Any) -> str:
    params = ["0"]
    if char.bold:
        params.append("1")
    if char.italics:
        params.append("3")
    if char.underscore:
        params.append("4")
    if char.blink:
        params.append("5")
    if char.reverse:
        params.append("7")
    if char.strikethrough:
        params.append("9")
    for colour, table, extended in ((char.fg, _FG, "38"), (char.bg, _BG, "48")):
        if colour == "default":
            continue
        if colour in table:
            params.append(str(table[colour]))
        elif len(colour) == 6:
            try:
                r, g, b = (int(colour[i:i + 2], 16) for i in (0, 2, 4))
            except ValueError:
                continue
            params.append(f"{extended};2;{r};{g};{b}")
    return "\x1b[" + ";".join(params) + "m"


class ScreenState:
    """A session's emulated screen.

    Threading contract: `append` and `detach` run on the event loop only; `feed`,
    `render` and `resize` run in one worker thread, in the order the loop
    detached the bytes, so emulation never reorders output.
    """

    def __init__(self, cols: int, rows: int) -> None:
        self.screen = AltScreen(cols, rows)
        self.stream = pyte.ByteStream(self.screen)
        self.pending = bytearray()
        self._reset_pending = False
        self.lock = threading.Lock()

    def append(self, data: bytes) -> None:
        """Queue output (cheap; called for every chunk on the event loop)."""
        self.pending += data
        if len(self.pending) > COMPACT_AT:
            self._compact()

    def _compact(self) -> None:
        keep = max(32 * 1024, self.screen.columns * self.screen.lines * 8)
        head, tail = bytes(self.pending[:-keep]), bytes(self.pending[-keep:])
        # Start the tail at a line boundary so it does not begin mid-escape-sequence.
        newline = tail.find(b"\n")
        if 0 <= newline < len(tail) - 1:
            head, tail = head + tail[: newline + 1], tail[newline + 1:]
        state = _sticky_state(head)
        self._reset_pending = True  # the worker clears the stale screen before feeding this
        self.pending = bytearray(state + b"\r\n" * self.screen.lines + tail)

    def detach(self) -> tuple[bool, bytes]:
        """Hand the queued bytes to the worker (event loop side)."""
        reset, data = self._reset_pending, bytes(self.pending)
        self._reset_pending, self.pending = False, bytearray()
        return reset, data

    def feed(self, reset: bool, data: bytes) -> None:
        """Emulate detached bytes (slow: worker thread)."""
        with self.lock:
            if reset:
                self.screen.reset()
            if data:
                self.stream.feed(data)

    def flush(self) -> None:
        """detach + feed in one go, for single-threaded callers (tests, tools)."""
        self.feed(*self.detach())

    def resize(self, cols: int, rows: int) -> None:
        with self.lock:
            self.screen.resize(rows, cols)

    def snapshot(self) -> bytes:
        """flush + render, for single-threaded callers."""
        self.flush()
        return self.render()

    def render(self) -> bytes:
        """Escape sequences that redraw the emulated screen on a freshly reset terminal.

        In the alternate screen, the saved main screen is drawn first, then the
        alternate one: a late joiner then gets the main screen back when the
        full-screen program exits, like everyone else.
        """
        with self.lock:
            screen = self.screen
            out: list[str] = ["\x1bc"]  # RIS: start from a known state
            if screen.in_alt and screen._saved is not None:
                saved_buffer, saved_cursor = screen._saved
                self._draw(out, saved_buffer)
                out.append(f"\x1b[{saved_cursor.y + 1};{saved_cursor.x + 1}H\x1b[?1049h")
            self._draw(out, screen.buffer)
            if screen.margins:
                out.append(f"\x1b[{screen.margins.top + 1};{screen.margins.bottom + 1}r")
            out.append(f"\x1b[{screen.cursor.y + 1};{screen.cursor.x + 1}H")
            out.append(_sgr(screen.cursor.attrs))
            if screen.cursor.hidden:
                out.append("\x1b[?25l")
            if pyte.modes.DECAWM not in screen.mode:
                out.append("\x1b[?7l")
            for private_mode in (1, 2004):  # application cursor keys, bracketed paste
                if (private_mode << 5) in screen.mode:
                    out.append(f"\x1b[?{private_mode}h")
            return "".join(out).encode("utf-8")

    def _draw(self, out: list[str], buffer: Any) -> None:
        columns = self.screen.columns
        out.append("\x1b[H\x1b[2J")
        for y in range(self.screen.lines):
            line = buffer.get(y, {}) if isinstance(buffer, dict) and not hasattr(buffer, "default_factory") else buffer[y]
            default = self.screen.default_char
            out.append(f"\x1b[{y + 1};1H")
            last_sgr = ""
            # Trailing default blanks need not be drawn.
            width = max((cx + 1 for cx, ch in line.items()
                         if ch.data not in ("", " ") or ch.bg != "default" or ch.reverse), default=0)
            x = 0
            while x < min(width, columns):
                char = line.get(x, default)
                sgr = _sgr(char)
                if sgr != last_sgr:
                    out.append(sgr)
                    last_sgr = sgr
                out.append(char.data or " ")
                x += 1
                # A wide character fills two cells; pyte leaves the second one empty.
                if char.data and x < columns and line.get(x, default).data == "":
                    x += 1
        out.append("\x1b[0m")

    def display(self) -> list[str]:
        self.flush()
        with self.lock:
            return list(self.screen.display)
