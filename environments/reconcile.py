"""Engine state → rows. Runs in the worker only: reads (API, pages, /metrics) never ask the engine.

Two ways in: `EngineEventTracker.apply` for each `docker events` record (a container killed,
stopped, OOM-killed or removed behind LSL's back shows within moments, with the reason), and
`reconcile` — a full comparison — at start-up, after the event stream reconnects, and every
LSL_RECONCILE_INTERVAL seconds as a safety net.

Rows that some other party is changing are left alone: `creating` ones (their provisioning worker
decides), and ones with a fresh `pending_action` (a start/stop/restart/delete request is making the
engine do exactly what the events report).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from django.db import transaction
from django.utils import timezone

from environments import nodes, runtime, services
from environments.models import Environment, Node, SetupStatus, Status
from environments.signals import environment_stopped

log = logging.getLogger(__name__)

MEMORY_SECONDS = 30.0  # how long an `oom`/`kill` event is remembered for the `die` that follows it


def _busy(env: Environment) -> bool:
    if env.status == Status.CREATING:
        return True
    return bool(env.pending_action) and env.pending_action_at is not None and \
        timezone.now() - env.pending_action_at < services.ACTION_STALE_AFTER


def stop_reason(exit_code: int | None, *, oom: bool = False, signal: int | None = None) -> str:
    """The reason users see for a container that stopped without LSL stopping it."""
    if oom:
        return "oom"
    if signal == 9:
        return "killed"
    if signal == 15:
        return "stopped"  # `docker stop` from outside: a polite stop, whoever asked
    if exit_code is None:
        return "stopped"
    return f"exited {exit_code}"


def _mark(env: Environment, status: str, reason: str, **fields: Any) -> None:
    previous = env.status
    with transaction.atomic():
        locked = Environment.objects.select_for_update().filter(pk=env.pk).first()
        if locked is None or locked.status != previous or _busy(locked):
            return  # changed meanwhile: whoever changed it had the fresher view
        now = timezone.now()
        extra: dict[str, Any] = {"stop_reason": reason} if status != Status.RUNNING else {"stop_reason": "", "started_at": now}
        if status != Status.RUNNING and previous == Status.RUNNING:
            extra["stopped_at"] = now
        services.set_status(env, status, **extra, **fields)
        if previous == Status.RUNNING and status != Status.RUNNING:
            transaction.on_commit(lambda: environment_stopped.send(
                sender=Environment, environment=env, reason="missing" if status == Status.MISSING else "stopped"))
    log.info("%s: %s → %s (%s)", env, previous, status, reason or "started")


@dataclass(frozen=True)
class Change:
    """What an engine event means for its environment's row."""

    action: str  # "die", "destroy" or "start"
    reason: str = ""


class EngineEventTracker:
    """Turns the engine's container events into row changes; remembers `oom`/`kill` for the `die` after them.

    `interpret` is pure (tests/test_engine_events_logic.py); `apply` also reads and writes the row.
    """

    def __init__(self) -> None:
        self.oom: dict[str, float] = {}
        self.signals: dict[str, tuple[int, float]] = {}

    def interpret(self, event: runtime.EngineEvent, now: float) -> Change | None:
        if event.action == "oom":
            self.oom[event.container_id] = now
            return None
        if event.action == "kill":
            if event.signal is not None:
                self.signals[event.container_id] = (event.signal, now)
            return None
        if event.action == "die":
            oom = now - self.oom.pop(event.container_id, -1e9) < MEMORY_SECONDS
            signal, at = self.signals.pop(event.container_id, (None, -1e9))
            return Change("die", stop_reason(event.exit_code, oom=oom, signal=signal if now - at < MEMORY_SECONDS else None))
        if event.action == "destroy":
            self.oom.pop(event.container_id, None)
            self.signals.pop(event.container_id, None)
            return Change("destroy", "removed")
        if event.action == "start":
            return Change("start")
        return None

    def apply(self, event: runtime.EngineEvent, node: Node | None = None) -> None:
        """`node`: the node whose event stream this came from (its environments only)."""
        change = self.interpret(event, time.monotonic())
        if change is None or not event.environment_id:
            return
        env = (Environment.objects.select_related("owner", "template", "team", "node")
               .filter(pk=event.environment_id).first())
        if env is None or _busy(env) or (node is not None and env.node_id != node.pk) or \
                (env.container_id and env.container_id != event.container_id):
            return
        if change.action == "start":
            if env.status in (Status.STOPPED, Status.ERROR, Status.MISSING):
                _mark(env, Status.RUNNING, "", container_id=event.container_id)
        elif change.action == "die":
            if env.status == Status.RUNNING:
                _mark(env, Status.STOPPED, change.reason)
        elif env.status in (Status.RUNNING, Status.STOPPED):
            _mark(env, Status.MISSING, change.reason)


def _status_for(state: runtime.ContainerState | None) -> str:
    if state is None:
        return Status.MISSING
    return Status.RUNNING if state.running else Status.STOPPED


def reconcile(node: Node | None = None, envs: list[Environment] | None = None) -> list[Environment]:
    """Make rows agree with the engine (one engine call per node). Returns the environments that changed.

    `node`: that node's environments only (its watcher reconnected, or it came back); otherwise every
    available node in turn, one that does not answer left for its own next turn (EngineError only
    when none answered). `envs`: just these (admin's action).

    `creating` rows belong to their provisioning worker; rows with an action in progress belong to
    that action; a failed setup or a container-less error stays an error until someone starts it.
    """
    if node is None:
        wanted = {env.node_id for env in envs} if envs is not None else None
        targets = [n for n in Node.objects.filter(available=True) if wanted is None or n.pk in wanted]
        changed: list[Environment] = []
        failures: list[runtime.EngineError] = []
        for target in targets:
            try:
                changed += reconcile(target, [e for e in envs if e.node_id == target.pk] if envs is not None else None)
            except runtime.EngineError as exc:
                log.info("reconcile of node %s: %s", target, exc)
                failures.append(exc)
        if failures and len(failures) == len(targets):
            raise failures[0]
        return changed
    states = nodes.engine_of_node(node).list_managed_containers()
    candidates = envs if envs is not None else list(
        Environment.objects.filter(node=node).exclude(status=Status.CREATING).select_related("owner", "template", "team", "node"))
    changed = []
    for env in candidates:
        if _busy(env) or (env.status == Status.ERROR and (not env.container_id or env.setup_status == SetupStatus.FAILED)):
            continue
        state = states.get(str(env.id))
        status = _status_for(state)
        if status == env.status:
            continue
        if status == Status.MISSING:
            reason = "removed"
        elif status == Status.STOPPED:
            reason = stop_reason(state.exit_code if state else None)
        else:
            reason = ""
        _mark(env, status, reason, **({"container_id": state.container_id} if state is not None else {}))
        changed.append(env)
    return changed
