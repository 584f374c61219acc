"""Terminal benchmark: LSL's shared sessions against baselines measured in the same run.

    .venv/bin/python bench/terminal.py [--flood-mb 20] [--keystrokes 200]

Needs a running Docker engine and the test image lsl-test/debian:bookworm
(`make images`). It sets up a throwaway LSL (its own var dir, SQLite, a daphne
process), creates one environment, and measures:

* keystroke echo round trip (p50/p99): LSL websocket vs a direct `docker exec`
  TTY socket to the same container;
* output throughput of `yes | head -c N` for 1, 10 and 50 participants: LSL vs
  the direct exec socket and vs terminado (one shared terminal running
  `docker exec -it` into the same container).

Not a test: it prints a table of ratios; nothing asserts on timings.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
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
sys.path.insert(0, str(REPO))
VAR = Path(tempfile.mkdtemp(prefix="lsl-bench-"))
os.environ.update({
    "DJANGO_SETTINGS_MODULE": "lsl_site.settings",
    "LSL_VAR_DIR": str(VAR),
    "LSL_INSTANCE": f"bench-{os.getpid()}",
    "LSL_ALLOWED_HOSTS": "127.0.0.1,localhost",
    "LSL_THROTTLE_USER": "100000/min",
    "LSL_LOG_LEVEL": "WARNING",
})

import django  # noqa: E402

django.setup()

import websockets  # noqa: E402
from websockets.asyncio.client import connect  # noqa: E402

from environments import runtime  # noqa: E402

MARK_START, MARK_END = b"BENCH-START\r\n", b"BENCH-END\r\n"
# A participant resynced from a snapshot sees the end marker drawn on its screen, not followed by CRLF.
SCREEN_END = b"BENCH-END"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen[bytes], accept: tuple[int, ...]) -> None:
    import requests

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if requests.get(url, timeout=1).status_code in accept:
                return
        except requests.ConnectionError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    raise SystemExit(f"server at {url} did not start")


def flood_command(mb: int) -> str:
    # The markers are assembled by the shell, so the echoed command line never contains them.
    return f"printf '%s\\n' BENCH-ST''ART; yes | head -c {mb}M; printf '%s\\n' BENCH-E''ND\r"


# --- setup ----------------------------------------------------------------------------

class Setup:
    def __init__(self) -> None:
        from django.contrib.auth import get_user_model
        from django.core.management import call_command

        from accounts.services import create_token
        from environments import services
        from environments.catalog import apply_catalog
        from environments.models import Template

        runtime.ping()
        if not runtime.image_exists("lsl-test/debian:bookworm"):
            raise SystemExit("missing image lsl-test/debian:bookworm: run `make images`")
        call_command("migrate", verbosity=0)
        apply_catalog(REPO / "catalog" / "test.yaml")
        user = get_user_model().objects.create_user("bench", "", "bench-password")
        self.token = create_token(user, "bench")[1]
        env = services.create_environment(user, services.CreateRequest(name="bench", template=Template.objects.get(slug="debian")))
        from environments import provisioning

        provisioning.provision(env.id, "bench")  # in-process: this benchmark is about terminals, not the worker
        env.refresh_from_db()
        if env.status != "running":
            raise SystemExit(f"environment did not start: {env.last_error}")
        self.env = env
        self.container_id = env.container_id
        port = free_port()
        self.log = (VAR / "daphne.log").open("wb")
        self.daphne = subprocess.Popen([sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port),
                                        "lsl_site.asgi:application"], cwd=REPO, env=os.environ.copy(),
                                       stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{port}"
        wait_http(f"{self.url}/api/v1/config/", self.daphne, (401, 403))

    def open_session(self) -> str:
        import requests

        response = requests.post(f"{self.url}/api/v1/environments/{self.env.id}/sessions/",
                                 headers={"Authorization": f"Token {self.token}"}, json={"cols": 120, "rows": 40}, timeout=30)
        response.raise_for_status()
        return response.json()["ws_url"]

    def close(self) -> None:
        self.daphne.terminate()
        self.daphne.wait(timeout=10)
        runtime.remove_instance_resources()
        shutil.rmtree(VAR, ignore_errors=True)


# --- direct exec socket (the floor) -------------------------------------------------------

class DirectExec:
    def __init__(self, container_id: str) -> None:
        self.exec = runtime.exec_open_tty(container_id, ["/bin/bash"], cols=120, rows=40)
        self.sock = self.exec.sock
        self.sock.settimeout(30)
        self.buffer = bytearray()
        self.send(b"export PS1='$ '\r")
        self.read_until(b"$ ")
        time.sleep(0.2)
        self.drain()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def drain(self) -> None:
        self.sock.setblocking(False)
        try:
            while self.sock.recv(65536):
                pass
        except BlockingIOError:
            pass
        self.sock.settimeout(30)
        self.buffer.clear()

    def read_until(self, needle: bytes) -> None:
        scanned = 0
        while self.buffer.find(needle, max(0, scanned - len(needle))) < 0:
            scanned = len(self.buffer)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError
            self.buffer += chunk

    def keystroke_rtts(self, count: int) -> list[float]:
        rtts = []
        for i in range(count):
            start = time.perf_counter()
            self.send(b"a")
            while b"a" not in self.sock.recv(65536):
                pass
            rtts.append(time.perf_counter() - start)
            if i % 50 == 49:
                self.send(b"\x15")  # ^U clears the line
                time.sleep(0.05)
                self.drain()
        self.send(b"\x15")
        time.sleep(0.05)
        self.drain()
        return rtts

    def flood(self, mb: int) -> float:
        self.buffer.clear()
        self.send(flood_command(mb).encode())
        self.read_until(MARK_START)
        start = time.perf_counter()
        self.read_until(MARK_END)
        elapsed = time.perf_counter() - start
        time.sleep(0.2)
        self.drain()
        return elapsed

    def close(self) -> None:
        self.send(b"exit\r")
        self.sock.close()


# --- LSL websocket participants ----------------------------------------------------------------

class Participant:
    ACK_EVERY = 256 * 1024

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.received = self.acked = 0
        self.output = bytearray()
        self.scanned = 0
        self.event = asyncio.Event()
        self.snapshots = 0
        self.closed = False

    @classmethod
    async def join(cls, ws_url: str, token: str) -> "Participant":
        ws = await connect(f"{ws_url}?client=cli&cols=120&rows=40", additional_headers={"Authorization": f"Token {token}"},
                           max_size=None, compression=None, max_queue=None)
        participant = cls(ws)
        participant.task = asyncio.create_task(participant.run())
        return participant

    async def run(self) -> None:
        try:
            async for message in self.ws:
                if isinstance(message, bytes):
                    self.received += len(message)
                    self.output += message
                    if self.received - self.acked >= self.ACK_EVERY:
                        self.acked = self.received
                        await self.ws.send(json.dumps({"type": "ack", "bytes": self.received}))
                    self.event.set()
                elif json.loads(message).get("type") == "snapshot":
                    self.snapshots += 1
        except websockets.ConnectionClosed:
            pass
        self.closed = True
        self.event.set()

    async def wait_for(self, needle: bytes, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while self.output.find(needle, max(0, self.scanned - len(needle))) < 0 and not self.closed:
            self.scanned = len(self.output)
            self.event.clear()
            await asyncio.wait_for(self.event.wait(), max(0.01, deadline - time.monotonic()))

    def reset(self) -> None:
        self.output.clear()
        self.scanned = 0


async def lsl_keystrokes(setup: Setup, count: int) -> list[float]:
    ws_url = setup.open_session()
    typist = await Participant.join(ws_url, setup.token)
    await typist.ws.send(b"export PS1='$ '\r")
    await typist.wait_for(b"$ ")
    await asyncio.sleep(0.3)
    rtts = []
    for i in range(count):
        typist.reset()
        start = time.perf_counter()
        await typist.ws.send(b"a")
        await typist.wait_for(b"a")
        rtts.append(time.perf_counter() - start)
        if i % 50 == 49:
            await typist.ws.send(b"\x15")
            await asyncio.sleep(0.05)
    await typist.ws.send(b"exit\r")
    await typist.ws.close()
    return rtts


async def lsl_flood(setup: Setup, participants: int, mb: int) -> tuple[float, int, int]:
    """Seconds until the slowest participant has seen the end of the flood (live or on a
    resynced screen), how many were resynced from a snapshot, and how many were closed."""
    ws_url = setup.open_session()
    clients = [await Participant.join(ws_url, setup.token) for _ in range(participants)]
    await asyncio.sleep(0.5)
    for client in clients:
        client.reset()
        client.snapshots = 0
    await clients[0].ws.send(flood_command(mb).encode())
    await asyncio.gather(*(c.wait_for(MARK_START) for c in clients))
    start = time.perf_counter()
    await asyncio.gather(*(c.wait_for(SCREEN_END) for c in clients))
    elapsed = time.perf_counter() - start
    resynced = sum(1 for c in clients if c.snapshots)
    closed = sum(1 for c in clients if c.closed)
    if not clients[0].closed:
        await clients[0].ws.send(b"exit\r")
    for client in clients:
        await client.ws.close()
    return elapsed, resynced, closed


# --- terminado (one shared terminal, `docker exec -it` into the same container) -------------

def start_terminado(container_id: str) -> tuple[str, Any]:
    import tornado.web
    from terminado import SingleTermManager, TermSocket

    port = free_port()
    ready = threading.Event()
    holder: dict[str, Any] = {}

    def serve() -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        docker = shutil.which("docker") or "docker"
        manager = SingleTermManager(shell_command=[docker, "exec", "-it", "-e", "TERM=xterm-256color", container_id, "/bin/bash"])
        app = tornado.web.Application([(r"/websocket", TermSocket, {"term_manager": manager})])
        app.listen(port, "127.0.0.1")
        holder["loop"], holder["manager"] = loop, manager
        ready.set()
        loop.run_forever()

    threading.Thread(target=serve, daemon=True).start()
    ready.wait(10)
    return f"ws://127.0.0.1:{port}/websocket", holder


async def terminado_flood(url: str, participants: int, mb: int) -> float:
    class Reader:
        def __init__(self, ws: Any) -> None:
            self.ws, self.text, self.event, self.scanned = ws, [], asyncio.Event(), 0
            self.joined = ""

        async def run(self) -> None:
            try:
                async for message in self.ws:
                    kind, *rest = json.loads(message)
                    if kind == "stdout":
                        self.text.append(rest[0])
                        self.event.set()
            except websockets.ConnectionClosed:
                pass

        async def wait_for(self, needle: str) -> None:
            while True:
                self.joined = "".join(self.text)
                if needle in self.joined[max(0, self.scanned - len(needle)):]:
                    return
                self.scanned = len(self.joined)
                self.text = [self.joined]
                self.event.clear()
                await asyncio.wait_for(self.event.wait(), 300)

    readers = []
    for _ in range(participants):
        reader = Reader(await connect(url, max_size=None, compression=None, max_queue=None))
        reader.task = asyncio.create_task(reader.run())
        readers.append(reader)
    await readers[0].ws.send(json.dumps(["stdin", "export PS1='$ '\r"]))
    await asyncio.sleep(1.0)
    for reader in readers:
        reader.text, reader.scanned = [], 0
    await readers[0].ws.send(json.dumps(["stdin", flood_command(mb)]))
    await asyncio.gather(*(r.wait_for(MARK_START.decode()) for r in readers))
    start = time.perf_counter()
    await asyncio.gather(*(r.wait_for(MARK_END.decode()) for r in readers))
    elapsed = time.perf_counter() - start
    for reader in readers:
        await reader.ws.close()
    return elapsed


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flood-mb", type=int, default=20, help="MiB of `yes` output per throughput run")
    parser.add_argument("--keystrokes", type=int, default=200)
    parser.add_argument("--participants", default="1,10,50")
    args = parser.parse_args()
    counts = [int(n) for n in args.participants.split(",")]

    setup = Setup()
    try:
        rows: list[tuple[str, str, str, str]] = []
        direct = DirectExec(setup.container_id)
        direct_rtt = direct.keystroke_rtts(args.keystrokes)
        lsl_rtt = asyncio.run(lsl_keystrokes(setup, args.keystrokes))
        for label, p in (("p50", 50), ("p99", 99)):
            d, lsl = pct(direct_rtt, p) * 1000, pct(lsl_rtt, p) * 1000
            rows.append((f"keystroke echo {label}", f"{lsl:.2f} ms", f"direct exec {d:.2f} ms", f"{lsl / d:.1f}x"))

        output_mb = args.flood_mb * 1.5  # the TTY turns "y\n" into "y\r\n"
        direct_s = direct.flood(args.flood_mb)
        direct.close()
        terminado_url, terminado = start_terminado(setup.container_id)
        for n in counts:
            lsl_s, resynced, closed = asyncio.run(lsl_flood(setup, n, args.flood_mb))
            term_s = asyncio.run(terminado_flood(terminado_url, n, args.flood_mb))
            lsl_rate, direct_rate, term_rate = output_mb / lsl_s, output_mb / direct_s, output_mb / term_s
            note = f" ({resynced} resynced, {closed} closed)" if resynced or closed else ""
            rows.append((f"throughput, {n} participant(s)", f"{lsl_rate:.2f} MiB/s each{note}",
                         f"direct exec {direct_rate:.2f}, terminado {term_rate:.2f} MiB/s each",
                         f"{lsl_rate / direct_rate:.2f}x direct, {lsl_rate / term_rate:.2f}x terminado"))
        terminado["loop"].call_soon_threadsafe(terminado["loop"].stop)

        print()
        print(f"LSL terminal benchmark ({args.keystrokes} keystrokes, {args.flood_mb} MiB of `yes` per run, "
              f"engine {runtime.engine_info()['server_version']}, {os.cpu_count()} CPUs)")
        widths = [max(len(r[i]) for r in rows + [("measure", "LSL", "baseline", "ratio")]) for i in range(4)]
        line = "| " + " | ".join(h.ljust(w) for h, w in zip(("measure", "LSL", "baseline (same run)", "ratio"), widths)) + " |"
        print(line)
        print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        for row in rows:
            print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")
        print(f"\nkeystroke samples: LSL mean {statistics.mean(lsl_rtt) * 1000:.2f} ms, direct mean {statistics.mean(direct_rtt) * 1000:.2f} ms")
    finally:
        setup.close()


if __name__ == "__main__":
    main()
