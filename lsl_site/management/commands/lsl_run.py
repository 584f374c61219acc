"""`manage.py lsl_run`: serve LSL with one command — daphne (HTTP + websockets) and the worker.

Both are child processes; Ctrl-C (or SIGTERM) stops both, and if either exits on its own the other
is stopped too and the exit status says which, so a supervisor (systemd, compose) restarts the pair.
Production deployments run them as separate services instead (docker-compose.yml: web, worker).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any

from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Run daphne and the LSL worker together until Ctrl-C."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8000)

    def handle(self, *args: Any, host: str, port: int, **options: Any) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        children = {
            "web": subprocess.Popen([sys.executable, "-m", "daphne", "-b", host, "-p", str(port), "lsl_site.asgi:application"], env=env),
            "worker": subprocess.Popen([sys.executable, "manage.py", "lsl_worker"], env=env),
        }
        self.stdout.write(f"LSL: serving http://{host}:{port}/ (web pid {children['web'].pid}, "
                          f"worker pid {children['worker'].pid}); Ctrl-C stops both")
        stopping = False

        def stop(signum: int, _frame: Any) -> None:
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
        exited = ""
        while not stopping and not exited:
            for name, proc in children.items():
                if proc.poll() is not None:
                    exited = name
            time.sleep(0.2)
        for proc in children.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in children.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        if exited:
            self.stderr.write(f"LSL: the {exited} process exited ({children[exited].returncode}); stopped the other")
            sys.exit(1)
