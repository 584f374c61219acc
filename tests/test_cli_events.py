"""The CLI on the event stream (`/ws/events/`): `lsl create` progress and failures, `lsl list --watch`.

Two kinds of tests:
- the real `.venv/bin/lsl` executable against the live daphne + worker + Docker engine
  (fixtures of tests/conftest.py), as in tests/test_cli.py;
- lsl.events / lsl.progress in-process against a scripted websocket server, for what the
  real server will not do on demand: drop the connection, refuse to resume (`resync`), stay down.
"""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import docker_cli, free_port, make_token
from tests.test_cli import LSL, Cli, assert_error

NO_POLL = {"LSL_CLI_NO_POLL": "1"}  # the CLI may not poll: only events can carry it to the end


def live(test: Callable[..., None]) -> Callable[..., None]:
    """Runs against the live daphne + worker: the real engine, the test catalog, rows they can see."""
    test = pytest.mark.usefixtures("engine", "catalog")(test)
    return pytest.mark.django_db(transaction=True, serialized_rollback=True)(test)


@pytest.fixture()
def alice(people: Any, live_server_proc: Any, tmp_path: Path) -> Cli:
    return Cli(live_server_proc.url, tmp_path / "alice", token=make_token(people.owner))


def make_template(slug: str, image: str | None = None, setup: list[str] | None = None) -> Any:
    """A template the catalog does not have (tests/test_catalog.py counts the catalog's two)."""
    from environments.models import Template

    busybox = Template.objects.get(slug="busybox")
    return Template.objects.create(slug=slug, image=image or busybox.image, shell=busybox.shell, cpus=0.5, memory_mb=128,
                                   pids=64, network_modes=["none"], setup=setup or [], managed_by_catalog=False)


class Lines:
    """A subprocess's stdout read line by line on a thread, so every wait can have a timeout."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, predicate: Callable[[str], bool], timeout: float, what: str) -> str:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no line with {what} within {timeout}s; got:\n{''.join(self.seen)}")
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                stderr = self.proc.stderr.read() if self.proc.stderr else ""
                raise AssertionError(f"lsl exited ({self.proc.poll()}) before {what}; stdout:\n{''.join(self.seen)}\n"
                                     f"stderr:\n{stderr}")
            self.seen.append(line)
            if predicate(line):
                return line


def json_event(kind: str, **environment: Any) -> Callable[[str], bool]:
    """Matches an NDJSON line of event type `kind` whose environment has all of `environment`'s fields."""
    def matches(line: str) -> bool:
        record = json.loads(line)
        env = record.get("environment") or {}
        return record.get("type") == kind and all(env.get(key) == value for key, value in environment.items())

    return matches


@pytest.fixture()
def spawn(alice: Cli) -> Iterator[Callable[..., tuple[subprocess.Popen[str], Lines]]]:
    """Start long-running `lsl` commands; each is interrupted (then killed if need be) at the end."""
    procs: list[subprocess.Popen[str]] = []

    def start(*args: str, **env: str) -> tuple[subprocess.Popen[str], Lines]:
        proc = subprocess.Popen([str(LSL), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**alice.env, **env})
        procs.append(proc)
        return proc, Lines(proc)

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def interrupt(proc: subprocess.Popen[str]) -> int:
    """Ctrl-C, as a person ends a watch; lsl must exit promptly (it never blocks without a timeout)."""
    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("lsl did not exit within 10 s of Ctrl-C") from None


# --- lsl create on events ---------------------------------------------------------------------

@pytest.mark.parametrize("env", [{}, NO_POLL], ids=["events+poll-fallback", "events-only"])
@live
def test_create_follows_progress_through_events(alice: Cli, env: dict[str, str]) -> None:
    result = alice.ok("create", "dev", "--template", "busybox", **env)
    assert "dev: running" in result.stderr and "attach with: lsl shell dev" in result.stderr, result.stderr
    # Without a terminal, one line per phase: the event stream delivers every phase in order.
    assert "dev: waiting for a worker" in result.stderr, result.stderr
    assert "dev: creating the environment user" in result.stderr, result.stderr
    assert "note:" not in result.stderr, "the event stream stayed up: no fallback"
    assert alice.json("info", "dev")["status"] == "running"
    alice.ok("rm", "--purge", "dev")


@live
def test_create_shows_each_setup_step_from_events(alice: Cli) -> None:
    make_template("busybox-setup", setup=["echo one > /workspace/one", "sleep 0.3", "echo [done] >/dev/null"])
    result = alice.ok("create", "set", "--template", "busybox-setup", "--json", **NO_POLL)
    env = json.loads(result.stdout)
    assert (env["status"], env["setup_status"], env["name"]) == ("running", "succeeded", "set")
    assert env["container_id"] and env["image"], "the final object is the full REST one, not an event summary"
    lines = [line for line in result.stderr.splitlines() if "setup step" in line]
    assert lines == ["set: setup step 1/3: echo one > /workspace/one", "set: setup step 2/3: sleep 0.3",
                     "set: setup step 3/3: echo [done] >/dev/null"], result.stderr  # brackets print literally
    alice.ok("rm", "--purge", "set")


@live
def test_create_that_cannot_start_exits_1_with_the_engines_reason(alice: Cli) -> None:
    # An image nobody can pull: its registry (port 9 on loopback) refuses at once, no network needed.
    make_template("absent-image", image="127.0.0.1:9/lsl-test/absent:latest")
    failed = alice("create", "ghost", "--template", "absent-image", **NO_POLL)
    assert_error(failed, 1, "ghost: could not be created: cannot pull 127.0.0.1:9/lsl-test/absent:latest")
    assert "connection refused" in failed.stderr.lower(), failed.stderr
    assert "ghost: pulling 127.0.0.1:9/lsl-test/absent:latest" in failed.stderr, "the pull phase was shown"
    assert "ghost: error" not in failed.stderr, "no success-style final line"
    info = alice.json("info", "ghost")
    assert info["status"] == "error" and "cannot pull" in info["last_error"]
    assert "last error" in alice.ok("info", "ghost").stdout

    # A setup step that fails: with --json the error object is still printed (stdout) before lsl exits 1.
    make_template("bad-setup", setup=["echo about to fail", "exit 3"])
    broken = alice("create", "broken", "--template", "bad-setup", "--json")
    assert_error(broken, 1, "broken: could not be created: setup step 2 ('exit 3') failed with exit status 3")
    assert json.loads(broken.stdout)["status"] == "error"
    assert "broken: setup step 2/2: exit 3" in broken.stderr

    # --no-wait returns at once, successfully: nothing has failed yet.
    queued = alice.ok("create", "later", "--template", "absent-image", "--no-wait", "--json")
    assert json.loads(queued.stdout)["status"] == "creating"
    for name in ("ghost", "broken", "later"):
        alice.ok("rm", "--purge", name)


# --- lsl list --watch --------------------------------------------------------------------------

@live
def test_list_watch_sees_a_docker_kill_as_stopped_killed(alice: Cli, spawn: Any) -> None:
    env = json.loads(alice.ok("create", "dev", "--template", "busybox", "--json").stdout)

    watch, ndjson = spawn("list", "--watch", "--json", **NO_POLL)
    lines_proc, lines = spawn("list", "--watch")
    snapshot = json.loads(ndjson.wait_for(lambda line: json.loads(line)["type"] == "snapshot", 30, "the snapshot"))
    assert [(e["name"], e["status"]) for e in snapshot["environments"]] == [("dev", "running")]
    lines.wait_for(lambda line: line.startswith("dev ") and "running" in line, 30, "the table's dev row")

    killed = docker_cli("kill", env["container_id"])
    assert killed.returncode == 0, killed.stderr
    record = json.loads(ndjson.wait_for(json_event("environment.changed", id=env["id"], status="stopped"), 30,
                                        "dev stopped"))
    assert record["environment"]["stop_reason"] == "killed", record
    assert isinstance(record["id"], int), "a real event from the stream, not a poll's made-up record"
    lines.wait_for(lambda line: "dev running -> stopped (killed)" in line, 30, "the change line")

    # It keeps following: a start is the next event, and a removal ends with `deleted`.
    alice.ok("start", "dev")
    ndjson.wait_for(json_event("environment.changed", id=env["id"], status="running", stop_reason=""), 30, "dev running")
    alice.ok("rm", "--purge", "dev")
    ndjson.wait_for(json_event("environment.deleted", id=env["id"]), 30, "dev deleted")
    lines.wait_for(lambda line: "dev deleted" in line, 30, "the deletion line")

    assert interrupt(watch) == 0
    assert interrupt(lines_proc) == 0
    assert "Traceback" not in watch.stderr.read()


@live
def test_list_watch_on_a_terminal_redraws_the_table_in_place(alice: Cli) -> None:
    import pexpect

    alice.ok("create", "dev", "--template", "busybox")
    child = pexpect.spawn(str(LSL), ["list", "--watch"], env=alice.env, dimensions=(24, 120), timeout=30,
                          encoding="utf-8", codec_errors="replace")
    try:
        child.expect(r"dev\s+running\s+busybox")
        child.expect_exact("1 environment · live · Ctrl-C to quit")
        alice.ok("stop", "dev")
        child.expect(r"dev\s+stopped \(stopped\)\s+busybox")  # the same row, redrawn with its stop reason
        child.sendcontrol("c")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0, "Ctrl-C is how a watch ends"
    alice.ok("rm", "--purge", "dev")


@live
def test_list_watch_filters_and_reports_new_environments(alice: Cli, spawn: Any) -> None:
    watch, ndjson = spawn("list", "--watch", "--json", "--status", "running", **NO_POLL)
    assert json.loads(ndjson.wait_for(lambda line: True, 30, "the snapshot")) == {"type": "snapshot", "environments": []}
    alice.ok("create", "fresh", "--template", "busybox", "--no-wait")
    # `creating` is filtered out, so the first record is the change that makes it match.
    record = json.loads(ndjson.wait_for(json_event("environment.changed", name="fresh", status="running"), 60, "fresh running"))
    assert not any(json.loads(line)["environment"].get("status") == "creating" for line in ndjson.seen[1:]), ndjson.seen
    alice.ok("stop", "fresh")
    left = json.loads(ndjson.wait_for(json_event("environment.changed", name="fresh", status="stopped"), 30, "fresh stopped"))
    assert left["environment"]["stop_reason"] == "stopped" and record["id"] < left["id"]
    assert interrupt(watch) == 0
    alice.ok("rm", "--purge", "fresh")


@live
def test_watch_and_create_fail_fast_without_a_server(alice: Cli) -> None:
    down = {"LSL_URL": f"http://127.0.0.1:{free_port()}"}
    assert_error(alice("list", "--watch", timeout=30, **down), 6, "cannot reach the server")
    assert_error(alice("create", "x", "--template", "busybox", timeout=30, **down, **NO_POLL), 6, "event stream")


# --- the events client against a scripted server ---------------------------------------------

class ScriptedServer:
    """A websocket server on loopback; each connection runs the next function of `script`.

    Records every request's path and Authorization header, to check resumption and credentials.
    """

    def __init__(self, script: list[Callable[[Any], None]], port: int = 0) -> None:
        from websockets.sync.server import serve

        self.script = list(script)
        self.requests: list[tuple[str, str | None]] = []
        self.server = serve(self._handle, "127.0.0.1", port)
        self.port = self.server.socket.getsockname()[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _handle(self, ws: Any) -> None:
        self.requests.append((ws.request.path, ws.request.headers.get("Authorization")))
        if not self.script:
            ws.close()
            return
        self.script.pop(0)(ws)

    def shutdown(self) -> None:
        self.server.shutdown()
        self.thread.join(timeout=5)


def send(ws: Any, **frame: Any) -> None:
    ws.send(json.dumps(frame))


def hold(ws: Any) -> None:
    """Keep the connection open, saying nothing, until the client closes it."""
    from websockets.exceptions import ConnectionClosed

    try:
        for _ in ws:
            pass
    except ConnectionClosed:
        pass


def changed(event_id: int, env_id: str = "e1", **fields: Any) -> dict[str, Any]:
    return {"type": "environment.changed", "id": event_id, "environment": {"id": env_id, **fields}}


class FakeClient:
    """What lsl.progress needs of lsl.client.Client, with canned GET answers."""

    def __init__(self, url: str, answers: list[dict[str, Any]] | None = None) -> None:
        self.url, self.token = url, "lsl_secret"
        self.answers = list(answers or [])
        self.gets: list[str] = []

    def get(self, path: str, **params: Any) -> Any:
        self.gets.append(path)
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


def test_stream_resumes_with_since_after_a_drop_and_relays_resync() -> None:
    from lsl.events import EventStream

    def first(ws: Any) -> None:
        send(ws, type="hello", user="alice", last_id=10)
        ws.send(json.dumps(changed(11, status="creating")))
        ws.close()  # dropped: the client must come back with since=11

    def second(ws: Any) -> None:
        send(ws, type="hello", user="alice", last_id=12)
        ws.send(json.dumps(changed(12, status="running")))  # the replay
        ws.close()

    def third(ws: Any) -> None:
        send(ws, type="resync", reason="events since that id are no longer kept")
        send(ws, type="hello", user="alice", last_id=40)
        hold(ws)

    server = ScriptedServer([first, second, third])
    try:
        with EventStream(FakeClient(server.url)) as stream:  # type: ignore[arg-type]
            assert stream.open() == 10
            assert stream.next(timeout=5) == changed(11, status="creating")
            assert stream.next(timeout=10) == changed(12, status="running")
            assert stream.next(timeout=10) == {"type": "resync", "reason": "events since that id are no longer kept"}
            assert stream.connected and stream.last_id == 40
            started = time.monotonic()
            assert stream.next(timeout=0.3) is None and time.monotonic() - started < 2, "a quiet stream returns on time"
    finally:
        server.shutdown()
    assert [path for path, _ in server.requests] == ["/ws/events/", "/ws/events/?since=11", "/ws/events/?since=12"]
    assert {auth for _, auth in server.requests} == {"Token lsl_secret"}, "the token goes in a header, never the URL"


def test_stream_that_cannot_connect_fails_fast_never_blocks_and_keeps_trying() -> None:
    from lsl.events import EventStream, EventStreamUnavailable

    port = free_port()
    stream = EventStream(FakeClient(f"http://127.0.0.1:{port}"))  # type: ignore[arg-type]
    started = time.monotonic()
    with pytest.raises(EventStreamUnavailable, match="cannot open the event stream"):
        stream.open()
    assert stream.next(timeout=0.5) is None
    assert time.monotonic() - started < 5 and not stream.connected

    # The server comes up: the stream connects on its own, and since it had nothing to resume
    # from, the caller is told to refetch what it polled meanwhile.
    def hello(ws: Any) -> None:
        send(ws, type="hello", user="alice", last_id=7)
        hold(ws)

    server = ScriptedServer([hello], port=port)
    try:
        assert stream.next(timeout=15) == {"type": "resync", "reason": "the event stream is connected again"}
        assert stream.connected and stream.last_id == 7
    finally:
        stream.close()
        server.shutdown()
    assert server.requests[0][0] == "/ws/events/", "a fresh start: no since"

    silent = ScriptedServer([hold])  # accepts, then never says hello
    try:
        started = time.monotonic()
        with pytest.raises(EventStreamUnavailable, match="did not say hello"):
            EventStream(FakeClient(silent.url)).open()  # type: ignore[arg-type]
        assert time.monotonic() - started < 8
    finally:
        silent.shutdown()


def test_create_wait_falls_back_to_a_slow_poll_when_the_stream_drops(monkeypatch: pytest.MonkeyPatch) -> None:
    from lsl import progress
    from lsl.events import EventStream

    monkeypatch.setattr(progress, "POLL_INTERVAL", 0.2)

    def then_gone(ws: Any) -> None:
        send(ws, type="hello", user="alice", last_id=1)
        ws.send(json.dumps(changed(2, name="dev", status="creating", progress={"phase": "creating"})))
        time.sleep(0.2)
        ws.close()

    server = ScriptedServer([then_gone])
    creating = {"id": "e1", "name": "dev", "status": "creating", "progress": {"phase": "queued"}}
    running = {**creating, "status": "running", "progress": {"phase": "ready"}, "image": "busybox"}
    client = FakeClient(server.url, [creating, creating, running])
    stream = EventStream(client)  # type: ignore[arg-type]
    stream.open()
    server.shutdown()  # reconnecting fails from now on: only polling can finish the wait
    try:
        final = progress.wait_for_environment(client, dict(creating), 20, stream=stream, poll=True)  # type: ignore[arg-type]
    finally:
        stream.close()
    assert final == running
    assert len(client.gets) >= 3, "polls until it runs, then the final GET"


def test_create_wait_on_events_alone_applies_only_its_environment() -> None:
    from lsl import progress
    from lsl.events import EventStream

    def events(ws: Any) -> None:
        send(ws, type="hello", user="alice", last_id=1)
        ws.send(json.dumps(changed(2, env_id="other", name="other", status="error")))
        ws.send(json.dumps({"type": "session.opened", "id": 3, "environment": "e1", "session": "s"}))
        ws.send(json.dumps(changed(4, name="dev", status="creating", progress={"phase": "pulling", "current": 5, "total": 10})))
        ws.send(json.dumps(changed(5, name="dev", status="error", last_error="cannot pull x", progress={"phase": "failed"})))
        hold(ws)

    server = ScriptedServer([events])
    creating = {"id": "e1", "name": "dev", "status": "creating", "progress": {"phase": "queued"}, "image": "x"}
    client = FakeClient(server.url, [{**creating, "status": "error", "last_error": "cannot pull x"}])
    try:
        with EventStream(client) as stream:  # type: ignore[arg-type]
            stream.open()
            final = progress.wait_for_environment(client, dict(creating), 10, stream=stream, poll=False)  # type: ignore[arg-type]
    finally:
        server.shutdown()
    assert final["status"] == "error" and final["last_error"] == "cannot pull x"
    assert client.gets == ["environments/e1/"], "no poll: just the final full object"
