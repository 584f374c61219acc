"""The worker process (`manage.py lsl_worker`): all of LSL's background work, none of it in daphne.

Threads, each with one job:
- task runners (LSL_WORKER_THREADS): claim django-tasks rows (provisioning) and run them;
- the engine watcher: follows `docker events` for this instance's containers and turns them into
  row changes (reconcile.EngineEventTracker); on every (re)connect it first runs a full reconcile,
  so nothing that happened while it was away is missed;
- periodic jobs, one thread each: resume stalled provisioning, enforce setup deadlines, the full
  reconcile safety net, idle stop, disk limits, container stats sampling, listening-port scans, event and
  task-result pruning.
  Several workers may run: each periodic run is claimed with a conditional UPDATE on its
  PeriodicJob row, so it happens once per interval whoever runs it.

Any number of workers can run against one database. A worker killed with -9 loses nothing but
time: the rows it was provisioning are resumed by whichever worker is alive once their leases
run out.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import connection
from django.utils import timezone

from environments import metrics, nodes, policy, provisioning, reconcile, runtime, services, tasks
from environments.models import Environment, Node, Status
from lsl_site import events, wake
from lsl_site.dbpool import refresh_connections
from lsl_site.models import PeriodicJob

log = logging.getLogger("lsl.worker")


@dataclass(frozen=True)
class Periodic:
    name: str
    interval: Callable[[], float]  # seconds; <= 0 turns the job off
    run: Callable[[], Any]


def _sample_stats() -> dict[str, Any]:
    """Container figures for the monitor and /metrics, so that reading them never asks the engine."""
    envs = list(Environment.objects.filter(status=Status.RUNNING, node__available=True).exclude(container_id="")
                .select_related("node"))
    stats = metrics.sample_container_stats(envs)
    now = timezone.now()
    for env in envs:
        Environment.objects.filter(pk=env.pk).update(stats=stats.get(env.pk) or {}, stats_at=now)
    Environment.objects.exclude(status=Status.RUNNING).exclude(stats={}).update(stats={}, stats_at=None)
    # Per node, from the node check's last `docker info` (no engine call here).
    per_node = {n.name: {"available": n.available, **n.engine} for n in Node.objects.all()}
    local = per_node.get(Node.LOCAL) or next(iter(per_node.values()), {})
    up = bool(local.get("available"))
    return {"engine": {"containers_running": local.get("containers_running", 0), "server_version": local.get("version", ""),
                       "ncpu": local.get("ncpu", 0), "mem_total": local.get("mem_total", 0)} if up else
            {"error": "the local node does not answer"}, "engine_up": up, "nodes": per_node, "sampled_at": now.isoformat()}


# The engine's walk of every layer and volume costs ~5 ms per small environment and ~10 µs per file
# (measured: 2 workspaces of 20 000 files, 0.42 s): at most this share of the engine's time goes to it.
DISK_CHECK_MAX_SHARE = 0.2


def enforce_disk_limits() -> dict[str, Any]:
    """Measure every running environment's disk (workspace volume + container layer, in one engine call),
    record it, and stop (never delete) those over their limit with the reason (policy.disk_verdict).

    Returns the figures of this run, kept on the PeriodicJob row: `seconds` is what the engine took to
    measure (it walks every container layer and volume it has). A slow walk pushes the next run back
    (DISK_CHECK_MAX_SHARE), so that many or huge workspaces cannot keep the engine's disk busy.
    """
    envs = list(Environment.objects.filter(status=Status.RUNNING, node__available=True).exclude(container_id="")
                .select_related("owner", "template", "team", "node"))
    if not envs:
        return {"environments": 0, "measured": 0, "stopped": 0, "seconds": 0.0}
    started = time.monotonic()
    usage: dict[str, runtime.DiskUsage] = {}
    for node_id in {env.node_id for env in envs}:  # one engine walk per node
        on_node = [env for env in envs if env.node_id == node_id]
        try:
            usage.update(nodes.engine_for(on_node[0]).disk_usage(
                {str(env.pk): (env.container_id, env.workspace_volume) for env in on_node}))
        except runtime.EngineError as exc:
            log.info("disk usage on node %s: %s", on_node[0].node, exc)
    took = time.monotonic() - started
    now = timezone.now()
    if took / DISK_CHECK_MAX_SHARE > settings.LSL_DISK_CHECK_INTERVAL:
        PeriodicJob.objects.filter(name="enforce_disk_limits").update(
            due_at=now + timedelta(seconds=took / DISK_CHECK_MAX_SHARE))
    stopped = 0
    for env in envs:
        measured = usage.get(str(env.pk))
        if measured is None:
            continue
        used_mb = measured.total_bytes / (1024 * 1024)
        Environment.objects.filter(pk=env.pk).update(disk_used_mb=math.ceil(used_mb), disk_checked_at=now)
        if policy.disk_verdict(env, used_mb, now) is None:
            continue
        env.refresh_from_db()  # a start may just have set a grace period; a user may just have stopped it
        verdict = policy.disk_verdict(env, used_mb, now)
        if env.status != Status.RUNNING or verdict is None:
            continue
        log.warning("stopping %s: %s (workspace %d bytes, container layer %d bytes)", env, verdict,
                    measured.workspace_bytes, measured.container_bytes)
        try:
            services.stop_environment(env, reason="disk", detail=verdict)
            stopped += 1
        except runtime.EngineError as exc:
            log.warning("could not stop %s for its disk use: %s", env, exc)
    return {"environments": len(envs), "measured": len(usage), "stopped": stopped, "seconds": round(took, 3)}


# Each scan is one short keeper request (a Unix socket round trip, or a `docker exec` for an old keeper).
PORT_SCAN_WORKERS = 8
PORT_SCAN_BUDGET_SECONDS = 10.0


def scan_listening_ports() -> dict[str, Any]:
    """What listens inside every running bridge/none-network environment (the keeper reads
    /proc/net/tcp* in the container's network namespace), stored on the row; a change publishes
    `environment.ports`. Environments no longer running get their list cleared (whatever stopped
    them: a user, the engine, idle or disk). Host-network ones are never scanned: their ports are
    the host's, which LSL does not forward (ports.check_reachable)."""
    from concurrent.futures import ThreadPoolExecutor, wait

    from environments import keeper, ports
    from environments.models import NetworkMode

    cleared = 0
    for env in (Environment.objects.exclude(status=Status.RUNNING).filter(ports_checked_at__isnull=False)
                .only("id", "owner_id", "listening_ports", "ports_checked_at")):
        if env.listening_ports:
            ports.do_update_listening_ports(env, [])
            cleared += 1
        Environment.objects.filter(pk=env.pk).exclude(status=Status.RUNNING).update(ports_checked_at=None)
    envs = list(Environment.objects.filter(status=Status.RUNNING, node__available=True).exclude(container_id="")
                .exclude(network_mode=NetworkMode.HOST).select_related("node"))
    if not envs:
        return {"environments": 0, "scanned": 0, "changed": 0, "cleared": cleared}

    def scan(env: Environment) -> list[ports.ListeningPort] | None:
        try:
            return keeper.listening_ports(nodes.engine_for(env), env.container_id, env.pk)
        except Exception as exc:  # noqa: BLE001 - an old keeper, a container going away: try again next time
            log.debug("port scan of %s failed: %s", env.pk, exc)
            return None

    pool = ThreadPoolExecutor(max_workers=min(PORT_SCAN_WORKERS, len(envs)), thread_name_prefix="lsl-ports")
    try:
        futures = {pool.submit(scan, env): env for env in envs}
        done, _ = wait(futures, timeout=PORT_SCAN_BUDGET_SECONDS)
        found = {futures[f].pk: (futures[f], f.result()) for f in done if f.result() is not None}
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    # Only those still running: one stopped meanwhile keeps its cleared list.
    still_running = set(Environment.objects.filter(pk__in=list(found), status=Status.RUNNING).values_list("pk", flat=True))
    changed = sum(ports.do_update_listening_ports(env, listening)
                  for pk, (env, listening) in found.items() if pk in still_running)
    return {"environments": len(envs), "scanned": len(found), "changed": changed, "cleared": cleared}


def _prune_task_results() -> int:
    from django_tasks_db.models import DBTaskResult

    cutoff = timezone.now() - timedelta(hours=1)
    deleted, _ = DBTaskResult.objects.finished().filter(finished_at__lt=cutoff).delete()
    return deleted


PERIODIC: list[Periodic] = [
    Periodic("check_nodes", lambda: settings.LSL_NODE_CHECK_INTERVAL, nodes.check_nodes),
    Periodic("resume_stalled_provisioning", lambda: 2.0,
             lambda: provisioning.resume_stalled(tasks.enqueue_provisioning)),
    Periodic("enforce_setup_deadlines", lambda: 2.0, provisioning.enforce_setup_deadlines),
    Periodic("reconcile", lambda: settings.LSL_RECONCILE_INTERVAL, lambda: len(reconcile.reconcile())),
    Periodic("stop_idle_environments",
             lambda: settings.LSL_IDLE_CHECK_INTERVAL if settings.LSL_IDLE_STOP_AFTER > 0 else 0,
             lambda: len(services.stop_idle_environments())),
    Periodic("enforce_disk_limits", lambda: settings.LSL_DISK_CHECK_INTERVAL, enforce_disk_limits),
    Periodic("sample_stats", lambda: settings.LSL_STATS_INTERVAL, _sample_stats),
    Periodic("scan_listening_ports", lambda: settings.LSL_PORT_SCAN_INTERVAL, scan_listening_ports),
    # Workspace volumes no row accounts for (kept before kept workspaces were recorded, or a delete that
    # died half-way): listed for their owners, so nothing kept is invisible (services.adopt_orphan_workspaces).
    Periodic("adopt_orphan_workspaces", lambda: 300.0, lambda: len(services.adopt_orphan_workspaces())),
    Periodic("prune_events", lambda: 300.0, lambda: events.prune(settings.LSL_EVENT_RETENTION)),
    Periodic("prune_task_results", lambda: 3600.0, _prune_task_results),
]


def register_periodic(job: Periodic) -> None:
    """For apps above this one (sessions registers its reaper): dependencies point one way."""
    if all(existing.name != job.name for existing in PERIODIC):
        PERIODIC.append(job)


def claim_periodic(name: str, interval: float, worker_id: str) -> bool:
    """Take this interval's run of `name`, unless another worker already did."""
    now = timezone.now()
    PeriodicJob.objects.get_or_create(name=name, defaults={"due_at": now})
    return bool(PeriodicJob.objects.filter(name=name, due_at__lte=now).update(
        due_at=now + timedelta(seconds=interval), last_run_by=worker_id, last_run_at=now))


class Worker:
    def __init__(self, worker_id: str | None = None, threads: int | None = None) -> None:
        self.worker_id = worker_id or provisioning.new_worker_id()
        self.threads = threads or settings.LSL_WORKER_THREADS
        self.stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self.busy = 0
        self._busy_lock = threading.Lock()

    # --- life cycle -------------------------------------------------------------------------

    def start(self) -> None:
        tasks.WORKER_ID = self.worker_id
        log.info("worker %s: %d task threads, engine watcher, %d periodic jobs", self.worker_id, self.threads, len(PERIODIC))
        self._spawn("lsl-task-claimer", self._run_tasks)
        self._spawn("lsl-engine-watchers", self._watch_engines)
        for job in PERIODIC:
            self._spawn(f"lsl-periodic-{job.name}", self._run_periodic, job)

    def _spawn(self, name: str, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=self._guarded, args=(target, *args), name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _guarded(self, target: Callable[..., None], *args: Any) -> None:
        try:
            target(*args)
        finally:
            connection.close()

    def stop(self, grace: float = 5.0) -> None:
        """Stop taking work; give running tasks `grace` seconds. Whatever is cut short is resumed later
        (leases run out), so a quick exit is safe."""
        self.stopping.set()
        deadline = time.monotonic() + grace
        while self.busy and time.monotonic() < deadline:
            time.sleep(0.05)

    # --- tasks --------------------------------------------------------------------------------

    def _run_tasks(self) -> None:
        """One thread polls and claims; up to `threads` tasks run at once on a pool.

        Polling is a cheap read (`exists`) every LSL_WORKER_POLL_INTERVAL; only when something is
        ready does it take the claim transaction, which on SQLite holds the write lock. Each wake-up
        announces one task just queued (committed): announced tasks are claimed straight away,
        without the read, and once the last one announced is claimed the claimer waits again rather
        than look for more, so that the task's thread starts without it (a task queued meanwhile has
        woken it already; one whose wake-up was lost is found by the next poll). A task found by
        polling is followed by another look at once (a burst queued without wake-ups).
        The claimer and the pool's threads keep their database connections (refresh_connections).
        """
        from concurrent.futures import ThreadPoolExecutor

        from django.db.utils import OperationalError
        from django_tasks_db.management.commands.db_worker import Worker as TaskRunner
        from django_tasks_db.models import DBTaskResult
        from django_tasks_db.utils import exclusive_transaction, is_locked_database_exception

        runner = TaskRunner(queue_names=["default"], interval=0, batch=False, backend_name="default",
                            startup_delay=False, max_tasks=None, worker_id=self.worker_id, excluded_queue_names=[])
        pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="lsl-task")
        free = threading.Semaphore(self.threads)
        poll = settings.LSL_WORKER_POLL_INTERVAL
        try:
            woken: wake.Listener | None = wake.Listener("tasks")  # enqueue_provisioning wakes it at once
        except OSError as exc:  # e.g. a var dir path too long for a Unix socket: polling still works
            log.warning("no local wake-up socket for tasks (%s); polling every %gs", exc, poll)
            woken = None
        wake.relay_redis_in_thread("tasks", self.stopping)

        def run(task_result: Any) -> None:
            try:
                refresh_connections()
                runner.run_task(task_result)
            finally:
                with self._busy_lock:
                    self.busy -= 1
                free.release()

        announced = 0  # wake-ups read and not yet answered by a claim: each announced one queued task
        while not self.stopping.is_set():
            if not free.acquire(timeout=poll):
                continue  # every runner is busy: claim nothing, leave it to other workers
            task_result = None
            try:
                refresh_connections()
                ready = DBTaskResult.objects.ready().filter(backend_name="default")
                if announced or ready.exists():
                    with exclusive_transaction(ready.db):
                        task_result = ready.get_locked()
                        if task_result is not None:
                            task_result.claim(self.worker_id)
            except OperationalError as exc:
                if not is_locked_database_exception(exc):
                    log.warning("claiming a task failed: %s", exc)
            except Exception:
                log.exception("claiming a task failed")
            if task_result is None:
                free.release()
                if woken is not None:
                    announced = woken.wait(poll)
                else:
                    self.stopping.wait(poll)
                continue
            with self._busy_lock:
                self.busy += 1
            pool.submit(run, task_result)
            if announced == 1 and woken is not None:
                # The one task announced is claimed: wait for the next wake-up (a task queued meanwhile
                # has sent one already) instead of looking again now, so that its thread starts alone.
                announced = woken.wait(poll)
            else:
                # More were announced (claim the next at once), or this one was found by polling (a
                # burst that came without wake-ups: look again now, with the read).
                announced = max(announced - 1, 0)
        pool.shutdown(wait=False)
        if woken is not None:
            woken.close()

    # --- engine events --------------------------------------------------------------------------

    def _watch_engines(self) -> None:
        """One event watcher thread per node, started as nodes are added (looked for every few
        seconds); a watcher ends when its node is removed or its address changes."""
        watching: dict[tuple[int, str], threading.Thread] = {}
        while not self.stopping.is_set():
            refresh_connections()
            try:
                current = {(n.pk, n.url): n for n in Node.objects.all()}
            except Exception:
                log.exception("engine watchers: listing nodes failed")
                current = {}
            for key, node in current.items():
                if key not in watching or not watching[key].is_alive():
                    thread = threading.Thread(target=self._guarded, args=(self._watch_engine, node), daemon=True,
                                              name=f"lsl-engine-watcher-{node.name}")
                    thread.start()
                    watching[key] = thread
            for key in [k for k in watching if k not in current]:
                watching.pop(key)  # its thread sees the node gone at its next reconnect and ends
            self.stopping.wait(3.0)

    def _watch_engine(self, node: Node) -> None:
        backoff = 0.5
        tracker = reconcile.EngineEventTracker()
        engine = nodes.engine_of_node(node)
        while not self.stopping.is_set():
            refresh_connections()
            if not Node.objects.filter(pk=node.pk, url=node.url).exists():
                log.info("engine watcher %s: node removed; stopping", node.name)
                return
            try:
                stream = engine.container_events()  # subscribed before the reconcile: nothing falls between
                node.refresh_from_db()
                changed = reconcile.reconcile(node)
                log.info("engine watcher %s: connected; reconcile changed %d environments", node.name, len(changed))
                backoff = 0.5
                for event in stream:
                    refresh_connections()
                    try:
                        tracker.apply(event, node)
                    except Exception:
                        log.exception("engine watcher %s: applying %s failed", node.name, event)
                    if self.stopping.is_set():
                        return
            except runtime.EngineError as exc:
                log.log(logging.INFO if backoff >= 5.0 else logging.WARNING,
                        "engine watcher %s: %s; reconnecting in %.1fs", node.name, exc, backoff)
            except Exception:
                log.exception("engine watcher %s failed; reconnecting in %.1fs", node.name, backoff)
            self.stopping.wait(backoff)
            backoff = min(backoff * 2, 5.0)

    # --- periodic jobs ----------------------------------------------------------------------------

    def _run_periodic(self, job: Periodic) -> None:
        while not self.stopping.is_set():
            interval = job.interval()
            if interval <= 0:
                self.stopping.wait(30.0)
                continue
            refresh_connections()
            try:
                if claim_periodic(job.name, interval, self.worker_id):
                    result = job.run()
                    fields: dict[str, Any] = {"last_error": ""}
                    if isinstance(result, dict):
                        fields["result"] = result
                    PeriodicJob.objects.filter(name=job.name).update(**fields)
            except runtime.EngineError as exc:
                log.info("periodic %s: %s", job.name, exc)
                PeriodicJob.objects.filter(name=job.name).update(last_error=str(exc)[:2000])
            except Exception as exc:
                log.exception("periodic %s failed", job.name)
                try:
                    PeriodicJob.objects.filter(name=job.name).update(last_error=f"{exc.__class__.__name__}: {exc}"[:2000])
                except Exception:
                    pass
            self.stopping.wait(min(interval, 1.0) if interval < 5 else 1.0)
