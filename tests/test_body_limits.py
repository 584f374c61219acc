"""Request bodies against a real daphne, as an attacker would send them (lsl_site/httpserver.py).

Each test measures the web process's resident memory from /proc while the body is in flight, on a
daphne of this module's own, so other tests' allocations cannot hide or fake a growth.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from tests.conftest import LiveServer, make_token, start_daphne, stop_daphne

pytestmark = [pytest.mark.django_db(transaction=True, serialized_rollback=True), pytest.mark.usefixtures("engine", "catalog")]

GIB = 1024**3
MIB = 1024**2
RSS_BUDGET = 32 * MIB


@pytest.fixture(scope="module")
def server(django_db_setup: Any, django_db_blocker: Any, engine: None) -> Iterator[LiveServer]:
    with django_db_blocker.unblock():
        live = start_daphne(name="daphne-bodies")
    yield live
    stop_daphne(live)


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class PeakRss:
    """Samples a process's RSS every 20 ms on a thread: the peak, not just the end, must stay in budget."""

    def __init__(self, pid: int) -> None:
        self.pid, self.before = pid, rss(pid)
        self.peak = self.before
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss(self.pid))

    def growth(self) -> int:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss(self.pid))
        return self.peak - self.before


def raw_request(server: LiveServer, head: str) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(head.encode() + b"\r\n\r\n")
    return sock


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        more = sock.recv(65536)
        if not more:
            break
        data += more
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        more = sock.recv(65536)
        if not more:
            break
        body += more
    return int(lines[0].split()[1]), headers, body


def send_body_until_refused(sock: socket.socket, total: int) -> list[int]:
    """Stream `total` bytes on a thread until the server stops taking them; returns [bytes sent]."""
    sent = [0]
    block = b"x" * (256 * 1024)

    def pump() -> None:
        try:
            while sent[0] < total:
                sock.sendall(block)
                sent[0] += len(block)
        except OSError:
            pass  # the server answered and closed: exactly what is expected

    threading.Thread(target=pump, daemon=True).start()
    return sent


def test_anonymous_gigabyte_post_gets_413_before_it_is_read(server: LiveServer) -> None:
    peak = PeakRss(server.proc.pid)
    sock = raw_request(server, f"POST /api/v1/config/ HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                               f"Content-Length: {GIB}")
    sent = send_body_until_refused(sock, GIB)
    status, headers, body = read_response(sock)
    time.sleep(0.5)
    growth = peak.growth()
    sock.close()
    assert status == 413
    assert headers["content-type"] == "application/json"
    error = json.loads(body)["error"]
    assert error["code"] == "request_too_large" and "LSL_MAX_REQUEST_BYTES" in error["detail"], error
    assert sent[0] < 64 * MIB, f"the server kept reading: {sent[0]} bytes taken"
    assert growth <= RSS_BUDGET, f"RSS grew by {growth / MIB:.1f} MiB"


def test_anonymous_chunked_body_is_cut_off_at_the_limit(server: LiveServer) -> None:
    peak = PeakRss(server.proc.pid)
    sock = raw_request(server, "POST /api/v1/environments/ HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                               "Transfer-Encoding: chunked")
    sent = [0]
    try:
        while sent[0] < GIB:
            sock.sendall(b"40000\r\n" + b"x" * 0x40000 + b"\r\n")
            sent[0] += 0x40000
    except OSError:
        pass
    status, _headers, body = read_response(sock)
    growth = peak.growth()
    assert status == 413, body
    assert json.loads(body)["error"]["code"] == "request_too_large"
    assert sent[0] < 64 * MIB
    assert growth <= RSS_BUDGET, f"RSS grew by {growth / MIB:.1f} MiB"


def test_upload_with_a_bad_token_is_refused_before_its_body(server: LiveServer, people: Any) -> None:
    target = "/api/v1/environments/00000000-0000-4000-8000-000000000000/files/?path=/workspace/big"
    for credentials in ("Authorization: Token lsl_bogus_key", "Cookie: sessionid=forged", ""):
        head = f"PUT {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {GIB}\r\nExpect: 100-continue"
        sock = raw_request(server, head + (f"\r\n{credentials}" if credentials else ""))
        status, headers, body = read_response(sock)  # no body byte sent: the answer must not wait for it
        sock.close()
        assert status == 401, (credentials, body)
        assert json.loads(body)["error"]["code"] == "not_authenticated"


def test_a_body_under_the_limit_is_still_served(server: LiveServer, people: Any) -> None:
    """3 MB is above Django's default 2.5 MB, below LSL_MAX_REQUEST_BYTES: the view answers (400 here), not a size error."""
    token = make_token(people.owner)
    response = requests.post(f"{server.url}/api/v1/environments/", data=json.dumps({"name": "x" * (3 * 1000 * 1000)}),
                             headers={"Authorization": f"Token {token}", "Content-Type": "application/json"}, timeout=30)
    assert response.status_code == 400, response.text
    assert response.headers["Content-Type"] == "application/json"
    assert "name" in response.json()["error"]["fields"]


def test_daphne_errors_under_api_are_json(server: LiveServer) -> None:
    sock = raw_request(server, "GET /api/v1/environments/ HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Probe: a\x0bb")
    status, headers, body = read_response(sock)
    sock.close()
    assert status == 400
    assert headers["content-type"] == "application/json"
    assert json.loads(body)["error"]["code"] == "bad_request"


def pattern(offset: int, size: int) -> bytes:
    """Deterministic bytes that differ per MiB, so a dropped or repeated chunk changes the digest."""
    out = bytearray()
    while len(out) < size:
        block = offset // MIB
        out += hashlib.sha256(str(block).encode()).digest() * (MIB // 32)
        offset += MIB
    return bytes(out[:size])


def test_authenticated_gigabyte_upload_streams_in_bounded_memory(server: LiveServer, people: Any, make_env: Any) -> None:
    env = make_env(people.owner)
    token = make_token(people.owner)
    url = f"{server.url}/api/v1/environments/{env.id}/files/"
    auth = {"Authorization": f"Token {token}"}
    digest = hashlib.sha256()

    class Body:
        """A 1 GiB file-like body generated as it is read (`__len__`: requests sends Content-Length, not chunked)."""

        def __init__(self) -> None:
            self.offset, self.pending = 0, b""

        def __len__(self) -> int:
            return GIB - self.offset + len(self.pending)

        def read(self, size: int = -1) -> bytes:
            if not self.pending and self.offset < GIB:
                self.pending = pattern(self.offset, 8 * MIB)
                digest.update(self.pending)
                self.offset += len(self.pending)
            size = len(self.pending) if size < 0 else size
            out, self.pending = self.pending[:size], self.pending[size:]
            return out

    peak = PeakRss(server.proc.pid)
    response = requests.put(url, params={"path": "/workspace/big.bin"}, data=Body(),
                            headers={**auth, "Content-Type": "application/octet-stream"}, timeout=900)
    growth = peak.growth()
    print(f"1 GiB upload: RSS {peak.before / MIB:.0f} MiB, peak growth {growth / MIB:.1f} MiB")
    assert response.status_code == 201, response.content[:2000]
    assert response.json()["bytes"] == GIB
    assert growth <= RSS_BUDGET, f"RSS grew by {growth / MIB:.1f} MiB during a 1 GiB upload"

    peak = PeakRss(server.proc.pid)
    downloaded = hashlib.sha256()
    size = 0
    with requests.get(url, params={"path": "/workspace/big.bin"}, headers=auth, stream=True, timeout=900) as download:
        assert download.status_code == 200
        for chunk in download.iter_content(MIB):
            downloaded.update(chunk)
            size += len(chunk)
    growth = peak.growth()
    print(f"1 GiB download: RSS {peak.before / MIB:.0f} MiB, peak growth {growth / MIB:.1f} MiB")
    assert size == GIB
    assert downloaded.hexdigest() == digest.hexdigest(), "the download is not byte-exact"
    assert growth <= RSS_BUDGET, f"RSS grew by {growth / MIB:.1f} MiB during a 1 GiB download"
