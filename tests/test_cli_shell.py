"""`lsl shell` in a real terminal emulator (tmux), and `lsl create`/`lsl start` of an environment
whose container cannot start, against the live daphne + worker + Docker engine.

tmux is the terminal here, as it is for many people: it draws the screen we assert on
(`capture-pane`), and it answers the terminal queries programs send, such as BusyBox ash's
cursor position request (`ESC[6n`) after every prompt, whose answer arrives on lsl's stdin. That
answer used to make lsl miss `Enter ~ .` in ash (Alpine, BusyBox images); pexpect answers nothing,
so only a real terminal catches it. The pure logic is in tests/test_detach_logic.py.
"""

from __future__ import annotations

import io
import re
import shlex
import shutil
import subprocess
import tarfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import docker_cli, make_token
from tests.test_cli import LSL, Cli, assert_error

pytestmark = [pytest.mark.usefixtures("engine", "catalog"), pytest.mark.django_db(transaction=True, serialized_rollback=True)]

WAIT = 30.0  # seconds any one thing may take to show up on a screen


class Tmux:
    """A private tmux server (its own socket, no user config) whose windows run `lsl` commands."""

    def __init__(self, directory: Path) -> None:
        if shutil.which("tmux") is None:
            pytest.fail("tmux is required (apt-get install tmux; scripts/machine.sh installs it)", pytrace=False)
        self.socket = directory / "tmux.sock"
        self.config = directory / "tmux.conf"
        # remain-on-exit: a window whose lsl exited stays, with its last screen and exit status to read.
        self.config.write_text("set -g remain-on-exit on\nset -g status off\nset -g history-limit 5000\n")
        self.windows: list[str] = []

    def tmux(self, *args: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(["tmux", "-S", str(self.socket), "-f", str(self.config), *args],
                                capture_output=True, text=True, timeout=30, check=False)
        assert result.returncode == 0, f"tmux {' '.join(args)}: {result.stderr}"
        return result

    def run(self, name: str, cli: Cli, *args: str, cols: int = 160, rows: int = 30) -> str:
        """Start `lsl ARGS` as `cli` in a new window of its own; returns the window's target."""
        env = {key: value for key, value in cli.env.items() if key.startswith(("LSL_", "XDG_"))}
        lsl = " ".join(["env", *(shlex.quote(f"{k}={v}") for k, v in env.items()), shlex.quote(str(LSL)),
                        *map(shlex.quote, args)])
        script = lsl + '; echo "[lsl exited $?]"'
        command = f"sh -c {shlex.quote(script)}"
        self.tmux("new-session", "-d", "-s", name, "-x", str(cols), "-y", str(rows), command)
        self.windows.append(name)
        return name

    def screen(self, target: str) -> str:
        return self.tmux("capture-pane", "-p", "-t", target).stdout

    def lines(self, target: str) -> list[str]:
        return [line.rstrip() for line in self.screen(target).splitlines()]

    def wait_for(self, target: str, pattern: str, what: str, timeout: float = WAIT) -> re.Match[str]:
        """Wait until the visible screen matches `pattern` (a multi-line regex)."""
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen(target)
            found = re.search(pattern, screen, re.M)
            if found:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not on the screen of {target} within {timeout:g} s:\n{screen}")
            time.sleep(0.1)

    def type(self, target: str, text: str) -> None:
        self.tmux("send-keys", "-t", target, "-l", text)

    def enter(self, target: str) -> None:
        self.tmux("send-keys", "-t", target, "Enter")

    def exit_status(self, target: str, timeout: float = WAIT) -> int:
        """The exit status of the window's lsl, once it has exited (the window's shell prints it)."""
        return int(self.wait_for(target, r"^\[lsl exited (\d+)\]$", "lsl's exit status", timeout).group(1))

    def kill(self) -> None:
        subprocess.run(["tmux", "-S", str(self.socket), "kill-server"], capture_output=True, timeout=30, check=False)


@pytest.fixture()
def tmux(tmp_path: Path) -> Iterator[Tmux]:
    server = Tmux(tmp_path)
    yield server
    server.kill()


@pytest.fixture()
def alice(people: Any, live_server_proc: Any, tmp_path: Path) -> Cli:
    return Cli(live_server_proc.url, tmp_path / "alice", token=make_token(people.owner))


@pytest.fixture()
def bob(people: Any, live_server_proc: Any, tmp_path: Path) -> Cli:
    return Cli(live_server_proc.url, tmp_path / "bob", token=make_token(people.teammate))


# BusyBox ash as the environment user (`\w \$ `; capture-pane drops the trailing blank).
PROMPT = r"^/\S* \$$"


def test_busybox_shell_detaches_with_enter_tilde_dot_and_shows_who_comes_and_goes(
        people: Any, alice: Cli, bob: Cli, tmux: Tmux) -> None:
    from tests.wsclient import TermClient

    alice.ok("create", "ash", "--template", "busybox")
    alice.ok("share", "ash", "--user", "bob", "--role", "member")

    first = tmux.run("alice", alice, "shell", "ash")
    tmux.wait_for(first, r"^\[lsl\] ash: session \w+ as admin; here: alice \(cli\); Enter ~ \. to detach$", "the join line")
    tmux.wait_for(first, PROMPT, "ash's prompt")
    tmux.type(first, "cd /tmp && KEPT=kept-$((6*7))")
    tmux.enter(first)
    tmux.type(first, "echo ready-$((2*3))")
    tmux.enter(first)
    tmux.wait_for(first, r"^ready-6\n/tmp \$$", "the command's output and the next prompt")

    # A second participant: alice's terminal says so on a line of its own, and the prompt is redrawn
    # below it intact, so what she types next lands where it should.
    second = tmux.run("bob", bob, "shell", "ash")
    tmux.wait_for(second, r"as member; here: .*alice \(cli\)", "bob's join line")
    tmux.wait_for(first, r"^ready-6\n\[lsl\] bob joined \(member, cli\)\n/tmp \$$", "the join notice above the prompt")
    tmux.type(first, "echo after-$((3*3))")
    tmux.enter(first)
    tmux.wait_for(first, r"^/tmp \$ echo after-\$\(\(3\*3\)\)\nafter-9\n/tmp \$$", "a command typed after the notice")

    # A browser-like participant: role and client are named.
    [session] = alice.json("sessions", "ash", "--live")
    victor_token = make_token(people.viewer)
    alice.ok("share", "ash", "--user", "victor", "--role", "viewer")
    watcher = TermClient(session["ws_url"], token=victor_token, client="web")
    watcher.wait_event("snapshot")
    tmux.wait_for(first, r"^\[lsl\] victor joined \(viewer, web\)$", "the web viewer's join notice")
    watcher.close()
    tmux.wait_for(first, r"^\[lsl\] victor left$", "the web viewer's leave notice")

    # bob detaches (Enter ~ . after ash's prompt, in a real terminal that answers ash's cursor query).
    tmux.enter(second)
    tmux.wait_for(second, r"^/tmp \$\n/tmp \$$", "bob's fresh prompt")
    tmux.type(second, "~.")
    tmux.wait_for(second, r"^\[lsl\] detached; the session keeps running \(rejoin: lsl shell ash --session [-\w]+\)$",
                  "bob's detach line")
    assert tmux.exit_status(second) == 0
    tmux.wait_for(first, r"^\[lsl\] bob left$", "bob's leave notice in alice's terminal")

    # alice detaches the same way; the shell lives on.
    tmux.enter(first)
    tmux.wait_for(first, r"^/tmp \$\n/tmp \$$", "alice's fresh prompt")
    tmux.type(first, "~.")
    tmux.wait_for(first, r"^\[lsl\] detached; the session keeps running", "alice's detach line")
    assert tmux.exit_status(first) == 0
    [still] = alice.json("sessions", "ash", "--live")
    assert still["id"] == session["id"]

    # Rejoining finds the same shell: same directory, same variables.
    again = tmux.run("alice-again", alice, "shell", "ash")
    tmux.wait_for(again, r"as admin; here: alice \(cli\)", "the rejoin line")
    tmux.type(again, "echo $KEPT in $PWD")
    tmux.enter(again)
    tmux.wait_for(again, r"^kept-42 in /tmp$", "the shell's state, kept")
    tmux.type(again, "exit 4")
    tmux.enter(again)
    tmux.wait_for(again, r"^\[lsl\] session ended: the shell exited with code 4$", "the end line")
    assert tmux.exit_status(again) == 4

    # The scenario is the one that broke: ash asked the terminal where its cursor was after each
    # prompt (so a cursor report reached lsl's stdin between Enter and `~`).
    cast = alice.ok("record", session["id"], "-o", "-").stdout
    assert "\\u001b[6n" in cast, "BusyBox ash no longer asks for the cursor position: this test proves nothing"
    alice.ok("rm", "--purge", "ash")


def test_session_end_reason_is_shown(alice: Cli, tmux: Tmux) -> None:
    alice.ok("create", "stopper", "--template", "busybox")
    first = tmux.run("alice", alice, "shell", "stopper")
    tmux.wait_for(first, PROMPT, "ash's prompt")
    alice.ok("stop", "stopper")
    tmux.wait_for(first, r"^\[lsl\] session ended: the environment was stopped$", "the end reason")
    # Ended from outside, not by the shell: exit 1 (other error), whatever code the hung-up shell left.
    assert tmux.exit_status(first) == 1
    alice.ok("rm", "--purge", "stopper")


def test_notices_wait_while_a_full_screen_program_runs(people: Any, alice: Cli, tmux: Tmux) -> None:
    from tests.wsclient import TermClient

    alice.ok("create", "full", "--template", "busybox")
    alice.ok("share", "full", "--user", "meg", "--role", "member")
    first = tmux.run("alice", alice, "shell", "full")
    tmux.wait_for(first, PROMPT, "ash's prompt")
    # A stand-in for vim or less: the alternate screen until Enter, then the main screen again.
    tmux.type(first, "printf '\\033[?1049hFULL-SCREEN\\n'; read x; printf '\\033[?1049l'; echo back-$((4*4))")
    tmux.enter(first)
    tmux.wait_for(first, r"^FULL-SCREEN$", "the full-screen program")

    [session] = alice.json("sessions", "full", "--live")
    meg = TermClient(session["ws_url"], token=make_token(people.member), client="web")
    meg.wait(lambda c: any(e["type"] == "presence" and len(e["participants"]) == 2 for e in c.events),
             what="the presence list with meg")
    # Her keystroke's echo reaches alice's lsl after the presence list did (one hub, in order): once it
    # is on alice's screen, lsl has had the join and must have kept it off the full-screen program.
    meg.send_input("y")
    tmux.wait_for(first, r"^FULL-SCREEN\ny$", "meg's keystroke on the full screen")
    assert "joined" not in tmux.screen(first), tmux.screen(first)

    # The program leaves the alternate screen: the notice comes, on the main screen, above what follows.
    meg.send_input("\r")
    tmux.wait_for(first, r"^\[lsl\] meg joined \(member, web\)\nback-16\n/workspace \$$", "the notice after it")
    meg.close()
    tmux.type(first, "exit")
    tmux.enter(first)
    assert tmux.exit_status(first) == 0
    alice.ok("rm", "--purge", "full")


# --- an environment whose container cannot start -----------------------------------------------

@pytest.fixture()
def shell_less_image() -> Iterator[str]:
    """An image without /bin/sh (like a distroless one): LSL's container on it dies at once.
    Made offline (`docker import` of a one-file tarball), removed afterwards."""
    tag = f"lsl-test/no-shell-{uuid.uuid4().hex[:8]}:latest"
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        note = b"no shell in this image\n"
        member = tarfile.TarInfo("README")
        member.size = len(note)
        tar.addfile(member, io.BytesIO(note))
    tarball = buffer.getvalue()
    made = subprocess.run(["docker", "import", "-", tag], input=tarball, capture_output=True, timeout=60, check=False)
    assert made.returncode == 0, made.stderr
    yield tag
    docker_cli("rmi", "-f", tag)


def test_create_and_start_of_an_image_without_a_shell_exit_1_with_the_reason(
        alice: Cli, shell_less_image: str) -> None:
    from tests.test_cli_events import make_template

    make_template("no-shell", image=shell_less_image)
    failed = alice("create", "hollow", "--template", "no-shell")
    info = alice.json("info", "hollow")
    assert info["status"] == "error" and info["last_error"], info
    # Exit 1 with the reason the server recorded (the environment's last_error), on one line.
    assert_error(failed, 1, f"hollow: could not be created: {info['last_error']}")
    assert "hollow: running" not in failed.stderr

    # `lsl start` cannot bring it up either: exit 1 (failed to start), not 5 (conflict), nor 0.
    started = alice("start", "hollow")
    assert_error(started, 1, "hollow: could not start: ")
    assert "not running" in started.stderr or "/bin/sh" in started.stderr, started.stderr
    assert alice.json("info", "hollow")["status"] != "running"
    alice.ok("rm", "--purge", "hollow")
