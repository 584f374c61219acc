"""`lsl forward` benchmark: forwarded throughput and request latency against a direct connection to the
container's IP, measured in the same run.

    .venv/bin/python bench/forward.py [--download-mb 64] [--rounds 3] [--requests 200] [--deadline 600] [--json FILE]

Needs a running Docker engine, the test image lsl-test/debian:bookworm (`make images`) and the keeper
binary. It sets up a throwaway LSL exactly as bench/terminal.py does (its own var dir with SQLite, its
own LSL_INSTANCE label, one Debian environment provisioned in this process, daphne in its own
process), starts a small HTTP server inside the environment on 0.0.0.0:8000 (python3-minimal has no
http.server: SERVER below; keep-alive, `GET /blob/N` answers N bytes), runs the real
`lsl forward ENV 0:8000 --json` in its own process, and measures, on the same server:

1. **Throughput**: one `GET /blob/<--download-mb MiB>` on a new connection, through the forward and
   directly to <container IP>:8000 (`docker inspect`), --rounds times each, taking turns going first.
   Rate = body bytes delivered to the client / (last byte - connect). Median over rounds. CPU-seconds
   per MiB of daphne (process tree) and of the `lsl forward` process over the forwarded rounds.
2. **Latency**: --requests small requests (`GET /blob/100`), after 20 untimed ones, each timed from
   connect (new connection per request) or from sending (keep-alive: one connection for all) to the
   last byte; p50 and p95.

Method: every measuring client is its own OS process (this file with --client), never this one or the
servers; only bytes the client received count; a client that does not finish within --client-timeout
is killed and its measurement reported as failed; no measurement starts after --deadline seconds, and
a watchdog ends the whole run 60 s after it, whatever is stuck. Not a test: it prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
MiB = 1024 * 1024

SERVER = r'''
import socket, sys, threading
port = int(sys.argv[1])
CHUNK = bytes(range(256)) * 1024

def serve(conn):
    try:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        f = conn.makefile("rb")
        while True:
            line = f.readline()
            if not line:
                return
            path = line.split()[1].decode()
            while f.readline() not in (b"\r\n", b"\n", b""):
                pass
            n = int(path[6:]) if path.startswith("/blob/") else 2
            head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % n
            if n <= len(CHUNK):
                conn.sendall(head + CHUNK[:n])
                continue
            conn.sendall(head)
            while n > 0:
                conn.sendall(CHUNK[:n])
                n -= len(CHUNK)
    except OSError:
        pass
    finally:
        conn.close()

s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", port))
s.listen(256)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
'''


# --- the client (its own process) ------------------------------------------------------------------

def _request(sock: socket.socket, path: str, buf: bytearray) -> int:
    """Send one GET on `sock`, read its whole response; returns the body bytes received."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before the headers")
        buf += chunk
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
    got = len(rest)
    del buf[:]
    while got < length:
        chunk = sock.recv(min(1 << 20, length - got))
        if not chunk:
            raise ConnectionError(f"closed after {got} of {length} bytes")
        got += len(chunk)
    return got


def client(mode: str, host: str, port: int, amount: int) -> dict[str, Any]:
    if mode == "download":
        start = time.perf_counter()
        with socket.create_connection((host, port), timeout=60) as sock:
            got = _request(sock, f"/blob/{amount}", bytearray())
        seconds = time.perf_counter() - start
        return {"bytes": got, "seconds": seconds, "mib_s": got / MiB / seconds}
    times: list[float] = []
    keep = socket.create_connection((host, port), timeout=30) if mode == "keepalive" else None
    try:
        for i in range(amount + 20):
            start = time.perf_counter()
            if keep is None:
                with socket.create_connection((host, port), timeout=30) as sock:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    _request(sock, "/blob/100", bytearray())
            else:
                keep.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                _request(keep, "/blob/100", bytearray())
            if i >= 20:
                times.append((time.perf_counter() - start) * 1000)
    finally:
        if keep is not None:
            keep.close()
    return {"ms": times}


# --- the run -----------------------------------------------------------------------------------------

def run_client(mode: str, host: str, port: int, amount: int, timeout: float) -> dict[str, Any]:
    try:
        done = subprocess.run([sys.executable, __file__, "--client", mode, host, str(port), str(amount)],
                              capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"no answer within {timeout:.0f} s"}
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    return json.loads(done.stdout)


def container_ip(container_id: str) -> str:
    out = subprocess.run(["docker", "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}", container_id],
                         capture_output=True, text=True, timeout=30, check=True).stdout.split()
    if not out:
        raise SystemExit("the container has no IP address (not on a bridge network?)")
    return out[0]


class Forward:
    """`lsl forward bench 0:8000 --json` in its own process."""

    def __init__(self, url: str, token: str, var: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LSL_")}
        env.update({"LSL_URL": url, "LSL_TOKEN": token, "XDG_CONFIG_HOME": str(var / "cli")})
        self.log = (var / "forward.log").open("w")
        self.proc = subprocess.Popen([str(Path(sys.executable).parent / "lsl"), "forward", "bench", "0:8000", "--json"],
                                     stdout=subprocess.PIPE, stderr=self.log, text=True, env=env, start_new_session=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"lsl forward did not start: {(var / 'forward.log').read_text()[-2000:]}")
        self.port = int(json.loads(line)[0]["local"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def measure(args: argparse.Namespace, budget: Any, setup: Any, fwd: Forward, direct: str, results: dict[str, Any]) -> None:
    from terminal import progress, tree_cpu

    targets = {"lsl forward": ("127.0.0.1", fwd.port), "direct": (direct, 8000)}
    size = args.download_mb * MiB
    run_client("download", "127.0.0.1", fwd.port, MiB, args.client_timeout)  # warm-up (first tunnel, page cache)
    run_client("download", direct, 8000, MiB, args.client_timeout)
    downloads: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
    cpu = {"daphne": 0.0, "lsl": 0.0, "mib": 0.0}
    for r in range(args.rounds):
        order = list(targets) if r % 2 == 0 else list(reversed(targets))
        for name in order:
            budget.require(args.client_timeout, f"download round {r + 1}")
            progress(budget, f"download {args.download_mb} MiB, round {r + 1}, {name}")
            before = (tree_cpu(setup.pid), tree_cpu(fwd.proc.pid)) if name == "lsl forward" else None
            result = run_client("download", *targets[name], size, args.client_timeout)
            if before is not None and "bytes" in result:
                cpu["daphne"] += tree_cpu(setup.pid) - before[0]
                cpu["lsl"] += tree_cpu(fwd.proc.pid) - before[1]
                cpu["mib"] += result["bytes"] / MiB
            if "bytes" in result and result["bytes"] != size:
                result = {"error": f"got {result['bytes']} of {size} bytes"}
            downloads[name].append(result)
    results["download"] = downloads
    results["cpu_per_mib"] = {k: cpu[k] / cpu["mib"] for k in ("daphne", "lsl")} if cpu["mib"] else None
    results["latency"] = {}
    for mode in ("new", "keepalive"):
        results["latency"][mode] = {}
        for name, (host, port) in targets.items():
            budget.require(args.client_timeout, f"latency ({mode})")
            progress(budget, f"{args.requests} requests, {'new connection each' if mode == 'new' else 'keep-alive'}, {name}")
            results["latency"][mode][name] = run_client(mode, host, port, args.requests, args.client_timeout)


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def report(results: dict[str, Any], json_path: str | None) -> None:
    rows: list[tuple[str, str, str, str]] = []
    downloads = results.get("download") or {}

    def rate(name: str) -> tuple[str, float | None]:
        done = [r["mib_s"] for r in downloads.get(name, []) if "mib_s" in r]
        errors = [r["error"] for r in downloads.get(name, []) if "error" in r]
        if not done:
            return (errors[0] if errors else "not run"), None
        med = statistics.median(done)
        note = f" ({len(errors)} failed)" if errors else ""
        return f"{med:.0f} MiB/s (rounds {', '.join(f'{v:.0f}' for v in done)}){note}", med

    if downloads:
        (f_text, f_rate), (d_text, d_rate) = rate("lsl forward"), rate("direct")
        ratio = f"{f_rate / d_rate:.2f}x direct" if f_rate and d_rate else "n/a"
        rows.append((f"throughput, {results['meta']['download_mb']} MiB download", f_text, d_text, ratio))
    for mode, label in (("new", "new connection each"), ("keepalive", "keep-alive")):
        for p in (50, 95):
            cells = []
            for name in ("lsl forward", "direct"):
                entry = (results.get("latency") or {}).get(mode, {}).get(name, {})
                cells.append(pct(entry["ms"], p) if entry.get("ms") else None)
                if entry.get("error"):
                    cells[-1] = entry["error"]
            text = [f"{c:.2f} ms" if isinstance(c, float) else (c or "not run") for c in cells]
            ratio = (f"{cells[0] / cells[1]:.1f}x direct (+{cells[0] - cells[1]:.2f} ms)"
                     if all(isinstance(c, float) and c for c in cells) else "n/a")
            rows.append((f"request latency p{p}, {label} ({results['meta']['requests']} requests)", *text, ratio))
    cpu = results.get("cpu_per_mib")
    if cpu:
        rows.append(("CPU-s per forwarded MiB", f"daphne {cpu['daphne']:.4f}, lsl forward {cpu['lsl']:.4f}", "—", "—"))
    header = ("measure", "through lsl forward", "direct to the container's IP", "ratio")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    meta = results["meta"]
    print()
    print(f"lsl forward benchmark: engine {meta.get('engine', '?')}, {meta['cpus']} CPUs, keeper path "
          f"{meta.get('keeper_path', '?')}, wall {results.get('wall_s', 0):.0f} s"
          f"{' — STOPPED EARLY: ' + results['stopped'] if results.get('stopped') else ''}")
    print()
    print("| " + " | ".join(c.ljust(w) for c, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=1, default=str))
        print(f"\nraw numbers: {json_path}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--download-mb", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--client-timeout", type=float, default=120, help="seconds one client process may take")
    parser.add_argument("--deadline", type=float, default=600, help="seconds: no measurement starts after this")
    parser.add_argument("--json", help="write every number to this file")
    parser.add_argument("--client", nargs=4, metavar=("MODE", "HOST", "PORT", "AMOUNT"), help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    if args.client:
        mode, host, port, amount = args.client
        print(json.dumps(client(mode, host, int(port), int(amount))))
        return 0
    sys.path.insert(0, str(BENCH))
    from terminal import (
        Budget,
        DeadlineReached,
        Setup,
        configure_django,
        progress,
        start_watchdog,
    )

    budget = Budget(args.deadline)
    var = Path(tempfile.mkdtemp(prefix="lsl-bench-fwd-"))
    results: dict[str, Any] = {"meta": {"cpus": os.cpu_count(), "download_mb": args.download_mb, "rounds": args.rounds,
                                        "requests": args.requests}, "stopped": None}
    held: dict[str, Any] = {}

    def emergency() -> None:
        results["stopped"] = "watchdog fired"
        results["wall_s"] = budget.elapsed()
        try:
            report(results, args.json)
        finally:
            for key in ("forward", "daphne"):
                with contextlib.suppress(Exception):
                    held[key].kill()

    start_watchdog(args.deadline + 60, emergency)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    status = 0
    setup = fwd = None
    try:
        configure_django(var, None)
        progress(budget, "setting up LSL (environment, daphne) and the server in the environment")
        setup = Setup(var)
        held["daphne"] = setup.daphne
        results["meta"]["engine"] = setup.engine
        from environments import keeper, runtime

        results["meta"]["keeper_path"] = "socket" if keeper._host_socket(setup.env_id) is not None else "exec"
        runtime.local().exec_detached(setup.container_id, ["python3", "-c", SERVER, "8000"], user="0:0")
        direct = container_ip(setup.container_id)
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection((direct, 8000), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit(f"the server in the environment did not listen on {direct}:8000")
                time.sleep(0.1)
        fwd = Forward(setup.url, setup.token, var)
        held["forward"] = fwd.proc
        measure(args, budget, setup, fwd, direct, results)
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
        report(results, args.json)
        if fwd is not None:
            fwd.stop()
        if setup is not None:
            try:
                setup.close()
            except Exception as exc:  # noqa: BLE001
                print(f"cleanup: {exc}", file=sys.stderr)
        shutil.rmtree(var, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
