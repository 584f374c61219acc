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

# The terminal's owner renews its claim every 2 s (hub.HEARTBEAT); one silent for this long is gone:
# the next process a participant reaches takes the session over, and the worker's reaper hands it
# back meanwhile. The shell itself lives in the environment's keeper and is not affected.
HUB_STALE_AFTER = timedelta(seconds=6)


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


PRESENCE_LISTED = 50


def _listed(session_id: Any, joined_at: Any) -> bool:
    """Whether a participant who joined at `joined_at` is (or was, until it left) among the first
    PRESENCE_LISTED attached, the ones a presence event lists: the arrivals and departures of the
    rest change nothing a dashboard shows."""
    earlier = Participation.objects.filter(session_id=session_id, left_at__isnull=True, joined_at__lt=joined_at)
    return earlier.count() < PRESENCE_LISTED


def _publish_presence(session_id: Any) -> None:
    """Who is attached now, for dashboards (participants in the terminal hear it from the hub): the
    first PRESENCE_LISTED by arrival, so that a join storm of hundreds costs O(1) per join."""
    row = TerminalSession.objects.filter(pk=session_id).values("environment_id").first()
    if row is None or row["environment_id"] is None:
        return
    attached = (Participation.objects.filter(session_id=session_id, left_at__isnull=True).select_related("user")
                .order_by("joined_at")[:PRESENCE_LISTED])
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
        if _listed(session_id, participation.joined_at):
            _publish_presence(session_id)
    return participation


def leave(participation_id: int) -> None:
    """Mark a participation left, once. The row can vanish meanwhile (its user or session was
    deleted while the client was still attached): then there is nothing left to record."""
    row = (Participation.objects.filter(pk=participation_id, left_at__isnull=True)
           .values("session_id", "user_id", "client_kind", "joined_at").first())
    if row is None:
        return
    with transaction.atomic():
        if Participation.objects.filter(pk=participation_id, left_at__isnull=True).update(left_at=timezone.now()):
            record_event(row["session_id"], AuditKind.LEAVE, row["user_id"], client=row["client_kind"])
            if _listed(row["session_id"], row["joined_at"]):
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
    """Decide which process serves a session's terminal. Returns
    "claimed"     this process is the first owner: it starts the shell;
    "taken_over"  the shell exists (in the keeper) and its owner is gone or handed it back: this
                  process attaches to it;
    "remote"      a live process owns it; or "ended".
    A compare-and-set on (hub_channel, hub_seen_at), so two processes never both win."""
    for _ in range(3):
        now = timezone.now()
        row = TerminalSession.objects.filter(pk=session_id).values("ended_at", "hub_channel", "hub_seen_at").first()
        if row is None or row["ended_at"] is not None:
            return "ended"
        if row["hub_channel"] and row["hub_seen_at"] and now - row["hub_seen_at"] < HUB_STALE_AFTER:
            return "remote"
        with transaction.atomic():
            won = TerminalSession.objects.filter(pk=session_id, ended_at__isnull=True, hub_channel=row["hub_channel"],
                                                 hub_seen_at=row["hub_seen_at"]).update(hub_channel=channel, hub_seen_at=now)
            if not won:
                continue  # someone else changed it meanwhile: look again
            if row["hub_seen_at"] is None:
                return "claimed"
            # Whoever was attached through the old owner went with it; they come back as new participants.
            _leave_all(session_id, now)
        log.info("session %s: taken over by %s", session_id, channel)
        return "taken_over"
    return "remote"


def _leave_all(session_id: Any, now: Any) -> None:
    if Participation.objects.filter(session_id=session_id, left_at__isnull=True).update(left_at=now):
        _publish_presence(session_id)


def heartbeat(session_id: Any, channel: str) -> bool:
    """Renew the owner's claim. False: another process owns it now, or it ended (a fence): stop serving at once."""
    return bool(TerminalSession.objects.filter(pk=session_id, hub_channel=channel, ended_at__isnull=True)
                .update(hub_seen_at=timezone.now()))


def release_hub(session_id: Any, channel: str) -> None:
    """An owner shutting down hands the session back; the next process a participant reaches takes
    it over at once instead of waiting for the claim to go stale."""
    with transaction.atomic():
        if TerminalSession.objects.filter(pk=session_id, hub_channel=channel, ended_at__isnull=True).update(hub_channel=""):
            _leave_all(session_id, timezone.now())
            # Participants attached through other processes hear this and follow the session.
            env_id = TerminalSession.objects.filter(pk=session_id).values_list("environment_id", flat=True).first()
            events.publish("session.detached", {}, environment_id=env_id, session_id=session_id)


def rejoin(participation_id: int) -> None:
    """A participant that followed its session to a new owner is attached again."""
    row = Participation.objects.filter(pk=participation_id).values("session_id").first()
    if row is not None and Participation.objects.filter(pk=participation_id).exclude(left_at=None).update(left_at=None):
        _publish_presence(row["session_id"])


def end_lost_session(session_id: Any, reason: str = EndReason.SERVER_LOST) -> bool:
    """Nobody serves the session any more and nobody came back for it: end it (its participants hear it
    through `session.ended`) and kill the shell the keeper holds for it."""
    from environments import keeper, nodes, runtime

    row = (TerminalSession.objects.filter(pk=session_id)
           .values("environment_id", "environment__container_id").first())
    if row is None or not mark_ended(session_id, reason, None):
        return False
    if row["environment__container_id"]:
        try:
            engine = nodes.engine_for_environment_id(row["environment_id"])
            keeper.kill_session(engine, row["environment__container_id"], row["environment_id"], str(session_id))
        except runtime.EngineError as exc:
            log.info("session %s: could not kill the orphaned shell: %s", session_id, exc)
    log.info("session %s: nobody served it; ended as %s", session_id, reason)
    return True


def reap_lost_sessions() -> list[str]:
    """The worker's periodic job, for sessions nobody serves:
    * an owner that stopped heart-beating is gone: its claim is released (its participants marked
      left), so the next process a participant reaches takes over at once;
    * a shell that exited meanwhile ends its session with its exit code (the keeper remembers it);
    * a session nobody came back to within LSL_SESSION_REATTACH_GRACE is ended as server_lost and
      its shell killed: no session stays live with nobody serving it.
    Returns the ids of the sessions it ended."""
    from django.conf import settings

    from environments import keeper, nodes, runtime

    now = timezone.now()
    live = TerminalSession.objects.filter(ended_at__isnull=True)
    for row in live.exclude(hub_channel="").filter(hub_seen_at__lt=now - HUB_STALE_AFTER).values("pk", "hub_channel"):
        release_hub(row["pk"], row["hub_channel"])
        log.info("session %s: its owner stopped renewing; released for takeover", row["pk"])
    ended: list[str] = []
    grace = timedelta(seconds=settings.LSL_SESSION_REATTACH_GRACE)
    unserved = live.filter(hub_channel="").exclude(hub_seen_at=None).values(
        "pk", "hub_seen_at", "environment_id", "environment__container_id", "environment__node__available")
    kept: dict[Any, dict[str, keeper.KeptSession] | None] = {}
    for row in unserved:
        session_id, container_id = str(row["pk"]), row["environment__container_id"]
        if row["environment__node__available"] is False:
            # Its node does not answer: nobody can serve it, and nothing can be asked of its keeper.
            if row["hub_seen_at"] < now - grace and mark_ended(session_id, EndReason.NODE_UNAVAILABLE, None):
                ended.append(session_id)
            continue
        if container_id and row["environment_id"] not in kept:
            try:
                engine = nodes.engine_for_environment_id(row["environment_id"])
                kept[row["environment_id"]] = keeper.list_sessions(engine, container_id, row["environment_id"])
            except runtime.EngineError:
                kept[row["environment_id"]] = None  # stopped or gone: reconcile ends its sessions
        shell = (kept.get(row["environment_id"]) or {}).get(session_id)
        if shell is not None and not shell.alive:
            if mark_ended(session_id, EndReason.EXITED, shell.exit_code):
                keeper.forget_session(nodes.engine_for_environment_id(row["environment_id"]), container_id,
                                      row["environment_id"], session_id)
                ended.append(session_id)
        elif shell is None and kept.get(row["environment_id"]) is not None:
            ended += [session_id] if end_lost_session(session_id) else []  # the keeper has no such shell
        elif row["hub_seen_at"] < now - grace and end_lost_session(session_id):
            ended.append(session_id)
    return ended


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
