"""Container healthchecks of docker-compose.yml's LSL services: `python deploy/healthcheck.py web|worker`.

Standard library only and no Django start-up (a check runs every few seconds in every container):

* both roles: PostgreSQL accepts a TCP connection (LSL_DATABASE_URL), Redis answers PING
  (LSL_REDIS_URL), the Docker engine answers /_ping on its socket — what a request or a job needs;
* web: daphne serves the sign-in page (200) on 127.0.0.1:8000, asked with a Host that the server
  accepts (the first of LSL_ALLOWED_HOSTS), so Django itself answered, not only the socket.

Exit 0 healthy, 1 not (with the reason on stdout, which `docker inspect` shows). Every step has a
short timeout so a hung dependency fails the check instead of hanging it.
"""

from __future__ import annotations

import http.client
import os
import socket
import sys
from urllib.parse import urlsplit

TIMEOUT = 3.0


def check_tcp(url: str, default_port: int) -> None:
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname or "localhost", parts.port or default_port), timeout=TIMEOUT):
        pass


def check_redis(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme != "redis":  # rediss:// (TLS), unix://: reachability only
        if parts.scheme == "rediss":
            check_tcp(url, 6379)
        return
    with socket.create_connection((parts.hostname or "localhost", parts.port or 6379), timeout=TIMEOUT) as sock:
        sock.settimeout(TIMEOUT)
        if parts.password:
            user = parts.username or "default"
            sock.sendall(f"AUTH {user} {parts.password}\r\n".encode())
            if not sock.recv(64).startswith(b"+OK"):
                raise RuntimeError("redis refused the credentials")
        sock.sendall(b"PING\r\n")
        answer = sock.recv(64)
        if not answer.startswith(b"+PONG"):
            raise RuntimeError(f"redis answered {answer!r}")


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=TIMEOUT)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(self.path)


def check_docker() -> None:
    host = os.environ.get("LSL_DOCKER_HOST") or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    if not host.startswith("unix://"):
        return  # a remote engine (TLS, ssh): its reachability is the node's health, not this container's
    conn = UnixHTTPConnection(host[len("unix://"):])
    conn.request("GET", "/_ping")
    status = conn.getresponse().status
    if status != 200:
        raise RuntimeError(f"the Docker engine answered /_ping with {status}")


def request_host() -> str:
    for host in os.environ.get("LSL_ALLOWED_HOSTS", "localhost").split(","):
        host = host.strip().lstrip(".")
        if host and host != "*" and not host.startswith("*"):
            return host
    return "localhost"


def check_web() -> None:
    conn = http.client.HTTPConnection("127.0.0.1", 8000, timeout=TIMEOUT)
    conn.request("GET", "/login/", headers={"Host": request_host()})
    status = conn.getresponse().status
    if status != 200:
        raise RuntimeError(f"GET /login/ answered {status}")


def main(role: str) -> int:
    checks = [("postgres", lambda: check_tcp(os.environ["LSL_DATABASE_URL"], 5432))] \
        if os.environ.get("LSL_DATABASE_URL", "").startswith("postgres") else []
    if os.environ.get("LSL_REDIS_URL"):
        checks.append(("redis", lambda: check_redis(os.environ["LSL_REDIS_URL"])))
    checks.append(("docker", check_docker))
    if role == "web":
        checks.append(("web", check_web))
    elif role != "worker":
        print(f"usage: {sys.argv[0]} web|worker")
        return 2
    for name, check in checks:
        try:
            check()
        except Exception as exc:  # any failure is "unhealthy", with the reason
            print(f"unhealthy: {name}: {exc.__class__.__name__}: {exc}")
            return 1
    print("healthy")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else ""))
