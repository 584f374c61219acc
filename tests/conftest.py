"""Shared fixtures. Engine tests run against the real Docker engine, always.

Transactional tests use `django_db(transaction=True, serialized_rollback=True)`:
a plain flush recreates content types and permissions with new ids, and a
long-lived daphne process (which caches content-type ids) would then see no
guardian permissions at all.

A missing engine or missing test image is a test *failure* (never a skip):
the suite exists to prove LSL works against a real engine.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
TEST_IMAGES = ["lsl-test/busybox:latest", "lsl-test/debian:bookworm"]


# --- PostgreSQL: a flush that yields to the server processes --------------------------------

# SQLSTATEs of "could not get the lock in time" and "deadlock detected".
_LOCK_NOT_AVAILABLE, _DEADLOCK = "55P03", "40P01"
FLUSH_LOCK_TIMEOUT_MS = 200  # below PostgreSQL's deadlock_timeout (1 s): the flush always gives way first
FLUSH_DEADLINE = 60.0


def _sqlstate(exc: BaseException | None) -> str | None:
    while exc is not None:  # flush's CommandError <- Django's OperationalError <- psycopg's error
        state = getattr(exc, "sqlstate", None)
        if state:
            return str(state)
        exc = exc.__cause__ or exc.__context__
    return None


def _polite_flush(original: Any) -> Any:
    """A transactional test ends with `flush`: on PostgreSQL one TRUNCATE of every table, which takes
    ACCESS EXCLUSIVE locks table after table. The session's daphne and worker keep running meanwhile
    and may be inside a transaction that holds one of those tables and wants another (an event row
    written with the environment it describes): a deadlock, and PostgreSQL kills one side: the
    flush (the next test then finds the last one's rows: duplicate "alice") or the server's write.
    SQLite cannot deadlock here (one database-wide write lock: the flush waits its turn).

    So on PostgreSQL the flush runs with a lock_timeout below deadlock_timeout: when it cannot get a
    lock at once it gives up and releases everything (the server's transaction completes) and tries
    again, for up to FLUSH_DEADLINE seconds; then it fails naming what held the locks."""

    def teardown(self: Any) -> None:
        from django.db import connections

        deadline = time.monotonic() + FLUSH_DEADLINE
        attempt = 0
        while True:
            postgres = [connections[name] for name in self._databases_names(include_mirrors=False)
                        if connections[name].vendor == "postgresql"]
            for conn in postgres:
                with conn.cursor() as cursor:
                    cursor.execute(f"SET lock_timeout = {FLUSH_LOCK_TIMEOUT_MS}")
            try:
                original(self)
                return
            except Exception as exc:
                if not postgres or _sqlstate(exc) not in (_LOCK_NOT_AVAILABLE, _DEADLOCK):
                    raise
                if time.monotonic() > deadline:
                    raise AssertionError(f"could not flush the test database within {FLUSH_DEADLINE:.0f}s; "
                                         f"sessions holding locks: {_lock_holders(postgres[0])}") from exc
                attempt += 1
                time.sleep(min(0.02 * attempt, 0.5))
            finally:
                for conn in postgres:
                    if conn.connection is not None and not conn.needs_rollback:
                        with conn.cursor() as cursor:
                            cursor.execute("RESET lock_timeout")

    return teardown


def _lock_holders(conn: Any) -> list[tuple[Any, ...]]:
    with conn.cursor() as cursor:
        cursor.execute("SELECT pid, state, now() - xact_start, left(query, 120) FROM pg_stat_activity "
                       "WHERE datname = current_database() AND pid <> pg_backend_pid() AND xact_start IS NOT NULL")
        return list(cursor.fetchall())


def pytest_configure(config: Any) -> None:
    from django.test import TransactionTestCase

    # Only TransactionTestCase's flush; TestCase rolls back its transaction instead (its own _fixture_teardown).
    if not getattr(TransactionTestCase._fixture_teardown, "_lsl_polite", False):
        TransactionTestCase._fixture_teardown = _polite_flush(TransactionTestCase._fixture_teardown)
        TransactionTestCase._fixture_teardown._lsl_polite = True


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    """On PostgreSQL (make test-postgres), skip the tests marked `own_database`: each runs a stack
    with a SQLite database of its own (tests/stack.py), so the SQLite stage already ran exactly
    that; running it again would add minutes to CI and test nothing about PostgreSQL."""
    from django.conf import settings

    if settings.DATABASES["default"]["ENGINE"] != "django.db.backends.postgresql":
        return
    skip = pytest.mark.skip(reason="own SQLite database (tests/stack.py): the SQLite stage runs it")
    for item in items:
        if item.get_closest_marker("own_database"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def engine() -> Iterator[None]:
    from environments import runtime

    try:
        runtime.local().ping()
    except runtime.EngineError as exc:
        pytest.fail(f"A running Docker engine is required (start one: 'bash scripts/engine.sh'): {exc}", pytrace=False)
    missing = [image for image in TEST_IMAGES if not runtime.local().image_exists(image)]
    if missing:
        pytest.fail(f"Test images missing: {missing}. Build them with 'make images'.", pytrace=False)
    yield
    runtime.local().remove_instance_resources()


@pytest.fixture()
def catalog(db: Any) -> None:
    from environments.catalog import apply_catalog

    result = apply_catalog(REPO / "catalog" / "test.yaml")
    assert not result.problems, result.problems


class People:
    """The base cast (healthchecks style): an owner, a teammate, an outsider, and more roles."""

    def __init__(self) -> None:
        from django.contrib.auth import get_user_model

        from accounts.services import add_member, create_team

        User = get_user_model()
        make = lambda name, **kw: User.objects.create_user(name, f"{name}@example.com", "password-" + name, **kw)  # noqa: E731
        self.owner = make("alice")
        self.teammate = make("bob")
        self.outsider = make("mallory")
        self.viewer = make("victor")
        self.member = make("meg")
        self.admin = make("ada")
        self.staff = make("steve", is_staff=True)
        self.team = create_team("Platform", owner=self.owner)
        add_member(self.team, self.teammate)


@pytest.fixture()
def people(db: Any) -> People:
    return People()


def api_client(user: Any | None = None) -> Any:
    from rest_framework.test import APIClient

    client = APIClient()
    if user is not None:
        client.force_authenticate(user)
    return client


def wait_for_status(env_id: Any, statuses: set[str] | str, timeout: float = 60.0) -> Any:
    """Poll the row until its status is one of `statuses` (provisioning runs in a job thread)."""
    from environments.models import Environment

    wanted = {statuses} if isinstance(statuses, str) else statuses
    deadline = time.monotonic() + timeout
    while True:
        env = Environment.objects.get(pk=env_id)
        if env.status in wanted:
            return env
        if time.monotonic() > deadline:
            raise AssertionError(f"environment {env_id} stuck in {env.status!r} (wanted {wanted}); error={env.last_error!r}")
        time.sleep(0.05)


@pytest.fixture()
def make_env(engine: None, catalog: None, transactional_db: Any, worker_proc: "WorkerProcess") -> Iterator[Any]:
    """Create a running environment through the service layer; the worker provisions it; wait for it."""
    from environments import services
    from environments.models import Template

    def make(owner: Any, name: str | None = None, template: str = "busybox", **kwargs: Any) -> Any:
        req = services.CreateRequest(name=name or f"env-{uuid.uuid4().hex[:6]}", template=Template.objects.get(slug=template), **kwargs)
        env = services.create_environment(owner, req)
        return wait_for_status(env.id, {"running", "error"})

    yield make


def docker_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=60, check=False)


# --- live servers (real daphne processes) -------------------------------------------

def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LiveServer:
    def __init__(self, url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.url, self.proc, self.log = url, proc, log

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://", 1)

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:]


def start_daphne(extra_env: dict[str, str] | None = None, name: str = "daphne", port: int | None = None) -> LiveServer:
    """Start `daphne lsl_site.asgi:application` on a free port (or `port`, to restart one in place),
    sharing the test database file."""
    import sys

    import requests
    from django.conf import settings

    port = port or free_port()
    log = Path(settings.VAR_DIR) / f"{name}-{port}.log"
    env = process_env(extra_env)
    handle = log.open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "lsl_site.asgi:application"],
                            cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if requests.get(f"{url}/api/v1/config/", timeout=2).status_code in (401, 403):
                return LiveServer(url, proc, log)
        except requests.RequestException:  # not listening yet, or too busy to answer in time
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"daphne did not start:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.1)


def stop_daphne(server: LiveServer) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.proc.kill()


class WorkerProcess:
    """A real `manage.py lsl_worker` process (provisioning, engine events, periodic jobs)."""

    def __init__(self, proc: subprocess.Popen[bytes], log: Path, extra_env: dict[str, str] | None = None) -> None:
        self.proc, self.log, self.extra_env = proc, log, extra_env

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:]

    def kill(self) -> None:
        """kill -9: no clean-up, no lease released, like a crash or an OOM kill."""
        self.proc.kill()
        self.proc.wait(timeout=10)

    def restart(self) -> None:
        """Start a fresh process in place of this one (the session fixture keeps working)."""
        if self.proc.poll() is None:
            self.kill()
        fresh = start_worker(self.extra_env)
        self.proc, self.log = fresh.proc, fresh.log


def test_database_url() -> str:
    """The URL of the database this test run uses (SQLite file or PostgreSQL test database), for subprocesses."""
    from urllib.parse import quote, urlencode

    from django.db import connection

    settings_dict = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{settings_dict['NAME']}"
    assert connection.vendor == "postgresql", f"the suite runs on SQLite or PostgreSQL, not {connection.vendor}"
    assert settings_dict["NAME"].startswith("test_"), f"not a test database: {settings_dict['NAME']!r}"
    # NAME is test_<name> by now (pytest-django created it): the subprocesses must use that
    # database, never the one LSL_DATABASE_URL names. Quote what a password or a socket path may
    # contain; a socket directory as host goes in the query, which dj_database_url understands.
    host, port = settings_dict["HOST"] or "", settings_dict["PORT"] or ""
    user = quote(settings_dict["USER"] or "", safe="")
    password = quote(settings_dict["PASSWORD"] or "", safe="")
    credentials = f"{user}:{password}@" if password else (f"{user}@" if user else "")
    query = {str(k): str(v) for k, v in (settings_dict.get("OPTIONS") or {}).items() if k in ("sslmode", "sslrootcert")}
    if host.startswith("/"):
        query["host"], host = host, ""
    netloc = f"{credentials}{host}{f':{port}' if port else ''}"
    return f"postgres://{netloc}/{quote(settings_dict['NAME'], safe='')}" + (f"?{urlencode(query)}" if query else "")


def process_env(extra_env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a server or worker process sharing the test database."""
    return {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "lsl_site.settings",
        "LSL_DATABASE_URL": test_database_url(),
        "LSL_ALLOWED_HOSTS": "127.0.0.1,localhost",
        "PYTHONUNBUFFERED": "1",
        **(extra_env or {}),
    }


def start_worker(extra_env: dict[str, str] | None = None, name: str = "worker") -> WorkerProcess:
    """Start `manage.py lsl_worker` and wait until it says it runs."""
    import sys

    from django.conf import settings

    log = Path(settings.VAR_DIR) / f"{name}-{uuid.uuid4().hex[:6]}.log"
    handle = log.open("wb")
    proc = subprocess.Popen([sys.executable, "manage.py", "lsl_worker"], cwd=REPO, env=process_env(extra_env),
                            stdout=handle, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while "running" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the worker did not start:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.05)
    return WorkerProcess(proc, log, extra_env)


def stop_worker(worker: WorkerProcess) -> None:
    worker.proc.terminate()
    try:
        worker.proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        worker.proc.kill()
        worker.proc.wait(timeout=5)


@pytest.fixture(scope="session")
def worker_proc(django_db_setup: Any, django_db_blocker: Any, engine: None) -> Iterator[WorkerProcess]:
    """One worker for the whole run, like production: nothing in the test process does background work."""
    with django_db_blocker.unblock():
        worker = start_worker()
    yield worker
    stop_worker(worker)


@pytest.fixture(autouse=True)
def _worker_for_engine_tests(request: Any) -> None:
    """Every test that uses the engine gets the worker too: provisioning and engine events need it."""
    if "engine" in request.fixturenames:
        request.getfixturevalue("worker_proc")


@pytest.fixture(scope="session")
def live_server_proc(django_db_setup: Any, django_db_blocker: Any, engine: None, worker_proc: WorkerProcess) -> Iterator[LiveServer]:
    """One daphne for the whole run; tests using it need `transactional_db` so it sees their rows."""
    with django_db_blocker.unblock():
        server = start_daphne()
    yield server
    stop_daphne(server)


class RedisServer:
    """A real redis-server on a private port, which a test may stop and start again (same port)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        import socket

        port = self.port
        command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.proc = proc = subprocess.Popen(command,
                                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    proc.kill()
                    pytest.fail("redis-server did not start (apt-get install redis-server)", pytrace=False)
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture()
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture()
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


def make_token(user: Any, name: str = "test") -> str:
    from accounts.services import create_token

    return create_token(user, name)[1]


def read_streaming(response: Any) -> bytes:
    """The whole body of a streaming response from the test client; LSL streams with async iterators."""
    import asyncio

    content = response.streaming_content
    if hasattr(content, "__aiter__"):
        async def collect() -> bytes:
            return b"".join([chunk async for chunk in content])

        return asyncio.run(collect())
    return b"".join(content)
