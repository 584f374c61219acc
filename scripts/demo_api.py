#!/usr/bin/env python3
"""Walk LSL's REST API the way a client does: the original project's demo (`server.demo_api`), on LSL.

    python scripts/demo_api.py --url http://127.0.0.1:8000 --token lsl_... --action all

The seed's demo called three endpoints; here they are LSL's:

    get_config  GET  /get_config  ->  config   GET  /api/v1/config/   who am I, templates, websocket base URL
    ping        POST /ping        ->  ping     POST /api/v1/ping/     record this client as seen (client id)
    monitor     GET  /monitor     ->  monitor  GET  /api/v1/monitor/  host and per-environment figures
                                               (+ GET /metrics when --metrics-token is given)

`--action all` runs the three in turn and stops at the first failure. Exit codes follow the `lsl` CLI:
0 success, 1 other failure, 2 usage, 3 token refused, 6 server unreachable, 7 server error; the reason is
one line on stderr. Only `requests` is needed (no Django, no LSL package), so it runs from anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

import requests

ACTIONS = ("config", "ping", "monitor")
EXIT_OTHER, EXIT_USAGE, EXIT_AUTH, EXIT_UNREACHABLE, EXIT_SERVER = 1, 2, 3, 6, 7
DEMO_VERSION = "demo_api/1"


class DemoError(Exception):
    """A failed call: its message is the one line printed, `code` the exit status."""

    def __init__(self, message: str, code: int = EXIT_OTHER) -> None:
        super().__init__(message)
        self.code = code


class Client:
    def __init__(self, url: str, token: str, timeout: float) -> None:
        self.url = url.rstrip("/")
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Token {token}"
        self.session.headers["User-Agent"] = DEMO_VERSION
        self.timeout = timeout

    def call(self, method: str, path: str, *, json_body: Any = None, headers: dict[str, str] | None = None,
             expect_json: bool = True) -> tuple[Any, float]:
        """One request; the decoded answer and the round trip in seconds, or DemoError saying why not."""
        where = f"{method} {path}"
        started = time.perf_counter()
        try:
            response = self.session.request(method, self.url + path, json=json_body, headers=headers,
                                            timeout=self.timeout, allow_redirects=False)
        except requests.ConnectionError as exc:
            raise DemoError(f"{where}: cannot reach the server at {self.url} ({_short(exc)})", EXIT_UNREACHABLE) from None
        except requests.Timeout:
            raise DemoError(f"{where}: no answer from {self.url} within {self.timeout:g} s", EXIT_UNREACHABLE) from None
        elapsed = time.perf_counter() - started
        if response.status_code >= 400:
            raise DemoError(f"{where}: HTTP {response.status_code}: {_reason(response)}", _exit_code(response.status_code))
        if 300 <= response.status_code < 400:
            # A redirect here means the URL is not an LSL server's root (a proxy's login page, http -> https…).
            raise DemoError(f"{where}: HTTP {response.status_code} redirect to {response.headers.get('Location')!r}; "
                            f"is --url the server's root?")
        if not expect_json:
            return response.text, elapsed
        try:
            return response.json(), elapsed
        except ValueError:
            raise DemoError(f"{where}: the answer is not JSON ({response.headers.get('Content-Type', '?')}); "
                            f"is {self.url} an LSL server?") from None


def _short(exc: Exception) -> str:
    """The innermost reason of a connection error ('Connection refused'), not urllib3's whole chain."""
    match = re.search(r"\[Errno -?\d+\] ([^'\")]+)", str(exc))
    return match.group(1).strip() if match else str(exc)[:200]


def _reason(response: requests.Response) -> str:
    """LSL's error shape {"error": {"code", "detail", "fields"}} as one line; plain text (/metrics) as is."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip().splitlines()[0][:300] if response.text.strip() else response.reason
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return json.dumps(body)[:300]
    text = f"{error.get('code', '?')}: {error.get('detail', '')}"
    fields = error.get("fields")
    if fields:
        text += " " + json.dumps(fields)
    return text


def _exit_code(status: int) -> int:
    if status in (401, 403):
        return EXIT_AUTH
    if status >= 500:
        return EXIT_SERVER
    return EXIT_OTHER


def _table(rows: list[list[str]]) -> list[str]:
    """Rows as lines with their columns aligned (the last column is not padded)."""
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))] if rows else []
    return ["  ".join(str(cell).ljust(width) for cell, width in zip(row[:-1], widths)) + "  " + str(row[-1])
            for row in rows]


def _mib(value: Any) -> str:
    return f"{(value or 0) / 1024**2:.1f} MiB"


def _gib(value: Any) -> str:
    return f"{(value or 0) / 1024**3:.1f}"


# --- the actions ------------------------------------------------------------------------------------
# Each returns the API's answer (for --json) after printing it for a person, unless quiet.

def action_config(client: Client, args: argparse.Namespace, out: Callable[[str], None]) -> Any:
    out("== config: GET /api/v1/config/")
    config, _ = client.call("GET", "/api/v1/config/")
    user = config.get("user") or {}
    templates = config.get("templates") or []
    out(f"user       {user.get('username', '?')} (staff: {'yes' if user.get('is_staff') else 'no'})")
    out(f"server     {config.get('server_version', '?')}")
    out(f"websocket  {config.get('websocket_base_url', '?')}")
    out(f"templates  {len(templates)}")
    rows = [[t.get("slug", "?"), t.get("image", "?"), f"cpus {(t.get('limits') or {}).get('cpus')}",
             f"memory {(t.get('limits') or {}).get('memory_mb')} MiB", "network " + ", ".join(t.get("network_modes") or []),
             t.get("description", "")] for t in templates]
    for line in _table(rows):
        out(f"  {line}")
    return config


def action_ping(client: Client, args: argparse.Namespace, out: Callable[[str], None]) -> Any:
    out("== ping: POST /api/v1/ping/")
    body = {"client_id": str(args.client_id), "hostname": socket.gethostname()[:255], "version": DEMO_VERSION}
    answer, elapsed = client.call("POST", "/api/v1/ping/", json_body=body)
    if str(answer.get("client_id")) != str(args.client_id):
        raise DemoError(f"POST /api/v1/ping/: the server answered for client {answer.get('client_id')!r}, "
                        f"not {args.client_id}")
    out(f"client     {answer.get('client_id')} (this host: {body['hostname']})")
    out(f"last seen  {answer.get('last_seen_at')}")
    out(f"round trip {elapsed * 1000:.1f} ms")
    return answer


def action_monitor(client: Client, args: argparse.Namespace, out: Callable[[str], None]) -> Any:
    out("== monitor: GET /api/v1/monitor/")
    answer, _ = client.call("GET", "/api/v1/monitor/")
    host = answer.get("host") or {}
    load = " ".join(str(x) for x in host.get("load_average") or [])
    out(f"host       cpu {host.get('cpu_percent')}% of {host.get('cpu_count')}, load {load}, "
        f"memory {_gib(host.get('memory_used_bytes'))}/{_gib(host.get('memory_total_bytes'))} GiB, "
        f"disk {_gib(host.get('disk_used_bytes'))}/{_gib(host.get('disk_total_bytes'))} GiB")
    engine = host.get("engine")
    if isinstance(engine, dict):
        if engine.get("error"):
            out(f"engine     {engine['error']}")
        else:
            out(f"engine     {engine.get('server_version', '?')}, {engine.get('containers_running', '?')} containers running")
    environments = answer.get("environments") or []
    out(f"environments  {len(environments)}")
    rows = []
    for env in environments:
        stats = env.get("stats") or {}
        limits = env.get("limits") or {}
        sessions = env.get("sessions") or []
        people = sorted({p.get("user", "?") for s in sessions for p in s.get("participants") or []})
        figures = (f"cpu {stats.get('cpu_percent', 0)}%  memory {_mib(stats.get('memory_bytes'))} / "
                   f"{_mib(limits.get('memory_bytes'))}" if stats else "no figures yet")
        status = env.get("status", "?") + (f" ({env['stop_reason']})" if env.get("stop_reason") else "")
        rows.append([env.get("name", "?"), status, env.get("owner", "?"), env.get("template", "?"), figures,
                     f"sessions {len(sessions)}" + (f" ({', '.join(people)})" if people else "")])
    for line in _table(rows):
        out(f"  {line}")
    if args.metrics_token:
        out("== monitor: GET /metrics")
        text, _ = client.call("GET", "/metrics", headers={"Authorization": f"Bearer {args.metrics_token}"},
                              expect_json=False)
        samples = [line for line in text.splitlines() if line and not line.startswith("#")]
        engine_up = next((line.split()[-1] for line in samples if line.startswith("lsl_engine_up")), "?")
        out(f"metrics    {len(samples)} samples, lsl_engine_up {engine_up}")
        answer = {**answer, "metrics_samples": len(samples)}
    return answer


RUNNERS: dict[str, Callable[[Client, argparse.Namespace, Callable[[str], None]], Any]] = {
    "config": action_config, "ping": action_ping, "monitor": action_monitor,
}


def default_client_id() -> uuid.UUID:
    """Stable per host, so repeated runs update one client row in the admin instead of adding one each."""
    return uuid.uuid5(uuid.NAMESPACE_DNS, f"demo-api.{socket.gethostname()}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Walk LSL's REST API: config, ping, monitor (the original demo's get_config, ping, monitor).",
        epilog="Exit codes: 0 ok, 1 other failure, 2 usage, 3 token refused, 6 unreachable, 7 server error.")
    parser.add_argument("--url", default=os.environ.get("LSL_URL"),
                        help="server root, e.g. http://127.0.0.1:8000 (default: $LSL_URL)")
    parser.add_argument("--token", default=os.environ.get("LSL_TOKEN"),
                        help="API token, lsl_... (default: $LSL_TOKEN); make one under 'API tokens' or with 'lsl init'")
    parser.add_argument("--action", choices=[*ACTIONS, "all"], default="all", help="what to call (default: all)")
    parser.add_argument("--client-id", type=uuid.UUID, default=None,
                        help="client id for ping (default: one derived from this host's name)")
    parser.add_argument("--metrics-token", default=os.environ.get("LSL_METRICS_TOKEN"),
                        help="also scrape /metrics with this bearer token in 'monitor' (default: $LSL_METRICS_TOKEN)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per request (default: 10)")
    parser.add_argument("--json", action="store_true", help="print the API's answers as one JSON object")
    args = parser.parse_args(argv)
    if not args.url:
        parser.error("--url is required (or set LSL_URL)")
    if not args.url.startswith(("http://", "https://")):
        parser.error(f"--url must start with http:// or https:// (got {args.url!r})")
    if not args.token:
        parser.error("--token is required (or set LSL_TOKEN)")
    if args.client_id is None:
        args.client_id = default_client_id()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    client = Client(args.url, args.token, args.timeout)
    actions = list(ACTIONS) if args.action == "all" else [args.action]
    out: Callable[[str], None] = (lambda line: None) if args.json else print
    answers: dict[str, Any] = {}
    for name in actions:
        try:
            answers[name] = RUNNERS[name](client, args, out)
        except DemoError as exc:
            if args.json and answers:
                print(json.dumps(answers, indent=2, default=str))
            print(f"demo_api: error: {name}: {exc}", file=sys.stderr)
            return exc.code
    if args.json:
        print(json.dumps(answers, indent=2, default=str))
    else:
        print(f"ok: {', '.join(actions)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
