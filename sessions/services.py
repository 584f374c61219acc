"""Every write to terminal sessions goes through here (Zulip style)."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.db.models import Q
from django.dispatch import receiver
from django.utils import timezone

from environments.models import Environment
from environments.signals import environment_stopped
from sessions.models import AuditEvent, AuditKind, EndReason, Participation, TerminalSession

log = logging.getLogger(__name__)

HUB_STALE_AFTER = timedelta(seconds=20)  # heartbeats come every 5 s
SESSION_PID_DIR = "/tmp"


def pidfile(session_id: Any) -> str:
    return f"{SESSION_PID_DIR}/.lsl-session-{session_id}.pid"


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
    return session


def record_event(session_id: Any, kind: str, user_id: int | None = None, **data: Any) -> None:
    AuditEvent.objects.create(session_id=session_id, user_id=user_id, kind=kind, data=data)


def join(session_id: Any, user: AbstractBaseUser, role: str, client_kind: str, remote_addr: str) -> Participation:
    with transaction.atomic():
        participation = Participation.objects.create(session_id=session_id, user=user, role=role,
                                                     client_kind=client_kind, remote_addr=remote_addr)
        record_event(session_id, AuditKind.JOIN, user.pk, role=role, client=client_kind, remote_addr=remote_addr)
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


def mark_ended(session_id: Any, reason: str, exit_code: int | None) -> bool:
    """Record the end once; returns False if it had already ended (the first reason wins)."""
    now = timezone.now()
    with transaction.atomic():
        updated = TerminalSession.objects.filter(pk=session_id, ended_at__isnull=True).update(
            ended_at=now, end_reason=reason, exit_code=exit_code, hub_channel="")
        if updated:
            Participation.objects.filter(session_id=session_id, left_at__isnull=True).update(left_at=now)
            record_event(session_id, AuditKind.END, None, reason=reason, exit_code=exit_code)
    return bool(updated)


def claim_hub(session_id: Any, channel: str) -> str:
    """Decide where a session's PTY lives. Returns "claimed", "remote" (another live process has it) or "lost"."""
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
    # The process holding the PTY died: the shell went with it.
    mark_ended(session_id, EndReason.SERVER_LOST, None)
    return "lost"


def heartbeat(session_id: Any, channel: str) -> None:
    TerminalSession.objects.filter(pk=session_id, hub_channel=channel).update(hub_seen_at=timezone.now())


def set_size(session_id: Any, cols: int, rows: int, user_id: int | None) -> None:
    with transaction.atomic():
        TerminalSession.objects.filter(pk=session_id).update(cols=cols, rows=rows)
        record_event(session_id, AuditKind.RESIZE, user_id, cols=cols, rows=rows)


def end_session(session: TerminalSession, reason: str = EndReason.ENDED) -> None:
    """Ask the PTY's owner to kill the shell; if no process owns it, just record the end."""
    session.refresh_from_db()
    if session.ended_at is not None:
        return
    if session.hub_channel and session.hub_seen_at and timezone.now() - session.hub_seen_at < HUB_STALE_AFTER:
        async_to_sync(get_channel_layer().send)(session.hub_channel, {"type": "hub.terminate", "reason": reason})
    else:
        mark_ended(session.pk, reason, None)


def live_sessions(env: Environment) -> Any:
    return TerminalSession.objects.filter(environment=env, ended_at__isnull=True)


@receiver(environment_stopped)
def _end_sessions_of_stopped_environment(sender: Any, environment: Environment, reason: str, **kwargs: Any) -> None:
    """Record the end first (so it carries this reason), then tell each PTY owner to hang up."""
    end_reason = EndReason.ENVIRONMENT_DELETED if reason == "deleted" else EndReason.ENVIRONMENT_STOPPED
    for session in TerminalSession.objects.filter(Q(environment_id=environment.pk), ended_at__isnull=True):
        hub_channel = session.hub_channel
        mark_ended(session.pk, end_reason, None)
        if hub_channel:
            try:
                async_to_sync(get_channel_layer().send)(hub_channel, {"type": "hub.terminate", "reason": end_reason})
            except Exception:  # a channel-layer hiccup must not fail the stop itself
                log.exception("could not notify the owner of session %s", session.pk)
