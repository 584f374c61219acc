"""The browser preview (environments/preview.py) against a real engine and a real daphne.

A stdlib-only HTTP/1.1 + websocket echo server (APP_SERVER below; the Debian test image has only
python3-minimal, without http.server) runs inside a Debian environment on 127.0.0.1:8000; the
live daphne proxies to it through the environment's keeper. Owner, teammate (member through a
team), viewer, outsider and anonymous are each checked, in path mode and in subdomain mode (a
second daphne on the same database with LSL_PREVIEW_DOMAIN=preview.localtest, reached with the
Host header), plus public links, SSRF attempts and a large streamed download.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from typing import Any, Iterator
from urllib.parse import quote, urlsplit

import psutil
import pytest
import requests
from django.conf import settings
from django.test import Client

from environments import ports
from environments.models import NetworkMode, PortAuditEvent, PortAuditKind, PortTraffic, Role
from environments.preview_urls import port_host
from environments.services import grant_access
from tests.conftest import docker_cli, start_daphne, stop_daphne

pytestmark = [pytest.mark.django_db(transaction=True, serialized_rollback=True), pytest.mark.usefixtures("engine", "catalog")]

from tests.browser import cleanup_containers  # noqa: E402,F401  (fixture)

APP_PORT = 8000
DOMAIN = "preview.localtest"

APP_SERVER = r'''# A tiny stdlib-only HTTP/1.1 + websocket echo server for the preview tests (python3-minimal has no http.server).
import base64, hashlib, socket, struct, sys, threading

PAGE = b"""<!doctype html><html><head><meta charset=utf-8><title>preview app</title></head><body>
<h1 id=title>Hello from port PORT</h1><p id=out>waiting</p><p id=storage></p>
<script src="app.js"></script>
<script>
const url = new URL("ws?x=1", location.href); url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
const ws = new WebSocket(url.href, ["echo.v1"]);
ws.onopen = () => ws.send("ping from the page");
ws.onmessage = (e) => { document.getElementById("out").textContent = e.data + " via " + ws.protocol; };
ws.onerror = () => { document.getElementById("out").textContent = "websocket error"; };
try { localStorage.setItem("k", "v"); document.getElementById("storage").textContent = "storage ok"; }
catch (e) { document.getElementById("storage").textContent = "storage blocked"; }
</script></body></html>"""


def read_request(conn, buf):
    while b"\r\n\r\n" not in buf:
        data = conn.recv(65536)
        if not data:
            return None, None, None, b""
        buf += data
    head, _, buf = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name.strip().lower(), value.strip()))
    return method, target, headers, buf


def get(headers, name):
    return next((v for k, v in headers if k == name), None)


def read_body(conn, headers, buf):
    length = get(headers, "content-length")
    if length is not None:
        n = int(length)
        while len(buf) < n:
            data = conn.recv(65536)
            if not data:
                break
            buf += data
        return buf[:n]
    if (get(headers, "transfer-encoding") or "").lower() == "chunked":
        body = b""
        while True:
            while b"\r\n" not in buf:
                buf += conn.recv(65536)
            size_line, _, buf = buf.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            while len(buf) < size + 2:
                buf += conn.recv(65536)
            body += buf[:size]
            buf = buf[size + 2:]
            if size == 0:
                return body
    return b""


def respond(conn, status, headers, body):
    head = f"HTTP/1.1 {status}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
    head += f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    conn.sendall(head.encode("latin-1") + body)


def ws_frames(conn):
    buf = b""
    def need(n):
        nonlocal buf
        while len(buf) < n:
            data = conn.recv(65536)
            if not data:
                raise EOFError
            buf += data
        out, buf = buf[:n], buf[n:]
        return out
    while True:
        b1, b2 = need(2)
        opcode, length = b1 & 0x0F, b2 & 0x7F
        if length == 126:
            length = struct.unpack("!H", need(2))[0]
        elif length == 127:
            length = struct.unpack("!Q", need(8))[0]
        mask = need(4) if b2 & 0x80 else b"\0\0\0\0"
        payload = bytes(c ^ mask[i % 4] for i, c in enumerate(need(length)))
        yield opcode, payload


def ws_send(conn, opcode, payload):
    n = len(payload)
    head = bytes([0x80 | opcode]) + (bytes([n]) if n < 126 else bytes([126]) + struct.pack("!H", n) if n < 65536
                                     else bytes([127]) + struct.pack("!Q", n))
    conn.sendall(head + payload)


def websocket(conn, target, headers):
    key = get(headers, "sec-websocket-key")
    accept = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
    protocols = [p.strip() for p in (get(headers, "sec-websocket-protocol") or "").split(",") if p.strip()]
    extra = "Sec-WebSocket-Protocol: echo.v1\r\n" if "echo.v1" in protocols else ""
    conn.sendall(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Accept: {accept}\r\n{extra}\r\n").encode())
    if target.startswith("/close4001"):
        ws_send(conn, 8, struct.pack("!H", 4001) + b"bye")
        return
    for opcode, payload in ws_frames(conn):
        if opcode == 8:
            ws_send(conn, 8, payload[:2] or struct.pack("!H", 1000))
            return
        if opcode == 9:
            ws_send(conn, 10, payload)
        elif opcode == 1:
            ws_send(conn, 1, b"echo: " + payload)
        elif opcode == 2:
            ws_send(conn, 2, payload)


def handle(conn, port):
    try:
        method, target, headers, buf = read_request(conn, b"")
        if method is None:
            return
        path = target.split("?", 1)[0]
        if (get(headers, "upgrade") or "").lower() == "websocket":
            return websocket(conn, target, headers)
        body = read_body(conn, headers, buf)
        if path == "/" or path == "/index.html":
            respond(conn, "200 OK", [("Content-Type", "text/html; charset=utf-8")], PAGE.replace(b"PORT", str(port).encode()))
        elif path == "/app.js":
            respond(conn, "200 OK", [("Content-Type", "text/javascript")],
                    b"document.getElementById('title').dataset.js = 'loaded';")
        elif path.startswith("/headers"):
            text = f"{method} {target}\n" + "".join(f"{k}: {v}\n" for k, v in headers)
            respond(conn, "200 OK", [("Content-Type", "text/plain")], text.encode("latin-1"))
        elif path == "/redirect":
            respond(conn, "302 Found", [("Location", "/target?a=1"), ("Set-Cookie", "app=1; Path=/; HttpOnly"),
                                        ("Set-Cookie", "sessionid=evil; Path=/"),
                                        ("Set-Cookie", "wide=1; Domain=localtest; Path=/sub"),
                                        ("Clear-Site-Data", '"cookies"')], b"")
        elif path == "/echo-body":
            respond(conn, "200 OK", [("Content-Type", "text/plain")],
                    f"{len(body)} {hashlib.sha256(body).hexdigest()}".encode())
        elif path == "/big":
            n = int(target.split("n=", 1)[1])
            conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {n}\r\n"
                         f"Connection: close\r\n\r\n".encode())
            chunk = b"\0" * 65536
            while n > 0:
                conn.sendall(chunk[:min(n, 65536)])
                n -= 65536
        else:
            respond(conn, "404 Not Found", [("Content-Type", "text/plain")], f"app 404 {path}".encode())
    except (OSError, EOFError, ValueError):
        pass
    finally:
        conn.close()


def main():
    port = int(sys.argv[1])
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", port))
    server.listen(64)
    while True:
        conn, _ = server.accept()
        threading.Thread(target=handle, args=(conn, port), daemon=True).start()


main()
'''


def start_app(env: Any, port: int = APP_PORT) -> None:
    """Copy the echo server into the environment and start it on 127.0.0.1:<port>; wait until it listens."""
    import subprocess

    subprocess.run(["docker", "exec", "-i", env.container_id, "sh", "-c", "cat > /tmp/app.py"], input=APP_SERVER.encode(),
                   check=True, timeout=30)
    subprocess.run(["docker", "exec", "-d", env.container_id, "python3", "/tmp/app.py", str(port)], check=True, timeout=30)
    deadline = time.monotonic() + 20
    while True:
        probe = docker_cli("exec", env.container_id, "sh", "-c", f"grep -qi ':{port:04X} 00000000:0000 0A' /proc/net/tcp && echo up")
        if "up" in probe.stdout:
            return
        assert time.monotonic() < deadline, f"the app did not start: {probe.stdout} {probe.stderr}"
        time.sleep(0.1)


def session_cookie(user: Any) -> dict[str, str]:
    client = Client()
    client.force_login(user)
    return {settings.SESSION_COOKIE_NAME: client.cookies[settings.SESSION_COOKIE_NAME].value}


def browser_session(user: Any) -> requests.Session:
    s = requests.Session()
    s.cookies.update(session_cookie(user))
    s.cookies.set(settings.CSRF_COOKIE_NAME, "csrf-secret-value")
    return s


HTML = {"Accept": "text/html,application/xhtml+xml"}


@pytest.fixture()
def app_env(people: Any, make_env: Any) -> Any:
    env = make_env(people.owner, template="debian")
    assert env.status == "running", env.last_error
    start_app(env)
    grant_access(env, role=Role.VIEWER, user=people.viewer)
    return env


def url(server: Any, env: Any, path: str = "/", port: int = APP_PORT) -> str:
    return f"{server.url}/preview/{env.id}/{port}{path}"


# --- path mode -------------------------------------------------------------------------------------

def test_path_mode_roles_headers_and_cookies(people: Any, app_env: Any, live_server_proc: Any) -> None:
    server, env = live_server_proc, app_env
    alice = browser_session(people.owner)
    alice.cookies.set("theirs", "kept")

    # The owner, alone in the environment: the page as it is, on LSL's origin (no sandbox).
    page = alice.get(url(server, env), headers=HTML, timeout=30)
    assert page.status_code == 200, page.text
    assert "Hello from port 8000" in page.text
    assert "sandbox" not in page.headers.get("Content-Security-Policy", "")

    # What the app sees: Host rewritten, X-Forwarded-*, the path after the prefix, and never LSL's
    # session, CSRF cookie or API token.
    seen = alice.get(url(server, env, "/headers/a%2Fb?q=1"), timeout=30).text
    assert seen.startswith("GET /headers/a%2Fb?q=1\n"), seen
    assert "host: localhost:8000" in seen
    assert f"x-forwarded-prefix: /preview/{env.id}/{APP_PORT}" in seen
    assert "x-forwarded-proto: http" in seen
    assert "cookie: theirs=kept" in seen
    assert settings.SESSION_COOKIE_NAME not in seen and "csrf-secret-value" not in seen
    token = ports_token(people.owner)
    by_token = requests.get(url(server, env, "/headers"), headers={"Authorization": f"Token {token}"}, timeout=30)
    assert by_token.status_code == 200 and token not in by_token.text and "authorization" not in by_token.text.lower()
    assert "sandbox" in by_token.headers["Content-Security-Policy"]

    # Redirects and cookies stay inside the prefix; the app cannot set LSL's cookie or wipe LSL's data.
    moved = alice.get(url(server, env, "/redirect"), allow_redirects=False, timeout=30)
    assert moved.status_code == 302
    assert moved.headers["Location"] == f"/preview/{env.id}/{APP_PORT}/target?a=1"
    cookies = moved.raw.headers.getlist("Set-Cookie")
    assert any(c.startswith("app=1") and f"Path=/preview/{env.id}/{APP_PORT}/" in c for c in cookies), cookies
    assert not any(c.startswith(settings.SESSION_COOKIE_NAME + "=") for c in cookies), cookies
    assert not any("domain=" in c.lower() for c in cookies), cookies
    assert "Clear-Site-Data" not in moved.headers

    # No trailing slash: redirected to it (relative links need it).
    bare = alice.get(f"{server.url}/preview/{env.id}/{APP_PORT}?x=1", allow_redirects=False, timeout=30)
    assert bare.status_code == 302 and bare.headers["Location"] == f"/preview/{env.id}/{APP_PORT}/?x=1"

    # A body goes through whole (and LSL's body limit applies).
    body = os.urandom(300_000)
    echoed = alice.post(url(server, env, "/echo-body"), data=body, timeout=30)
    assert echoed.text == f"{len(body)} {hashlib.sha256(body).hexdigest()}"
    too_big = alice.post(url(server, env, "/echo-body"), data=b"x" * (settings.LSL_MAX_REQUEST_BYTES + 1), timeout=30)
    assert too_big.status_code == 413

    # The app's own 404 is the app's.
    assert alice.get(url(server, env, "/nope"), timeout=30).text == "app 404 /nope"

    # Viewer 403, outsider 404 (as for any other thing they may not see), anonymous to the login page.
    for user, status in ((people.viewer, 403), (people.outsider, 404)):
        refused = browser_session(user).get(url(server, env), headers=HTML, timeout=30)
        assert refused.status_code == status, refused.text
        assert "<h1>" in refused.text  # a page for a browser
        as_json = browser_session(user).get(url(server, env), timeout=30)
        assert as_json.status_code == status and as_json.json()["error"]["code"]
    anon = requests.get(url(server, env, "/x?y=1"), headers=HTML, allow_redirects=False, timeout=30)
    assert anon.status_code == 302 and anon.headers["Location"].startswith("/login/?next=/preview/")
    assert requests.get(url(server, env), timeout=30).status_code == 401

    # Audited once per user/environment/port (not per request); traffic counted.
    opened = PortAuditEvent.objects.filter(environment=env, kind=PortAuditKind.PREVIEW_OPENED, user=people.owner)
    assert opened.count() == 1
    traffic = PortTraffic.objects.get(environment=env, port=APP_PORT, via="preview")
    assert traffic.connections >= 6 and traffic.bytes_from_environment > 1000 and traffic.bytes_to_environment >= len(body)


def ports_token(user: Any) -> str:
    from tests.conftest import make_token
    return make_token(user, f"preview-{time.monotonic_ns()}")


def test_shared_environment_gets_a_sandboxed_personal_address(people: Any, app_env: Any, live_server_proc: Any) -> None:
    """A teammate (member through the team) opens the owner's preview: it is not their own code, so
    it is served sandboxed (an opaque origin) at a personal signed address, role re-checked each time."""
    server, env = live_server_proc, app_env
    grant_access(env, role=Role.MEMBER, team=people.team)
    bob = browser_session(people.teammate)
    first = bob.get(url(server, env, "/?a=b"), headers=HTML, allow_redirects=False, timeout=30)
    assert first.status_code == 302, first.text
    location = first.headers["Location"]
    assert location.startswith("/preview/t/") and location.endswith("/?a=b")
    page = requests.get(server.url + location, headers=HTML, timeout=30)  # no cookie needed: the address is the key
    assert page.status_code == 200 and "Hello from port 8000" in page.text
    assert page.headers["Content-Security-Policy"].startswith("sandbox allow-scripts")
    assert "allow-same-origin" not in page.headers["Content-Security-Policy"]
    assert page.headers["Referrer-Policy"] == "no-referrer"
    # The owner, now sharing the environment, is sandboxed too (a teammate could have put the page there).
    alice = browser_session(people.owner)
    assert alice.get(url(server, env), headers=HTML, allow_redirects=False, timeout=30).headers["Location"].startswith("/preview/t/")
    # A forged or tampered address is nothing.
    assert requests.get(server.url + location.replace("/preview/t/", "/preview/t/x"), timeout=30).status_code == 404
    # Access taken away: the address stops working at the next request.
    from guardian.shortcuts import remove_perm
    for codename in ("view_environment", "use_environment", "admin_environment"):
        remove_perm(codename, people.team.group, env)
    gone = requests.get(server.url + location, timeout=30)
    assert gone.status_code == 404, gone.text


def test_websocket_echo_path_mode(people: Any, app_env: Any, live_server_proc: Any) -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    server, env = live_server_proc, app_env
    cookie = "; ".join(f"{k}={v}" for k, v in session_cookie(people.owner).items())
    viewer_cookie = "; ".join(f"{k}={v}" for k, v in session_cookie(people.viewer).items())
    ws_url = f"{server.ws_url}/preview/{env.id}/{APP_PORT}/ws?x=1"

    async def scenario() -> None:
        async with connect(ws_url, additional_headers={"Cookie": cookie}, origin=server.url,
                           subprotocols=["echo.v1"]) as ws:
            assert ws.subprotocol == "echo.v1"
            await ws.send("hello")
            assert await ws.recv() == "echo: hello"
            blob = os.urandom(200_000)
            await ws.send(blob)
            assert await ws.recv() == blob
        # The app's close code reaches the browser.
        async with connect(f"{server.ws_url}/preview/{env.id}/{APP_PORT}/close4001", additional_headers={"Cookie": cookie},
                           origin=server.url) as ws:
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
            assert closed.value.rcvd.code == 4001
        # Another site's page may not ride the cookie; a viewer is refused; so is nobody.
        for headers, origin, code in (({"Cookie": cookie}, "http://evil.example", 4403),
                                      ({"Cookie": viewer_cookie}, server.url, 4403),
                                      ({}, server.url, 4401)):
            async with connect(ws_url, additional_headers=headers, origin=origin) as ws:
                error = json.loads(await ws.recv())["error"]
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.recv()
                assert closed.value.rcvd.code == code, (error, closed.value.rcvd)
        # Nothing listening on the port: told so, at once.
        async with connect(f"{server.ws_url}/preview/{env.id}/8999/ws", additional_headers={"Cookie": cookie},
                           origin=server.url) as ws:
            assert "nothing is listening on port 8999" in json.loads(await ws.recv())["error"]["detail"].lower()

    try:
        asyncio.run(asyncio.wait_for(scenario(), 60))
    except BaseException:
        print(server.log_tail(6000))
        raise
    assert PortTraffic.objects.get(environment=env, port=APP_PORT, via="preview").bytes_to_environment >= 200_000


def test_ssrf_attempts_reach_nothing_but_the_environment(people: Any, app_env: Any, make_env: Any,
                                                        live_server_proc: Any) -> None:
    server, env = live_server_proc, app_env
    alice = browser_session(people.owner)
    prefix = f"/preview/{env.id}/{APP_PORT}"

    def raw(target: str, host: str = "127.0.0.1") -> tuple[int, bytes]:
        import socket
        with socket.create_connection(("127.0.0.1", urlsplit(server.url).port), timeout=30) as sock:
            cookie = "; ".join(f"{k}={v}" for k, v in alice.cookies.items())
            sock.sendall(f"GET {target} HTTP/1.1\r\nHost: {host}\r\nCookie: {cookie}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        return int(data.split(b" ", 2)[1]), data

    # Dot segments and encoded slashes stay inside the app: it sees them, nothing else does.
    status, data = raw(f"{prefix}/../../api/v1/config/")
    assert status == 404 and b"app 404 /../../api/v1/config/" in data, data[:500]
    status, data = raw(f"{prefix}/..%2F..%2Fapi%2Fv1%2F")
    assert b"app 404" in data, data[:500]
    # @host, absolute-form targets and a Host naming the engine's socket: still only the app.
    status, data = raw(f"{prefix}/@169.254.169.254/latest")
    assert b"app 404 /@169.254.169.254/latest" in data
    status, data = raw(f"http://docker.sock{prefix}/headers", host="unix:/var/run/docker.sock")
    assert status in (400, 404), data[:300]
    seen = alice.get(url(server, env, "/headers"), headers={"Host": "unix%3A%2Fvar%2Frun%2Fdocker.sock"}, timeout=30)
    assert seen.status_code in (400, 404) or "host: localhost:8000" in seen.text
    # Ports out of range, and the engine's own port inside the environment (nothing there).
    for port, status_wanted in ((0, 400), (65536, 400), (99999999, 400)):
        assert alice.get(f"{server.url}/preview/{env.id}/{port}/", timeout=30).status_code == status_wanted
    closed = alice.get(f"{server.url}/preview/{env.id}/2375/", headers=HTML, timeout=30)
    assert closed.status_code == 502 and "Nothing is listening on port 2375" in closed.text
    t0 = time.monotonic()
    assert alice.get(f"{server.url}/preview/{env.id}/2376/", timeout=30).json()["error"]["code"] == "port_closed"
    assert time.monotonic() - t0 < 5
    # Someone else's environment (one alice cannot see): 404, as if it did not exist; a made-up id too.
    other = make_env(people.outsider, template="debian")
    start_app(other)
    assert alice.get(url(server, other), timeout=30).status_code == 404
    assert alice.get(f"{server.url}/preview/00000000-0000-0000-0000-000000000000/{APP_PORT}/", timeout=30).status_code == 404
    assert alice.get(f"{server.url}/preview/not-a-uuid/{APP_PORT}/", timeout=30).status_code == 404
    # A host-network environment: its 127.0.0.1 is the host's, so it is refused (409) even to a
    # superuser (others are only viewers there: 403).
    from django.contrib.auth import get_user_model
    from environments.models import Environment
    root = get_user_model().objects.create_superuser("root", "root@example.com", "password-root")
    Environment.objects.filter(pk=other.pk).update(network_mode=NetworkMode.HOST)
    refused = browser_session(root).get(url(server, other), timeout=30)
    assert refused.status_code == 409 and "host network" in refused.json()["error"]["detail"]


def test_public_link_works_without_login_until_revoked(people: Any, app_env: Any, live_server_proc: Any) -> None:
    server, env = live_server_proc, app_env
    link, token = ports.do_create_preview_link(env, APP_PORT, by=people.owner, ttl_seconds=600)
    address = f"{server.url}/preview/link/{token}/"
    page = requests.get(address, headers=HTML, timeout=30)
    assert page.status_code == 200 and "Hello from port 8000" in page.text
    assert page.headers["Content-Security-Policy"].startswith("sandbox")  # on LSL's origin: sandboxed
    seen = requests.get(address + "headers", timeout=30).text
    assert f"x-forwarded-prefix: /preview/link/{token}" in seen

    async def echo() -> str:
        from websockets.asyncio.client import connect
        async with connect(f"{server.ws_url}/preview/link/{token}/ws", origin="null") as ws:
            await ws.send("hi")
            return str(await ws.recv())
    assert asyncio.run(echo()) == "echo: hi"
    assert PortTraffic.objects.get(environment=env, port=APP_PORT, via="public").connections >= 3

    ports.do_revoke_preview_link(link, by=people.owner)
    gone = requests.get(address, headers=HTML, timeout=30)
    assert gone.status_code == 404 and "unknown, expired or revoked" in gone.text
    assert requests.get(f"{server.url}/preview/link/{'a' * 32}/", timeout=30).status_code == 404


def test_large_download_streams_with_bounded_memory(people: Any, app_env: Any, live_server_proc: Any) -> None:
    server, env = live_server_proc, app_env
    alice = browser_session(people.owner)
    size = 256 * 1024 * 1024
    process = psutil.Process(server.proc.pid)
    alice.get(url(server, env, "/big?n=1000"), timeout=30)  # warm up
    before = process.memory_info().rss
    peak = before
    received = 0
    with alice.get(url(server, env, f"/big?n={size}"), stream=True, timeout=60) as response:
        assert response.status_code == 200 and int(response.headers["Content-Length"]) == size
        for i, chunk in enumerate(response.iter_content(1024 * 1024)):
            received += len(chunk)
            if i == 1:
                # A reader that stalls: the app could send all 256 MiB in this time; the proxy must
                # stop reading it while daphne holds more than a little unsent, not buffer it all.
                time.sleep(3)
            if i % 16 == 1:
                peak = max(peak, process.memory_info().rss)
    assert received == size
    growth = peak - before
    print(f"daphne RSS growth while streaming 256 MiB: {growth / 2**20:.1f} MiB")
    assert growth < 64 * 1024 * 1024, f"daphne grew by {growth / 2**20:.0f} MiB while streaming 256 MiB"


# --- subdomain mode --------------------------------------------------------------------------------------

@pytest.fixture()
def domain_server(transactional_db: Any) -> Iterator[Any]:
    server = start_daphne({"LSL_PREVIEW_DOMAIN": DOMAIN}, name="daphne-preview-domain")
    yield server
    stop_daphne(server)


def test_subdomain_mode_handoff_cookie_and_roles(people: Any, app_env: Any, domain_server: Any) -> None:
    server, env = domain_server, app_env
    port = urlsplit(server.url).port
    host = f"{port_host(env.id, APP_PORT, DOMAIN)}:{port}"
    base = f"http://127.0.0.1:{port}"

    def at(session: requests.Session, path: str, **kw: Any) -> requests.Response:
        return session.get(base + path, headers={"Host": host, **kw.pop("headers", HTML)}, allow_redirects=False,
                           timeout=30, **kw)

    alice = browser_session(people.owner)
    # Path mode on LSL's host sends a browser to the preview's own origin.
    moved = alice.get(f"{base}/preview/{env.id}/{APP_PORT}/x?y=1", headers=HTML, allow_redirects=False, timeout=30)
    assert moved.headers["Location"] == f"http://{host}/x?y=1"

    # The preview host never gets LSL's session cookie (it is host-only on LSL's host): the hand-off.
    preview = requests.Session()
    first = at(preview, "/page?q=1")
    assert first.status_code == 302
    handoff = first.headers["Location"]
    assert handoff.startswith(f"http://127.0.0.1:{port}/preview/auth/?next=")
    back = alice.get(handoff, allow_redirects=False, timeout=30)  # the main site, with alice's session
    assert back.status_code == 302, back.text
    ticket_url = urlsplit(back.headers["Location"])
    assert ticket_url.netloc == host and ticket_url.path == "/__lsl_preview_auth"
    landed = at(preview, f"{ticket_url.path}?{ticket_url.query}")
    assert landed.status_code == 302 and landed.headers["Location"] == "/page?q=1"
    set_cookie = landed.headers["Set-Cookie"]
    assert set_cookie.startswith("__lsl_preview=") and "HttpOnly" in set_cookie and "SameSite=Lax" in set_cookie
    assert "Domain" not in set_cookie
    preview_cookie = set_cookie.split(";")[0].split("=", 1)[1]  # requests keeps it (for 127.0.0.1)
    # A ticket works once.
    assert at(requests.Session(), f"{ticket_url.path}?{ticket_url.query}").status_code == 403

    page = at(preview, "/")
    assert page.status_code == 200 and "Hello from port 8000" in page.text
    assert "sandbox" not in page.headers.get("Content-Security-Policy", "")  # its own origin
    seen = at(preview, "/headers", headers={}).text
    assert "host: localhost:8000" in seen and "__lsl_preview" not in seen and "x-forwarded-prefix" not in seen
    moved = at(preview, "/redirect")
    assert moved.headers["Location"] == "/target?a=1"
    assert not any("domain=" in c.lower() for c in moved.raw.headers.getlist("Set-Cookie"))

    # The cookie is bound to its host: another port of the same environment wants its own hand-off.
    other_host = f"{port_host(env.id, 8001, DOMAIN)}:{port}"
    assert preview.get(base + "/", headers={"Host": other_host, **HTML}, allow_redirects=False, timeout=30).status_code == 302

    # Websocket on the preview host, with its cookie and its own origin.
    async def echo() -> str:
        from websockets.asyncio.client import connect
        async with connect(f"ws://{host}/ws", host="127.0.0.1", port=port,
                           additional_headers={"Cookie": f"__lsl_preview={preview_cookie}"}, origin=f"http://{host}") as ws:
            await ws.send("sub")
            return str(await ws.recv())
    assert asyncio.run(echo()) == "echo: sub"

    # A viewer gets no ticket (403 on the main site); an outsider 404; nobody is sent to log in.
    for user, status in ((people.viewer, 403), (people.outsider, 404)):
        assert browser_session(user).get(handoff, headers=HTML, allow_redirects=False, timeout=30).status_code == status
    anon = requests.get(handoff, headers=HTML, allow_redirects=False, timeout=30)
    assert anon.status_code == 302 and anon.headers["Location"].startswith("/login/?next=")
    # `next` must be a preview of this server: no open redirect.
    assert alice.get(f"{base}/preview/auth/?next={quote('https://evil.example/', safe='')}", timeout=30).status_code == 400

    # Access withdrawn: the cookie stops working at the next request. Unknown hosts under the domain: 404.
    env.owner = people.outsider
    env.save(update_fields=["owner"])
    assert at(preview, "/").status_code == 404
    assert requests.get(base + "/", headers={"Host": f"p0-{env.id.hex}.{DOMAIN}"}, timeout=30).status_code == 404
    assert requests.get(base + "/", headers={"Host": f"evil.{DOMAIN}"}, timeout=30).status_code == 404

    # Public links get their own host too.
    link, token = ports.do_create_preview_link(env, APP_PORT, by=people.owner, ttl_seconds=600)
    public = requests.get(base + "/", headers={"Host": f"l-{token}.{DOMAIN}:{port}", **HTML}, timeout=30)
    assert public.status_code == 200 and "Hello from port 8000" in public.text
    ports.do_revoke_preview_link(link, by=people.owner)
    assert requests.get(base + "/", headers={"Host": f"l-{token}.{DOMAIN}:{port}"}, timeout=30).status_code == 404
