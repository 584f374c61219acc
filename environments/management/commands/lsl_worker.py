"""`manage.py lsl_worker`: run LSL's background work (environments/worker.py) until SIGTERM/SIGINT."""

from __future__ import annotations

import signal
import threading
from typing import Any

from django.core.management.base import BaseCommand

from environments.worker import Worker


class Command(BaseCommand):
    help = "Run the LSL worker: provisioning, engine events, reconcile, idle stop, stats (several may run)."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--threads", type=int, default=None, help="task threads (default LSL_WORKER_THREADS)")
        parser.add_argument("--worker-id", default=None, help="name used for leases (default host-pid-random)")

    def handle(self, *args: Any, threads: int | None = None, worker_id: str | None = None, **options: Any) -> None:
        worker = Worker(worker_id=worker_id, threads=threads)
        done = threading.Event()

        def shut_down(signum: int, _frame: Any) -> None:
            self.stderr.write(f"worker {worker.worker_id}: {signal.Signals(signum).name}, stopping")
            done.set()

        signal.signal(signal.SIGTERM, shut_down)
        signal.signal(signal.SIGINT, shut_down)
        worker.start()
        self.stdout.write(f"worker {worker.worker_id} running", ending="\n")
        self.stdout.flush()
        while not done.wait(1.0):
            pass
        worker.stop()
