"""The xterm.js screen model (sessions/emulator.py + sessions/emulator/emulator.js), with a real node.

Snapshots are checked against an independent emulator: the same bytes are fed straight to a
pyte screen (the reference), the snapshot is written to a fresh pyte screen (what a late joiner
sees), and both must show the same cells, colours and cursor. Some checks also replay a snapshot
into xterm.js itself (a second key) and require the very same snapshot back: xterm.js clients
then render it exactly.

No database, no engine. Needs node >= 18: without it these tests skip, except with CI=true.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pyte
import pytest

from sessions.emulator import NICE
from tests.wsclient import AltScreen

REPO = Path(__file__).resolve().parent.parent
SOURCE = REPO / "sessions" / "emulator" / "emulator.js"
T = TypeVar("T")


@pytest.fixture(scope="session", autouse=True)
def bundle() -> Path:
    """The node bundle, built (`node frontend/build.mjs`, about half a second) if missing or stale."""
    from django.conf import settings

    if shutil.which(settings.LSL_NODE) is None:
        # The server needs node (its screen model; `manage.py check` says so too): a failure, never a skip.
        pytest.fail(f"node ({settings.LSL_NODE}) is required: install Node.js 18 or newer", pytrace=False)
    path = Path(settings.LSL_EMULATOR_BUNDLE)
    if not path.is_file() or path.stat().st_mtime < SOURCE.stat().st_mtime:
        if not (REPO / "frontend" / "node_modules" / "@xterm" / "headless").is_dir():
            pytest.fail("frontend/node_modules lacks @xterm/headless: run `make assets`", pytrace=False)
        built = subprocess.run([settings.LSL_NODE, "build.mjs"], cwd=REPO / "frontend", capture_output=True, text=True,
                               timeout=120, check=False)
        assert built.returncode == 0, built.stderr
    assert path.is_file()
    return path


def run(body: Callable[..., Awaitable[T]], **options: Any) -> T:
    """Run `body(emulator)` on a fresh loop with a fresh Emulator, and stop its node afterwards."""
    from sessions.emulator import Emulator

    async def main() -> T:
        emulator = Emulator(**options)
        try:
            return await body(emulator)
        finally:
            emulator.shutdown()

    return asyncio.run(main())


def reference(chunks: list[bytes], cols: int = 80, rows: int = 24) -> AltScreen:
    """The same output fed straight to pyte (with the alternate screen client-side emulation adds)."""
    screen = AltScreen(cols, rows)
    stream = pyte.ByteStream(screen)
    for chunk in chunks:
        stream.feed(chunk)
    return screen


def render(snapshot: bytes, cols: int = 80, rows: int = 24) -> AltScreen:
    """What a late joiner sees: the snapshot written to a fresh terminal."""
    return reference([snapshot], cols, rows)


def cells(screen: AltScreen) -> list[list[tuple[Any, ...]]]:
    return [[(c.data, c.fg, c.bg, c.bold, c.italics, c.underscore, c.reverse)
             for c in (screen.buffer[y][x] for x in range(screen.columns))] for y in range(screen.lines)]


def assert_same(actual: AltScreen, expected: AltScreen) -> None:
    assert actual.display == expected.display
    assert (actual.cursor.x, actual.cursor.y) == (expected.cursor.x, expected.cursor.y)
    assert cells(actual) == cells(expected)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def gone(pid: int) -> bool:
    """Reaped: neither running nor a zombie."""
    return not Path(f"/proc/{pid}").exists()


async def round_trip(emulator: Any, snapshot: bytes, cols: int, rows: int) -> bytes:
    """Replay a snapshot into a fresh xterm.js terminal and snapshot that."""
    key = f"replay-{time.monotonic_ns()}"
    emulator.open(key, cols, rows)
    emulator.feed(key, snapshot)
    try:
        return await emulator.snapshot(key)
    finally:
        emulator.close(key)


COLOURFUL = [
    b"plain text\r\n",
    b"\x1b[1mbold\x1b[0m \x1b[31mred\x1b[39m \x1b[42mgreen bg\x1b[0m \x1b[4;3munder italic\x1b[0m\r\n",
    b"\x1b[38;5;208m256-colour\x1b[0m \x1b[38;2;10;200;30mtruecolour\x1b[0m \x1b[7mreverse\x1b[0m\r\n",
    b"\x1b[44m      \x1b[0m <- blue blanks\r\n",
    b"$ \x1b[32m",  # a prompt, and the cursor's SGR left green
]


def test_plain_text_and_colours() -> None:
    async def body(emulator: Any) -> bytes:
        emulator.open("s", 80, 24)
        for chunk in COLOURFUL:
            emulator.feed("s", chunk)
        return await emulator.snapshot("s")

    snapshot = run(body)
    assert snapshot.startswith(b"\x1bc")
    shown = render(snapshot)
    assert shown.display[1].startswith("bold red green bg under italic")
    assert shown.buffer[2][0].fg == "ff8700"  # 256-colour 208
    assert shown.buffer[3][0].bg == "blue"
    assert_same(shown, reference(COLOURFUL))
    # The SGR in force carries over: what the shell prints next is green for the joiner too.
    for screen in (shown, reference(COLOURFUL)):
        pyte.ByteStream(screen).feed(b"next")
    assert shown.buffer[4][2].fg == "green"


def test_a_joiner_gets_scrollback_and_a_resync_need_not() -> None:
    """Lines scrolled off the top come with a snapshot (up to LSL_SESSION_SNAPSHOT_SCROLLBACK, or
    fewer when asked): a late joiner can scroll up; a resync, drawn again in a real terminal,
    would only pile them up in its own scrollback."""
    lines = b"".join(b"line-%03d\r\n" % i for i in range(100))

    async def body(emulator: Any) -> tuple[bytes, bytes, bytes]:
        emulator.open("s", 80, 24)
        emulator.feed("s", lines)
        return (await emulator.snapshot("s"), await emulator.snapshot("s", scrollback=0),
                await emulator.snapshot("s", scrollback=10))

    full, bare, some = run(body, scrollback=50)
    # The screen shows line-077 .. line-099 and the empty line the cursor is on.
    assert b"line-027" in full and b"line-026" not in full, "the last 50 lines above the screen, no more"
    assert b"line-077" in bare and b"line-076" not in bare, "only the screen"
    assert b"line-067" in some and b"line-066" not in some
    for snapshot in (full, bare, some):
        assert_same(render(snapshot), reference([lines]))


def test_utf8_split_across_feeds_and_wide_characters() -> None:
    text = "中文 wide: 日本語テキスト, accents: é ü ß\r\n".encode() + b"x" * 78 + "漢".encode() + b"\r\n$ "
    garbage = b"\xff\xfe\xc3 broken\r\x1b[K"  # invalid UTF-8, then the line is erased

    async def body(emulator: Any) -> bytes:
        emulator.open("s", 80, 24)
        emulator.feed("s", garbage)
        for i in range(len(text)):  # one byte per feed: every multi-byte sequence is split
            emulator.feed("s", text[i:i + 1])
        return await emulator.snapshot("s")

    snapshot = run(body)
    shown = render(snapshot)
    assert shown.display[0].startswith("中文 wide: 日本語テキスト, accents: é ü ß")
    assert shown.display[1].startswith("x" * 78)
    assert_same(shown, reference([garbage, text]))


def test_alternate_screen_with_the_main_screen_saved_under_it() -> None:
    main = [b"main line 1\r\nmain line 2\r\n\x1b[33m$ vim\x1b[0m"]
    alt = [b"\x1b[?1049h\x1b[H\x1b[2J~\r\n~\r\n\x1b[7m-- INSERT --\x1b[0m\x1b[1;5Hvim text"]

    async def body(emulator: Any) -> tuple[bytes, bytes]:
        emulator.open("s", 80, 24)
        for chunk in main + alt:
            emulator.feed("s", chunk)
        snapshot = await emulator.snapshot("s")
        return snapshot, await round_trip(emulator, snapshot, 80, 24)

    snapshot, again = run(body)
    assert again == snapshot
    shown, expected = render(snapshot), reference(main + alt)
    assert shown.in_alt
    assert shown.display[0].startswith("~   vim text")
    assert_same(shown, expected)
    # The full-screen program exits: the joiner gets the main screen and its cursor back.
    for screen in (shown, expected):
        pyte.ByteStream(screen).feed(b"\x1b[?1049l")
    assert shown.display[2].startswith("$ vim")
    assert_same(shown, expected)


def test_cursor_modes_scroll_region_and_charsets() -> None:
    setup = [
        b"".join(f"line {i}\r\n".encode() for i in range(30)),
        b"\x1b[?2004h\x1b[?1h\x1b[?1000h\x1b[?1006h\x1b[4 q",  # bracketed paste, app cursor keys, SGR mouse, cursor style
        b"\x1b[5;20r\x1b[12;7Hcursor here\x1b[?25l",  # a scroll region, the cursor inside it, hidden
        b"\x1b7\x1b[3;3H\x1b7\x1b[12;18H",  # a saved cursor elsewhere (DECSC)
        b"\x1b(0",  # G0 = DEC line drawing
    ]
    # What the program prints next: line drawing, scrolling within the region, restoring the saved cursor.
    after = b"qqq\x1b[20;1H" + b"\n" * 3 + b"\x1b(Bscrolled\x1b8restored"

    async def body(emulator: Any) -> tuple[bytes, bytes, bytes, bytes]:
        emulator.open("s", 80, 24)
        for chunk in setup:
            emulator.feed("s", chunk)
        snapshot = await emulator.snapshot("s")
        again = await round_trip(emulator, snapshot, 80, 24)
        emulator.open("joiner", 80, 24)  # an xterm.js that joined late, from the snapshot
        emulator.feed("joiner", snapshot)
        for key in ("s", "joiner"):
            emulator.feed(key, after)
        return snapshot, again, await emulator.snapshot("s"), await emulator.snapshot("joiner")

    snapshot, again, live, joined = run(body)
    assert again == snapshot  # xterm.js restores every mode, region and cursor it reports
    for sequence in (b"\x1b[?2004h", b"\x1b[?1h", b"\x1b[?1000h", b"\x1b[?1006h", b"\x1b[?25l", b"\x1b[4 q",
                     b"\x1b[5;20r", b"\x1b(0"):
        assert sequence in snapshot, sequence
    # In xterm.js, the late joiner and the live terminal go on identically.
    assert joined == live
    shown = render(live).display
    assert shown[8].startswith("line 1cursor here───")  # drawn on row 12, scrolled up 3 within the region
    assert shown[2].startswith("lirestored") and shown[19].startswith("scrolled")
    # An independent emulator agrees on the screen, cursor and modes. (Not on what comes next: pyte
    # ignores charsets in UTF-8 mode and its DECRC depends on when the region was set.)
    rendered = render(snapshot)
    assert_same(rendered, reference(setup))
    assert rendered.cursor.hidden
    assert {1 << 5, 2004 << 5} <= rendered.mode  # pyte keeps private modes shifted: app cursor keys, bracketed paste


LATE_JOINER_CASES = {
    # output so far, what comes next
    "origin mode": (b"text\r\n\x1b[3;10r\x1b[?6h\x1b[2;5Hinside", b"X\x1b[Htop of region\x1b[20;1H\n\nbottom"),
    "pending wrap": (b"prompt\r\n" + b"w" * 80, b"X wrapped"),
    "alt screen with region": (b"main\r\n\x1b[?1049h\x1b[2;20r\x1b[5;3Hvim\x1b[?2004h\x1b[44m",
                               b"\x1b[20;1H\n\nscrolled\x1b[0m\x1b[?1049lback in main"),
    "wide char at the margin": (b"y" * 79 + "漢字".encode(), b"!"),
    "no wraparound": (b"\x1b[?7l" + b"z" * 90, b"END"),
}


def test_a_late_joiner_goes_on_exactly_like_the_live_terminal() -> None:
    """For each case, xterm.js fed the snapshot, then the next output, ends identical to the live one."""

    async def body(emulator: Any) -> dict[str, tuple[bytes, bytes, bytes]]:
        results = {}
        for name, (before, after) in LATE_JOINER_CASES.items():
            emulator.open(name, 80, 24)
            emulator.feed(name, before)
            snapshot = await emulator.snapshot(name)
            emulator.open(name + "/joiner", 80, 24)
            emulator.feed(name + "/joiner", snapshot)
            emulator.feed(name, after)
            emulator.feed(name + "/joiner", after)
            results[name] = (snapshot, await emulator.snapshot(name), await emulator.snapshot(name + "/joiner"))
        return results

    results = run(body)
    for name, (snapshot, live, joined) in results.items():
        assert joined == live, name
        assert_same(render(snapshot), reference([LATE_JOINER_CASES[name][0]]))
    # What the live terminals show, to be sure the cases test what they say.
    assert render(results["pending wrap"][1]).display[1:3] == ["w" * 80, "X wrapped".ljust(80)]
    assert render(results["no wraparound"][1]).display[0] == "z" * 79 + "D"  # each letter lands on the margin
    assert render(results["alt screen with region"][1]).display[:2] == ["main".ljust(80), "back in main".ljust(80)]
    # Relative to the region (rows 3-10): home is row 3, row 20 is its bottom, two line feeds
    # scroll "inside" and "top of region" out of it.
    origin = render(results["origin mode"][1]).display
    assert origin[0].startswith("text") and origin[9].startswith("bottom")
    assert origin[1:9] == [" " * 80] * 8


def test_resize_is_ordered_with_output() -> None:
    before, after = [b"a" * 10], [b"\r\n" + b"b" * 100 + b"\r\nend"]

    async def body(emulator: Any) -> bytes:
        emulator.open("s", 80, 24)
        emulator.feed("s", before[0])
        emulator.resize("s", 100, 30)
        emulator.feed("s", after[0])
        return await emulator.snapshot("s")

    shown = render(run(body), 100, 30)
    expected = reference(before, 80, 24)
    expected.resize(30, 100)
    pyte.ByteStream(expected).feed(after[0])
    assert shown.display[1] == "b" * 100  # one line: written at 100 columns
    assert_same(shown, expected)


def test_snapshot_reflects_what_was_fed_before_it_and_nothing_after() -> None:
    async def body(emulator: Any) -> tuple[bytes, bytes]:
        emulator.open("s", 80, 24)
        emulator.feed("s", b"feed A\r\n")
        first = asyncio.ensure_future(emulator.snapshot("s"))
        await asyncio.sleep(0)  # the coroutine runs up to its first await: the request is queued
        emulator.feed("s", b"feed B\r\n")
        emulator.resize("s", 40, 10)
        second = await emulator.snapshot("s")
        return await first, second

    first, second = run(body)
    assert render(first).display[:2] == ["feed A".ljust(80), " " * 80]
    shown = render(second, 40, 10)
    assert shown.display[:2] == ["feed A".ljust(40), "feed B".ljust(40)]


def test_two_keys_are_independent_and_close_frees() -> None:
    async def body(emulator: Any) -> tuple[bytes, bytes, bytes]:
        emulator.open("one", 80, 24)
        emulator.open("two", 40, 10)
        emulator.feed("one", b"first terminal\r\n")
        emulator.feed("two", b"\x1b[?1049hsecond terminal")
        one, two = await asyncio.gather(emulator.snapshot("one"), emulator.snapshot("two"))
        emulator.close("one")
        with pytest.raises(KeyError):
            await emulator.snapshot("one")
        emulator.feed("one", b"ignored after close\r\n")
        emulator.open("one", 80, 24)  # a new terminal under the old key: it starts blank
        return one, two, await emulator.snapshot("one")

    one, two, reopened = run(body)
    assert render(one).display[0].startswith("first terminal")
    assert not render(one).in_alt
    shown = render(two, 40, 10)
    assert shown.in_alt and shown.display[0] == "second terminal".ljust(40)
    assert render(reopened).display == [" " * 80] * 24


def test_flood_is_bounded_and_the_snapshot_shows_its_end(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="sessions.emulator")
    chunk = b"y\r\n" * (64 * 1024 // 3)
    total = 30 * 1024 * 1024
    ending = b"".join(f"last line {i}\r\n".encode() for i in range(5)) + b"$ "

    async def body(emulator: Any) -> tuple[bytes, int, float]:
        emulator.open("flood", 120, 40)
        started = time.monotonic()
        peak, sent = 0, 0
        while sent < total:
            emulator.feed("flood", chunk)
            sent += len(chunk)
            if sent % (1024 * 1024) < len(chunk):
                await asyncio.sleep(0)  # the loop writes to node's pipe between bursts, as in the hub
                peak = max(peak, rss_kib(emulator.pid))
        emulator.feed("flood", ending)
        snapshot = await emulator.snapshot("flood")
        peak = max(peak, rss_kib(emulator.pid))
        return snapshot, peak, time.monotonic() - started

    snapshot, peak_kib, elapsed = run(body)
    shown = render(snapshot, 120, 40)
    assert [line.rstrip() for line in shown.display[-7:]] == \
        ["y"] + [f"last line {i}" for i in range(5)] + ["$"]
    assert (shown.cursor.x, shown.cursor.y) == (2, 39)
    assert peak_kib < 192 * 1024, f"node grew to {peak_kib} KiB"  # ~50 MB idle, ~90 MB in this flood
    assert elapsed < 30, elapsed
    assert any("may be approximate" in r.getMessage() for r in caplog.records), "node's stderr reached the log"


def test_node_killed_is_restarted_and_rebuilt_from_the_tail() -> None:
    lines = [f"\x1b[3{i % 8}mline {i} of output\x1b[0m\r\n".encode() for i in range(5000)]

    async def body(emulator: Any) -> None:
        emulator.open("s", 80, 24)
        emulator.open("idle", 40, 10)
        emulator.feed("idle", b"\x1b[?2004hidle terminal\r\n")
        for line in lines:
            emulator.feed("s", line)
        # A snapshot in flight when node is killed (stopped first, so it surely has not answered) is retried.
        first = emulator.pid
        assert first is not None
        os.kill(first, signal.SIGSTOP)
        pending = asyncio.ensure_future(emulator.snapshot("s"))
        await asyncio.sleep(0.05)
        assert not pending.done()
        emulator.feed("s", b"output after the snapshot was asked for\r\n")
        os.kill(first, signal.SIGKILL)
        snapshot = await pending
        second = emulator.pid
        assert second is not None and second != first
        assert_same(render(snapshot), reference(lines))  # replayed up to where it was asked for, not further
        assert render(await emulator.snapshot("s")).display[-2].startswith("output after the snapshot")
        # The other terminal was rebuilt too, modes included.
        idle = await emulator.snapshot("idle")
        assert b"\x1b[?2004h" in idle and render(idle, 40, 10).display[0].startswith("idle terminal")
        # Killed while idle: the next use restarts it.
        os.kill(second, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while emulator.pid is not None and time.monotonic() < deadline:
            await asyncio.sleep(0.01)  # node's stdout EOF reaches the loop
        emulator.feed("s", b"after the second kill\r\n")
        shown = render(await emulator.snapshot("s"))
        assert shown.display[-2].startswith("after the second kill")
        while not (gone(first) and gone(second)) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert gone(first) and gone(second), "a killed node was left a zombie"

    run(body)


def test_a_hung_node_is_killed_and_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    import sessions.emulator

    monkeypatch.setattr(sessions.emulator, "SNAPSHOT_TIMEOUT", 2.0)  # the retry includes starting a node
    megabyte = b"".join(f"{i:07d} {'-' * 70}\r\n".encode() for i in range(13000))[:1024 * 1024]

    async def body(emulator: Any) -> None:
        emulator.open("s", 80, 24)
        emulator.feed("s", b"before the hang\r\n")
        # Not answering: the snapshot times out, node is killed and the snapshot retried in a new one.
        first = emulator.pid
        os.kill(first, signal.SIGSTOP)
        shown = render(await emulator.snapshot("s"))
        assert shown.display[0].startswith("before the hang")
        second = emulator.pid
        assert second not in (None, first)
        # Not reading: past 32 MiB waiting for its stdin, not moving for a second, it is killed; the
        # next use restarts it.
        os.kill(second, signal.SIGSTOP)
        for _ in range(33):
            emulator.feed("s", megabyte)
        await asyncio.sleep(1.2)
        assert emulator.pid == second  # a big backlog alone is no proof of a hang
        emulator.feed("s", megabyte)
        assert emulator.pid is None
        emulator.feed("s", b"after the hang\r\n")
        shown = render(await emulator.snapshot("s"))
        assert shown.display[-2].startswith("after the hang")
        assert shown.display[-3].startswith(megabyte.splitlines()[-1].decode())
        deadline = time.monotonic() + 5
        while not (gone(first) and gone(second)) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert gone(first) and gone(second)

    run(body)


def test_a_node_that_cannot_run_is_a_clear_error() -> None:
    from sessions.emulator import EmulatorUnavailable

    async def missing(emulator: Any) -> None:
        emulator.open("s", 80, 24)
        emulator.feed("s", b"output is still kept\r\n")
        with pytest.raises(EmulatorUnavailable, match="node .* was not found"):
            await emulator.snapshot("s")

    run(missing, node="/nonexistent/node")

    async def dying(emulator: Any) -> None:
        emulator.open("s", 80, 24)
        with pytest.raises(EmulatorUnavailable, match="exited"):
            await emulator.snapshot("s")

    run(dying, node=shutil.which("false"))


def test_system_check(settings: Any, tmp_path: Path) -> None:
    from sessions.checks import emulator_check

    assert emulator_check() == []
    settings.LSL_NODE = "/nonexistent/node"
    settings.LSL_EMULATOR_BUNDLE = tmp_path / "missing.cjs"
    errors = emulator_check()
    assert [e.id for e in errors] == ["sessions.E001", "sessions.E001"]
    assert "make assets" in errors[1].hint
    old = tmp_path / "node"
    old.write_text("#!/bin/sh\necho v16.20.0\n")
    old.chmod(0o755)
    settings.LSL_NODE = str(old)
    assert "version v16.20.0" in emulator_check()[0].msg


def test_node_runs_niced_and_dies_with_its_parent(tmp_path: Path) -> None:
    script = tmp_path / "parent.py"
    script.write_text(
        "import asyncio, django\n"
        "django.setup()\n"
        "from sessions.emulator import get_emulator\n"
        "async def main():\n"
        "    emulator = get_emulator()\n"
        "    emulator.open('k', 80, 24)\n"
        "    await emulator.snapshot('k')\n"
        "    print(emulator.pid, flush=True)\n"
        "    await asyncio.sleep(60)\n"
        "asyncio.run(main())\n")
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "lsl_site.settings", "PYTHONPATH": str(REPO)}
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, env=env, cwd=REPO)
    try:
        assert parent.stdout is not None
        node = int(parent.stdout.readline())
        nice = int(Path(f"/proc/{node}/stat").read_text().rsplit(")", 1)[1].split()[16])
        assert nice == min(19, os.getpriority(os.PRIO_PROCESS, 0) + NICE)
    finally:
        parent.kill()  # SIGKILL: no clean-up of its own; the pipe's EOF and PR_SET_PDEATHSIG remain
        parent.wait()

    def dead() -> bool:
        stat = Path(f"/proc/{node}/stat")
        return not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"

    deadline = time.monotonic() + 5
    while not dead() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert dead(), "node outlived the server process"
