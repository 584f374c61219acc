"""The server's copy of each session's screen, kept by xterm.js in a node child process.

One node process per server process (sessions/emulator/emulator.js, bundled by `make assets`
into sessions/emulator/dist/emulator.cjs) holds one headless xterm.js Terminal per session key.
Output is shipped to it off the hot path: `feed` only appends a frame (the caller's bytes, not
copied) to a queue that one `loop.call_soon` flush hands to node's stdin with a single writev;
node parses in the background (15-55 MiB/s, at the lowest CPU priority, outside the GIL: pyte managed ~0.1-1)
and serializes a snapshot on request. xterm.js clients draw a snapshot exactly as the live
stream drew it: the same parser built it.

Exactness: a snapshot reflects every byte fed (and every resize) before `snapshot()` started
and none after -- the request is queued when the coroutine first runs, so `await
emulator.snapshot(key)` pins it at the call. The only inexact case in normal operation is a
flood: node parses output in batches 250 ms apart and, when a batch is over 256 KiB (output
faster than about 1 MiB/s), or more than LSL_EMULATOR_BACKLOG bytes wait (node runs at the
lowest CPU priority, so on a busy machine delivering output wins the cores), or more than 1 MiB
waits when a snapshot is asked for (a joiner never waits long), it drops the head of that
backlog except its sticky state (private modes, SGR, scroll region) and logs once that snapshots
may be approximate; they then show the flood's last screenfuls. Following a flood byte by byte
would cost up to a core (xterm.js: ~60 ms of CPU per MiB of short lines). (Never in a snapshot: the window title, tab stops, OSC 8 hyperlinks, underline
styles and colours, the attributes saved with the cursor -- SerializeAddon does not write them.)

Node dying is survivable: each terminal keeps the last LSL_KEEPER_RING bytes it was fed (and the
private modes and SGR of what was trimmed off), so the next use restarts node and replays every
open terminal from that tail -- exact again unless a terminal printed more than that. A snapshot
in flight when node dies is retried once, replayed up to the same point of the stream; if that
fails too it raises `EmulatorUnavailable`. A node that stops reading (more than 32 MiB waiting
for its stdin and the pipe not moving) or answering (SNAPSHOT_TIMEOUT) is killed and treated the
same way. node runs in its own session, dies with this process (stdin EOF, PR_SET_PDEATHSIG
through setpriv) and is always reaped.

Threading contract: every method runs on one asyncio event loop (the first one that uses the
instance); nothing blocks it: pipes are non-blocking and served with add_reader/add_writer.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import re
import shutil
import struct
import subprocess
import time
from collections import deque
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

from django.conf import settings

from lsl_site.errors import DomainError

log = logging.getLogger(__name__)

# node parses at the lowest priority: on a busy machine delivery wins the cores and node falls
# behind (its backlog is bounded, see emulator.js); with a core to spare it keeps up and every
# snapshot is exact.
NICE = 19

# Frames, both ways: type, key length, payload length, key, payload (emulator.js has the list).
_HEADER = struct.Struct(">cHI")
_SIZE = struct.Struct(">HH")
_ID = struct.Struct(">I")
_OPEN, _DATA, _RESIZE, _CLOSE, _SNAPSHOT, _FAILED = b"O", b"D", b"R", b"C", b"S", b"X"

MAX_STDIN_BACKLOG = 32 * 1024 * 1024  # bytes waiting for node's stdin past which it may hang...
HANG_AFTER = 1.0  # ...if its pipe has taken nothing for this many seconds (or 4x as many bytes wait)
SNAPSHOT_TIMEOUT = 15.0  # seconds; node answers in milliseconds, or within a backlog's parse time...
REPLAY_RATE = 4 * 1024 * 1024  # ...plus, after a restart, the replay's parse time at this (low) rate
PIPE_SIZE = 1024 * 1024  # fewer, larger writes and wake-ups than the default 64 KiB pipe
# A node that keeps dying (a broken install, input that crashes it) is restarted at most
# RESTARTS times per RESTART_WINDOW seconds; meanwhile snapshots fail fast and output is kept.
RESTARTS = 4
RESTART_WINDOW = 30.0
READ_SIZE = 1024 * 1024
IOV_MAX = 1024  # buffers per writev (Linux's limit)

# The state a trimmed head of output leaves behind, replayed before the tail after a restart.
# Only what is cheap to find in the Python process: private modes have a 3-byte literal prefix;
# SGR is only scanned after its last reset, near the end. (Node's own backlog compaction also
# keeps the scroll region.)
_PRIVATE_MODE = re.compile(rb"\x1b\[\?([0-9;]+)[hl]")
_SGR = re.compile(rb"\x1b\[([0-9;:]*)m")
_MAX_SGR = 32
BLOCK = 64 * 1024  # bytes per block of a terminal's kept tail


class EmulatorUnavailable(DomainError):
    """The terminal emulator (node) cannot produce a snapshot: not installed, not built, or dying."""

    status = 503
    code = "emulator_unavailable"


class _Terminal:
    """What this process knows of one terminal: its size and the tail of its output.

    The tail is a deque of blocks of about BLOCK bytes: small chunks wait in `small` and are
    joined into a block once (growing a bytearray would copy it at every step), large ones are
    blocks as they are (bytes: not copied), and trimming drops whole blocks from the front.
    """

    __slots__ = ("base", "blocks", "cols", "modes", "rows", "sgr", "size", "small", "small_size", "wire_key")

    def __init__(self, key: str, cols: int, rows: int) -> None:
        self.wire_key = key.encode()
        self.cols, self.rows = cols, rows
        self.blocks: deque[bytes] = deque()
        self.small: list[bytes] = []
        self.small_size = 0
        self.size = 0  # bytes in blocks and small
        self.base = 0  # stream offset of the tail's first byte: bytes trimmed so far
        self.modes: dict[bytes, bytes] = {}  # private mode -> its last setting, from trimmed output
        self.sgr: list[bytes] = []  # SGRs since the last reset, from trimmed output

    @property
    def fed(self) -> int:
        return self.base + self.size

    def add(self, data: bytes) -> None:
        self.size += len(data)
        if len(data) >= BLOCK // 4:
            self._seal()
            self.blocks.append(data)
            return
        self.small.append(data)
        self.small_size += len(data)
        if self.small_size >= BLOCK or len(self.small) >= 1024:
            self._seal()

    def _seal(self) -> None:
        if self.small:
            self.blocks.append(b"".join(self.small))
            self.small.clear()
            self.small_size = 0

    def tail(self) -> bytes:
        self._seal()
        return b"".join(self.blocks)

    def sticky(self) -> bytes:
        return b"".join(self.modes.values()) + b"".join(self.sgr)

    def trim(self, keep: int) -> None:
        """Drop whole blocks until about `keep` bytes are left, starting at a line boundary,
        remembering the sticky state of what was dropped."""
        self._seal()
        blocks, dropped = self.blocks, []
        while blocks and self.size - len(blocks[0]) >= keep:
            block = blocks.popleft()
            dropped.append(block)
            self.size -= len(block)
        if blocks and self.size > keep:  # a huge chunk fed at once: cut into it
            excess = self.size - keep
            dropped.append(blocks[0][:excess])
            blocks[0] = blocks[0][excess:]
            self.size = keep
        if blocks:
            newline = blocks[0].find(b"\n", 0, 4096)
            if 0 <= newline < len(blocks[0]) - 1:
                dropped.append(blocks[0][:newline + 1])
                blocks[0] = blocks[0][newline + 1:]
                self.size -= newline + 1
        head = b"".join(dropped)
        self.base += len(head)
        # Each distinct mode sequence once (a spinner toggling ?25 thousands of times costs a
        # findall, not a Python loop per match), then its last setting by rfind, in time order.
        changes = []
        for params in set(_PRIVATE_MODE.findall(head)):
            for action in (b"h", b"l"):
                at = head.rfind(b"\x1b[?" + params + action)
                if at >= 0:
                    changes.append((at, params, action))
        for _, params, action in sorted(changes):
            for mode in params.split(b";"):
                if mode:
                    self.modes.pop(mode, None)  # re-insert: the last setting wins, in time order
                    self.modes[mode] = b"\x1b[?" + mode + action
        reset, sgr = _last_sgrs(head)
        self.sgr = sgr if reset else (self.sgr + sgr)[-_MAX_SGR:]


def _last_sgrs(head: bytes) -> tuple[bool, list[bytes]]:
    """The SGRs in force at the end of `head`, oldest first, back to the last reset (found?).

    Walks escape sequences backwards with rfind, so 300 KB of plain text after a colour cost
    one search, and colourful output only the few sequences since its last reset.
    """
    found: list[bytes] = []
    end = len(head)
    for _ in range(4096):
        at = head.rfind(b"\x1b[", 0, end)
        if at < 0:
            break
        match = _SGR.match(head, at)
        if match is not None:
            found.append(match.group(0))
            params = match.group(1)
            if params in (b"", b"0") or params.startswith(b"0;"):
                return True, found[::-1]
            if len(found) >= _MAX_SGR:
                break
        end = at
    return False, found[::-1]


@dataclass(eq=False)
class _Request:
    """A snapshot asked for: where in the terminal's stream, so a retry replays exactly up to it."""

    id: int
    key: str
    future: asyncio.Future[bytes]
    offset: int
    cols: int
    rows: int
    scrollback: int = 0
    attempts: int = 0
    sent_to: subprocess.Popen[bytes] | None = field(default=None, repr=False)


def _pdeathsig_prefix() -> list[str]:
    """`setpriv --pdeathsig KILL` when util-linux has it: node dies with us even on SIGKILL.

    (preexec_fn + prctl would do the same, but it is unsafe in a threaded process like daphne.)
    """
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return []
    try:
        help_text = subprocess.run([setpriv, "--help"], capture_output=True, text=True, timeout=5, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [setpriv, "--pdeathsig", "KILL", "--"] if "--pdeathsig" in help_text else []


class Emulator:
    """One per process (get_emulator()); a node child process holding one xterm Terminal per key.

    `open`, `feed`, `resize` and `close` are synchronous and cheap, and never start a round trip;
    `snapshot` awaits node's answer. Frames for one key reach node in call order, so a snapshot
    reflects every feed and resize issued before it and none after. Unknown keys: `feed`,
    `resize` and `close` ignore them (output racing a close), `snapshot` raises KeyError.
    """

    def __init__(self, *, node: str | None = None, bundle: str | Path | None = None, scrollback: int | None = None,
                 backlog: int | None = None, ring: int | None = None) -> None:
        self.node = node or settings.LSL_NODE
        self.bundle = Path(bundle or settings.LSL_EMULATOR_BUNDLE)
        self.scrollback = settings.LSL_SESSION_SNAPSHOT_SCROLLBACK if scrollback is None else scrollback
        self.backlog = backlog or settings.LSL_EMULATOR_BACKLOG
        self.ring = ring or settings.LSL_KEEPER_RING
        # Trim tails when they reach 1.5x the ring: amortised, once per half a ring of output.
        self._trim_at = self.ring + self.ring // 2
        self._terminals: dict[str, _Terminal] = {}
        self._requests: dict[int, _Request] = {}
        self._next_id = 1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        # Frames not yet written to node's stdin: headers and the callers' own payload objects
        # (no copy), written with one writev per loop turn.
        self._out: deque[bytes | memoryview] = deque()
        self._out_size = 0
        self._out_limit = MAX_STDIN_BACKLOG
        self._in = bytearray()  # read from node's stdout, not yet a whole frame
        self._err = bytearray()  # a partial stderr line
        self._flush_scheduled = False
        self._writer_active = False
        self._started_at = 0.0
        self._replayed = 0  # bytes the current node was started with
        self._progress = 0.0  # when node's stdin last took bytes
        self._starts: deque[float] = deque(maxlen=RESTARTS)
        self._not_before = 0.0  # no start before this (monotonic)
        self._down_reason = "the terminal emulator has not started"
        self._prefix: list[str] | None = None

    # --- the API (event loop only) ------------------------------------------------------------

    def open(self, key: str, cols: int, rows: int) -> None:
        """Start keeping a terminal's screen (idempotent: an open key is resized if need be)."""
        if key in self._terminals:
            self.resize(key, cols, rows)
            return
        term = self._terminals[key] = _Terminal(key, cols, rows)
        if self._live():
            self._send(_OPEN, term.wire_key, _SIZE.pack(cols, rows))

    def feed(self, key: str, data: bytes) -> None:
        """Output of the terminal (cheap: called for every chunk; buffered, written once per loop turn)."""
        term = self._terminals.get(key)
        if term is None or not data:
            return
        data = bytes(data)  # the caller's object when it is bytes; a reused buffer is copied
        term.add(data)
        if term.size > self._trim_at:
            term.trim(self.ring)
        if self._live():
            self._send(_DATA, term.wire_key, data)

    def resize(self, key: str, cols: int, rows: int) -> None:
        term = self._terminals.get(key)
        if term is None or (term.cols, term.rows) == (cols, rows):
            return
        term.cols, term.rows = cols, rows
        if self._live():
            self._send(_RESIZE, term.wire_key, _SIZE.pack(cols, rows))

    def close(self, key: str) -> None:
        """Forget a terminal (node frees it); snapshots of it still in flight raise KeyError."""
        term = self._terminals.pop(key, None)
        if term is None:
            return
        for request in [r for r in self._requests.values() if r.key == key]:
            self._requests.pop(request.id, None)
            if not request.future.done():
                request.future.set_exception(KeyError(key))
        if self._proc is not None:  # a node that is not running has nothing to free
            self._send(_CLOSE, term.wire_key)

    async def snapshot(self, key: str, *, scrollback: int | None = None) -> bytes:
        """Escape sequences redrawing the terminal on a freshly reset one (they start with RIS).

        They reproduce the screen after every byte fed before this call: scrollback (the last
        `scrollback` lines, at most and by default LSL_SESSION_SNAPSHOT_SCROLLBACK), colours,
        the cursor (position, visibility,
        style), SGR, the alternate screen with the main one saved under it, scroll regions,
        saved cursors, line-drawing charsets and the modes that change what keys, paste and
        the mouse send.
        """
        term = self._terminals.get(key)
        if term is None:
            raise KeyError(key)
        loop = self._bind_loop()
        request = _Request(self._next_id, key, loop.create_future(), term.fed, term.cols, term.rows,
                           scrollback=self.scrollback if scrollback is None else max(0, scrollback))
        self._next_id += 1
        self._requests[request.id] = request
        try:
            if self._live():
                self._send_request(request)
            elif self._proc is None and not request.future.done():
                request.future.set_exception(EmulatorUnavailable(self._down_reason))
            # else a fresh node was started and its replay sent the request (or it could not start)
            while True:
                try:
                    return await asyncio.wait_for(asyncio.shield(request.future), self._patience())
                except TimeoutError:
                    if request.future.done():
                        continue
                    if self._proc is not None and request.sent_to is self._proc:
                        self._kill(f"did not answer a snapshot of {key} in time")
                    if not request.future.done() and (self._proc is None or request.sent_to is not self._proc):
                        request.future.set_exception(EmulatorUnavailable(self._down_reason))
        finally:
            self._requests.pop(request.id, None)

    def _patience(self) -> float:
        """How long a snapshot may take: a freshly restarted node first parses every tail."""
        replaying = self._replayed / REPLAY_RATE - (time.monotonic() - self._started_at)
        return SNAPSHOT_TIMEOUT + max(0.0, replaying)

    @property
    def pid(self) -> int | None:
        """node's pid while it runs (tests, metrics)."""
        return self._proc.pid if self._proc is not None else None

    def shutdown(self) -> None:
        """Stop node (stdin EOF, then SIGKILL after 2 s); the next use would start a new one."""
        proc = self._proc
        if proc is None:
            return
        self._detach(proc)
        try:
            proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        self._fail_all("the terminal emulator was shut down")

    # --- the process ----------------------------------------------------------------------------

    def _bind_loop(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError("the terminal emulator is bound to another event loop")
        return loop

    def _live(self) -> bool:
        """Whether node was already running, so the caller sends its frame itself.

        Otherwise node is (re)started here -- its replay includes whatever the caller just
        recorded -- or cannot be, and the caller's change lives only in the tails for now.
        """
        if self._proc is not None:
            return True
        self._start()
        return False

    def _command(self, node: str) -> list[str]:
        if self._prefix is None:
            self._prefix = _pdeathsig_prefix()
        # nice applies to all of node's threads (setpriority on a pid would miss them): a flood's
        # parsing yields the cores to delivering output.
        nice = shutil.which("nice")
        return [*self._prefix, *([nice, "-n", str(NICE)] if nice else []), node, "--expose-gc", str(self.bundle),
                f"--scrollback={self.scrollback}", f"--backlog={self.backlog}"]

    def _start(self) -> None:
        now = time.monotonic()
        if now < self._not_before:
            return
        if len(self._starts) == RESTARTS and now - self._starts[0] < RESTART_WINDOW:
            self._cannot_start(f"{self._down_reason}; it died {RESTARTS} times within {RESTART_WINDOW:.0f} s, "
                               f"so it is not restarted before {self._starts[0] + RESTART_WINDOW - now:.0f} s",
                               until=self._starts[0] + RESTART_WINDOW)
            return
        loop = self._bind_loop()
        node = shutil.which(self.node)
        if node is None:
            self._cannot_start(f"cannot start the terminal emulator: node ({self.node!r}, setting LSL_NODE) "
                               "was not found")
            return
        if not self.bundle.is_file():
            self._cannot_start(f"cannot start the terminal emulator: its bundle {self.bundle} is missing "
                               "(run `make assets`)")
            return
        command = self._command(node)
        try:
            # New session: a Ctrl-C at the server's terminal must not kill node before the server.
            proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    bufsize=0, close_fds=True, start_new_session=True)
        except OSError as exc:
            self._cannot_start(f"cannot start the terminal emulator ({self.node}): {exc}")
            return
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            os.set_blocking(pipe.fileno(), False)
        try:
            fcntl.fcntl(proc.stdin.fileno(), fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass  # above /proc/sys/fs/pipe-max-size: the default size works, with more wake-ups
        self._proc = proc
        self._started_at = self._progress = now
        self._starts.append(now)
        self._out.clear()
        self._out_size = 0
        self._in.clear()
        self._err.clear()
        loop.add_reader(proc.stdout.fileno(), self._on_stdout, proc)
        loop.add_reader(proc.stderr.fileno(), self._on_stderr, proc)
        # The replay may be far bigger than a hung node's backlog: allow for it while it drains.
        self._out_limit = 1 << 62
        self._replayed = replayed = self._replay()
        self._out_limit = MAX_STDIN_BACKLOG + replayed
        log.info("terminal emulator started (node pid %d, %d terminal(s), %d bytes replayed)",
                 proc.pid, len(self._terminals), replayed)

    def _replay(self) -> int:
        """Rebuild every open terminal in a fresh node: open, its tail, and the snapshots pending on it,
        each at the point of the stream where it was asked for."""
        by_key: dict[str, list[_Request]] = {}
        for request in self._requests.values():
            if request.future.done():
                continue
            if request.key in self._terminals:
                by_key.setdefault(request.key, []).append(request)
            else:
                request.future.set_exception(KeyError(request.key))
        for key, term in self._terminals.items():
            requests = sorted(by_key.get(key, ()), key=lambda r: r.id)
            cols, rows = (requests[0].cols, requests[0].rows) if requests else (term.cols, term.rows)
            self._send(_OPEN, term.wire_key, _SIZE.pack(cols, rows))
            sticky = term.sticky()
            if sticky:
                self._send(_DATA, term.wire_key, sticky)
            tail, at = term.tail(), 0
            for request in requests:
                upto = max(at, min(len(tail), request.offset - term.base))
                if upto > at:
                    self._send(_DATA, term.wire_key, tail[at:upto])
                    at = upto
                if (request.cols, request.rows) != (cols, rows):
                    cols, rows = request.cols, request.rows
                    self._send(_RESIZE, term.wire_key, _SIZE.pack(cols, rows))
                self._send_request(request)
            if at < len(tail):
                self._send(_DATA, term.wire_key, tail[at:])
            if (term.cols, term.rows) != (cols, rows):
                self._send(_RESIZE, term.wire_key, _SIZE.pack(term.cols, term.rows))
        return self._out_size

    def _cannot_start(self, reason: str, until: float | None = None) -> None:
        if reason != self._down_reason:
            log.error("%s", reason)
        self._down_reason = reason
        self._not_before = until or time.monotonic() + 5.0  # not once per output chunk
        self._fail_all(reason)

    def _fail_all(self, reason: str) -> None:
        for request in list(self._requests.values()):
            if not request.future.done():
                request.future.set_exception(EmulatorUnavailable(reason))
        self._requests.clear()

    def _kill(self, reason: str) -> None:
        proc = self._proc
        if proc is None:
            return
        try:
            proc.kill()
        except ProcessLookupError:
            pass
        self._died(proc, reason)

    def _died(self, proc: subprocess.Popen[bytes], reason: str) -> None:
        """node is gone (or killed): clean up, then retry the snapshots it owed once, in a new node."""
        if proc is not self._proc:
            return
        self._drain_stderr(proc)
        self._detach(proc)
        if proc.poll() is None:
            proc.kill()
        self._reap(proc, 0)
        self._down_reason = f"the terminal emulator (node pid {proc.pid}) {reason}"
        log.warning("%s after %.1f s; restarting it on next use", self._down_reason, time.monotonic() - self._started_at)
        for request in list(self._requests.values()):
            if request.attempts >= 2 and not request.future.done():
                request.future.set_exception(EmulatorUnavailable(
                    f"{self._down_reason}, twice while taking a snapshot of {request.key}"))
        self._requests = {i: r for i, r in self._requests.items() if not r.future.done()}
        if self._requests:
            self._start()  # in-flight snapshots are retried once, now
            if self._proc is None:
                self._fail_all(self._down_reason)

    def _detach(self, proc: subprocess.Popen[bytes]) -> None:
        """Stop serving node's pipes and close our ends (closing stdin tells a live node to exit)."""
        loop = self._loop
        assert loop is not None and proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        loop.remove_reader(proc.stdout.fileno())
        loop.remove_reader(proc.stderr.fileno())
        if self._writer_active:
            loop.remove_writer(proc.stdin.fileno())
            self._writer_active = False
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            pipe.close()
        self._proc = None
        self._out.clear()
        self._out_size = 0
        self._in.clear()

    def _reap(self, proc: subprocess.Popen[bytes], tries: int) -> None:
        # SIGKILLed: gone within milliseconds; poll rather than block the loop in wait().
        if proc.poll() is None and self._loop is not None and not self._loop.is_closed() and tries < 600:
            self._loop.call_later(0.05, self._reap, proc, tries + 1)

    # --- the pipes -------------------------------------------------------------------------------

    def _send(self, kind: bytes, key: bytes, payload: bytes = b"") -> None:
        out = self._out
        out.append(_HEADER.pack(kind, len(key), len(payload)) + key)
        if payload:
            out.append(payload)
        self._out_size += _HEADER.size + len(key) + len(payload)
        if self._out_size > self._out_limit and self._hung():
            self._kill(f"stopped reading its input ({self._out_size} bytes waiting)")
            return
        if not self._flush_scheduled and not self._writer_active:
            self._flush_scheduled = True
            assert self._loop is not None
            self._loop.call_soon(self._flush)

    def _hung(self) -> bool:
        """Past the backlog limit: is node hung? It reads far faster than terminals print (parsing
        or not), so a pipe that takes nothing now and took nothing for HANG_AFTER says so; so does
        a backlog 4x the limit even if it moves (a restart rebuilds from the tails: bounded)."""
        if self._out_size > 4 * self._out_limit:
            return True
        return self._write() == 0 and self._proc is not None and time.monotonic() - self._progress > HANG_AFTER

    def _send_request(self, request: _Request) -> None:
        term = self._terminals[request.key]
        request.attempts += 1
        request.sent_to = self._proc
        self._send(_SNAPSHOT, term.wire_key, _ID.pack(request.id) + _ID.pack(request.scrollback))

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._writer_active:
            self._write()

    def _write(self) -> int:
        """Write what the pipe takes now; wait for it to be writable (add_writer) if anything is left."""
        proc = self._proc
        if proc is None or proc.stdin is None:
            return 0
        fd = proc.stdin.fileno()
        out, total = self._out, 0
        while out:
            batch = list(islice(out, IOV_MAX))
            try:
                written = os.writev(fd, batch)
            except BlockingIOError:
                break
            except OSError as exc:  # EPIPE: node is gone; its stdout EOF may not have been seen yet
                self._died(proc, f"stopped reading its input ({exc})")
                return 0
            total += written
            full = written < sum(map(len, batch))
            while written:
                first = out[0]
                if len(first) <= written:
                    written -= len(first)
                    out.popleft()
                else:
                    out[0] = memoryview(first)[written:]
                    written = 0
            if full:
                break
        if total:
            self._out_size -= total
            self._progress = time.monotonic()
            if self._out_limit > MAX_STDIN_BACKLOG:
                self._out_limit = max(MAX_STDIN_BACKLOG, self._out_limit - total)
        assert self._loop is not None
        if self._out and not self._writer_active:
            self._loop.add_writer(fd, self._write)
            self._writer_active = True
        elif not self._out and self._writer_active:
            self._loop.remove_writer(fd)
            self._writer_active = False
        return total

    def _on_stdout(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        try:
            data = os.read(proc.stdout.fileno(), READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._died(proc, "exited")
            return
        buf = self._in
        buf += data
        at, size = 0, len(buf)
        while size - at >= _HEADER.size:
            kind, key_length, length = _HEADER.unpack_from(buf, at)
            start = at + _HEADER.size
            end = start + key_length + length
            if end > size:
                break
            key = buf[start:start + key_length].decode(errors="replace")
            (request_id,) = _ID.unpack_from(buf, start + key_length)
            body = bytes(buf[start + key_length + _ID.size:end])
            at = end
            self._answer(kind, key, request_id, body)
        del buf[:at]

    def _answer(self, kind: bytes, key: str, request_id: int, body: bytes) -> None:
        request = self._requests.get(request_id)
        if request is None or request.future.done():
            return  # its caller gave up, or the terminal was closed
        if kind == _SNAPSHOT:
            request.future.set_result(body)
        elif key not in self._terminals:
            request.future.set_exception(KeyError(key))
        else:
            request.future.set_exception(EmulatorUnavailable(
                f"the terminal emulator could not take a snapshot of {key}: {body.decode(errors='replace')}"))

    def _on_stderr(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stderr is not None
        try:
            data = os.read(proc.stderr.fileno(), 64 * 1024)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            assert self._loop is not None
            self._loop.remove_reader(proc.stderr.fileno())
            self._log_stderr(final=True)
            return
        self._err += data
        self._log_stderr()

    def _drain_stderr(self, proc: subprocess.Popen[bytes]) -> None:
        """What a dying node said last (a stack trace) reaches the log before we close the pipe."""
        assert proc.stderr is not None
        try:
            while chunk := os.read(proc.stderr.fileno(), 64 * 1024):
                self._err += chunk
        except OSError:
            pass
        self._log_stderr(final=True)

    def _log_stderr(self, final: bool = False) -> None:
        *lines, rest = self._err.split(b"\n")
        if final and rest:
            lines.append(rest)
            rest = b""
        for line in lines:
            text = line.decode(errors="replace").rstrip()
            if text.startswith("info: "):  # what emulator.js expects to happen (a flood skipped)
                log.info("node: %s", text[6:])
            elif text:
                log.warning("node: %s", text)
        self._err = bytearray(rest)


_instance: Emulator | None = None


def get_emulator() -> Emulator:
    """The process's emulator, bound to the running loop (node starts on first use)."""
    global _instance
    loop = asyncio.get_running_loop()
    if _instance is not None and _instance._loop is not None and _instance._loop is not loop:
        if not _instance._loop.is_closed():
            raise RuntimeError("the terminal emulator is already used by another running event loop")
        # Its loop is gone (a test's asyncio.run, a restarted server loop): so are its terminals' users.
        _instance._loop = None
        stale = _instance._proc
        if stale is not None:
            for pipe in (stale.stdin, stale.stdout, stale.stderr):
                if pipe is not None:
                    pipe.close()
            stale.kill()
            stale.wait()
        _instance = None
    if _instance is None:
        _instance = Emulator()
    return _instance
