"""Load benchmark through a real reverse proxy: 1 web process against 2, measured in the same run.

    .venv/bin/python bench/load.py [--api-levels 1,2,4,8,16,32,64] [--api-seconds 2.5] [--api-p99-ms 250]
                                   [--participants 100,200,400] [--sessions 4] [--ticks 20] [--tick-ms 100]
                                   [--line-bytes 200] [--lag-p99-ms 1000] [--clients 4] [--deadline 280] [--json FILE]

Needs a running Docker engine, the test image lsl-test/busybox (`make images`), the keeper binary
(`make keeper`), nginx and redis-server (Debian packages). It sets up a throwaway LSL: its own var dir
(SQLite there, or PostgreSQL if LSL_DATABASE_URL is set: the benchmark then migrates that database and
leaves its rows), its own LSL_INSTANCE label, its own redis-server, the worker (which provisions two
BusyBox environments), and then, once with 1 web process and once with 2 (the baseline first), daphne
processes with LSL_REDIS_URL behind a private nginx (tests/proxy.py: never port 80). Every request and
websocket of the benchmark goes through nginx. It measures:

1. **API requests per second at a bounded p99**: --api-levels concurrent clients (keep-alive
   connections, spread over --clients OS processes) each alternating an authenticated (token) GET of
   the environment list and of one environment's detail, for --api-seconds after a 0.5 s warm-up;
   the concurrency steps up until p99 exceeds --api-p99-ms; reported: the best rate of a level within
   the bound (and its p50/p99), and the level past it. A level over the bound is measured again once
   (the machine is shared: one burst of other work should not end the stepping); both are listed.
2. **Terminal participants**: N participants (raw websocket clients speaking docs/protocol.md, acking
   like the real ones) watch one session, and then N spread over --sessions sessions; one writer per
   session (itself a participant) types `echo X-<n>-$((1)) <filler>` every --tick-ms, --ticks times.
   A participant *kept up* if it received every marker line live (the shell's output, not the echoed
   command, not a snapshot's redraw) by the end of the level (--lag-p99-ms + 0.5 s after the last
   marker was typed); delivery latency = when it saw the marker - when the writer sent
   the keystrokes (the same host clock), so it includes the shell's echo path, the hub, Redis and nginx.
   N steps up (--participants) until a participant misses a marker or the p99 latency over all
   participants' markers exceeds --lag-p99-ms; reported: the largest N within the bound.
   Only bytes participants received count (live output and snapshots apart).

Clients run in --clients OS processes of their own (multiprocessing, spawned once, driven over pipes),
never in this process or the servers'. The machine is small (see the header: CPUs, load average at
the start): clients, nginx, Redis, the worker and the web processes share its cores, so a second web
process can only help as far as a core is free; the table says so rather than hiding it.

Every wait has a timeout; no step starts after --deadline seconds (then the table says what was
skipped), and a watchdog ends the run 60 s after it, whatever is stuck. On any exit it stops what it
started (client processes, web processes, nginx, the worker, redis-server) and removes the
environments' containers and volumes (its instance label). Not a test: it prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import multiprocessing
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
MARK = re.compile(rb"X-(\d+)-1 ")  # the shell's output of `echo X-<n>-$((1)) ...`; the echoed command says $((1))
COLS, ROWS = 120, 40


# --- client processes (spawned: no Django here) ---------------------------------------------------

def _api_worker(base: str, token: str, paths: list[str], stop_at: float, warm_until: float, out: list[Any]) -> None:
    """One keep-alive connection, requests back to back; (latency, ok) per request after the warm-up."""
    host, port = base.split("//", 1)[1].split(":")
    conn: http.client.HTTPConnection | None = None
    i = 0
    headers = {"Authorization": f"Token {token}", "Accept": "application/json"}
    while True:
        start = time.monotonic()
        if start >= stop_at:
            break
        path = paths[i % len(paths)]
        i += 1
        ok = False
        for _attempt in range(2):  # nginx closes a keep-alive connection after 1000 requests: open another
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(host, int(port), timeout=10)
                conn.request("GET", path, headers=headers)
                response = conn.getresponse()
                response.read()
                ok = response.status == 200
                if response.getheader("Connection", "").lower() == "close":
                    conn.close()
                    conn = None
                break
            except (OSError, http.client.HTTPException):
                if conn is not None:
                    conn.close()
                conn = None
        if start >= warm_until:
            out.append((time.monotonic() - start, ok))
    if conn is not None:
        conn.close()


def _api(base: str, token: str, paths: list[str], threads: int, seconds: float) -> dict[str, Any]:
    warm_until = time.monotonic() + 0.5
    stop_at = warm_until + seconds
    results: list[list[Any]] = [[] for _ in range(threads)]
    workers = [threading.Thread(target=_api_worker, args=(base, token, paths, stop_at, warm_until, results[t]), daemon=True)
               for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=seconds + 15)
    samples = [s for r in results for s in r]
    return {"latencies": [s[0] for s in samples if s[1]], "errors": sum(1 for s in samples if not s[1]), "seconds": seconds}


class _Participant:
    def __init__(self, url: str, token: str) -> None:
        self.url, self.token = url, token
        self.joined = asyncio.Event()
        self.seen: dict[int, float] = {}
        self.live = self.snapshot_bytes = self.snapshots = 0
        self.errors: list[str] = []
        self.close_code: int | None = None
        self.ws: Any = None
        self.stopping = False
        self.received = self.acked = 0

    async def run(self, join_timeout: float) -> None:
        from websockets.asyncio.client import connect

        deadline = time.monotonic() + join_timeout
        delay = 0.25
        while True:  # as LSL's clients do: retry a failed handshake with backoff (docs/protocol.md §2.1)
            try:
                self.ws = await connect(f"{self.url}?client=cli&cols={COLS}&rows={ROWS}", max_size=None, compression=None,
                                        additional_headers={"Authorization": f"Token {self.token}"},
                                        open_timeout=max(1.0, deadline - time.monotonic()), ping_interval=None)
                break
            except Exception as exc:
                if time.monotonic() + delay > deadline:
                    self.errors.append(f"connect: {exc!r}"[:200])
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 4.0)
        self.received = self.acked = 0
        expect_snapshot = False
        tail = b""
        # A plain recv, with acks on pause from a task of their own: `wait_for(recv(), 0.1)` in the loop
        # can swallow the cancellation that ends the measurement (Python 3.11's wait_for race), and a
        # participant then never stops.
        acker = asyncio.create_task(self._ack_on_pause())
        try:
            while not self.stopping:
                message = await self.ws.recv()
                now = time.time()
                if isinstance(message, bytes):
                    self.received += len(message)
                    if expect_snapshot:
                        expect_snapshot = False
                        self.snapshot_bytes += len(message)
                        tail = b""
                        self.joined.set()
                    else:
                        self.live += len(message)
                        buffer = tail + message
                        for match in MARK.finditer(buffer):
                            self.seen.setdefault(int(match.group(1)), now)
                        tail = buffer[-32:]
                    if self.received - self.acked >= 32 * 1024:
                        await self._ack()
                else:
                    event = json.loads(message)
                    if event["type"] == "snapshot":
                        expect_snapshot = True
                        self.snapshots += 1
                    elif event["type"] in ("error", "exit", "lagging"):
                        self.errors.append(json.dumps(event)[:200])
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.close_code = getattr(self.ws, "close_code", None)
            if self.close_code not in (1000, None) and not self.stopping:
                self.errors.append(f"closed {self.close_code}: {exc!r}"[:200])
        finally:
            acker.cancel()

    async def _ack(self) -> None:
        self.acked = self.received
        await self.ws.send(json.dumps({"type": "ack", "bytes": self.received}))

    async def _ack_on_pause(self) -> None:
        """Ack when output pauses (100 ms), as the real clients do."""
        with contextlib.suppress(Exception):
            while not self.stopping:
                await asyncio.sleep(0.1)
                if self.received > self.acked:
                    await self._ack()

    def report(self) -> dict[str, Any]:
        return {"seen": self.seen, "live": self.live, "snapshot_bytes": self.snapshot_bytes, "snapshots": self.snapshots,
                "joined": self.joined.is_set(), "errors": self.errors[:5], "close_code": self.close_code}


def _log(text: str) -> None:
    """This client process's own log (the parent prints its tail if the process does not answer)."""
    path = os.environ.get("LSL_LOAD_CLIENT_LOG")
    if path:
        with open(path, "a") as log:
            log.write(f"{time.time():.3f} {text}\n")


async def _terminal(conn: Any, urls: list[str], token: str, join_timeout: float) -> None:
    _log(f"terminal: {len(urls)} participants")
    people = [_Participant(url, token) for url in urls]
    tasks = [asyncio.create_task(p.run(join_timeout)) for p in people]
    loop = asyncio.get_running_loop()
    try:
        await asyncio.wait_for(asyncio.gather(*(p.joined.wait() for p in people)), join_timeout)
    except asyncio.TimeoutError:
        pass
    conn.send({"joined": sum(p.joined.is_set() for p in people)})
    _log(f"joined {sum(p.joined.is_set() for p in people)}")
    await loop.run_in_executor(None, conn.recv)  # "stop"
    _log("stop")
    for p in people:
        p.stopping = True
    for task in tasks:
        task.cancel()
    _done, stuck = await asyncio.wait(tasks, timeout=10)
    _log(f"cancelled ({len(stuck)} did not stop)")

    async def close(p: _Participant) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(p.ws.close(), 2)

    # All at once: one by one, hundreds of closing handshakes took longer than the parent waits.
    await asyncio.gather(*(close(p) for p in people if p.ws is not None))
    _log("closed")
    conn.send({"participants": [p.report() for p in people]})
    _log("reported")


def client_main(conn: Any, log: str) -> None:
    """A client process: runs the commands it is sent, one at a time, until `None`."""
    import faulthandler

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    os.environ["LSL_LOAD_CLIENT_LOG"] = log
    faulthandler.register(signal.SIGUSR1, file=open(log, "a"), all_threads=True)  # noqa: SIM115 (for the life of the process)
    while True:
        command = conn.recv()
        if command is None:
            return
        op = command.pop("op", None)  # a stray "stop" (its measurement already over) is not a command
        try:
            if op == "api":
                conn.send(_api(**command))
            elif op == "terminal":
                asyncio.run(_terminal(conn, **command))
        except Exception as exc:  # say so: the parent waits for an answer
            conn.send({"error": repr(exc)})


class Clients:
    """--clients processes, spawned once and reused for every measurement (`reset` after a failure:
    a process that missed a deadline may answer late, and its answer must not be taken for the next)."""

    def __init__(self, n: int, log_dir: Path) -> None:
        self.n = n
        self.log_dir = log_dir
        self.spawned = 0
        self.procs: list[Any] = []
        self.conns: list[Any] = []
        self._spawn()

    def _spawn(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        for _ in range(self.n):
            parent, child = ctx.Pipe()
            self.spawned += 1
            log = self.log_dir / f"client-{self.spawned}.log"
            proc = ctx.Process(target=client_main, args=(child, str(log)), daemon=True)
            proc.log = log  # type: ignore[attr-defined]
            proc.start()
            self.procs.append(proc)
            self.conns.append(parent)

    def send(self, commands: list[dict[str, Any] | None]) -> None:
        for conn, command in zip(self.conns, commands):
            if command is not None:
                conn.send(command)

    def receive(self, which: list[int], timeout: float) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        answers = []
        for i in which:
            if not self.conns[i].poll(max(0.0, deadline - time.monotonic())):
                proc = self.procs[i]
                with contextlib.suppress(OSError):
                    os.kill(proc.pid, signal.SIGUSR1)  # its threads' stacks, into its log
                    time.sleep(0.5)
                tail = proc.log.read_text(errors="replace")[-3000:] if proc.log.exists() else "(no log)"
                raise TimeoutError(f"client process {i} did not answer within {timeout:g}s; its log:\n{tail}")
            answers.append(self.conns[i].recv())
        return answers

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(Exception):
                conn.send(None)
        for proc in self.procs:
            proc.join(timeout=3)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=3)
        self.procs, self.conns = [], []

    def reset(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.join(timeout=3)
        self.procs, self.conns = [], []
        self._spawn()


# --- the servers ------------------------------------------------------------------------------------

class Budget:
    def __init__(self, seconds: float) -> None:
        self.start = time.monotonic()
        self.end = self.start + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start


def progress(budget: Budget, text: str) -> None:
    print(f"[{budget.elapsed():6.1f}s] {text}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(requests.RequestException):
            if requests.get(url, timeout=1).status_code in (200, 401, 403):
                return
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout:g}s:\n{log.read_text(errors='replace')[-2000:]}")


class Servers:
    """redis-server, the worker, and the web processes behind nginx (started and stopped per config)."""

    def __init__(self, var: Path) -> None:
        self.var = var
        self.procs: list[subprocess.Popen[bytes]] = []
        self.webs: list[subprocess.Popen[bytes]] = []
        self.proxy: Any = None
        self.redis_port = free_port()

    def spawn(self, name: str, argv: list[str]) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.var / f"{name}.log"
        proc = subprocess.Popen(argv, cwd=REPO, env=os.environ.copy(), stdout=log.open("ab"), stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs.append(proc)
        return proc, log

    def start_redis(self) -> str:
        proc, log = self.spawn("redis", ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1",
                                         "--save", "", "--appendonly", "no"])
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.redis_port), timeout=0.5).close()
                return f"redis://127.0.0.1:{self.redis_port}/0"
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"redis-server did not start:\n{log.read_text(errors='replace')[-2000:]}")
                time.sleep(0.05)

    def start_worker(self) -> None:
        proc, log = self.spawn("worker", [sys.executable, "manage.py", "lsl_worker"])
        deadline = time.monotonic() + 30
        while "running" not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the worker did not start:\n{log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.1)

    def start_webs(self, n: int) -> str:
        from tests.proxy import Nginx

        urls = []
        for i in range(n):
            port = free_port()
            proc, log = self.spawn(f"web{i + 1}-of-{n}", [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port),
                                                          "lsl_site.asgi:application"])
            self.webs.append(proc)
            urls.append(f"http://127.0.0.1:{port}")
            wait_http(f"{urls[-1]}/api/v1/config/", proc, log)
        self.proxy = Nginx(urls, self.var / f"nginx-{n}", access_log=False).start()
        return self.proxy.url

    def stop_webs(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()
            self.proxy = None
        for proc in self.webs:
            self._stop(proc)
        self.webs = []

    @staticmethod
    def _stop(proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

    def web_cpu(self) -> float:
        """CPU-seconds used so far by the web processes (and their node screen-model children)."""
        total = 0.0
        tick = os.sysconf("SC_CLK_TCK")
        for proc in self.webs:
            for pid in [proc.pid, *_children(proc.pid)]:
                with contextlib.suppress(OSError, IndexError, ValueError):
                    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                    total += (int(fields[11]) + int(fields[12])) / tick
        return total

    def close(self) -> None:
        self.stop_webs()
        for proc in reversed(self.procs):
            self._stop(proc)


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
    return found


# --- measurements ------------------------------------------------------------------------------------

def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def split(n: int, parts: int) -> list[int]:
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


class Bench:
    def __init__(self, args: argparse.Namespace, budget: Budget, clients: Clients, token: str, env_ids: list[str]) -> None:
        self.args, self.budget, self.clients, self.token, self.env_ids = args, budget, clients, token, env_ids

    def api_level(self, base: str, level: int) -> dict[str, Any]:
        paths = ["/api/v1/environments/", f"/api/v1/environments/{self.env_ids[0]}/"]
        n = len(self.clients.procs)
        threads = split(level, min(n, level))
        self.clients.send([{"op": "api", "base": base, "token": self.token, "paths": paths, "threads": t,
                            "seconds": self.args.api_seconds} for t in threads])
        try:
            answers = self.clients.receive(list(range(len(threads))), self.args.api_seconds + 30)
        except TimeoutError:
            self.clients.reset()
            raise
        failed = [a["error"] for a in answers if "error" in a]
        if failed:
            raise RuntimeError(f"API client failed: {failed[0]}")
        latencies = [x for a in answers for x in a["latencies"]]
        errors = sum(a["errors"] for a in answers)
        if not latencies:
            return {"level": level, "rate": 0.0, "p50_ms": None, "p99_ms": None, "errors": errors}
        return {"level": level, "rate": len(latencies) / self.args.api_seconds, "p50_ms": pct(latencies, 50) * 1000,
                "p99_ms": pct(latencies, 99) * 1000, "errors": errors, "requests": len(latencies)}

    def api(self, base: str) -> dict[str, Any]:
        steps = []
        for level in self.args.api_levels:
            if self.budget.left() < self.args.api_seconds + 10:
                steps.append({"level": level, "skipped": "deadline"})
                break
            step = self.api_level(base, level)
            if not self.api_ok(step):
                # Measured again once: on a machine shared with other work, one burst of someone else's
                # CPU should not end the stepping (both runs are listed; the better one counts).
                again = self.api_level(base, level)
                progress(self.budget, f"  API x{level}: {step['rate']:.0f} req/s, p99 {step['p99_ms'] or 0:.0f} ms "
                                      "(over the bound: measured again)")
                step = {**(again if self.api_ok(again) or (again["rate"] > step["rate"]) else step), "first_try": step}
            steps.append(step)
            progress(self.budget, f"  API x{level}: {step['rate']:.0f} req/s, p99 {step['p99_ms'] or 0:.0f} ms, "
                                  f"{step['errors']} errors")
            if not self.api_ok(step):
                break
        within = [s for s in steps if "skipped" not in s and self.api_ok(s)]
        best = max(within, key=lambda s: s["rate"]) if within else None
        # Bounded: some level went past the bound, so the best rate is this setup's; otherwise the levels
        # (or the time) ran out first and it is only a lower bound.
        return {"steps": steps, "best": best, "bounded": any("skipped" not in s and s not in within for s in steps)}

    def api_ok(self, step: dict[str, Any]) -> bool:
        return step.get("p99_ms") is not None and step["p99_ms"] <= self.args.api_p99_ms and not step["errors"]

    def terminal_level(self, base: str, n: int, sessions: int) -> dict[str, Any]:
        import requests

        from tests.wsclient import TermClient

        headers = {"Authorization": f"Token {self.token}"}
        opened = []
        for s in range(sessions):
            env = self.env_ids[s % len(self.env_ids)]
            response = requests.post(f"{base}/api/v1/environments/{env}/sessions/", json={"cols": COLS, "rows": ROWS},
                                     headers=headers, timeout=30)
            response.raise_for_status()
            opened.append(response.json())
        writers: list[TermClient] = []
        used: list[int] = []
        try:
            # The writers join first: each one's process (through nginx) serves its session.
            for session in opened:
                writer = TermClient(session["ws_url"], token=self.token, cols=COLS, rows=ROWS, render=False)
                writer.wait_event("snapshot", timeout=20)
                writers.append(writer)
            urls = [opened[i % sessions]["ws_url"] for i in range(n)]
            shares = split(n, len(self.clients.procs))
            commands: list[dict[str, Any] | None] = []
            start = 0
            for i, share in enumerate(shares):
                if share:
                    commands.append({"op": "terminal", "urls": urls[start:start + share], "token": self.token,
                                     "join_timeout": self.args.join_timeout})
                    used.append(i)
                else:
                    commands.append(None)
                start += share
            join_started = time.monotonic()
            self.clients.send(commands)
            joined = sum(a.get("joined", 0) for a in self.clients.receive(used, self.args.join_timeout + 15))
            join_s = time.monotonic() - join_started
            time.sleep(0.5)  # let the join snapshots and presence storms settle
            filler = "y" * self.args.line_bytes
            sent: dict[int, float] = {}
            cpu0 = self.servers_cpu()
            t0 = time.monotonic()
            for tick in range(self.args.ticks):
                sent[tick] = time.time()
                for writer in writers:
                    writer.send_input(f"echo X-{tick}-$((1)) {filler}\r")
                time.sleep(max(0.0, t0 + (tick + 1) * self.args.tick_ms / 1000 - time.monotonic()))
            time.sleep(self.args.lag_p99_ms / 1000 + 0.5)  # the last markers' bound, and a margin
            cpu = self.servers_cpu() - cpu0
            wall = time.monotonic() - t0
            self.clients.send([{"stop": True} if i in used else None for i in range(len(self.clients.procs))])
            reports = [p for a in self.clients.receive(used, 60) for p in a.get("participants", [])]
            used = []
        finally:
            if used:  # a failure on the way: client processes may be mid-measurement; start them afresh
                self.clients.reset()
            for writer in writers:
                writer.close()
            for session in opened:
                with contextlib.suppress(requests.RequestException):
                    requests.post(f"{base}/api/v1/sessions/{session['id']}/end/", headers=headers, timeout=30)
        latencies: list[float] = []
        complete = 0
        for report in reports:
            seen = {int(k): v for k, v in report["seen"].items()}
            if all(tick in seen for tick in sent):
                complete += 1
            latencies += [seen[tick] - sent[tick] for tick in sent if tick in seen]
        errors = [e for r in reports for e in r["errors"]]
        return {"participants": n, "sessions": sessions, "joined": joined, "join_s": join_s, "complete": complete,
                "p50_ms": pct(latencies, 50) * 1000 if latencies else None,
                "p99_ms": pct(latencies, 99) * 1000 if latencies else None,
                "live_mib": sum(r["live"] for r in reports) / 2**20,
                "snapshot_mib": sum(r["snapshot_bytes"] for r in reports) / 2**20,
                "resyncs": sum(max(0, r["snapshots"] - 1) for r in reports),
                "web_cpu_s": cpu, "wall_s": wall, "errors": len(errors), "first_errors": errors[:3]}

    def servers_cpu(self) -> float:
        return self.servers.web_cpu() if getattr(self, "servers", None) is not None else 0.0

    def terminal(self, base: str, sessions: int) -> dict[str, Any]:
        steps = []
        for n in self.args.participants:
            need = self.args.ticks * self.args.tick_ms / 1000 + self.args.lag_p99_ms / 1000 + 15
            if self.budget.left() < need:
                steps.append({"participants": n, "sessions": sessions, "skipped": "deadline"})
                break
            step = self.terminal_level(base, max(n, sessions), sessions)
            steps.append(step)
            progress(self.budget, f"  {step['participants']} participants / {sessions} session(s): {step['complete']} kept up, "
                                  f"p99 {step['p99_ms'] or 0:.0f} ms, {step['resyncs']} resyncs, {step['errors']} errors")
            if not self.ok(step):
                break
        within = [s for s in steps if "skipped" not in s and self.ok(s)]
        return {"steps": steps, "best": within[-1] if within else None,
                "bounded": any("skipped" not in s and not self.ok(s) for s in steps)}

    def ok(self, step: dict[str, Any]) -> bool:
        return (step["complete"] == step["participants"] and step["p99_ms"] is not None
                and step["p99_ms"] <= self.args.lag_p99_ms)


# --- report --------------------------------------------------------------------------------------------

def fmt(value: float | None, digits: int = 0) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def ratio(a: float | None, b: float | None) -> str:
    return "–" if not a or not b else f"{b / a:.2f}×"


def report(results: dict[str, Any], args: argparse.Namespace) -> None:
    configs = results["configs"]
    one, two = configs.get("1"), configs.get("2")
    print("\n## LSL load through nginx: 1 web process vs 2\n")
    print(f"{results['conditions']}\n")

    def best(config: dict[str, Any] | None, part: str, key: str) -> float | None:
        if config is None or config.get(part) is None or config[part]["best"] is None:
            return None
        return config[part]["best"][key]

    rows = [
        (f"API req/s at p99 ≤ {args.api_p99_ms:g} ms", "api", "rate", 0),
        ("  its p99 (ms)", "api", "p99_ms", 0),
        ("  concurrency", "api", "level", 0),
        (f"participants of 1 session, all output live, p99 ≤ {args.lag_p99_ms:g} ms", "one", "participants", 0),
        ("  their p99 delivery (ms)", "one", "p99_ms", 0),
        (f"participants over {args.sessions} sessions, same bound", "many", "participants", 0),
        ("  their p99 delivery (ms)", "many", "p99_ms", 0),
    ]
    def bounded(config: dict[str, Any] | None, part: str) -> bool:
        return bool(config and config.get(part) and config[part].get("bounded"))

    print("| measure | 1 web | 2 web | 2 web / 1 web |")
    print("| --- | ---: | ---: | ---: |")
    for label, part, key, digits in rows:
        a, b = best(one, part, key), best(two, part, key)
        main_row = not label.startswith("  ")
        # "≥": every level passed (or the time ran out) before the bound was reached: a lower bound.
        mark_a = "≥" if main_row and a is not None and not bounded(one, part) else ""
        mark_b = "≥" if main_row and b is not None and not bounded(two, part) else ""
        shown = ratio(a, b) + (" (lower bounds)" if mark_a or mark_b else "") if main_row and a and b else ""
        print(f"| {label} | {mark_a}{fmt(a, digits)} | {mark_b}{fmt(b, digits)} | {shown} |")
    print("\n≥: every level up to this one stayed within the bound (more levels: --participants / --api-levels).")
    for name, config in configs.items():
        print(f"\n### {name} web process(es): every step\n")
        for step in (config.get("api") or {}).get("steps", []):
            if "skipped" in step:
                print(f"- API x{step['level']}: skipped ({step['skipped']})")
            else:
                first = step.get("first_try")
                print(f"- API x{step['level']}: {step['rate']:.0f} req/s, p50 {fmt(step['p50_ms'])} ms, "
                      f"p99 {fmt(step['p99_ms'])} ms, {step['errors']} errors"
                      + (f" (first try: {first['rate']:.0f} req/s, p99 {fmt(first['p99_ms'])} ms)" if first else ""))
        for part in ("one", "many"):
            for step in (config.get(part) or {}).get("steps", []):
                if "skipped" in step:
                    print(f"- {step['participants']} participants / {step['sessions']} session(s): skipped ({step['skipped']})")
                    continue
                print(f"- {step['participants']} participants / {step['sessions']} session(s): joined {step['joined']} "
                      f"in {step['join_s']:.1f} s, kept up {step['complete']}, delivery p50 {fmt(step['p50_ms'])} ms "
                      f"p99 {fmt(step['p99_ms'])} ms, live {step['live_mib']:.1f} MiB + snapshots "
                      f"{step['snapshot_mib']:.1f} MiB, {step['resyncs']} resyncs, web CPU {step['web_cpu_s']:.1f} s "
                      f"over {step['wall_s']:.1f} s, {step['errors']} client errors"
                      + (f" (first: {step['first_errors'][0]})" if step["first_errors"] else ""))
        for error in config.get("errors", []):
            print(f"- failed: {error}")


def parse_args() -> argparse.Namespace:
    ints = lambda text: [int(x) for x in text.split(",") if x]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--api-levels", type=ints, default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--api-seconds", type=float, default=2.5)
    parser.add_argument("--api-p99-ms", type=float, default=250.0)
    parser.add_argument("--participants", type=ints, default=[100, 200, 400])
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--ticks", type=int, default=20)
    parser.add_argument("--tick-ms", type=float, default=100.0)
    parser.add_argument("--line-bytes", type=int, default=200)
    parser.add_argument("--lag-p99-ms", type=float, default=1000.0)
    parser.add_argument("--join-timeout", type=float, default=30.0)
    parser.add_argument("--clients", type=int, default=4, help="client OS processes")
    parser.add_argument("--webs", type=ints, default=[1, 2], help="web process counts to compare, baseline first")
    parser.add_argument("--deadline", type=float, default=280.0, help="no measurement starts after this many seconds")
    parser.add_argument("--json")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    budget = Budget(args.deadline)
    for tool in ("nginx", "redis-server"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            raise SystemExit(f"{tool} is required (apt-get install {tool})")
    var = Path(tempfile.mkdtemp(prefix="lsl-load-"))
    sys.path.insert(0, str(REPO))
    os.environ.update({"DJANGO_SETTINGS_MODULE": "lsl_site.settings", "LSL_VAR_DIR": str(var),
                       "LSL_INSTANCE": f"bench-load-{os.getpid()}", "LSL_ALLOWED_HOSTS": "127.0.0.1,localhost",
                       "LSL_THROTTLE_USER": "100000000/min", "LSL_LOG_LEVEL": "WARNING", "PYTHONUNBUFFERED": "1"})
    servers = Servers(var)
    clients: Clients | None = None
    runtime: Any = None
    results: dict[str, Any] = {"configs": {}}
    done = threading.Event()

    def watchdog() -> None:
        if not done.wait(args.deadline + 60):
            print("load.py: the watchdog ended a stuck run", file=sys.stderr)
            with contextlib.suppress(Exception):
                servers.close()
            os._exit(2)

    threading.Thread(target=watchdog, daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        os.environ["LSL_REDIS_URL"] = servers.start_redis()
        import django

        django.setup()
        from django.contrib.auth import get_user_model
        from django.core.management import call_command
        from django.db import connection

        from accounts.services import create_token
        from environments import runtime as runtime_module
        from environments import services
        from environments.catalog import apply_catalog
        from environments.models import Environment, Template

        runtime = runtime_module
        runtime.local().ping()
        if not runtime.local().image_exists("lsl-test/busybox:latest"):
            raise SystemExit("missing image lsl-test/busybox:latest: run `make images`")
        call_command("migrate", verbosity=0)
        apply_catalog(REPO / "catalog" / "test.yaml")
        user = get_user_model().objects.create_user(f"load-{os.getpid()}", "", "load-password")
        token = create_token(user, "load")[1]
        servers.start_worker()
        template = Template.objects.get(slug="busybox")
        envs = [services.create_environment(user, services.CreateRequest(name=f"load-{i}", template=template)) for i in range(2)]
        deadline = time.monotonic() + 90
        while Environment.objects.filter(pk__in=[e.pk for e in envs], status="running").count() < len(envs):
            bad = Environment.objects.filter(pk__in=[e.pk for e in envs], status="error").first()
            if bad is not None or time.monotonic() > deadline:
                raise RuntimeError(f"environments did not start: {bad and bad.last_error}")
            time.sleep(0.2)
        env_ids = [str(e.pk) for e in envs]
        connection.close()
        clients = Clients(args.clients, var)
        load = os.getloadavg()
        results["conditions"] = (
            f"{os.cpu_count()} CPUs, load average {load[0]:.2f} at the start (shared with other work); "
            f"database {connection.vendor}; Redis {servers.redis_port}; nginx 1 worker; {args.clients} client processes "
            f"on the same machine; API: list + detail GETs with a token, {args.api_seconds:g} s per level; terminals: "
            f"{args.ticks} marker lines every {args.tick_ms:g} ms ({args.line_bytes} bytes each) typed by one writer per session")
        progress(budget, f"set up in {budget.elapsed():.1f} s; {results['conditions']}")
        bench = Bench(args, budget, clients, token, env_ids)
        bench.servers = servers  # type: ignore[attr-defined]
        for n in args.webs:
            config: dict[str, Any] = {}
            results["configs"][str(n)] = config
            try:
                base = servers.start_webs(n)
                progress(budget, f"{n} web process(es) behind nginx at {base}")
                parts = {"api": lambda base=base: bench.api(base), "one": lambda base=base: bench.terminal(base, 1),
                         "many": lambda base=base: bench.terminal(base, args.sessions)}
                for part, measure in parts.items():
                    try:
                        config[part] = measure()
                    except (RuntimeError, TimeoutError, OSError, AssertionError) as exc:
                        # One part failing (a client process stuck) does not lose the others' numbers.
                        config.setdefault("errors", []).append(f"{part}: {str(exc)[:300]}")
                        progress(budget, f"{n} web, {part}: {exc}")
            except (RuntimeError, OSError) as exc:
                config.setdefault("errors", []).append(str(exc)[:500])
                progress(budget, f"{n} web: {exc}")
            finally:
                servers.stop_webs()
        report(results, args)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2, default=str))
        return 0
    except KeyboardInterrupt:
        print("load.py: interrupted", file=sys.stderr)
        return 130
    finally:
        done.set()
        if clients is not None:
            clients.close()
        servers.close()
        if runtime is not None:
            with contextlib.suppress(Exception):
                runtime.local().remove_instance_resources()
        shutil.rmtree(var, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
