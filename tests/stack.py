"""An LSL of its own for fault tests: its own database, var dir, instance label and processes.

The session's worker and daphne share the test database; a fault test that points LSL at another
engine (tests/engines.py) must not have the session worker provision its rows on the main engine,
so it gets a whole stack: migrate, the test catalog, a user with a token, and real daphne and
worker processes started with tests.conftest's helpers.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import requests

from tests.conftest import REPO, LiveServer, WorkerProcess, start_daphne, start_worker, stop_daphne, stop_worker


class Stack:
    def __init__(self, root: Path, extra_env: dict[str, str] | None = None) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.instance = f"stack-{uuid.uuid4().hex[:8]}"
        self.env = {
            "LSL_VAR_DIR": str(root),
            "LSL_DATABASE_URL": f"sqlite:///{root / 'lsl.sqlite3'}",
            "LSL_INSTANCE": self.instance,
            "LSL_REDIS_URL": "",
            **(extra_env or {}),
        }
        self.web: LiveServer | None = None
        self.worker: WorkerProcess | None = None
        self._manage("migrate", "--noinput", "-v", "0")
        self._manage("lsl_apply", str(REPO / "catalog" / "test.yaml"))
        self.token = self._manage("shell", "-c", (
            "from django.contrib.auth import get_user_model; from accounts.services import create_token; "
            "u = get_user_model().objects.create_user('stack', 's@example.com', 'stack-password'); "
            "print(create_token(u, 'stack')[1])")).strip().splitlines()[-1]

    def _manage(self, *args: str) -> str:
        result = subprocess.run([sys.executable, "manage.py", *args], cwd=REPO, env={**os.environ, **self.env},
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"manage.py {args[0]} failed:\n{result.stdout}\n{result.stderr}"
        return result.stdout

    def start(self, worker: bool = True) -> "Stack":
        """`worker=False`: the web process only, so nothing queued (an environment created) is ever provisioned."""
        self.web = start_daphne(self.env, name=f"daphne-{self.instance}")
        if worker:
            self.worker = start_worker(self.env, name=f"worker-{self.instance}")
        return self

    def stop(self) -> None:
        if self.worker is not None:
            stop_worker(self.worker)
        if self.web is not None:
            stop_daphne(self.web)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Token {self.token}"}

    def api(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        assert self.web is not None
        return requests.request(method, f"{self.web.url}/api/v1/{path.lstrip('/')}", headers=self.headers,
                                timeout=kwargs.pop("timeout", 30), **kwargs)
