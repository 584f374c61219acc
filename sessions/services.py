"""Every write to terminal sessions goes through here (Zulip style)."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.db.models import Q
from django.dispatch import receiver
from django.utils import timezone

from environments.models import Environment
from environments.signals import environment_stopped
from lsl_site import events
from sessions.models import AuditEvent, AuditKind, EndReason, Participation, TerminalSession

log = logging.getLogger(__name__)

# The PTY's owner renews its claim every 2 s (hub.HEARTBEAT); one silent for this long is gone: the
# worker's reaper ends its sessions (server_lost) and kills their shells.
HUB_STALE_AFTER = timedelta(seconds=6)
SESSION_PID_DIR = "/tmp"


def pidfile(session_id: Any) -> str:
    return f"{SESSION_PID_DIR}/.lsl-session-{session_id}.pid"


def kill_shell_command(session_id: Any) -> list[str]:
    """HUP the session's shell (its process group), then KILL it: Docker has no API to kill an exec."""
    script = ("p=$(cat {f} 2>/dev/null) && [ -n \"$p\" ] && kill -HUP -- \"$p\" 2>/dev/null; "
              "sleep 1; [ -n \"$p\" ] && kill -KILL -- \"$p\" 2>/dev/null; rm -f {f}").format(f=pidfile(session_id))
    return ["/bin/sh", "-c", script]


def session_command(session_id: Any, shell: str) -> list[str]:
    """Run the shell under a wrapper that records its pid: Docker cannot kill an exec, so LSL must."""
    return ["/bin/sh", "-c", f'echo $$ > {pidfile(session_id)}; exec "$0" "$@"', shell]


def open_session(env: Environment, user: AbstractBaseUser, *, name: str = "", cols: int = 80, rows: int = 24) -> TerminalSession:
    with transaction.atomic():
        session = TerminalSession.objects.create(
            environment=env, environment_name=env.name, name=name, creator=user, cols=cols, rows=rows,
            command=[env.template.shell or "/bin/sh"],
        )
        AuditEvent.objects.create(session=session, user=user, kind=AuditKind.OPEN, data={"cols": cols, "rows": rows})
        events.publish("session.opened", {"name": name, "creator": user.get_username(),
                                          "created_at": session.created_at.isoformat()},
                       environment_id=env.pk, session_id=session.pk)
    return session


def _publish_presence(session_id: Any) -> None:
    """Who is attached now, for dashboards (participants in the terminal hear it from the hub)."""
    row = TerminalSession.objects.filter(pk=session_id).values("environment_id").first()
    if row is None or row["environment_id"] is None:
        return
    attached = (Participation.objects.filter(session_id=session_id, left_at__isnull=True).select_related("user")
                .order_by("joined_at"))
    participants = [{"user": p.user.get_username(), "role": p.role, "client": p.client_kind} for p in attached]
    events.publish("session.presence", {"participants": participants}, environment_id=row["environment_id"],
                   session_id=session_id)


def record_event(session_id: Any, kind: str, user_id: int | None = None, **data: Any) -> None:
    AuditEvent.objects.create(session_id=session_id, user_id=user_id, kind=kind, data=data)


def join(session_id: Any, user: AbstractBaseUser, role: str, client_kind: str, remote_addr: str) -> Participation:
    with transaction.atomic():
        participation = Participation.objects.create(session_id=session_id, user=user, role=role,
                                                     client_kind=client_kind, remote_addr=remote_addr)
        record_event(session_id, AuditKind.JOIN, user.pk, role=role, client=client_kind, remote_addr=remote_addr)
        _publish_presence(session_id)
    return participation


def leave(participation_id: int) -> None:
    """Mark a participation left, once. The row can vanish meanwhile (its user or session was
    deleted while the client was still attached): then there is nothing left to record."""
    row = (Participation.objects.filter(pk=participation_id, left_at__isnull=True)
           .values("session_id", "user_id", "client_kind").first())
    if row is None:
        return
    with transaction.atomic():
        if Participation.objects.filter(pk=participation_id, left_at__isnull=True).update(left_at=timezone.now()):
            record_event(row["session_id"], AuditKind.LEAVE, row["user_id"], client=row["client_kind"])
            _publish_presence(row["session_id"])


def mark_ended(session_id: Any, reason: str, exit_code: int | None) -> bool:
    """Record the end once; returns False if it had already ended (the first reason wins).

    The `session.ended` event it publishes is also how the process owning the PTY, wherever it
    is, learns that it must hang up (Hub subscribes to it).
    """
    now = timezone.now()
    with transaction.atomic():
        updated = TerminalSession.objects.filter(pk=session_id, ended_at__isnull=True).update(
            ended_at=now, end_reason=reason, exit_code=exit_code, hub_channel="")
        if updated:
            Participation.objects.filter(session_id=session_id, left_at__isnull=True).update(left_at=now)
            record_event(session_id, AuditKind.END, None, reason=reason, exit_code=exit_code)
            env_id = TerminalSession.objects.filter(pk=session_id).values_list("environment_id", flat=True).first()
            events.publish("session.ended", {"reason": reason, "exit_code": exit_code}, environment_id=env_id,
                           session_id=session_id)
    return bool(updated)


def claim_hub(session_id: Any, channel: str) -> str:
    """Decide where a session's PTY lives. Returns "claimed", "remote" (another live process has it),
    "ended", or "lost" (its owner died: the session is now ended with server_lost)."""
    now = timezone.now()
    with transaction.atomic():
        session = TerminalSession.objects.select_for_update().get(pk=session_id)
        if session.ended_at is not None:
            return "ended"
        if not session.hub_channel:
            session.hub_channel, session.hub_seen_at = channel, now
            session.save(update_fields=["hub_channel", "hub_seen_at"])
            return "claimed"
        if session.hub_seen_at and now - session.hub_seen_at < HUB_STALE_AFTER:
            return "remote"
    end_lost_session(session_id)
    return "lost"


def heartbeat(session_id: Any, channel: str) -> bool:
    """Renew the owner's claim. False: someone declared this owner lost (a fence): stop serving at once."""
    return bool(TerminalSession.objects.filter(pk=session_id, hub_channel=channel, ended_at__isnull=True)
                .update(hub_seen_at=timezone.now()))


def end_lost_session(session_id: Any) -> bool:
    """The process owning the PTY is gone: end the session (server_lost; its participants hear it
    through `session.ended`) and kill the shell it left running in the container."""
    from environments import runtime

    container_id = (TerminalSession.objects.filter(pk=session_id)
                    .values_list("environment__container_id", flat=True).first())
    if not mark_ended(session_id, EndReason.SERVER_LOST, None):
        return False
    if container_id:
        try:
            runtime.exec_run(container_id, kill_shell_command(session_id))
        except runtime.EngineError as exc:
            log.info("session %s: could not kill the orphaned shell: %s", session_id, exc)
    log.info("session %s: its owner stopped renewing; ended as server_lost", session_id)
    return True


def reap_lost_sessions() -> list[str]:
    """The worker's periodic job: end every live session whose owner stopped heart-beating."""
    stale = TerminalSession.objects.filter(ended_at__isnull=True).exclude(hub_channel="").filter(
        hub_seen_at__lt=timezone.now() - HUB_STALE_AFTER)
    return [str(session_id) for session_id in stale.values_list("pk", flat=True) if end_lost_session(session_id)]


def set_size(session_id: Any, cols: int, rows: int, user_id: int | None) -> None:
    with transaction.atomic():
        TerminalSession.objects.filter(pk=session_id).update(cols=cols, rows=rows)
        record_event(session_id, AuditKind.RESIZE, user_id, cols=cols, rows=rows)


def end_session(session: TerminalSession, reason: str = EndReason.ENDED) -> None:
    """Record the end; the PTY's owner (any process) hears `session.ended` and kills the shell."""
    mark_ended(session.pk, reason, None)
    session.refresh_from_db()


class SessionActivity:
    """Tells idle stop (environments.activity) about terminal sessions."""

    def attached(self, env: Environment) -> bool:
        return Participation.objects.filter(session__environment=env, session__ended_at__isnull=True,
                                            left_at__isnull=True).exists()

    def last_left(self, env: Environment) -> Any:
        from django.db.models import Max

        return Participation.objects.filter(session__environment=env).aggregate(left=Max("left_at"))["left"]


def live_sessions(env: Environment) -> Any:
    return TerminalSession.objects.filter(environment=env, ended_at__isnull=True)


@receiver(environment_stopped)
def _end_sessions_of_stopped_environment(sender: Any, environment: Environment, reason: str, **kwargs: Any) -> None:
    """Record each end with this reason; their PTY owners hear `session.ended` and hang up."""
    end_reason = EndReason.ENVIRONMENT_DELETED if reason == "deleted" else EndReason.ENVIRONMENT_STOPPED
    for session_id in TerminalSession.objects.filter(Q(environment_id=environment.pk), ended_at__isnull=True).values_list("pk", flat=True):
        mark_ended(session_id, end_reason, None)
