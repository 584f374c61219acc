"""Create-to-prompt benchmark: LSL against plain `docker run` + `docker exec`, measured in the same run.

    .venv/bin/python bench/create.py [--rounds 10] [--warmup 2] [--timeout 15] [--budget 140]
                                     [--server-env LSL_WORKER_POLL_INTERVAL=0.01 ...] [--json FILE]

Needs a running Docker engine and the test image lsl-test/busybox:latest (`make images`).

It sets up a throwaway LSL (its own var dir with SQLite, its own LSL_INSTANCE label, the test
catalog, a user with an API token), starts the two server processes (daphne and `manage.py
lsl_worker`), and measures "create -> first prompt", interleaving the two sides round by round
(which side goes first alternates) after unmeasured warm-up rounds:

* LSL: with `/ws/events/` already open, t0 -> `POST /api/v1/environments/` (busybox template)
  -> the `environment.changed` event with status `running` -> `POST .../sessions/` -> the session
  websocket -> shell prompt in the output delivered to the client = t1. The environment is then
  deleted with purge (untimed), so every round starts from nothing.
* baseline: t0 -> docker SDK `containers.run(detach=True, init=True)` (`tail -f /dev/null`) ->
  a TTY exec of /bin/sh opened as `docker exec -it` does (exec_create + exec_start(socket=True)
  + resize) -> shell prompt read from the socket = t1. The container is removed (untimed).

The measuring client runs in its own process (this file with --client, driven over a pipe), apart
from this process and from the server processes. Every wait is bounded: a round that times out is
counted as a failure, the run stops after 3 failures in a row of one side, and it starts no
measurement once --budget seconds have passed (so it ends within about 3 minutes).
Everything labelled with the bench's LSL_INSTANCE is removed at the end, also on Ctrl-C.

Not a test: it prints tables of timings and ratios; nothing asserts on them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import queue
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
IMAGE = "lsl-test/busybox:latest"
TEMPLATE = "busybox"
LABEL_INSTANCE = "lsl.instance"  # environments/runtime.py LABEL_INSTANCE (the client does not import Django)
LABEL_BENCH = "lsl.bench"
CLEANUP_TIMEOUT = 10.0  # seconds for the untimed delete after a round
GIVE_UP_AFTER = 3  # consecutive failed rounds of one side: the set-up is broken, stop

# A shell prompt: busybox ash prints "/ # " (root) or "/workspace $ " (a user), possibly followed by a
# cursor-position query. A snapshot (a redraw of the screen) may have its trailing space trimmed,
# so "$"/"#" at the very end of what arrived, before any escape sequences, counts too.
PROMPT = re.compile(rb"[$#] |[$#](?:\x1b\[[0-9;?]*[A-Za-z])*[ \t]*$")


def has_prompt(data: bytes | bytearray) -> bool:
    return PROMPT.search(data) is not None


# ==========================================================================================
# The client process (bench/create.py --client): no Django here.
# ==========================================================================================

class RoundTimeout(Exception):
    pass


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = time.perf_counter() + seconds
        self.stage = "starting"

    def left(self, what: str) -> float:
        """Seconds left for the step `what` (remembered, to name a timeout); raises once none are."""
        self.stage = what
        remaining = self.end - time.perf_counter()
        if remaining <= 0:
            raise RoundTimeout(f"timed out {what}")
        return remaining


def client_main() -> None:
    """Read one JSON command per line on stdin, answer one JSON line on stdout."""
    import asyncio

    import docker

    docker_client = docker.from_env(version=os.environ.get("LSL_DOCKER_API_VERSION", "1.41"), timeout=60)
    out = sys.stdout
    for line in sys.stdin:
        command = json.loads(line)
        op = command["op"]
        if op == "quit":
            break
        try:
            if op == "lsl":
                result = asyncio.run(lsl_round(command))
            elif op == "baseline":
                result = baseline_round(docker_client, command)
            elif op == "ping":
                result = {"ok": True}
            else:
                result = {"ok": False, "error": f"unknown op {op!r}"}
        except Exception as exc:  # reported, never fatal: the next round starts clean
            result = {"ok": False, "error": f"{exc.__class__.__name__}: {exc}"}
        out.write(json.dumps(result) + "\n")
        out.flush()


async def lsl_round(command: dict[str, Any]) -> dict[str, Any]:
    """One LSL create -> prompt. Times are seconds after t0 (perf_counter), server times too."""
    import asyncio

    import requests
    from websockets.asyncio.client import connect

    base, token, name = command["url"], command["token"], command["name"]
    deadline = Deadline(command["timeout"])
    auth = {"Authorization": f"Token {token}"}
    ws_base = base.replace("http://", "ws://", 1)
    http = requests.Session()
    http.headers.update(auth)
    marks: dict[str, float] = {}
    phases: list[dict[str, Any]] = []  # this environment's events: client receipt and server publish times
    env_id: str | None = None
    result: dict[str, Any] = {"ok": False, "marks": marks, "phases": phases}
    events_ws = session_ws = None
    received: list[tuple[float, dict[str, Any]]] = []
    arrived = asyncio.Event()

    async def collect_events() -> None:
        assert events_ws is not None
        async for message in events_ws:
            received.append((time.perf_counter(), json.loads(message)))
            arrived.set()

    collector: asyncio.Task[None] | None = None
    try:
        # The event stream is open (its hello read) before t0, as a client that shows progress would have it.
        events_ws = await asyncio.wait_for(connect(f"{ws_base}/ws/events/", additional_headers=auth, open_timeout=None),
                                           deadline.left("opening /ws/events/"))
        hello = json.loads(await asyncio.wait_for(events_ws.recv(), deadline.left("waiting for the events hello")))
        if hello.get("type") != "hello":
            raise RuntimeError(f"events stream: expected hello, got {hello}")
        collector = asyncio.create_task(collect_events())

        t0 = time.perf_counter()
        wall0 = time.time()
        response = await asyncio.to_thread(http.post, f"{base}/api/v1/environments/",
                                           json={"name": name, "template": TEMPLATE}, timeout=deadline.left("creating"))
        marks["post_answered"] = time.perf_counter() - t0
        if response.status_code not in (201, 202):
            raise RuntimeError(f"POST /environments/ answered {response.status_code}: {response.text[:300]}")
        env_id = response.json()["id"]

        # Wait for `running` on the event stream (events may have arrived before the POST answered).
        seen = 0
        running = False
        while not running:
            while seen < len(received):
                at, message = received[seen]
                seen += 1
                env = message.get("environment")
                if not isinstance(env, dict) or env.get("id") != env_id:
                    continue
                phase = (env.get("progress") or {}).get("phase")
                server_at = _iso_to_epoch(env.get("updated_at"))
                phases.append({"type": message.get("type"), "status": env.get("status"), "phase": phase,
                               "received": at - t0, "server": None if server_at is None else server_at - wall0})
                if env.get("status") == "running":
                    marks["running_event"] = at - t0
                    running = True
                    break
                if env.get("status") in ("error", "missing", "stopped"):
                    raise RuntimeError(f"environment went {env.get('status')}: {env.get('last_error')}")
            if not running:
                arrived.clear()
                if collector.done():
                    raise RuntimeError("the event stream closed")
                await asyncio.wait_for(arrived.wait(), deadline.left("waiting for the running event"))

        response = await asyncio.to_thread(http.post, f"{base}/api/v1/environments/{env_id}/sessions/",
                                           json={"cols": 80, "rows": 24}, timeout=deadline.left("opening a session"))
        marks["session_answered"] = time.perf_counter() - t0
        if response.status_code != 201:
            raise RuntimeError(f"POST sessions/ answered {response.status_code}: {response.text[:300]}")
        ws_url = response.json()["ws_url"]

        session_ws = await asyncio.wait_for(connect(f"{ws_url}?client=cli&cols=80&rows=24", additional_headers=auth,
                                                    open_timeout=None, max_size=None, compression=None),
                                            deadline.left("opening the session websocket"))
        marks["ws_open"] = time.perf_counter() - t0
        output = bytearray()
        while True:
            message = await asyncio.wait_for(session_ws.recv(), deadline.left("waiting for the prompt"))
            now = time.perf_counter() - t0
            if isinstance(message, str):
                kind = json.loads(message).get("type")
                if kind == "hello":
                    marks["hello"] = now
                elif kind == "exit":
                    raise RuntimeError(f"session ended before the prompt: {message}")
                continue
            marks.setdefault("first_bytes", now)
            output += message
            if has_prompt(output):
                marks["prompt"] = now
                break
        result["ok"] = True
        result["total"] = marks["prompt"]
        result["output"] = bytes(output[-200:]).decode(errors="replace")
    except (RoundTimeout, asyncio.TimeoutError) as exc:
        result["error"] = str(exc) or f"timed out {deadline.stage}"
        result["timeout"] = True
    except Exception as exc:
        result["error"] = f"{exc.__class__.__name__}: {exc}"
    finally:
        for ws in (session_ws, events_ws):
            if ws is not None:
                try:
                    await asyncio.wait_for(ws.close(), 2)
                except Exception:
                    pass
        if collector is not None:
            collector.cancel()
        if env_id is not None:  # untimed: every round starts from nothing
            started = time.perf_counter()
            try:
                response = await asyncio.to_thread(http.delete, f"{base}/api/v1/environments/{env_id}/?purge=true",
                                                   timeout=CLEANUP_TIMEOUT)
                result["delete"] = time.perf_counter() - started
                if response.status_code != 204:
                    result["delete_error"] = f"DELETE answered {response.status_code}: {response.text[:200]}"
            except Exception as exc:
                result["delete_error"] = f"{exc.__class__.__name__}: {exc}"
        http.close()
    return result


def _iso_to_epoch(value: Any) -> float | None:
    from datetime import datetime

    if not value:
        return None
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def baseline_round(client: Any, command: dict[str, Any]) -> dict[str, Any]:
    """`docker run -d --init IMAGE tail -f /dev/null` then `docker exec -it C /bin/sh`, through the SDK."""
    deadline = Deadline(command["timeout"])
    marks: dict[str, float] = {}
    result: dict[str, Any] = {"ok": False, "marks": marks}
    container = None
    sock = None
    api = client.api
    try:
        t0 = time.perf_counter()
        container = client.containers.run(IMAGE, ["tail", "-f", "/dev/null"], detach=True, init=True,
                                          name=command["name"], labels=command["labels"])
        marks["run_returned"] = time.perf_counter() - t0
        deadline.left("starting the container")
        exec_id = api.exec_create(container.id, ["/bin/sh"], stdin=True, stdout=True, stderr=True, tty=True,
                                  environment={"TERM": "xterm-256color"})["Id"]
        marks["exec_created"] = time.perf_counter() - t0
        socket_io = api.exec_start(exec_id, tty=True, socket=True)
        sock = socket_io._sock  # SocketIO is read-only; keep socket_io referenced (its finaliser closes the socket)
        marks["exec_started"] = time.perf_counter() - t0
        try:
            api.exec_resize(exec_id, height=24, width=80)  # as `docker exec -it` does
        except Exception:
            pass
        output = bytearray()
        while True:
            sock.settimeout(deadline.left("waiting for the prompt"))
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                raise RoundTimeout("timed out waiting for the prompt") from None
            if not chunk:
                raise RuntimeError(f"exec socket closed before the prompt: {bytes(output)!r}")
            now = time.perf_counter() - t0
            marks.setdefault("first_bytes", now)
            output += chunk
            if has_prompt(output):
                marks["prompt"] = now
                break
        result["ok"] = True
        result["total"] = marks["prompt"]
        result["output"] = bytes(output[-200:]).decode(errors="replace")
        del socket_io
    except RoundTimeout as exc:
        result["error"] = str(exc)
        result["timeout"] = True
    except Exception as exc:
        result["error"] = f"{exc.__class__.__name__}: {exc}"
    finally:
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass
        started = time.perf_counter()
        try:
            (container or client.containers.get(command["name"])).remove(force=True)
            result["delete"] = time.perf_counter() - started
        except Exception as exc:
            result["delete_error"] = f"{exc.__class__.__name__}: {exc}"
    return result


# ==========================================================================================
# The orchestrating process: a throwaway LSL, its two server processes, the client, the tables.
# ==========================================================================================

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Client:
    """The measuring process, driven over a pipe; replaced if it ever stops answering."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.proc: subprocess.Popen[str] | None = None
        self.replies: queue.Queue[str | None] = queue.Queue()
        self.start()

    def start(self) -> None:
        log = self.log_path.open("a")
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--client"], cwd=REPO,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                                     env={k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"})
        log.close()
        self.replies = queue.Queue()
        proc, replies = self.proc, self.replies

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                replies.put(line)
            replies.put(None)

        threading.Thread(target=read, daemon=True, name="bench-client-reader").start()

    def call(self, command: dict[str, Any], timeout: float) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(command) + "\n")
            self.proc.stdin.flush()
            line = self.replies.get(timeout=timeout)
        except queue.Empty:
            self.restart()
            return {"ok": False, "timeout": True, "error": f"the client did not answer within {timeout:.0f}s (restarted)"}
        except (BrokenPipeError, OSError) as exc:
            self.restart()
            return {"ok": False, "error": f"client pipe: {exc} (restarted)"}
        if line is None:
            self.restart()
            return {"ok": False, "error": f"the client exited (see {self.log_path}; restarted)"}
        return json.loads(line)

    def restart(self) -> None:
        self.stop()
        self.start()

    def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        try:
            assert proc.stdin is not None
            proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            proc.stdin.flush()
            proc.wait(timeout=3)
        except Exception:
            proc.kill()
            proc.wait(timeout=5)


class Server:
    """daphne and the worker, as child processes of this one, with their output in the var dir."""

    def __init__(self, var: Path, env: dict[str, str]) -> None:
        self.var, self.env = var, env
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, timeout: float = 30.0) -> None:
        import requests

        commands = {
            "web": [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(self.port), "lsl_site.asgi:application"],
            "worker": [sys.executable, "manage.py", "lsl_worker"],
        }
        for name, argv in commands.items():
            with (self.var / f"{name}.log").open("wb") as log:
                self.procs[name] = subprocess.Popen(argv, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        web_up = worker_up = False
        while time.monotonic() < deadline and not (web_up and worker_up):
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise SystemExit(f"the {name} process exited ({proc.returncode}) while starting:\n{self.tail(name)}")
            if not web_up:
                try:
                    web_up = requests.get(f"{self.url}/api/v1/config/", timeout=1).status_code in (200, 401, 403)
                except requests.RequestException:
                    pass
            if not worker_up:
                worker_up = " running" in (self.var / "worker.log").read_text(errors="replace")
            time.sleep(0.1)
        if not (web_up and worker_up):
            missing = ", ".join(n for n, up in (("web", web_up), ("worker", worker_up)) if not up)
            raise SystemExit(f"LSL did not become ready within {timeout:.0f}s ({missing}):\n"
                             f"{self.tail('web')}\n{self.tail('worker')}")

    def tail(self, name: str, lines: int = 20) -> str:
        path = self.var / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return f"--- {name}.log (last {lines} lines) ---\n" + "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1))]


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f} ms"


def table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(header, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    return "\n".join(lines)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def step_rows(results: list[dict[str, Any]], steps: list[tuple[str, str, str]]) -> list[tuple[str, ...]]:
    """Median/p90 of each step's duration (per round: mark minus the previous mark) and of its end time."""
    rows = []
    for label, start, end in steps:
        deltas, ends = [], []
        for r in results:
            m = r["marks"]
            if end in m and (start == "t0" or start in m):
                deltas.append(m[end] - (0.0 if start == "t0" else m[start]))
                ends.append(m[end])
        if deltas:
            rows.append((label, ms(statistics.median(deltas)), ms(pct(deltas, 90)), ms(statistics.median(ends))))
    return rows


def server_phase_rows(results: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    """Where the worker spent the time, from the server's publish times of each progress phase."""
    def server_time(r: dict[str, Any], phase: str, status: str | None = None) -> float | None:
        for p in r["phases"]:
            if p["phase"] == phase and (status is None or p["status"] == status) and p["server"] is not None:
                return p["server"]
        return None

    def received(r: dict[str, Any], phase: str, status: str | None = None) -> float | None:
        for p in r["phases"]:
            if p["phase"] == phase and (status is None or p["status"] == status):
                return p["received"]
        return None

    spans: list[tuple[str, Any]] = [
        ("POST: row + `created` event committed (server)", lambda r: server_time(r, "queued")),
        ("task picked up by the worker (queued -> phase creating)",
         lambda r: _sub(server_time(r, "creating"), server_time(r, "queued"))),
        ("docker create + start (phase creating -> user)",
         lambda r: _sub(server_time(r, "user"), server_time(r, "creating"))),
        ("identity read + mark running (phase user -> ready)",
         lambda r: _sub(server_time(r, "ready", "running"), server_time(r, "user"))),
        ("`running` event: published -> delivered to client",
         lambda r: _sub(received(r, "ready", "running"), server_time(r, "ready", "running"))),
    ]
    rows = []
    for label, fn in spans:
        values = [v for v in (fn(r) for r in results) if v is not None]
        if values:
            rows.append((label, ms(statistics.median(values)), ms(pct(values, 90)), f"{len(values)}"))
    return rows


def _sub(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=10, help="measured rounds per side (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured rounds per side first (default 2)")
    parser.add_argument("--timeout", type=float, default=15.0, help="seconds one measurement may take (default 15)")
    parser.add_argument("--budget", type=float, default=140.0,
                        help="start no measurement after this many seconds of the whole run (default 140)")
    parser.add_argument("--pause", type=float, default=0.2, help="seconds of quiet between measurements (default 0.2)")
    parser.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for the LSL processes, e.g. LSL_EVENT_POLL_INTERVAL=0.01 (repeatable)")
    parser.add_argument("--json", type=Path, help="also write every round's raw timings here")
    parser.add_argument("--keep", action="store_true", help="keep the var dir (server logs) afterwards")
    args = parser.parse_args()
    if args.client:
        client_main()
        return

    started = time.monotonic()
    var = Path(tempfile.mkdtemp(prefix="lsl-bench-create-"))
    instance = f"bench-create-{os.getpid()}"
    os.environ.update({
        "DJANGO_SETTINGS_MODULE": "lsl_site.settings",
        "LSL_VAR_DIR": str(var),
        "LSL_INSTANCE": instance,
        "LSL_ALLOWED_HOSTS": "127.0.0.1,localhost",
        "LSL_THROTTLE_USER": "100000/min",
        "LSL_LOG_LEVEL": "WARNING",
        "PYTHONUNBUFFERED": "1",
    })
    for item in args.server_env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--server-env wants KEY=VALUE, not {item!r}")
        os.environ[key] = value
    if not any(item.startswith("LSL_DATABASE_URL=") for item in args.server_env):
        os.environ.pop("LSL_DATABASE_URL", None)  # never a real database: SQLite in the throwaway var dir

    def on_sigterm(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_sigterm)

    server: Server | None = None
    client: Client | None = None
    runtime: Any = None
    try:
        sys.path.insert(0, str(REPO))
        import django

        django.setup()
        from django.conf import settings
        from django.contrib.auth import get_user_model
        from django.core.management import call_command

        from accounts.services import create_token
        from environments import runtime as lsl_runtime
        from environments.catalog import apply_catalog

        runtime = lsl_runtime
        runtime.local().ping()
        if not runtime.local().image_exists(IMAGE):
            raise SystemExit(f"missing image {IMAGE}: run `make images`")
        call_command("migrate", verbosity=0)
        apply_catalog(REPO / "catalog" / "test.yaml")
        user = get_user_model().objects.create_user("bench", "", "bench-password")
        token = create_token(user, "bench")[1]
        from django.db import connections

        connections.close_all()  # the server processes own the database from here on
        engine = runtime.local().engine_info()

        server = Server(var, os.environ.copy())
        server.start()
        client = Client(var / "client.log")
        if not client.call({"op": "ping"}, timeout=30).get("ok"):
            raise SystemExit(f"the measuring client did not start (see {var / 'client.log'})")
        setup_s = time.monotonic() - started

        results: dict[str, list[dict[str, Any]]] = {"lsl": [], "baseline": []}
        failures: dict[str, list[str]] = {"lsl": [], "baseline": []}
        skipped = 0
        streak = {"lsl": 0, "baseline": 0}
        stop = ""
        total_rounds = args.warmup + args.rounds
        for i in range(total_rounds):
            warm = i < args.warmup
            order = ("lsl", "baseline") if i % 2 == 0 else ("baseline", "lsl")
            for side in order:
                if time.monotonic() - started > args.budget:
                    stop = f"the {args.budget:.0f}s budget was spent"
                elif max(streak.values()) >= GIVE_UP_AFTER:
                    stop = f"{GIVE_UP_AFTER} {max(streak, key=streak.get)} rounds in a row failed"
                if stop:
                    break
                name = f"r{i}{'w' if warm else ''}-{side}"
                if side == "lsl":
                    command = {"op": "lsl", "url": server.url, "token": token, "name": name, "timeout": args.timeout}
                else:
                    command = {"op": "baseline", "name": f"lslbench-{instance}-{i}", "timeout": args.timeout,
                               "labels": {LABEL_INSTANCE: instance, LABEL_BENCH: "baseline"}}
                # The client bounds the measurement and the clean-up itself; this is the backstop.
                result = client.call(command, timeout=args.timeout + CLEANUP_TIMEOUT + 5)
                result["round"], result["warmup"] = i, warm
                streak[side] = 0 if result.get("ok") else streak[side] + 1
                if not warm:
                    if result.get("ok"):
                        results[side].append(result)
                    else:
                        failures[side].append(f"round {i}: {result.get('error', '?')}")
                status = f"{result['total'] * 1000:7.0f} ms" if result.get("ok") else f"FAILED: {result.get('error')}"
                extra = f" (delete error: {result['delete_error']})" if result.get("delete_error") else ""
                print(f"round {i:2d}{' (warm-up)' if warm else '          '} {side:8s} {status}{extra}", file=sys.stderr)
                time.sleep(args.pause)
            if stop:
                skipped = total_rounds - i
                print(f"stopping: {stop}; {skipped} round(s) not (fully) run", file=sys.stderr)
                break

        report(args, results, failures, skipped, stop, engine, settings, setup_s, time.monotonic() - started)
        if args.json:
            args.json.write_text(json.dumps({"results": results, "failures": failures, "engine": engine}, indent=1))
    except KeyboardInterrupt:
        print("\ninterrupted: cleaning up", file=sys.stderr)
    finally:
        if client is not None:
            client.stop()
        if server is not None:
            server.stop()
            if any(p.returncode not in (0, -signal.SIGTERM, None) for p in server.procs.values()):
                print(server.tail("web") + "\n" + server.tail("worker"), file=sys.stderr)
        if runtime is not None:
            try:
                removed = runtime.local().remove_instance_resources()
                if removed:
                    print(f"removed {removed} leftover container(s) labelled {LABEL_INSTANCE}={instance}", file=sys.stderr)
            except Exception as exc:
                print(f"clean-up failed: {exc}; remove containers/volumes labelled {LABEL_INSTANCE}={instance} by hand",
                      file=sys.stderr)
        if args.keep:
            print(f"kept {var}", file=sys.stderr)
        else:
            shutil.rmtree(var, ignore_errors=True)


def report(args: argparse.Namespace, results: dict[str, list[dict[str, Any]]], failures: dict[str, list[str]],
           skipped: int, stop: str, engine: dict[str, Any], settings: Any, setup_s: float, elapsed: float) -> None:
    lsl = [r["total"] for r in results["lsl"]]
    base = [r["total"] for r in results["baseline"]]
    print()
    print(f"LSL create -> first prompt vs `docker run` + `docker exec -it` ({IMAGE}; "
          f"{len(lsl)} LSL / {len(base)} baseline measured rounds after {args.warmup} warm-up, interleaved)")
    print(f"environment: engine {engine.get('server_version')} (API {settings.LSL_DOCKER_API_VERSION}), "
          f"{engine.get('ncpu')} engine CPUs / {os.cpu_count()} host CPUs ({cpu_model()}), "
          f"{engine.get('mem_total', 0) / 2**30:.1f} GiB, kernel {platform.release()}, Python {platform.python_version()}")
    print(f"LSL: SQLite, {'Redis' if settings.REDIS_URL else 'no Redis (in-memory channel layer)'}, "
          f"LSL_WORKER_POLL_INTERVAL={settings.LSL_WORKER_POLL_INTERVAL:g}s, "
          f"LSL_EVENT_POLL_INTERVAL={settings.LSL_EVENT_POLL_INTERVAL:g}s"
          + (f", overrides: {' '.join(args.server_env)}" if args.server_env else ""))
    print()
    rows: list[tuple[str, ...]] = []
    for label, p in (("create -> prompt, median", 50), ("create -> prompt, p90", 90)):
        if lsl and base:
            a = statistics.median(lsl) if p == 50 else pct(lsl, p)
            b = statistics.median(base) if p == 50 else pct(base, p)
            rows.append((label, ms(a), ms(b), f"{a / b:.2f}x"))
        else:
            rows.append((label, ms(statistics.median(lsl)) if lsl else "-", ms(statistics.median(base)) if base else "-", "-"))
    if lsl and base:
        rows.append(("min", ms(min(lsl)), ms(min(base)), f"{min(lsl) / min(base):.2f}x"))
    rows.append(("failed rounds", f"{len(failures['lsl'])}/{len(lsl) + len(failures['lsl'])}",
                 f"{len(failures['baseline'])}/{len(base) + len(failures['baseline'])}", ""))
    print(table(("measure", "LSL", "baseline", "ratio"), rows))
    if skipped:
        print(f"\n({skipped} round(s) not (fully) run: {stop})")

    if results["lsl"]:
        print("\nLSL breakdown (per step: median and p90 of the step's own duration; 'at' = median time since t0)")
        print(table(("step", "median", "p90", "at"), step_rows(results["lsl"], [
            ("POST /environments/ answered", "t0", "post_answered"),
            ("`running` event received on /ws/events/", "post_answered", "running_event"),
            ("POST .../sessions/ answered", "running_event", "session_answered"),
            ("session websocket handshake", "session_answered", "ws_open"),
            ("`hello` (hub started: shell opened in the keeper)", "ws_open", "hello"),
            ("first terminal bytes", "hello", "first_bytes"),
            ("prompt seen", "first_bytes", "prompt"),
        ])))
        print("\nLSL server side (from each progress event's publish time, `environment.updated_at`)")
        print(table(("span", "median", "p90", "rounds"), server_phase_rows(results["lsl"])))
    if results["baseline"]:
        print("\nbaseline breakdown")
        print(table(("step", "median", "p90", "at"), step_rows(results["baseline"], [
            ("containers.run (create + start) returned", "t0", "run_returned"),
            ("exec_create", "run_returned", "exec_created"),
            ("exec_start (socket open)", "exec_created", "exec_started"),
            ("first terminal bytes", "exec_started", "first_bytes"),
            ("prompt seen", "first_bytes", "prompt"),
        ])))
    for side in ("lsl", "baseline"):
        for error in failures[side]:
            print(f"{side} failure: {error}")
    deletes = [r["delete"] for r in results["lsl"] if "delete" in r]
    base_deletes = [r["delete"] for r in results["baseline"] if "delete" in r]
    if deletes and base_deletes:
        print(f"\n(untimed clean-up, for reference: LSL DELETE ?purge=true median {ms(statistics.median(deletes))}, "
              f"container remove median {ms(statistics.median(base_deletes))})")
    print(f"(set-up {setup_s:.1f}s, whole run {elapsed:.1f}s)")


if __name__ == "__main__":
    main()
