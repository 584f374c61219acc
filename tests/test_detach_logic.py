"""Pure-logic tests of `lsl shell`'s terminal bookkeeping (lsl/shell.py), no server, no terminal:

- DetachDetector: `Enter ~ .` detaches, and what the terminal sends by itself (cursor position
  and device attribute reports, focus events, colour replies, mouse reports) does not count as
  typing, while keys and bracketed pastes do. BusyBox ash asks for the cursor position after
  every prompt, so without this `Enter ~ .` never worked there.
- ScreenTracker: where a notice of lsl's own can go without corrupting the screen.
- PresenceTracker: presence lists → `bob joined (viewer, web)` / `bob left` lines.
- terminal_size and end_text.

End to end, in a real terminal (tmux), these are in tests/test_cli_shell.py."""

from __future__ import annotations

import pytest

from lsl import shell
from lsl.shell import DetachDetector, PresenceTracker, ScreenTracker, end_text

CPR = b"\x1b[24;3R"  # "the cursor is at row 24, column 3": ash's question ESC[6n answered


def feed_all(*chunks: bytes) -> tuple[bytes, bool]:
    """Feed chunks (as separate reads) to a fresh detector; what it sent in total, and whether it detached."""
    detector = DetachDetector()
    sent = b""
    for chunk in chunks:
        out, detach = detector.feed(chunk)
        sent += out
        if detach:
            return sent, True
    return sent, False


# --- the ssh rules ---------------------------------------------------------------------

def test_enter_tilde_dot_detaches_and_what_came_before_is_sent() -> None:
    assert feed_all(b"ls\r~.") == (b"ls\r", True)
    assert feed_all(b"ls\n", b"~", b".") == (b"ls\n", True)
    assert feed_all(b"~.") == (b"", True)  # right after attaching counts as the start of a line


def test_tilde_elsewhere_or_doubled_is_just_a_tilde() -> None:
    assert feed_all(b"cd ~.\r") == (b"cd ~.\r", False)  # not at the start of a line
    assert feed_all(b"\r~~.") == (b"\r~.", False)  # ~~ sends one ~, and the . after it is text
    assert feed_all(b"\r~x") == (b"\r~x", False)  # ~ and another key: both go through, in order
    assert feed_all(b"\r~\r~.") == (b"\r~\r", True)  # ~ then Enter: the Enter starts a new line


def test_a_waiting_tilde_is_held_until_the_next_key() -> None:
    detector = DetachDetector()
    assert detector.feed(b"\r~") == (b"\r", False)
    assert detector.feed(b"a") == (b"~a", False)


# --- what the terminal sends by itself ------------------------------------------------------

@pytest.mark.parametrize("reply", [
    CPR,
    b"\x1b[?24;3R",  # DECXCPR
    b"\x1b[?62;22c", b"\x1b[>1;10;0c",  # primary and secondary device attributes
    b"\x1b[0n",  # device status
    b"\x1b[I", b"\x1b[O",  # focus in / out
    b"\x1b]11;rgb:0000/0000/0000\x07", b"\x1b]10;rgb:ffff/ffff/ffff\x1b\\",  # OSC colour replies (BEL and ST)
    b"\x1bP>|XTerm(390)\x1b\\", b"\x1bP!|00000000\x1b\\",  # XTVERSION, DA3
    b"\x1b[?2004;1$y",  # DECRPM
    b"\x1b[8;24;80t",  # window size report
    b"\x1b[<0;12;5M", b"\x1b[<0;12;5m", b"\x1b[M !!",  # mouse reports (SGR, X10)
])
def test_terminal_replies_after_enter_keep_the_line_start(reply: bytes) -> None:
    sent, detached = feed_all(b"echo hi\r" + reply + b"~.")
    assert (sent, detached) == (b"echo hi\r" + reply, True)


def test_busybox_ash_cursor_report_between_enter_and_tilde() -> None:
    # The reply comes in its own read, between the Enter and the ~, as it does with ash.
    assert feed_all(b"\r", CPR, b"~", b".") == (b"\r" + CPR, True)
    # ...or split across reads.
    assert feed_all(b"\r", CPR[:3], CPR[3:], b"~.") == (b"\r" + CPR, True)
    # ...or after the ~, while it waits: the reply goes through at once and the ~ keeps waiting.
    detector = DetachDetector()
    assert detector.feed(b"\r~") == (b"\r", False)
    assert detector.feed(CPR) == (CPR, False)
    assert detector.feed(b".") == (b"", True)


def test_a_reply_does_not_make_a_line_start_either() -> None:
    assert feed_all(b"ls" + CPR + b"~.") == (b"ls" + CPR + b"~.", False)


# --- keys and pastes are typing ---------------------------------------------------------------

@pytest.mark.parametrize("key", [
    b"\x1b[A",  # up arrow
    b"\x1bOA",  # up arrow, application mode
    b"\x1b[15~",  # F5
    b"\x1bx",  # Alt-x
    b"\x1b]",  # Alt-]: not the start of an OSC reply
    b"\x1bP",  # Alt-P: not a DCS
    b"\x1b[1;5D",  # Ctrl-left
])
def test_keys_that_send_sequences_are_typing(key: bytes) -> None:
    assert feed_all(b"\r" + key + b"~.") == (b"\r" + key + b"~.", False)


def test_tilde_then_an_arrow_sends_both_in_order() -> None:
    assert feed_all(b"\r~", b"\x1b[A") == (b"\r~\x1b[A", False)


def test_a_lone_escape_then_enter_starts_a_line() -> None:
    assert feed_all(b"\x1b", b"\r~.") == (b"\x1b\r", True)
    # Alt-] then Enter (a control ends what looked like the start of a string).
    assert feed_all(b"\x1b]x\r~.") == (b"\x1b]x\r", True)


def test_bracketed_paste_is_typing_and_what_it_carries_never_detaches() -> None:
    paste = b"\x1b[200~one\r~.\rtwo\x1b[201~"
    assert feed_all(b"\r" + paste + b"~.") == (b"\r" + paste + b"~.", False)
    # Split across reads, end marker included.
    assert feed_all(b"\r", paste[:9], paste[9:-3], paste[-3:], b"\r~.") == (b"\r" + paste + b"\r", True)


# --- the screen: where lsl's own lines go -----------------------------------------------------

def test_a_notice_moves_the_prompt_down_intact() -> None:
    screen = ScreenTracker(cols=80)
    screen.feed(b"output\r\n\x1b[?2004h\x1b]0;title\x07\x1b[32m/workspace #\x1b[0m ls -l\x08\x08")
    assert screen.notice_bytes("[lsl] bob joined") == (
        b"\r\x1b[K[lsl] bob joined\r\n\x1b[?2004h\x1b]0;title\x07\x1b[32m/workspace #\x1b[0m ls -l\x08\x08")


def test_the_last_line_leaves_the_prompt_where_it_is() -> None:
    screen = ScreenTracker(cols=80)
    screen.feed(b"\r\n/tmp $ ")
    assert screen.notice_bytes("[lsl] detached", last=True) == b"\r\n[lsl] detached\x1b[K\r\n"


def test_ash_cursor_query_is_not_written_again() -> None:
    screen = ScreenTracker(cols=80)
    screen.feed(b"\r\n/workspace # \x1b[6n")
    assert screen.notice_bytes("x") == b"\r\x1b[Kx\r\n/workspace # "


def test_a_line_that_cannot_be_written_again_gets_a_fresh_line() -> None:
    screen = ScreenTracker(cols=80)
    screen.feed(b"\x1b[5;10Hdrawn")  # absolute positioning: not replayable
    assert screen.notice_bytes("x") == b"\r\nx\x1b[K\r\n"
    screen.feed(b"\r\n")
    assert screen.notice_bytes("y") == b"\r\x1b[Ky\r\n"
    wide = ScreenTracker(cols=10)
    wide.feed(b"0123456789ab")  # wrapped: erasing one row would not erase it all
    assert wide.notice_bytes("x") == b"\r\nx\x1b[K\r\n"


def test_notices_wait_for_the_alternate_screen_to_be_left() -> None:
    screen = ScreenTracker()
    screen.feed(b"$ vim\r\n")
    entering = b"\x1b[?1049h\x1b[Hfile\x1b[5;1H"
    assert screen.feed(entering) == len(entering)  # only leaving it stops the tracker
    assert screen.alt_screen
    data = b"\x1b[?1049l$ after"
    taken = screen.feed(data)
    assert taken == len(b"\x1b[?1049l") and not screen.alt_screen  # stops right where notices can go
    assert screen.notice_bytes("x") == b"\r\x1b[Kx\r\n"  # the main screen's line as it was (empty)
    screen.feed(data[taken:])
    assert screen.notice_bytes("y") == b"\r\x1b[Ky\r\n$ after"


def test_a_snapshot_reset_returns_to_the_main_screen() -> None:
    screen = ScreenTracker()
    screen.feed(b"\x1b[?1049h")
    assert screen.alt_screen
    assert screen.feed(b"\x1bcprompt $ ") == 2
    assert not screen.alt_screen


def test_output_split_inside_a_sequence() -> None:
    screen = ScreenTracker()
    screen.feed(b"\x1b[?10")
    screen.feed(b"49h")
    assert screen.alt_screen


# --- presence ---------------------------------------------------------------------------------

def person(pid: str, user: str, role: str = "member", client: str = "cli") -> dict[str, str]:
    return {"id": pid, "user": user, "role": role, "client": client}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_joins_and_leaves_by_participant() -> None:
    tracker = PresenceTracker()
    alice = person("1", "alice", "admin")
    assert tracker.update([alice]) is None  # the first list: the caller's summary line says it
    assert tracker.update([alice, person("2", "bob", "viewer", "web")]) == ["bob joined (viewer, web)"]
    assert tracker.update([alice, person("2", "bob", "viewer", "web")]) == []  # a typist change: no news
    assert tracker.update([alice, person("2", "bob", "member", "web")]) == ["bob is now member"]
    assert tracker.update([alice, person("2", "bob", "member", "web"), person("3", "bob")]) == ["bob joined (member, cli)"]
    assert tracker.update([alice, person("3", "bob")]) == ["bob left"]


def test_a_crowd_is_one_line() -> None:
    tracker = PresenceTracker()
    tracker.update([person("0", "alice")])
    crowd = [person("0", "alice")] + [person(str(i), f"s{i}", "viewer", "web") for i in range(1, 13)]
    assert tracker.update(crowd) == ["12 joined; 13 here now"]


def test_after_a_reconnect_old_faces_are_not_news() -> None:
    clock = Clock()
    tracker = PresenceTracker(clock=clock)
    tracker.update([person("1", "alice"), person("2", "bob", "viewer", "web")])
    tracker.reconnected()
    # New ids for everyone (ours too); carol joined during the outage.
    assert tracker.update([person("11", "alice"), person("13", "carol")]) == ["carol joined (member, cli)"]
    assert tracker.update([person("11", "alice"), person("13", "carol"), person("12", "bob", "viewer", "web")]) == []
    tracker.update([person("11", "alice")])
    tracker.reconnected()
    tracker.update([person("21", "alice")])
    clock.now += 60  # long after the outage, a join is news again
    assert tracker.update([person("21", "alice"), person("22", "bob", "viewer", "web")]) == ["bob joined (viewer, web)"]


# --- sizes and endings ------------------------------------------------------------------------

def test_a_terminal_without_a_size_gets_columns_and_lines_or_80x24(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shell.os, "get_terminal_size", lambda fd: shell.os.terminal_size((0, 0)))
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.delenv("LINES", raising=False)
    assert shell.terminal_size() == (80, 24)
    monkeypatch.setenv("COLUMNS", "132")
    monkeypatch.setenv("LINES", "junk")
    assert shell.terminal_size() == (132, 24)
    monkeypatch.setattr(shell.os, "get_terminal_size", lambda fd: shell.os.terminal_size((100, 30)))
    assert shell.terminal_size() == (100, 30)


def test_end_reasons_are_said_in_words() -> None:
    assert end_text({"code": 0, "reason": "exited"}) == "session ended: the shell exited"
    assert end_text({"code": 3, "reason": "exited"}) == "session ended: the shell exited with code 3"
    assert end_text({"code": None, "reason": "environment_stopped"}) == "session ended: the environment was stopped"
    assert end_text({"code": 129, "reason": "environment_stopped"}) == "session ended: the environment was stopped"
    assert end_text({"code": None, "reason": "ended", "by": "alice"}) == "session ended: ended by alice"
    assert end_text({"code": None, "reason": "access_revoked"}) == \
        "session ended: your access to the environment was revoked"
    assert end_text({"code": None, "reason": "something_new"}) == "session ended: something new"
