"""`lsl forward` end to end: the real `lsl` executable in a subprocess, a live daphne, the worker and
the real engine, with servers listening on the loopback of a Debian test environment (the image has
python3-minimal: no http.server, so SERVER below is a small HTTP and echo server of its own).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import make_token
from tests.test_cli import LSL, Cli

pytestmark = [pytest.mark.usefixtures("engine", "catalog"), pytest.mark.django_db(transaction=True, serialized_rollback=True)]

MiB = 1024 * 1024

# argv: http|echo PORT [HOST]. http: `GET /` is a directory listing of /, `GET /blob/N` is N bytes
# (keep-alive, Content-Length); echo: every byte back, and the write side shut at the client's EOF.
SERVER = r'''
import os, socket, sys, threading
mode, port = sys.argv[1], int(sys.argv[2])
host = sys.argv[3] if len(sys.argv) > 3 else "127.0.0.1"

def http(conn):
    f = conn.makefile("rb")
    while True:
        line = f.readline()
        if not line:
            return
        path = line.split()[1].decode()
        while f.readline() not in (b"\r\n", b"\n", b""):
            pass
        if path.startswith("/blob/"):
            n = int(path[6:])
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n" % n)
            chunk = bytes(range(256)) * 256
            while n > 0:
                conn.sendall(chunk[:n])
                n -= len(chunk)
        else:
            names = "".join('<li><a href="%s">%s</a></li>' % (n, n) for n in sorted(os.listdir("/")))
            body = ("<html><title>Directory listing for /</title><body><h1>Directory listing for /</h1><ul>%s</ul>"
                    "</body></html>" % names).encode()
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

def echo(conn):
    while True:
        data = conn.recv(262144)
        if not data:
            conn.shutdown(socket.SHUT_WR)
            return
        conn.sendall(data)

def serve(conn):
    try:
        (http if mode == "http" else echo)(conn)
    except OSError:
        pass
    finally:
        conn.close()

s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, port))
s.listen(128)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
'''


def start_server(env: Any, mode: str, port: int, host: str = "127.0.0.1") -> None:
    """Run SERVER inside the environment (docker exec, detached) and wait until it listens."""
    from environments import runtime

    runtime.local().exec_detached(env.container_id, ["python3", "-c", SERVER, mode, str(port), host], user="0:0")
    probe = f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=1).close()"
    deadline = time.monotonic() + 20
    while runtime.local().exec_run(env.container_id, ["python3", "-c", probe]).exit_code != 0:
        assert time.monotonic() < deadline, f"the {mode} server on port {port} did not start"
        time.sleep(0.1)


class Forward:
    """A running `lsl forward` (its own process group, so a Ctrl-C reaches only it)."""

    def __init__(self, cli: Cli, *args: str) -> None:
        self.proc = subprocess.Popen([str(LSL), "forward", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=cli.env, start_new_session=True)
        self.stderr_lines: list[str] = []
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr_lines.append(line)

    @property
    def stderr(self) -> str:
        return "".join(self.stderr_lines)

    def bound(self, timeout: float = 60) -> list[dict[str, Any]]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # the JSON line comes once everything is bound
        assert line, f"lsl forward printed nothing (exit {self.proc.wait(timeout=timeout)}): {self.stderr}"
        return json.loads(line)

    def interrupt(self, timeout: float = 15) -> int:
        os.kill(self.proc.pid, signal.SIGINT)
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=5)
        return code

    def wait(self, timeout: float = 30) -> int:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture()
def owner_cli(people: Any, live_server_proc: Any, tmp_path: Path) -> Cli:
    return Cli(live_server_proc.url, tmp_path / "alice", token=make_token(people.owner))


def echo_round_trip(port: int, payload: bytes) -> bytes:
    """Send everything, half-close, read until the server's EOF (both directions at once)."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sender = threading.Thread(target=lambda: (sock.sendall(payload), sock.shutdown(socket.SHUT_WR)), daemon=True)
        sender.start()
        chunks = []
        while True:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
        sender.join(timeout=60)
    return b"".join(chunks)


def wait_for(predicate: Any, timeout: float = 15, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_forward_http_echo_several_ports_and_concurrent_connections(people: Any, make_env: Any, owner_cli: Cli) -> None:
    from django.test import Client as DjangoClient

    from environments.models import PortAuditEvent, PortAuditKind, PortTraffic

    env = make_env(people.owner, "fwd", template="debian")
    assert env.status == "running", env.last_error
    start_server(env, "http", 8000)
    start_server(env, "echo", 9000)

    forward = Forward(owner_cli, "fwd", "0:8000", "0:9000", "0:7000", "--json")
    try:
        bound = forward.bound()
        assert [(b["remote"], b["url"]) for b in bound] == [(r, f"http://127.0.0.1:{b['local']}/") for r, b in
                                                             zip((8000, 9000, 7000), bound)]
        http, echo, closed = (b["local"] for b in bound)
        assert len({http, echo, closed}) == 3 and all(port > 0 for port in (http, echo, closed))

        page = requests.get(bound[0]["url"], timeout=30)
        assert page.status_code == 200 and "Directory listing for /" in page.text and ">workspace<" in page.text

        # Ten at once on one port, echoes on the other at the same time.
        def fetch(i: int) -> int:
            with requests.Session() as session:
                return len(session.get(f"http://127.0.0.1:{http}/blob/{100_000 + i}", timeout=60).content)

        def bounce(i: int) -> bool:
            payload = os.urandom(50_000 + i)
            return echo_round_trip(echo, payload) == payload

        with ThreadPoolExecutor(20) as pool:
            sizes = list(pool.map(fetch, range(10)))
            echoes = list(pool.map(bounce, range(10)))
        assert sizes == [100_000 + i for i in range(10)]
        assert all(echoes)

        # Keep-alive: several requests over one forwarded connection.
        with requests.Session() as session:
            for n in (1, 70_000, 3 * MiB):
                assert len(session.get(f"http://127.0.0.1:{http}/blob/{n}", timeout=60).content) == n

        # 8 MiB of random bytes there and back, byte-exact (flow control both ways, then half-close).
        payload = os.urandom(8 * MiB)
        back = echo_round_trip(echo, payload)
        assert len(back) == len(payload) and hashlib.sha256(back).digest() == hashlib.sha256(payload).digest()

        # Nothing listens on 7000: said when forwarding starts, and each connection is closed with a note.
        assert "nothing listens on port 7000 in fwd" in forward.stderr
        with socket.create_connection(("127.0.0.1", closed), timeout=30) as sock:
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            try:
                assert sock.recv(100) == b""
            except ConnectionResetError:
                pass
        wait_for(lambda: "Nothing is listening on port 7000" in forward.stderr, what="the closed-port note")
        assert requests.get(bound[0]["url"], timeout=30).status_code == 200, "the forward goes on"

        assert forward.interrupt() == 0
        assert "stopped forwarding" in forward.stderr
        assert "Traceback" not in forward.stderr
    finally:
        forward.kill()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", http), timeout=2).close()
    leftovers = subprocess.run(["pgrep", "-P", str(forward.proc.pid)], capture_output=True, text=True, check=False)
    assert leftovers.stdout == "", "lsl forward left processes behind"

    # Counted per port (connections and bytes each way)...
    def counted() -> dict[int, PortTraffic] | None:
        rows = {row.port: row for row in PortTraffic.objects.filter(environment=env, via="forward")}
        ok = (8000 in rows and rows[8000].connections >= 13 and rows[8000].bytes_from_environment > 4 * MiB
              and 9000 in rows and rows[9000].bytes_to_environment >= 8 * MiB
              and rows[9000].bytes_from_environment >= 8 * MiB)
        return rows if ok else None

    rows = wait_for(counted, what="traffic counters")
    assert rows[9000].connections == 11
    assert 7000 not in rows or rows[7000].bytes_to_environment == 0

    # ...audited once per forwarded port (not per TCP connection), with the totals at the end.
    audit = list(PortAuditEvent.objects.filter(environment=env).order_by("at", "id"))
    opened = [e for e in audit if e.kind == PortAuditKind.FORWARD_OPENED]
    closed_rows = wait_for(lambda: [e for e in PortAuditEvent.objects.filter(environment=env, kind=PortAuditKind.FORWARD_CLOSED)],
                           what="forward_closed rows")
    assert sorted(e.port for e in opened) == [7000, 8000, 9000] and all(e.user_id == people.owner.pk for e in opened)
    assert sorted(e.port for e in closed_rows) == [7000, 8000, 9000]
    echo_closed = next(e for e in closed_rows if e.port == 9000)
    assert echo_closed.data["connections"] == 11 and echo_closed.data["bytes_to_environment"] >= 8 * MiB
    assert echo_closed.data["session"] == opened[0].data["session"]

    # /metrics shows them (environments/metrics.py reads PortTraffic).
    staff = DjangoClient(REMOTE_ADDR="127.0.0.1")
    staff.force_login(people.staff)
    text = staff.get("/metrics").content.decode()
    if "lsl_port_bytes" in text:
        line = next(line for line in text.splitlines() if line.startswith("lsl_port_connections")
                    and 'environment="fwd"' in line and 'port="9000"' in line and 'via="forward"' in line)
        assert line.endswith(" 11.0")
        assert any(line.startswith("lsl_port_bytes") and 'port="9000"' in line and "to_environment" in line
                   and float(line.rsplit(" ", 1)[1]) >= 8 * MiB for line in text.splitlines())


def test_forward_refusals_and_the_end_of_access(people: Any, make_env: Any, owner_cli: Cli, live_server_proc: Any,
                                                 tmp_path: Path) -> None:
    from environments import services
    from environments.models import PortAuditEvent, PortAuditKind, Role

    env = make_env(people.owner, "refuse")
    assert env.status == "running", env.last_error
    services.grant_access(env, role=Role.VIEWER, user=people.viewer)
    member_grant = services.grant_access(env, role=Role.MEMBER, user=people.member)
    viewer = Cli(live_server_proc.url, tmp_path / "victor", token=make_token(people.viewer))
    outsider = Cli(live_server_proc.url, tmp_path / "mallory", token=make_token(people.outsider))
    member = Cli(live_server_proc.url, tmp_path / "meg", token=make_token(people.member))

    # Refused before anything is bound, with the server's own message and the CLI's exit codes.
    result = viewer("forward", "refuse", "3000", timeout=60)
    assert result.returncode == 3, result
    assert "lsl: error: This needs the member role on the environment; you are viewer." in result.stderr
    assert not result.stdout and "Forwarding" not in result.stderr
    assert PortAuditEvent.objects.filter(environment=env, user=people.viewer, kind=PortAuditKind.ACCESS_REFUSED,
                                         port=3000).count() == 1
    result = outsider("forward", "refuse", "3000", timeout=60)
    assert result.returncode == 4 and "no environment named 'refuse'" in result.stderr, result
    result = outsider("forward", str(env.pk), "3000", timeout=60)
    assert result.returncode == 4 and "no environment with id" in result.stderr, result
    for bad in ("0", "70000", "a:b", "1:2:3"):
        result = owner_cli("forward", "refuse", bad, timeout=60)
        assert result.returncode == 2 and "expected [LOCAL:]REMOTE" in result.stderr, (bad, result)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = owner_cli("forward", "refuse", f"{taken.getsockname()[1]}:3000", timeout=60)
    assert result.returncode == 1 and "cannot listen on 127.0.0.1:" in result.stderr, result

    # The websocket itself: no token, no handshake; a port out of range is a 4400 with a reason.
    from websockets.exceptions import ConnectionClosed, InvalidStatus
    from websockets.sync.client import connect

    ws_url = f"{live_server_proc.ws_url}/ws/environments/{env.pk}/forward"
    with pytest.raises(InvalidStatus):
        connect(f"{ws_url}/3000/", open_timeout=10).close()
    with connect(f"{ws_url}/0/", additional_headers={"Authorization": f"Token {make_token(people.owner, 'ws')}"},
                 open_timeout=10) as ws:
        assert json.loads(ws.recv(timeout=10))["error"]["code"] == "invalid"
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=10)
        assert ws.close_code == 4400

    # A spare (lsl/forward.py Spares): `standby`, no tunnel until `open`; bytes may follow `open` at
    # once (held until the tunnel is open), bytes before it are refused.
    owner_token = make_token(people.owner, "spare")
    with connect(f"{ws_url}/3000/?spare=1", additional_headers={"Authorization": f"Token {owner_token}"},
                 open_timeout=10) as ws:
        assert json.loads(ws.recv(timeout=10)) == {"type": "standby", "port": 3000}
        ws.send(json.dumps({"type": "open"}))
        ws.send(b"GET / HTTP/1.0\r\n\r\n")
        assert json.loads(ws.recv(timeout=10))["error"]["code"] == "port_closed"
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=10)
        assert ws.close_code == 4409
    with connect(f"{ws_url}/3000/?spare=1", additional_headers={"Authorization": f"Token {owner_token}"},
                 open_timeout=10) as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "standby"
        ws.send(b"too early")
        assert json.loads(ws.recv(timeout=10))["error"]["code"] == "bad_message"
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=10)
        assert ws.close_code == 4400

    # A member forwarding loses access: lsl says so and stops (exit 3).
    forward = Forward(member, "refuse", "0:3000", "--json")
    try:
        forward.bound()
        services.revoke_access(env, str(member_grant.id))
        assert forward.wait() == 3, forward.stderr
        assert "refuse: Your access to the environment was revoked. Stopped forwarding." in forward.stderr
    finally:
        forward.kill()

    # The environment stops under a running forward: said, exit 1; then it cannot start (exit 5).
    forward = Forward(owner_cli, "refuse", "0:3000", "--json")
    try:
        forward.bound()
        services.stop_environment(env)
        assert forward.wait() == 1, forward.stderr
        assert "stopped; start it to reach its ports" in forward.stderr and "Stopped forwarding" in forward.stderr
    finally:
        forward.kill()
    result = owner_cli("forward", "refuse", "3000", timeout=60)
    assert result.returncode == 5 and "The environment is stopped; start it to reach its ports." in result.stderr, result


def tunnel_processes(container_id: str) -> list[str]:
    """The keeper's tunnel children in the container: `keeper serve` processes whose parent is the
    keeper (a fork keeps its parent's command line; the keeper itself is a child of the init)."""
    from environments import runtime

    out = runtime.local().exec_run(container_id, ["ps", "-eo", "pid=,ppid=,args="]).output.decode(errors="replace")
    rows = [line.split(None, 2) for line in out.splitlines() if len(line.split(None, 2)) == 3]
    keepers = {pid for pid, _ppid, args in rows if "keeper serve" in args}
    return [" ".join(row) for row in rows if "keeper serve" in row[2] and row[1] in keepers]


def test_forward_survives_a_killed_server(people: Any, make_env: Any, tmp_path: Path) -> None:
    """kill -9 of the only server while `lsl forward` runs with a connection open: the open connection
    ends (no hang), lsl says it lost the server and keeps its local ports bound; the same server
    started again on the same port, new connections work again; nothing is left in the container."""
    from tests.conftest import start_daphne, stop_daphne

    env = make_env(people.owner, "fwd-kill", template="debian")
    assert env.status == "running", env.last_error
    start_server(env, "echo", 9000)
    server = start_daphne(None, "daphne-forward-kill")
    port = int(server.url.rsplit(":", 1)[1])
    cli = Cli(server.url, tmp_path / "alice", token=make_token(people.owner))
    forward = Forward(cli, "fwd-kill", "0:9000", "--json")
    try:
        local = forward.bound()[0]["local"]
        assert echo_round_trip(local, b"before") == b"before"
        held = socket.create_connection(("127.0.0.1", local), timeout=30)  # open across the kill
        held.sendall(b"ping")
        assert held.recv(16) == b"ping"
        assert tunnel_processes(env.container_id), "the open connection's tunnel child is not where the check looks"

        server.proc.kill()  # kill -9: no goodbye to anyone
        server.proc.wait(timeout=10)
        held.settimeout(30)
        try:
            rest = held.recv(16)  # the connection it carried ends: EOF or reset, never a hang
        except ConnectionResetError:
            rest = b""
        assert rest == b""
        held.close()
        wait_for(lambda: "lost the connection to the server" in forward.stderr, 20, "lsl saying it lost the server")
        assert forward.proc.poll() is None, f"lsl forward gave up at once: {forward.stderr}"

        server = start_daphne(None, "daphne-forward-kill", port=port)
        wait_for(lambda: "reconnected" in forward.stderr, 30, "lsl reconnecting")
        payload = os.urandom(300_000)
        assert echo_round_trip(local, payload) == payload  # the same local port, through the new server
        assert forward.interrupt() == 0
        # Only the echo server's connections remain: no tunnel child outlived its server or its client.
        wait_for(lambda: not tunnel_processes(env.container_id), 15, "the keeper's tunnel children to exit")
    finally:
        forward.kill()
        if server.proc.poll() is None:
            stop_daphne(server)
