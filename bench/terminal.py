"""Terminal benchmark: LSL's shared sessions against baselines measured in the same run.

    .venv/bin/python bench/terminal.py [--rounds 3] [--flood-mb 20] [--crowd-flood-mb 5] [--participants 1,10,50]
                                       [--keystrokes 200] [--idle 500] [--round-timeout 120] [--deadline 900]
                                       [--redis URL] [--json FILE]

Needs a running Docker engine, the test image lsl-test/debian:bookworm (`make images`) and the keeper
binary (`make keeper`). It sets up a throwaway LSL (its own var dir with SQLite, its own LSL_INSTANCE
label, a daphne process; with --redis the server runs with LSL_REDIS_URL), creates one Debian
environment, starts terminado in its own process (one shared terminal running
`docker exec -it -e TERM=xterm-256color <container> /bin/bash`, bench/terminado_server.py), and measures,
in this order:

1. **Keystroke echo** (p50/p99 over --keystrokes keys, after 20 untimed ones): one key at a time, until
   its echo arrives; LSL's websocket against a direct TTY `docker exec` socket to the same container.
   Reported as what LSL adds over direct, in ms, for p50 and p99 separately.
2. **Throughput** with 1, 10 and 50 participants (--participants): one participant types the flood
   command (it is one of the N), everyone watches. The flood is
   `printf START-marker <epoch>; yes | head -c N MiB; printf END-marker` in the Debian image (coreutils'
   `yes`; the TTY makes each "y\\n" 3 bytes: 1.5 x N MiB of output); --crowd-flood-mb from --crowd-from
   participants on. LSL and terminado run every N, the direct exec socket N = 1. The header also
   gives what a bare PTY on this host delivers (`yes | head` read straight from a PTY): every system
   here reads a PTY, so none can go faster.
3. **Idle crowd** (--idle, 0 skips), last, so that what a crowd leaves behind in the server does not
   weigh on the throughput rounds: that many participants join one LSL session; the time from the
   first connect to the last join snapshot, the server's CPU while they all sit idle for 10 s, and
   daphne's RSS before they join, with all joined, and 15 s after they all left. A handshake that
   fails is retried as LSL's clients do (0.25 s doubling to 4 s, docs/protocol.md §2.1), within 60 s.

Method, so that a run can be trusted:

* Every measuring client runs in its own OS process (bench/term_clients.py, driven over a pipe):
  N participants spread over min(N, 2 x CPUs) processes, apart from this process and the servers.
  LSL participants ack as the real clients do (every 64 KiB, and when output pauses for 50 ms).
* Every participant has fully joined (LSL: its join `snapshot` received and processed; terminado:
  `setup` and the replay of its buffer) before the flood command is typed, so no join snapshot can
  hide the start; and before each round, and again between the join and the flood, the servers are
  left to settle (under 0.1 core for 0.5 s, at most 10 s).
* Start: the producer's clock: the shell prints `date +%s.%N` in the start marker (the container
  shares the host's clock); if no participant saw it live, the moment the command was typed.
  End: when a participant sees the run's end marker, in live output *or* in a snapshot's redraw
  (a resynced participant is redrawn with the final screen, which shows it). Markers carry a run id
  and are assembled by the shell, so the echoed command line and earlier runs never match.
* Throughput per participant = live output bytes it actually received (binary frames that are not
  a snapshot's redraw; terminado's stdout payload, UTF-8 encoded) / (its end - start). Reported:
  the median over participants and the slowest one, each the median over --rounds timed rounds
  (the systems take turns going first). Participants that got a snapshot after the flood started
  count as resynced, with what they skipped (1.5 x N MiB - live bytes). "each" targets are judged
  on the median participant; the slowest is shown next to it.
* Every system gets one untimed warm-up flood before the timed rounds (terminado's first: it spawns
  its terminal).
* Server CPU-seconds per delivered MiB: utime+stime (+ reaped children's) from /proc of the server
  process and all its descendants, before and after the round, over the live MiB delivered to all
  participants. For terminado that includes its `docker exec` CLI child; neither side counts
  dockerd or the keeper in the container (nor, with --redis, the Redis server). Direct exec has no
  server: n/a.
* Nothing waits without a timeout: a participant that has not seen the end within --round-timeout
  counts as "did not finish" (the typist then sends ^C); no measurement starts after --deadline
  seconds, and then the run prints what it has and exits 1. A watchdog ends the process 90 s after
  the deadline, whatever is stuck. --json writes every number, per round and per participant.

Not a test: it prints a markdown table with the targets from issue 11 and whether they are met; nothing asserts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
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
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
IMAGE = "lsl-test/debian:bookworm"
MiB = 1024 * 1024
COLS, ROWS = 120, 40
CLK_TCK = os.sysconf("SC_CLK_TCK")
ACCESS_LINE = re.compile(r"^\S+:\d+ - - \[[^]]*\] \"(?:WS\w+|\w+ \S+\" [23]\d\d)")  # daphne's access log: not a problem
PAGE = os.sysconf("SC_PAGE_SIZE")

TARGETS = {"echo_p50_ms": 0.5, "echo_p99_ms": 2.0, "one_vs_direct": 0.9, "many_vs_one": 0.6, "crowd_vs_terminado": 3.0,
           "idle_cores": 0.05, "idle_attach_s": 5.0, "idle_rss_ratio": 1.2}


# --- time budget --------------------------------------------------------------------------------

class DeadlineReached(Exception):
    pass


class Budget:
    """The global deadline: every wait is clipped to it; no step starts without enough time left."""

    def __init__(self, seconds: float) -> None:
        self.start = time.monotonic()
        self.end = self.start + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def clip(self, seconds: float) -> float:
        return max(1.0, min(seconds, self.left()))

    def require(self, seconds: float, what: str) -> None:
        if self.left() < seconds:
            raise DeadlineReached(f"deadline reached before {what}")


def progress(budget: Budget, text: str) -> None:
    print(f"[{budget.elapsed():6.1f} s] {text}", file=sys.stderr, flush=True)


# --- /proc: a server process and its descendants ------------------------------------------------------

def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2:].split()  # fields from `state` on (comm may contain spaces)


def process_tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields:
                children.setdefault(int(fields[1]), []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def tree_cpu(root: int) -> float:
    """CPU seconds (user + system, plus reaped children's) of `root` and every live descendant."""
    total = 0
    for pid in process_tree(root):
        fields = _stat_fields(pid)
        if fields:
            total += sum(int(v) for v in fields[11:15])  # utime stime cutime cstime
    return total / CLK_TCK


def tree_rss(root: int) -> int:
    total = 0
    for pid in process_tree(root):
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
        except (OSError, IndexError, ValueError):
            pass
    return total


# --- client processes (bench/term_clients.py) -------------------------------------------------------

class ClientFailed(Exception):
    pass


class ClientProc:
    """One client process: JSON commands down its stdin, answers read by a thread into a queue."""

    def __init__(self, number: int, log_dir: Path) -> None:
        self.log = (log_dir / f"client-{number}.log").open("ab")
        self.proc = subprocess.Popen([sys.executable, str(BENCH / "term_clients.py")], cwd=REPO,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log)
        self.answers: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.seq = 0
        self.broken = False
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.answers.put(json.loads(line))
            except ValueError:
                pass
        self.answers.put(None)

    def send(self, op: str, **fields: Any) -> int:
        self.seq += 1
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write((json.dumps({"op": op, "seq": self.seq, **fields}) + "\n").encode())
            self.proc.stdin.flush()
        except OSError as exc:
            self.broken = True
            raise ClientFailed(f"client process gone: {exc}") from exc
        return self.seq

    def answer(self, seq: int, timeout: float) -> dict[str, Any]:
        end = time.monotonic() + timeout
        while True:
            try:
                answer = self.answers.get(timeout=max(0.0, end - time.monotonic()))
            except queue.Empty:
                self.broken = True  # its answer may still come: never reuse it
                raise ClientFailed(f"client process did not answer within {timeout:.0f} s") from None
            if answer is None:
                self.broken = True
                raise ClientFailed(f"client process exited ({self.proc.poll()})")
            if answer.get("seq") == seq:
                return answer

    def request(self, op: str, wait: float, **fields: Any) -> dict[str, Any]:
        return self.answer(self.send(op, **fields), wait)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send("quit")
                self.proc.wait(timeout=3)
            except (ClientFailed, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.log.close()


class ClientPool:
    def __init__(self, size: int, log_dir: Path) -> None:
        self.size, self.log_dir, self.spawned = size, log_dir, 0
        self.procs: list[ClientProc] = []
        self.take(size)

    def take(self, n: int) -> list[ClientProc]:
        """n healthy client processes (a broken one is replaced)."""
        for i, proc in enumerate(self.procs):
            if proc.broken or proc.proc.poll() is not None:
                proc.proc.kill()
                proc.stop()
                self.procs[i] = self._spawn()
        while len(self.procs) < n:
            self.procs.append(self._spawn())
        return self.procs[:n]

    def _spawn(self) -> ClientProc:
        self.spawned += 1
        return ClientProc(self.spawned, self.log_dir)

    @staticmethod
    def request_all(procs: list[ClientProc], op: str, wait: float, fields: list[dict[str, Any]] | None = None,
                    **common: Any) -> list[dict[str, Any]]:
        """Send `op` to all at once, then collect every answer within `wait` seconds (failures answer ok: false)."""
        seqs: list[int | None] = []
        for i, proc in enumerate(procs):
            try:
                seqs.append(proc.send(op, **common, **(fields[i] if fields else {})))
            except ClientFailed:
                seqs.append(None)
        end = time.monotonic() + wait
        answers = []
        for proc, seq in zip(procs, seqs):
            try:
                if seq is None:
                    raise ClientFailed("client process gone")
                answers.append(proc.answer(seq, max(0.0, end - time.monotonic())))
            except ClientFailed as exc:
                answers.append({"ok": False, "error": str(exc)})
        return answers

    def close(self) -> None:
        for proc in self.procs:
            proc.stop()

    def kill(self) -> None:
        for proc in self.procs:
            if proc.proc.poll() is None:
                proc.proc.kill()


def split(n: int, parts: int) -> list[int]:
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


# --- servers -----------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def configure_django(var: Path, redis: str | None) -> None:
    sys.path.insert(0, str(REPO))
    os.environ.update({
        "DJANGO_SETTINGS_MODULE": "lsl_site.settings",
        "LSL_VAR_DIR": str(var),
        "LSL_INSTANCE": f"bench-{os.getpid()}",
        "LSL_ALLOWED_HOSTS": "127.0.0.1,localhost",
        "LSL_THROTTLE_USER": "100000/min",
        "LSL_LOG_LEVEL": "WARNING",
    })
    if redis:
        os.environ["LSL_REDIS_URL"] = redis
    import django

    django.setup()


def wait_http(url: str, proc: subprocess.Popen[bytes], accept: tuple[int, ...], timeout: float = 30) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if requests.get(url, timeout=1).status_code in accept:
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise SystemExit(f"server at {url} did not start (see its log)")


class Setup:
    """A throwaway LSL: migrated SQLite in the var dir, the test catalog, a user with a token, one running
    Debian environment (provisioned in this process), and daphne in its own process."""

    def __init__(self, var: Path) -> None:
        from environments import runtime

        self.var, self.runtime, self.daphne = var, runtime, None
        self.log_path = var / "daphne.log"
        try:
            self._start()
        except BaseException:  # never leave the environment's container behind
            if self.log_path.exists():
                print("daphne's log:\n" + self.log_path.read_text(errors="replace")[-3000:], file=sys.stderr)
            self.close()
            raise

    def _start(self) -> None:
        from django.contrib.auth import get_user_model
        from django.core.management import call_command

        from accounts.services import create_token
        from environments import provisioning, services
        from environments.catalog import apply_catalog
        from environments.models import Template

        runtime = self.runtime
        runtime.local().ping()
        if not runtime.local().image_exists(IMAGE):
            raise SystemExit(f"missing image {IMAGE}: run `make images`")
        self.engine = runtime.local().engine_info().get("server_version", "?")
        call_command("migrate", verbosity=0)
        apply_catalog(REPO / "catalog" / "test.yaml")
        user = get_user_model().objects.create_user("bench", "", "bench-password")
        self.token = create_token(user, "bench")[1]
        env = services.create_environment(user, services.CreateRequest(name="bench", template=Template.objects.get(slug="debian")))
        provisioning.provision(env.id, "bench")  # in-process: this benchmark is about terminals, not the worker
        env.refresh_from_db()
        if env.status != "running":
            raise SystemExit(f"environment did not start: {env.last_error}")
        self.env_id, self.container_id = env.id, env.container_id
        port = free_port()
        self.log = self.log_path.open("wb")
        self.daphne = subprocess.Popen([sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "lsl_site.asgi:application"],
                                       cwd=REPO, env=os.environ.copy(), stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{port}"
        wait_http(f"{self.url}/api/v1/config/", self.daphne, (200, 401, 403))
        self.log.flush()
        self.log_start = self.log_path.stat().st_size  # what start-up logged (the probe's 401) is not news

    @property
    def pid(self) -> int:
        assert self.daphne is not None
        return self.daphne.pid

    def open_session(self) -> dict[str, Any]:
        import requests

        response = requests.post(f"{self.url}/api/v1/environments/{self.env_id}/sessions/", json={"cols": COLS, "rows": ROWS},
                                 headers={"Authorization": f"Token {self.token}"}, timeout=30)
        response.raise_for_status()
        return response.json()

    def end_session(self, session_id: str) -> None:
        import requests

        try:
            requests.post(f"{self.url}/api/v1/sessions/{session_id}/end/", headers={"Authorization": f"Token {self.token}"}, timeout=30)
        except requests.RequestException:
            pass

    def log_summary(self, limit: int = 8) -> dict[str, Any]:
        """What daphne logged (at WARNING and above): how many lines, and the first distinct ones."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(self.log_start)
                lines = [line for line in log.read().decode(errors="replace").splitlines() if not ACCESS_LINE.match(line)]
        except OSError:
            return {"lines": 0, "first": [], "tracebacks": 0}
        distinct: dict[str, str] = {}  # lines that differ only in numbers (task ids, ports, times) count once
        for line in lines:
            short = line.strip()[:200]
            if short:
                distinct.setdefault(re.sub(r"\d+", "N", short), short)
        return {"lines": len(lines), "first": list(distinct.values())[:limit],
                "tracebacks": sum(1 for line in lines if line.startswith("Traceback"))}

    def close(self) -> None:
        if self.daphne is not None and self.daphne.poll() is None:
            self.daphne.terminate()
            try:
                self.daphne.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.daphne.kill()
                self.daphne.wait(timeout=5)
        self.runtime.local().remove_instance_resources()


class Terminado:
    """terminado in its own process (bench/terminado_server.py), its own process group."""

    def __init__(self, container_id: str, var: Path) -> None:
        port = free_port()
        self.log = (var / "terminado.log").open("wb")
        self.proc = subprocess.Popen([sys.executable, str(BENCH / "terminado_server.py"), "--port", str(port), "--container", container_id],
                                     cwd=REPO, stdout=subprocess.PIPE, stderr=self.log, start_new_session=True)
        assert self.proc.stdout is not None
        ready: list[bytes] = []
        reader = threading.Thread(target=lambda: ready.append(self.proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
        reader.start()
        reader.join(30)
        if not ready or b"ready" not in ready[0]:
            self.stop()
            raise SystemExit("terminado did not start (see terminado.log)")
        self.url = f"ws://127.0.0.1:{port}/websocket"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # its group: terminado and its `docker exec` child
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        self.log.close()


# --- measurements ---------------------------------------------------------------------------------------

RUN_IDS = iter(range(1, 10_000))


def flood_command(run_id: str, mb: int) -> str:
    # printf assembles the markers: the echoed command line never contains them.
    return (f"printf 'BENCH-%s-%s %s\\n' START {run_id} \"$(date +%s.%N)\"; yes | head -c {mb}M; "
            f"printf 'BENCH-%s-%s\\n' END {run_id}\r")


def pty_ceiling(mb: int, timeout: float = 60) -> float | None:
    """MiB/s of `yes | head -c N` read from a PTY on this host, with nothing in between: the ceiling
    for every system here (they all read the same kind of PTY)."""
    import pty
    import select

    master, slave = pty.openpty()
    proc = subprocess.Popen(["sh", "-c", f"yes | head -c {mb}M"], stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    start, total = time.monotonic(), 0
    try:
        while time.monotonic() - start < timeout:
            if not select.select([master], [], [], 1)[0]:
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the writer side closed
                break
            if not data:
                break
            total += len(data)
        return total / MiB / (time.monotonic() - start) if total >= flood_bytes(mb) else None
    finally:
        proc.kill()
        proc.wait()
        os.close(master)


def flood_bytes(mb: int) -> int:
    return mb * MiB // 2 * 3  # "y\n" becomes "y\r\n" on the TTY


class Bench:
    """The systems under test and the client processes, with the measurements over them."""

    def __init__(self, args: argparse.Namespace, budget: Budget, setup: Setup, terminado: Terminado, pool: ClientPool) -> None:
        self.args, self.budget, self.setup, self.terminado, self.pool = args, budget, setup, terminado, pool

    def target(self, system: str) -> tuple[str, int | None, str | None]:
        """Where clients connect, the server pid whose CPU counts, and the LSL session (to end it)."""
        if system == "lsl":
            session = self.setup.open_session()
            return session["ws_url"], self.setup.pid, session["id"]
        if system == "terminado":
            return self.terminado.url, self.terminado.pid, None
        return self.setup.container_id, None, None

    def join(self, system: str, target: str, n: int, timeout: float) -> tuple[list[ClientProc], list[dict[str, Any]]]:
        procs = self.pool.take(min(n, self.pool.size))
        counts = split(n, len(procs))
        procs, counts = procs[:len([c for c in counts if c])], [c for c in counts if c]
        fields = [{"count": c, "first_index": sum(counts[:i])} for i, c in enumerate(counts)]
        answers = self.pool.request_all(procs, "join", timeout + 15, fields, kind=system, target=target, token=self.setup.token,
                                        cols=COLS, rows=ROWS, timeout=timeout)
        return procs, answers

    def leave(self, procs: list[ClientProc], exit_shell: bool) -> list[dict[str, Any]]:
        return self.pool.request_all(procs, "leave", 30, exit=exit_shell, timeout=20)  # ^C first: a flood may still run

    def settle(self, limit: float = 10.0, quiet: float = 0.1, window: float = 0.5) -> float:
        """Wait (at most `limit` s) until the servers use under `quiet` cores over `window` s, so that a
        round does not start while the previous one is still being cleaned up. Returns the seconds waited."""
        pids = [self.setup.pid, self.terminado.pid]
        start = time.monotonic()
        while time.monotonic() - start < self.budget.clip(limit):
            before = sum(tree_cpu(pid) for pid in pids)
            time.sleep(window)
            if (sum(tree_cpu(pid) for pid in pids) - before) / window < quiet:
                break
        return time.monotonic() - start

    def flood_round(self, system: str, n: int, mb: int) -> dict[str, Any]:
        result: dict[str, Any] = {"system": system, "n": n, "mb": mb, "flooded": False, "settle_s": self.settle()}
        target, server_pid, session_id = self.target(system)
        procs, joins = self.join(system, target, n, self.budget.clip(30 + 0.5 * n))
        try:
            joined = sum(a.get("joined", 0) for a in joins)
            result["join_retries"] = sum(a.get("retries", 0) for a in joins)
            if joined < n:
                failures = [f for a in joins for f in a.get("failures", [])] + [a["error"] for a in joins if "error" in a]
                result["error"] = f"join: {joined}/{n} joined ({'; '.join(failures[:2])})"
                return result
            result["settle_after_join_s"] = self.settle()  # what joining set off (presence, the database) is done
            run_id = f"{next(RUN_IDS):04d}"
            clients_cpu0 = self.pool.request_all(procs, "cpu", 10)
            cpu0 = tree_cpu(server_pid) if server_pid else None
            self.pool.request_all(procs, "arm", 10, id=run_id)
            typed = procs[0].request("type", 10, data=flood_command(run_id, mb))
            result["flooded"] = True
            timeout = self.budget.clip(self.args.round_timeout)
            answers = self.pool.request_all(procs, "collect", timeout + 15, timeout=timeout)
            cpu1 = tree_cpu(server_pid) if server_pid else None
            clients_cpu1 = self.pool.request_all(procs, "cpu", 10)
            reports = [r for a in answers for r in a.get("participants", [])]
            result.update(self.score(reports, n, mb, typed["sent_at"]))
            result["timeout_s"] = timeout
            result["client_failures"] = [a["error"] for a in answers if not a.get("ok")]
            result["server_cpu_s"] = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
            result["clients_cpu_s"] = sum(b.get("cpu", 0) - a.get("cpu", 0) for a, b in zip(clients_cpu0, clients_cpu1))
            delivered = result["delivered_bytes"]
            result["cpu_s_per_mib"] = (result["server_cpu_s"] / (delivered / MiB)
                                       if result["server_cpu_s"] is not None and delivered else None)
            result["participants"] = reports
            return result
        except ClientFailed as exc:
            result["error"] = str(exc)
            return result
        finally:
            self.leave(procs, exit_shell=system != "terminado")
            if session_id:
                self.setup.end_session(session_id)

    @staticmethod
    def score(reports: list[dict[str, Any]], n: int, mb: int, sent_at: float) -> dict[str, Any]:
        starts = [r["start_epoch"] for r in reports if r["start_epoch"]]
        t0 = min(starts) if starts else sent_at
        expected = flood_bytes(mb)
        rates = [r["live"] / MiB / (r["end_at"] - t0) for r in reports if r["end_at"] and r["end_at"] > t0]
        resynced = [r for r in reports if r["snapshots"]]
        return {
            "t0_source": "producer" if starts else "typed", "start_lag_s": (t0 - sent_at) if starts else None,
            "rates": rates, "rate_median": statistics.median(rates) if rates else None, "rate_min": min(rates) if rates else None,
            "finished": len(rates), "unfinished": n - len(rates),
            "resynced": len(resynced), "skipped_bytes": [max(0, expected - r["live"]) for r in resynced],
            "lagging": sum(r["lagging"] for r in reports),
            "end_via_snapshot": sum(1 for r in reports if r["end_via"] == "snapshot"),
            "close_codes": dict(Counter(str(r["close_code"]) for r in reports if r["close_code"] is not None)),
            "errors": dict(Counter(e for r in reports for e in r["errors"])),
            "delivered_bytes": sum(r["live"] for r in reports),
            "slowest_s": max((r["end_at"] - t0 for r in reports if r["end_at"]), default=None),
            # when the first `lagging` came and when resynced participants got their first redraw (s after start)
            "first_lagging_s": min((r["lagging_at"][0] - t0 for r in reports if r["lagging_at"]), default=None),
            "resync_snapshot_s": sorted(r["snapshots_at"][0] - t0 for r in reports if r["snapshots_at"]),
        }

    def echo(self, system: str) -> dict[str, Any]:
        target, _, session_id = self.target(system)
        procs, joins = self.join(system, target, 1, self.budget.clip(30))
        try:
            if not joins[0].get("ok"):
                return {"error": f"join failed: {joins[0].get('failures') or joins[0].get('error')}"}
            answer = procs[0].request("keystrokes", self.budget.clip(120), count=self.args.keystrokes, warmup=20, timeout=5)
            if not answer.get("ok"):
                return {"error": answer.get("error")}
            rtts = [t * 1000 for t in answer["rtts"]]
            return {"rtts_ms": rtts, "p50": percentile(rtts, 50), "p99": percentile(rtts, 99), "mean": statistics.mean(rtts)}
        except ClientFailed as exc:
            return {"error": str(exc)}
        finally:
            self.leave(procs, exit_shell=True)
            if session_id:
                self.setup.end_session(session_id)

    def idle(self, n: int) -> dict[str, Any]:
        """n participants join one session and sit idle: attach time, idle CPU, RSS before/joined/after."""
        session = self.setup.open_session()
        pid = self.setup.pid
        result: dict[str, Any] = {"n": n, "rss_before": tree_rss(pid)}
        result["join_timeout_s"] = join_timeout = self.budget.clip(60)
        clients0 = self.pool.request_all(self.pool.take(min(n, self.pool.size)), "cpu", 10)
        procs, joins = self.join("lsl", session["ws_url"], n, join_timeout)
        try:
            clients1 = self.pool.request_all(procs, "cpu", 10)
            result["clients_join_cpu_s"] = sum(b.get("cpu", 0) - a.get("cpu", 0) for a, b in zip(clients0, clients1))
            connects = [t for a in joins for t in a.get("connect_at", []) if t]
            joined_at = [t for a in joins for t in a.get("joined_at", []) if t]
            result["joined"] = sum(a.get("joined", 0) for a in joins)
            result["join_retries"] = sum(a.get("retries", 0) for a in joins)
            result["failures"] = [f for a in joins for f in a.get("failures", [])][:5] + [a["error"] for a in joins if "error" in a]
            if result["joined"] < n:
                result["error"] = f"join: {result['joined']}/{n} joined"
            if connects and joined_at:
                result["attach_s"] = max(joined_at) - min(connects)
            time.sleep(2)  # the last presence broadcasts settle
            clients0 = self.pool.request_all(procs, "cpu", 10)
            cpu0, t0 = tree_cpu(pid), time.monotonic()
            time.sleep(10)
            result["idle_cores"] = (tree_cpu(pid) - cpu0) / (time.monotonic() - t0)
            clients1 = self.pool.request_all(procs, "cpu", 10)
            result["clients_idle_cores"] = sum(b.get("cpu", 0) - a.get("cpu", 0) for a, b in zip(clients0, clients1)) / 10
            result["rss_joined"] = tree_rss(pid)
            status = self.pool.request_all(procs, "status", 10)
            result["open_after_idle"] = sum(s.get("open", 0) for s in status)
            result["close_codes"] = dict(sum((Counter(s.get("close_codes", {})) for s in status), Counter()))
            result["errors"] = sorted({e for s in status for e in s.get("errors", [])})
        finally:
            self.leave(procs, exit_shell=False)
        time.sleep(15)
        result["rss_after"] = tree_rss(pid)
        result["rss_ratio"] = result["rss_after"] / result["rss_before"]
        self.setup.end_session(session["id"])
        return result


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


# --- the run ----------------------------------------------------------------------------------------------

def run(bench: Bench, results: dict[str, Any]) -> None:
    args, budget = bench.args, bench.budget

    for system in ("direct", "lsl"):
        budget.require(30, f"keystroke echo ({system})")
        results["echo"][system] = echo = bench.echo(system)
        progress(budget, f"echo {system}: " + (f"p50 {echo['p50']:.2f} ms, p99 {echo['p99']:.2f} ms" if "p50" in echo else echo["error"]))

    results["meta"]["pty_ceiling_mib_s"] = pty_ceiling(args.flood_mb)
    progress(budget, f"a bare PTY on this host: {fmt(results['meta']['pty_ceiling_mib_s'])} MiB/s")
    for system in ("terminado", "direct", "lsl"):  # terminado first: its terminal is spawned by this warm-up
        budget.require(20, f"warm-up ({system})")
        warm = bench.flood_round(system, 1, args.flood_mb)
        results["warmup"][system] = {k: v for k, v in warm.items() if k != "participants"}
        progress(budget, f"warm-up {system}: {describe_round(warm)}")

    for n in args.participants:
        mb = args.flood_mb if n < args.crowd_from else args.crowd_flood_mb
        systems = ["lsl", "terminado"] + (["direct"] if n == 1 else [])
        entry = results["throughput"].setdefault(str(n), {"mb": mb, **{s: [] for s in systems}})
        for round_no in range(args.rounds):
            for system in systems[round_no % len(systems):] + systems[:round_no % len(systems)]:
                budget.require(20, f"{system} with {n} participant(s), round {round_no + 1}")
                outcome = bench.flood_round(system, n, mb)
                entry[system].append(outcome)
                progress(budget, f"{system} x{n} round {round_no + 1}: {describe_round(outcome)}")

    # Last: what a crowd leaves behind in the server must not weigh on the throughput rounds.
    if args.idle:
        budget.require(60, f"{args.idle} idle participants")
        bench.settle()
        results["idle"] = idle = bench.idle(args.idle)
        progress(budget, f"idle {args.idle}: {idle.get('joined')}/{args.idle} attached, last after {fmt(idle.get('attach_s'), 2)} s, "
                         f"{fmt(idle.get('idle_cores'), 3)} cores, RSS ratio {fmt(idle.get('rss_ratio'), 2)}")


def describe_round(r: dict[str, Any]) -> str:
    if r.get("error"):
        return f"error: {r['error']}"
    text = f"median {fmt(r['rate_median'])} MiB/s, slowest {fmt(r['rate_min'])}, {r['finished']}/{r['n']} finished"
    if r["resynced"]:
        text += f", {r['resynced']} resynced"
    if r["close_codes"]:
        text += f", closed {r['close_codes']}"
    if r.get("cpu_s_per_mib") is not None:
        text += f", server {r['cpu_s_per_mib']:.3f} CPU-s/MiB"
    return text


# --- the report -----------------------------------------------------------------------------------------------

def fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per configuration: medians over the rounds that ran."""
    done = [r for r in rounds if "rates" in r]

    def med(key: str) -> float | None:
        values = [r[key] for r in done if r.get(key) is not None]
        return statistics.median(values) if values else None

    skipped = [b for r in done for b in r["skipped_bytes"]]
    return {"rounds": len(rounds), "done": len(done), "median": med("rate_median"), "min": med("rate_min"),
            "cpu_s_per_mib": med("cpu_s_per_mib"), "n": rounds[0]["n"] if rounds else 0,
            "resynced": [r["resynced"] for r in done], "unfinished": [r["unfinished"] for r in done],
            "skipped_median_mib": statistics.median(skipped) / MiB if skipped else 0.0,
            "close_codes": dict(sum((Counter(r["close_codes"]) for r in done), Counter())),
            "errors": [r["error"] for r in rounds if r.get("error")]}


def describe(s: dict[str, Any], system_label: str = "") -> str:
    if not s["rounds"]:
        return f"{system_label}not run"
    if not s["done"]:
        return f"{system_label}failed: {s['errors'][0]}"
    if s["median"] is None:
        text = f"{system_label}no participant finished"
    else:
        text = f"{system_label}{fmt(s['median'])} MiB/s (slowest {fmt(s['min'])})"
    n = s["n"]
    if any(s["resynced"]):
        text += f"; resynced {'/'.join(str(x) for x in s['resynced'])} of {n} per round, skipped median {s['skipped_median_mib']:.1f} MiB"
    if any(s["unfinished"]):
        text += f"; timeout: {max(s['unfinished'])}/{n} did not finish"
    if s["close_codes"]:
        text += f"; closed {', '.join(f'{c} x{k}' for c, k in s['close_codes'].items())}"
    if s["done"] < s["rounds"]:
        text += f"; {s['rounds'] - s['done']} round(s) failed ({s['errors'][0]})"
    return text


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def times(value: float | None, what: str) -> str:
    return "n/a" if value is None else f"{value:.2f}x {what}"


def met(ok: bool | None) -> str:
    return "—" if ok is None else ("yes" if ok else "no")


def table_rows(results: dict[str, Any]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    echo_d, echo_l = results["echo"].get("direct", {}), results["echo"].get("lsl", {})
    for p, target in (("p50", TARGETS["echo_p50_ms"]), ("p99", TARGETS["echo_p99_ms"])):
        added = echo_l[p] - echo_d[p] if p in echo_l and p in echo_d else None
        rows.append((f"keystroke echo {p}", f"{echo_l[p]:.2f} ms" if p in echo_l else echo_l.get("error", "not run"),
                     f"direct exec {echo_d[p]:.2f} ms" if p in echo_d else echo_d.get("error", "not run"),
                     f"+{added:.2f} ms added" if added is not None else "n/a", "—", f"≤ {target} ms added",
                     met(None if added is None else added <= target)))

    through = results["throughput"]
    one = summarize(through["1"]["lsl"]) if "1" in through else None
    for key, entry in through.items():
        n, mb = int(key), entry["mb"]
        lsl, term = summarize(entry["lsl"]), summarize(entry["terminado"])
        label = f"throughput, {n} viewer{'s' if n > 1 else ''}{' each' if n > 1 else ''} ({mb} MiB)"
        baseline = describe(term, "terminado ")
        cpu = f"LSL {fmt(lsl['cpu_s_per_mib'], 3)} / terminado {fmt(term['cpu_s_per_mib'], 3)}"
        term_ratio = ratio(lsl["median"], term["median"])
        if n == 1:
            direct = summarize(entry["direct"])
            baseline = describe(direct, "direct exec ") + "; " + baseline
            cpu += " / direct n/a"
            r = ratio(lsl["median"], direct["median"])
            rows.append((label, describe(lsl), baseline, f"{times(r, 'direct')} ({times(term_ratio, 'terminado')})", cpu,
                         f"≥ {TARGETS['one_vs_direct']}x direct", met(None if r is None else r >= TARGETS["one_vs_direct"])))
        elif n < 50:
            r = ratio(lsl["median"], one["median"] if one else None)
            rows.append((label, describe(lsl), baseline, f"{times(r, 'LSL 1 viewer')} ({times(term_ratio, 'terminado')})", cpu,
                         f"≥ {TARGETS['many_vs_one']}x LSL 1 viewer", met(None if r is None else r >= TARGETS["many_vs_one"])))
        else:
            clean = lsl["done"] > 0 and not any(lsl["resynced"]) and not any(lsl["unfinished"])
            rows.append((label, describe(lsl), baseline, f"{times(term_ratio, 'terminado')} (slowest: {times(ratio(lsl['min'], term['min']), 'terminado')})",
                         cpu, f"≥ {TARGETS['crowd_vs_terminado']}x terminado, none resynced",
                         met(None if term_ratio is None else term_ratio >= TARGETS["crowd_vs_terminado"] and clean)))

    idle = results.get("idle")
    if idle:
        n = idle["n"]
        note = ""
        if idle.get("join_retries"):
            note += f"; {idle['join_retries']} handshake(s) failed and were retried"
        attach = idle.get("attach_s")
        if idle.get("joined", 0) < n:
            cell = (f"only {idle.get('joined', 0)}/{n} attached within {idle['join_timeout_s']:.0f} s "
                    f"(the last of those {fmt(attach, 1)} s after the first connect){note}")
            ok: bool | None = False
        else:
            cell = f"{fmt(attach, 2)} s, first connect to last join snapshot{note}"
            ok = None if attach is None else attach <= TARGETS["idle_attach_s"]
        rows.append((f"{n} idle: all attached", cell, "—", "—", "—", f"≤ {TARGETS['idle_attach_s']:.0f} s", met(ok)))
        cores = idle.get("idle_cores")
        lost = idle.get("joined", 0) - idle.get("open_after_idle", 0)
        closed = f"; {lost} of those attached were closed while idle {idle.get('close_codes')}" if lost > 0 else ""
        rows.append((f"{n} idle: server CPU", f"{fmt(cores, 3)} cores over 10 s{closed}", "—", "—", "—",
                     f"≤ {TARGETS['idle_cores']} core", met(None if cores is None else cores <= TARGETS["idle_cores"])))
        rss = [None if idle.get(k) is None else idle[k] / MiB for k in ("rss_before", "rss_joined", "rss_after")]
        rss_ratio = idle.get("rss_ratio")
        rows.append((f"{n} idle: daphne RSS", f"before {fmt(rss[0], 0)} MiB, joined {fmt(rss[1], 0)} MiB, 15 s after leaving {fmt(rss[2], 0)} MiB",
                     "—", f"{fmt(rss_ratio, 2)}x before", "—", f"after ≤ {TARGETS['idle_rss_ratio']}x before",
                     met(None if rss_ratio is None else rss_ratio <= TARGETS["idle_rss_ratio"])))
    return rows


def render_table(rows: list[tuple[str, ...]]) -> str:
    header = ("measure", "LSL (per participant)", "baseline (same run)", "ratio", "server CPU-s per delivered MiB", "target (issue 11)", "met?")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(header, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    return "\n".join(lines)


def report(results: dict[str, Any], json_path: str | None) -> None:
    meta = results["meta"]
    print()
    print(f"LSL terminal benchmark: engine {meta.get('engine', '?')}, {meta['cpus']} CPUs, {meta['rounds']} timed rounds "
          f"(median), client processes up to {meta['client_procs']}, redis {'yes' if meta['redis'] else 'no'}, "
          f"a bare PTY here {fmt(meta.get('pty_ceiling_mib_s'))} MiB/s, wall {results['wall_s']:.0f} s{' — STOPPED EARLY: ' + results['stopped'] if results.get('stopped') else ''}")
    print()
    print(render_table(table_rows(results)))
    log = results.get("server_log")
    if log and log["lines"]:
        print(f"\ndaphne logged {log['lines']} line(s) at WARNING or above ({log['tracebacks']} traceback(s)); first distinct:")
        for line in log["first"]:
            print(f"  {line}")
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=1, default=str))
        print(f"\nraw numbers: {json_path}")


def start_watchdog(seconds: float, on_fire: Callable[[], None]) -> None:
    """The last resort: whatever is stuck, the process ends `seconds` from now."""
    def fire() -> None:
        time.sleep(seconds)
        print(f"\nwatchdog: still running {seconds:.0f} s after start; giving up", file=sys.stderr, flush=True)
        try:
            on_fire()
        finally:
            os._exit(2)

    threading.Thread(target=fire, daemon=True).start()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per configuration (median)")
    parser.add_argument("--flood-mb", type=int, default=20, help="MiB of `yes` per throughput run (and the warm-ups)")
    parser.add_argument("--crowd-flood-mb", type=int, default=5, help="MiB of `yes` per run from --crowd-from participants")
    parser.add_argument("--crowd-from", type=int, default=50, help="participant count from which --crowd-flood-mb applies")
    parser.add_argument("--participants", default="1,10,50", help="comma-separated participant counts")
    parser.add_argument("--keystrokes", type=int, default=200)
    parser.add_argument("--idle", type=int, default=500, help="idle participants joined to one session (0 skips)")
    parser.add_argument("--round-timeout", type=float, default=120, help="seconds a round waits for every participant's end")
    parser.add_argument("--deadline", type=float, default=900, help="seconds: no measurement starts after this")
    parser.add_argument("--client-procs", type=int, default=2 * (os.cpu_count() or 1), help="client processes at most")
    parser.add_argument("--redis", help="run the server with LSL_REDIS_URL set to this")
    parser.add_argument("--json", help="write the raw numbers here")
    args = parser.parse_args()
    args.participants = [int(n) for n in args.participants.split(",") if n.strip()]
    return args


def main() -> int:
    args = parse_args()
    budget = Budget(args.deadline)
    var = Path(tempfile.mkdtemp(prefix="lsl-bench-"))
    results: dict[str, Any] = {"meta": {"cpus": os.cpu_count(), "rounds": args.rounds, "client_procs": args.client_procs,
                                        "redis": bool(args.redis), "args": {k: v for k, v in vars(args).items()}},
                               "echo": {}, "warmup": {}, "throughput": {}, "idle": None, "stopped": None}
    held: dict[str, Any] = {}

    def emergency() -> None:  # watchdog: report what there is, stop what this process started
        results["wall_s"] = budget.elapsed()
        results["stopped"] = "watchdog fired"
        try:
            report(results, args.json)
        finally:
            for key, stop in (("pool", ClientPool.kill), ("terminado", Terminado.stop), ("daphne", subprocess.Popen.kill)):
                with contextlib.suppress(Exception):
                    stop(held[key])

    start_watchdog(args.deadline + 90, emergency)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    status = 0
    setup: Setup | None = None
    terminado: Terminado | None = None
    pool: ClientPool | None = None
    try:
        configure_django(var, args.redis)
        progress(budget, "setting up LSL (environment, daphne), terminado and the client processes")
        setup = Setup(var)
        held["daphne"] = setup.daphne
        results["meta"]["engine"] = setup.engine
        terminado = held["terminado"] = Terminado(setup.container_id, var)
        pool = held["pool"] = ClientPool(args.client_procs, var)
        run(Bench(args, budget, setup, terminado, pool), results)
    except DeadlineReached as exc:
        results["stopped"] = str(exc)
        status = 1
    except KeyboardInterrupt:
        results["stopped"] = "interrupted"
        status = 130
    except Exception as exc:  # noqa: BLE001 - report what there is, then clean up
        import traceback

        traceback.print_exc()
        results["stopped"] = f"aborted: {exc.__class__.__name__}: {exc}"
        status = 2
    finally:
        results["wall_s"] = budget.elapsed()
        if setup is not None:
            results["server_log"] = setup.log_summary()
        report(results, args.json)
        for closer in (pool, terminado, setup):
            if closer is not None:
                try:
                    closer.close() if not isinstance(closer, Terminado) else closer.stop()
                except Exception as exc:  # noqa: BLE001 - clean up the rest anyway
                    print(f"cleanup: {exc}", file=sys.stderr)
        shutil.rmtree(var, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
