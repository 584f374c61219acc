"""The `lsl` CLI, run as the real installed executable against a live daphne and the real engine.

Every test drives `.venv/bin/lsl` in a subprocess (or a pseudo-terminal via
pexpect for `lsl shell`) with `LSL_URL` pointing at the `live_server_proc`
fixture and `XDG_CONFIG_HOME` in a temporary directory.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pexpect
import pytest

from tests.conftest import free_port, make_token

LSL = Path(sys.executable).parent / "lsl"
pytestmark = [pytest.mark.usefixtures("engine", "catalog"), pytest.mark.django_db(transaction=True, serialized_rollback=True)]


class Cli:
    """One CLI user: their own config directory, running the real `lsl` executable."""

    def __init__(self, url: str, home: Path, token: str | None = None) -> None:
        home.mkdir(parents=True, exist_ok=True)
        self.home = home
        self.env = {key: value for key, value in os.environ.items() if not key.startswith("LSL_")}
        self.env.update({"LSL_URL": url, "XDG_CONFIG_HOME": str(home), "TERM": "xterm", "PYTHONUNBUFFERED": "1"})
        if token:
            self.env["LSL_TOKEN"] = token

    def __call__(self, *args: str, input: str | None = None, timeout: float = 180, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(LSL), *args], input=input, capture_output=True, text=True, timeout=timeout,
                              env={**self.env, **env}, check=False)

    def ok(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        result = self(*args, **kwargs)
        assert result.returncode == 0, f"lsl {' '.join(args)} → {result.returncode}\n{result.stdout}\n{result.stderr}"
        return result

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args, "--json").stdout)

    @property
    def config_file(self) -> Path:
        return self.home / "lsl" / "config.json"


def assert_error(result: subprocess.CompletedProcess[str], code: int, message: str) -> None:
    """One `lsl: error:` line with the expected text and exit code, and never a traceback."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert re.search(r"^lsl: error: .*" + re.escape(message), result.stderr, re.M), result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture()
def alice(people: Any, live_server_proc: Any, tmp_path: Path) -> Cli:
    cli = Cli(live_server_proc.url, tmp_path / "alice")
    cli.ok("init", "-u", "alice", "--password-stdin", input="password-alice\n")
    return cli


@pytest.fixture()
def bob(people: Any, live_server_proc: Any, tmp_path: Path) -> Cli:
    cli = Cli(live_server_proc.url, tmp_path / "bob")
    cli.ok("init", "--token", make_token(people.teammate))
    return cli


def create(cli: Cli, name: str, *args: str) -> dict[str, Any]:
    result = cli.ok("create", name, "--template", "busybox", *args, "--json")
    env = json.loads(result.stdout)
    assert env["status"] == "running", env
    return env


# --- login ---------------------------------------------------------------------------

def test_init_with_password_stores_a_private_config(people: Any, live_server_proc: Any, tmp_path: Path) -> None:
    cli = Cli(live_server_proc.url, tmp_path / "home")
    result = cli.ok("init", "-u", "alice", "--password-stdin", input="password-alice\n")
    assert "Logged in to" in result.stderr and "alice" in result.stderr

    assert stat.S_IMODE(cli.config_file.stat().st_mode) == 0o600
    stored = json.loads(cli.config_file.read_text())
    assert stored["url"] == live_server_proc.url and stored["token"] and stored["client_id"]
    from accounts.models import APIToken

    assert APIToken.objects.filter(user=people.owner, name__startswith="lsl@").count() == 1

    assert "pong" in cli.ok("ping").stderr
    from accounts.models import Client as PingedClient

    pinged = PingedClient.objects.get(client_id=stored["client_id"])
    assert (pinged.user, pinged.version) == (people.owner, "0.1.0")

    templates = cli.json("images")
    assert "busybox" in [t["slug"] for t in templates]
    assert "busybox" in cli.ok("-l").stdout

    wrong = Cli(live_server_proc.url, tmp_path / "wrong")("init", "-u", "alice", "--password-stdin", input="nope\n")
    assert_error(wrong, 3, "Wrong username or password")
    assert not wrong.stdout


def test_init_with_token_then_logout_revokes_it(people: Any, live_server_proc: Any, tmp_path: Path) -> None:
    token = make_token(people.teammate)
    cli = Cli(live_server_proc.url, tmp_path / "home")
    assert "bob" in cli.ok("init", "--token", token).stderr
    assert json.loads(cli.config_file.read_text())["token"] == token
    cli.ok("list")

    assert "token revoked" in cli.ok("logout").stderr
    assert json.loads(cli.config_file.read_text())["token"] == ""
    assert_error(cli("list"), 3, "not logged in")
    assert_error(cli("list", LSL_TOKEN=token), 3, "revoked")

    bad = Cli(live_server_proc.url, tmp_path / "bad")("init", "--token", "lsl_nope")
    assert_error(bad, 3, "token")
    assert not (tmp_path / "bad" / "lsl" / "config.json").exists(), "a token that does not work is not stored"


def test_env_vars_override_the_config_file(people: Any, live_server_proc: Any, tmp_path: Path) -> None:
    cli = Cli(live_server_proc.url, tmp_path / "home", token=make_token(people.owner))
    assert cli.json("list") == []
    assert_error(cli("list", LSL_TOKEN="lsl_wrong.token"), 3, "token")


# --- errors ----------------------------------------------------------------------------

def test_errors_are_one_line_with_distinct_exit_codes(alice: Cli, tmp_path: Path) -> None:
    assert_error(alice("info", "nope"), 4, "no environment named 'nope'")
    assert_error(alice("exec", "00000000-0000-0000-0000-000000000000", "--", "true"), 4, "no environment with id")
    assert_error(alice("list", LSL_TOKEN="lsl_bad"), 3, "Invalid, expired or revoked API token")
    down = alice("list", LSL_URL=f"http://127.0.0.1:{free_port()}")
    assert_error(down, 6, "cannot reach the server")

    bad_mount = alice("create", "x", "--template", "busybox", "--mount", "/srv/data")
    assert_error(bad_mount, 2, "'/srv/data': expected SRC:DST or SRC:DST:ro")
    assert_error(alice("create", "x", "--template", "busybox", "--mount", "/a:/b:rx"), 2, "mode must be 'ro' or 'rw'")
    assert_error(alice("create", "x", "--template", "busybox", "--memory", "lots"), 2, "expected a size like 512m")
    assert_error(alice("create", "x", "--template", "no-such"), 2, "template")
    assert_error(alice("share", "x", "--role", "admin"), 2, "exactly one of --user or --team")
    assert_error(alice("frobnicate"), 2, "No such command")

    debug = alice("--debug", "info", "nope")
    assert debug.returncode == 4 and "Traceback" in debug.stderr


def test_help_everywhere_with_examples() -> None:
    top = subprocess.run([str(LSL), "--help"], capture_output=True, text=True, check=True).stdout
    assert "Exit codes:" in top and "6  server unreachable" in top
    commands = ["init", "logout", "ping", "images", "create", "list", "ls", "start", "stop", "restart", "rm", "info",
                "exec", "share", "unshare", "access", "sessions", "record", "shell", "monitor", "completion"]
    for command in commands:
        text = subprocess.run([str(LSL), command, "--help"], capture_output=True, text=True, check=True).stdout
        assert "Example" in text, command
    module = subprocess.run([sys.executable, "-m", "lsl", "--version"], capture_output=True, text=True, check=True)
    assert module.stdout.startswith("lsl, version")


def test_shell_completion_scripts_and_candidates() -> None:
    for shell in ("bash", "zsh", "fish"):
        result = subprocess.run([str(LSL), "completion", shell], capture_output=True, text=True, check=True)
        assert "_LSL_COMPLETE" in result.stdout, shell
    env = {**os.environ, "_LSL_COMPLETE": "bash_complete", "COMP_WORDS": "lsl sh", "COMP_CWORD": "1"}
    result = subprocess.run([str(LSL)], capture_output=True, text=True, env=env, check=False)
    assert "plain,shell" in result.stdout


# --- environments ---------------------------------------------------------------------------

def test_environment_lifecycle(alice: Cli, bob: Cli) -> None:
    result = alice.ok("create", "dev", "--template", "busybox", "--network", "none", "--cpus", "0.5", "--memory", "128m")
    assert "dev: running" in result.stderr, result.stderr
    # Without a terminal, progress is one line per phase seen (the local image makes pulls instant).
    assert "dev: waiting for a worker" in result.stderr or "dev: creating container" in result.stderr

    listed = alice.ok("list").stdout
    assert re.search(r"^dev\s+running\s+busybox\s+alice\b", listed, re.M), listed
    assert alice.ok("ls").stdout.splitlines()[0] == listed.splitlines()[0]
    envs = alice.json("list")
    assert [e["name"] for e in envs] == ["dev"]
    env = envs[0]
    assert {"id", "name", "status", "owner", "template", "network_mode", "cpus", "memory_mb"} <= set(env)
    assert (env["network_mode"], env["cpus"], env["memory_mb"]) == ("none", 0.5, 128)
    assert alice.json("info", "dev")["id"] == env["id"]
    assert alice.json("info", env["id"])["name"] == "dev"
    assert "network" in alice.ok("info", "dev").stdout

    out = alice("exec", "dev", "--", "sh", "-c", "echo hello; echo oops >&2; exit 3")
    assert out.returncode == 3, out.stderr
    assert "hello" in out.stdout and "oops" in out.stdout
    assert alice("exec", "dev", "-e", "GREETING=hi", "-w", "/tmp", "--", "sh", "-c", 'echo "$GREETING $PWD"').stdout == "hi /tmp\n"

    # Sharing: bob sees nothing until alice shares, then can run commands as a member.
    assert_error(bob("info", "dev"), 4, "no environment named 'dev'")
    assert "user bob is now member" in alice.ok("share", "dev", "--user", "bob", "--role", "member").stderr
    assert [(g["kind"], g["name"], g["role"]) for g in alice.json("access", "dev")] == [("user", "bob", "member")]
    assert "bob" in alice.ok("access", "dev").stdout
    assert bob.ok("exec", "dev", "--", "echo", "from-bob").stdout == "from-bob\n"
    assert_error(bob("rm", "dev"), 3, "")  # members may not delete
    assert "removed access for user bob" in alice.ok("unshare", "dev", "--user", "bob").stderr
    assert_error(alice("unshare", "dev", "--user", "bob"), 4, "has no access")
    assert_error(bob("info", "dev"), 4, "no environment named")

    monitor = alice.json("monitor")
    assert any(e["name"] == "dev" and e["status"] == "running" for e in monitor["environments"])
    assert "dev" in alice.ok("monitor").stdout

    assert "dev: stopped" in alice.ok("stop", "dev").stderr
    assert_error(alice("exec", "dev", "--", "true"), 5, "not running")
    assert alice.json("start", "dev")["status"] == "running"
    assert alice.json("restart", "dev")["status"] == "running"
    assert "dev: removed" in alice.ok("rm", "--purge", "dev").stderr
    assert alice.json("list") == []


def test_pull_progress_bar_renders_phases() -> None:
    """The bar itself (a real pull needs a registry, which tests never use): fed the server's progress shapes."""
    from rich.console import Console

    from lsl import progress

    console = Console(force_terminal=True, width=120, record=True)
    display = progress._Display(console)
    with display:
        display.update({"name": "dev", "image": "lsl/debian:12", "status": "creating",
                        "progress": {"phase": "pulling", "current": 50 * 2**20, "total": 200 * 2**20}})
        display.progress.refresh()
        task = display.progress.tasks[0]
        assert (task.completed, task.total) == (50 * 2**20, 200 * 2**20)
        display.update({"name": "dev", "status": "creating", "progress": {"phase": "creating"}})
        display.progress.refresh()
    text = console.export_text()
    assert "pulling lsl/debian:12" in text and "52.4/209.7 MB" in text
    assert "dev: creating container" in text


def test_names_shared_by_several_users(people: Any, alice: Cli, bob: Cli, live_server_proc: Any, tmp_path: Path) -> None:
    mine = create(alice, "twin")
    theirs = create(bob, "twin")
    bob.ok("share", "twin", "--user", "alice", "--role", "viewer")
    assert alice.json("info", "twin")["id"] == mine["id"], "the caller's own environment wins"
    assert bob.json("info", "twin")["id"] == theirs["id"]

    staff = Cli(live_server_proc.url, tmp_path / "steve", token=make_token(people.staff))
    assert_error(staff("info", "twin"), 2, "ambiguous")
    assert "use the id" in staff("info", "twin").stderr
    assert staff.json("info", theirs["id"])["owner"] == "bob"
    alice.ok("rm", "--purge", "twin")
    bob.ok("rm", "--purge", "twin")


# --- shared terminals ---------------------------------------------------------------------

def spawn_shell(cli: Cli, *args: str, rows: int = 24, cols: int = 80) -> pexpect.spawn:
    """`lsl shell` in a real pseudo-terminal, as a person would run it."""
    return pexpect.spawn(str(LSL), ["shell", *args], env=cli.env, dimensions=(rows, cols), timeout=30,
                         encoding="utf-8", codec_errors="replace")


def finish(child: pexpect.spawn) -> int:
    child.expect(pexpect.EOF, timeout=30)
    child.close()
    return child.exitstatus


def test_shell_is_shared_resizes_detaches_and_keeps_the_exit_code(people: Any, alice: Cli, bob: Cli) -> None:
    from accounts.models import Client as PingedClient
    from tests.wsclient import TermClient

    create(alice, "dev")
    alice.ok("share", "dev", "--user", "bob", "--role", "member")

    # No live session yet: bob's `lsl shell` opens one and says who is there, on one line.
    child = spawn_shell(bob, "dev")
    child.expect(r"\[lsl\] dev: session \w+ as member; here: bob \(cli\); Enter ~ \. to detach\r\n")
    [session] = alice.json("sessions", "dev", "--live")
    assert session["creator"] == "bob" and session["live"]
    assert PingedClient.objects.filter(user=people.teammate).exists(), "lsl shell pings the server while attached"

    # Alice watches the same session with a plain websocket client (big, so bob's size is the effective one).
    watcher = TermClient(session["ws_url"], token=make_token(people.owner), cols=200, rows=60)
    watcher.wait_event("snapshot")
    child.send("printf 'from-%s\\n' bob\r")
    child.expect_exact("from-bob")
    watcher.wait_output(b"from-bob")
    watcher.send_input("printf 'from-%s\\n' alice\r")
    child.expect_exact("from-alice")

    # A window-size change reaches the PTY (SIGWINCH → resize message).
    child.setwinsize(30, 100)
    watcher.wait_event("resize", cols=100, rows=30)
    child.send("stty size\r")
    child.expect_exact("30 100")

    # Enter ~ . detaches and leaves the shell running for the others.
    child.send("\r~.")
    child.expect_exact("detached; the session keeps running")
    assert finish(child) == 0
    watcher.send_input("echo still-$((1+1))\r")
    watcher.wait_output(b"still-2")

    # Rejoining picks the newest live session; `exit 3` ends it and lsl exits 3.
    child = spawn_shell(bob, "dev")
    child.expect(r"as member; here: .*alice \(cli\)")
    child.send("exit 3\r")
    assert finish(child) == 3
    assert watcher.wait_event("exit")["code"] == 3

    [ended] = alice.json("sessions", "dev")
    assert (ended["live"], ended["exit_code"]) == (False, 3)
    assert "exited" in alice.ok("sessions", "dev").stdout or "3" in alice.ok("sessions", "dev").stdout
    watcher.close()


@pytest.fixture()
def tight_server(live_server_proc: Any) -> Iterator[Any]:
    """A daphne with a 16 KiB flow-control window and a 3 s stall timeout, so a client that fails to ack is kicked fast."""
    from tests.conftest import start_daphne, stop_daphne

    server = start_daphne({"LSL_SESSION_WINDOW": "16384", "LSL_SESSION_STALL_TIMEOUT": "3"}, name="daphne-tight")
    yield server
    stop_daphne(server)


def test_shell_acks_output_beyond_the_window(people: Any, tight_server: Any, tmp_path: Path) -> None:
    alice = Cli(tight_server.url, tmp_path / "alice", token=make_token(people.owner))
    create(alice, "dev")
    child = spawn_shell(alice, "dev")
    child.maxread = 65536
    child.expect_exact("as admin")
    # ~40 windows of output: lsl acks as it writes (and once output pauses), so the server keeps
    # feeding it (or resyncs it with a snapshot) instead of pausing it for good and kicking it after 3 s.
    child.send("seq 1 100000\r")
    child.expect(r"\d{5}", timeout=30)
    child.expect(pexpect.TIMEOUT, timeout=5)  # keep reading, as a terminal does, past the stall timeout
    child.send("echo alive-$((2*3))\r")
    child.expect_exact("alive-6", searchwindowsize=65536)
    child.send("exit 7\r")
    assert finish(child) == 7
    alice.ok("rm", "--purge", "dev")


def test_shell_read_only_viewers_and_errors(people: Any, alice: Cli, live_server_proc: Any, tmp_path: Path) -> None:
    from tests.wsclient import TermClient

    create(alice, "dev")
    alice.ok("share", "dev", "--user", "victor", "--role", "viewer")
    victor = Cli(live_server_proc.url, tmp_path / "victor", token=make_token(people.viewer))
    assert_error(victor("shell", "dev"), 3, "")  # a viewer cannot open a session

    owner = spawn_shell(alice, "dev", "--new")
    owner.expect_exact("as admin")
    [session] = alice.json("sessions", "dev", "--live")

    # A viewer joins the live one: shown read-only; what they type never reaches the shell.
    viewer = spawn_shell(victor, "dev")
    viewer.expect(r"as viewer; here: .*; read-only, Ctrl-C or Enter ~ \. to detach")
    watcher = TermClient(session["ws_url"], token=make_token(people.owner))
    watcher.wait_event("snapshot")
    viewer.send("echo viewer-$((2+2))\r")
    owner.send("echo owner-$((3+3))\r")
    viewer.expect_exact("owner-6")
    watcher.wait_output(b"owner-6")
    assert b"viewer-4" not in watcher.output
    assert not any(e["type"] == "error" for e in watcher.events)
    viewer.sendcontrol("c")
    viewer.expect_exact("detached")
    assert finish(viewer) == 0

    # --read-only works for someone who could type, too.
    quiet = spawn_shell(alice, "dev", "--session", session["id"], "--read-only")
    quiet.expect_exact("read-only")
    quiet.send("echo quiet-$((4+4))\r")
    owner.send("echo loud-$((5+5))\r")
    quiet.expect_exact("loud-10")
    assert b"quiet-8" not in watcher.output
    quiet.send("\r~.")
    assert finish(quiet) == 0

    owner.send("exit\r")
    assert finish(owner) == 0
    assert_error(alice("shell", "dev", "--session", session["id"]), 5, "already ended")
    assert_error(alice("shell", "dev", "--session", "00000000-0000-0000-0000-000000000000"), 4, "")

    cast = tmp_path / "demo.cast"
    alice.ok("record", session["id"], "-o", str(cast))
    header, *events = cast.read_text().splitlines()
    assert json.loads(header)["version"] == 2
    assert any("loud-10" in line for line in events)
    assert_error(alice("record", "00000000-0000-0000-0000-000000000000"), 4, "")

    alice.ok("stop", "dev")
    assert_error(alice("shell", "dev"), 5, "start it first")
    alice.ok("rm", "--purge", "dev")
    watcher.close()
