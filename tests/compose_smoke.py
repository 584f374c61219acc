"""The compose stack's smoke test, spoken to through its proxy only, as a browser and a CLI would.

Run by scripts/compose_smoke.sh once the stack is up (not a pytest module: it needs the whole stack):

    python tests/compose_smoke.py --url http://127.0.0.1:PORT --admin NAME:PASSWORD --user NAME:PASSWORD

1. the admin signs in like a browser (the sign-in form with its CSRF token, a session cookie);
   the second user gets an API token (POST /api/v1/auth/token/), as `lsl init` does;
2. the admin creates an environment from the test catalog (template busybox) and waits for it to run;
3. opens a terminal session and attaches over the websocket (cookie + Origin), runs a command, sees
   its output;
4. shares the environment with the second user (member), who finds the live session and joins it
   over the websocket with the token: sees the first user's output on join, types a command of its
   own, and both see that output;
5. with --restart-cmd (scripts/compose_smoke.sh passes deploy/rolling-restart.sh): re-creates web1 then
   web2 while API requests keep coming through the proxy; the shell lives on (same PID, its output
   still on screen) and is reached again through the new processes;
6. ends the session and deletes the environment with its workspace (purge).

With the proxy's LSL_PROXY_UPSTREAM_HEADER=1 the second user's websocket is made to land on the other
web process than the first user's (X-LSL-Upstream), so joining is tested across processes.

Every wait is bounded; any failure raises, and the exit status is non-zero. Prints one line per
phase with its duration.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import threading
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from wsclient import TermClient  # noqa: E402

HTTP_TIMEOUT = 30


class SmokeFailure(AssertionError):
    pass


def check(condition: bool, message: str) -> None:
    if not condition:
        raise SmokeFailure(message)


def wait_for(what: str, probe: Callable[[], Any], timeout: float, interval: float = 0.5) -> Any:
    """Call probe until it returns something truthy; bounded by timeout."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    raise SmokeFailure(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


class Phases:
    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.rows: list[tuple[str, float]] = []

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        start = time.monotonic()
        print(f"[smoke] {name} ...", flush=True)
        result = fn()
        took = time.monotonic() - start
        self.rows.append((name, took))
        print(f"[smoke] {name}: ok in {took:.2f} s", flush=True)
        return result

    def summary(self) -> None:
        print("[smoke] phases:")
        for name, took in self.rows:
            print(f"[smoke]   {name:<48} {took:7.2f} s")
        print(f"[smoke]   {'total':<48} {time.monotonic() - self.t0:7.2f} s", flush=True)


class Browser:
    """A requests session that behaves like a browser on LSL's pages: CSRF token, session cookie, Origin."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.http = requests.Session()

    def login(self, username: str, password: str) -> None:
        page = self.http.get(f"{self.url}/login/", timeout=HTTP_TIMEOUT)
        check(page.status_code == 200, f"GET /login/: {page.status_code}")
        check("csrftoken" in self.http.cookies, "GET /login/ set no csrftoken cookie")
        done = self.http.post(f"{self.url}/login/", allow_redirects=False, timeout=HTTP_TIMEOUT,
                              data={"username": username, "password": password,
                                    "csrfmiddlewaretoken": self.http.cookies["csrftoken"]},
                              headers={"Origin": self.url, "Referer": f"{self.url}/login/"})
        check(done.status_code == 302, f"POST /login/: {done.status_code} {done.text[:300]!r}")
        check("sessionid" in self.http.cookies, "signing in set no sessionid cookie")

    def api(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        headers = kwargs.pop("headers", {})
        if method not in ("GET", "HEAD"):
            # DRF's session authentication asks for the CSRF token on unsafe methods, as the pages send it.
            headers |= {"X-CSRFToken": self.http.cookies.get("csrftoken", ""), "Origin": self.url}
        return self.http.request(method, f"{self.url}{path}", headers=headers, timeout=HTTP_TIMEOUT, **kwargs)

    def cookie_header(self) -> str:
        return "; ".join(f"{name}={value}" for name, value in self.http.cookies.items())


class TokenClient:
    def __init__(self, url: str, key: str) -> None:
        self.url = url.rstrip("/")
        self.key = key

    def api(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        return requests.request(method, f"{self.url}{path}", headers={"Authorization": f"Token {self.key}"},
                                timeout=HTTP_TIMEOUT, **kwargs)


def expect(response: requests.Response, status: int, what: str) -> Any:
    check(response.status_code == status, f"{what}: HTTP {response.status_code} (expected {status}): {response.text[:500]!r}")
    return response.json() if response.content and "json" in response.headers.get("Content-Type", "") else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", required=True, help="the proxy, e.g. http://127.0.0.1:8000")
    parser.add_argument("--admin", required=True, help="NAME:PASSWORD of the user who creates and shares")
    parser.add_argument("--user", required=True, help="NAME:PASSWORD of the user who joins")
    parser.add_argument("--template", default="busybox")
    parser.add_argument("--running-timeout", type=float, default=120.0)
    parser.add_argument("--restart-cmd", default="", help="a command restarting every web process, one at a time")
    parser.add_argument("--restart-timeout", type=float, default=420.0)
    args = parser.parse_args()
    url = args.url.rstrip("/")
    admin_name, admin_password = args.admin.split(":", 1)
    user_name, user_password = args.user.split(":", 1)
    phases = Phases()
    admin = Browser(url)
    clients: list[TermClient] = []
    env_id: str | None = None
    ok = False
    try:
        def pages() -> None:
            docs = requests.get(f"{url}/docs/", timeout=HTTP_TIMEOUT)
            check(docs.status_code == 200 and "LSL" in docs.text, f"GET /docs/: {docs.status_code}")
            anonymous = requests.get(f"{url}/api/v1/me/", timeout=HTTP_TIMEOUT)
            check(anonymous.status_code in (401, 403), f"anonymous GET /api/v1/me/: {anonymous.status_code}")
        phases.run("the proxy serves pages (/docs/, an API 401)", pages)

        phases.run(f"{admin_name} signs in (form + CSRF, session cookie)", lambda: admin.login(admin_name, admin_password))
        me = expect(admin.api("GET", "/api/v1/me/"), 200, "GET /api/v1/me/ (session)")
        check(me.get("username") == admin_name, f"/me/ says {me!r}")

        def token() -> TokenClient:
            answer = expect(requests.post(f"{url}/api/v1/auth/token/", timeout=HTTP_TIMEOUT,
                                          json={"username": user_name, "password": user_password, "name": "compose-smoke"}),
                            201, "POST /api/v1/auth/token/")
            client = TokenClient(url, answer["key"])
            who = expect(client.api("GET", "/api/v1/me/"), 200, "GET /api/v1/me/ (token)")
            check(who.get("username") == user_name, f"/me/ with the token says {who!r}")
            return client
        bob = phases.run(f"{user_name} gets an API token", token)

        def create() -> str:
            env = expect(admin.api("POST", "/api/v1/environments/",
                                   json={"name": f"smoke-{uuid.uuid4().hex[:8]}", "template": args.template}),
                         202, "POST /api/v1/environments/")
            return str(env["id"])
        env_id = phases.run(f"create an environment ({args.template})", create)

        def running() -> dict[str, Any]:
            def probe() -> dict[str, Any] | None:
                env = expect(admin.api("GET", f"/api/v1/environments/{env_id}/"), 200, "GET environment")
                check(env["status"] not in ("error", "missing", "node_unavailable"),
                      f"the environment is {env['status']}: {env.get('last_error')!r}")
                return env if env["status"] == "running" else None
            return wait_for("the environment to run", probe, args.running_timeout)
        phases.run("wait until it runs", running)

        def open_and_type() -> tuple[dict[str, Any], TermClient]:
            session = expect(admin.api("POST", f"/api/v1/environments/{env_id}/sessions/", json={"cols": 100, "rows": 30}),
                             201, "POST sessions")
            ws = urlsplit(session["ws_url"])
            # The proxy passes Host on unchanged, so the server names itself as the client reached it.
            check(ws.scheme == "ws" and ws.netloc == urlsplit(url).netloc,
                  f"ws_url {session['ws_url']!r} does not point at the proxy {url}")
            term = TermClient(session["ws_url"], cookie=admin.cookie_header(), origin=url, client="web", cols=100, rows=30)
            clients.append(term)
            hello = term.wait_event("hello", timeout=20)
            check(hello["user"] == admin_name and hello["can_write"], f"hello: {hello!r}")
            term.send_input("echo smoke-$((6*7))-marker\n")
            term.wait_output(b"smoke-42-marker", timeout=20)
            return session, term
        session, admin_term = phases.run("open a shell over the websocket, run a command", open_and_type)

        def share() -> None:
            expect(admin.api("POST", f"/api/v1/environments/{env_id}/access/", json={"user": user_name, "role": "member"}),
                   201, "POST access (share)")
        phases.run(f"share the environment with {user_name} (member)", share)

        def upstream(term: TermClient) -> str | None:
            return term.ws.response.headers.get("X-LSL-Upstream")

        def join() -> TermClient:
            live = expect(bob.api("GET", f"/api/v1/environments/{env_id}/sessions/?live=true"), 200, "GET live sessions")
            items = live["results"] if isinstance(live, dict) else live
            check(any(item["id"] == session["id"] for item in items), f"{user_name} does not see the live session: {live!r}")
            # Across processes when the proxy says which one served (round robin: a few tries at most).
            first = upstream(admin_term)
            for _ in range(8):
                term = TermClient(session["ws_url"], token=bob.key, client="cli", cols=100, rows=30)
                clients.append(term)
                if first is None or upstream(term) != first:
                    break
                term.close()
                clients.remove(term)
            print(f"[smoke]   {admin_name} attached through {first or '?'}, {user_name} through {upstream(term) or '?'}")
            check(first is None or upstream(term) != first, f"every try of {user_name} landed on {first}, like {admin_name}")
            hello = term.wait_event("hello", timeout=20)
            check(hello["user"] == user_name and hello["role"] == "member", f"hello: {hello!r}")
            # What the first user's command printed is on the screen the joiner is sent.
            term.wait(lambda c: any("smoke-42-marker" in line for line in c.text()), 20, "the marker on the joiner's screen")
            admin_term.wait(lambda c: any(e["type"] == "presence" and {p["user"] for p in e["participants"]} >= {admin_name, user_name}
                                          for e in c.events), 20, "both users in the presence list")
            term.send_input("echo joined-$((40+2))-too\n")
            term.wait_output(b"joined-42-too", timeout=20)
            admin_term.wait_output(b"joined-42-too", timeout=20)
            return term
        bob_term = phases.run(f"{user_name} joins the session, both see each other's output", join)

        def shell_pid(term: TermClient) -> str:
            mark = uuid.uuid4().hex[:6]
            term.send_input(f"echo pid-{mark}-$$-end\n")
            pattern = re.compile(rf"pid-{mark}-(\d+)-end".encode())
            term.wait(lambda c: pattern.search(bytes(c.output)) is not None, 20, "the shell's pid")
            return pattern.search(bytes(term.output)).group(1).decode()  # type: ignore[union-attr]

        def rolling_restart() -> None:
            before = shell_pid(admin_term)
            statuses: dict[int | str, int] = {}
            stop = threading.Event()

            def poll() -> None:  # API requests through the proxy all along the restart
                while not stop.is_set():
                    try:
                        code: int | str = bob.api("GET", "/api/v1/me/").status_code
                    except requests.RequestException as exc:
                        code = exc.__class__.__name__
                    statuses[code] = statuses.get(code, 0) + 1
                    stop.wait(0.2)
            poller = threading.Thread(target=poll, daemon=True)
            poller.start()
            try:
                done = subprocess.run(shlex.split(args.restart_cmd), timeout=args.restart_timeout)
            finally:
                stop.set()
                poller.join(timeout=HTTP_TIMEOUT + 5)
            check(done.returncode == 0, f"{args.restart_cmd!r} exited {done.returncode}")
            codes = [f"{t.close_code}" for t in (admin_term, bob_term)]
            print(f"[smoke]   API requests during the restart: {statuses}; old websockets closed with {codes}")
            check(set(statuses) == {200}, f"requests failed during the rolling restart: {statuses}")
            for term in (admin_term, bob_term):
                term.closed.wait(30)
                check(term.closed.is_set(), "a websocket to a restarted web process is still open")
            # Both processes are new: reattach (as clients do on `server_restarting`) and find the same shell.
            again = TermClient(session["ws_url"], token=bob.key, client="cli", cols=100, rows=30)
            clients.append(again)
            again.wait_event("hello", timeout=20)
            again.wait(lambda c: any("joined-42-too" in line for line in c.text()), 20, "the earlier output after the restart")
            after = shell_pid(again)
            print(f"[smoke]   shell pid before {before}, after {after}")
            check(before == after, f"the shell changed across the rolling restart: pid {before} -> {after}")
        if args.restart_cmd:
            phases.run("rolling restart of web1, web2: the shell survives", rolling_restart)

        def cleanup() -> None:
            for term in clients:
                term.close()
            clients.clear()
            expect(admin.api("POST", f"/api/v1/sessions/{session['id']}/end/"), 200, "POST end session")
            response = admin.api("DELETE", f"/api/v1/environments/{env_id}/?purge=true")
            check(response.status_code in (202, 204), f"DELETE environment: {response.status_code} {response.text[:300]!r}")
            wait_for("the environment to be gone",
                     lambda: admin.api("GET", f"/api/v1/environments/{env_id}/").status_code == 404, 60)
        phases.run("end the session, delete the environment (purge)", cleanup)
        env_id = None
        ok = True
    except Exception as exc:
        print(f"[smoke] FAILED: {exc.__class__.__name__}: {exc}", flush=True)
    finally:
        for term in clients:
            try:
                term.close()
            except Exception:
                pass
        if env_id is not None:  # best effort: scripts/compose_smoke.sh reaps what is left by label anyway
            try:
                admin.api("DELETE", f"/api/v1/environments/{env_id}/?purge=true")
            except Exception:
                pass
        phases.summary()
    print(f"[smoke] {'PASSED' if ok else 'FAILED'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
