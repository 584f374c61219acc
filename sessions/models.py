"""Shared terminal sessions: one PTY per session, many participants, an audit trail."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models
from django.utils import timezone

from environments.models import Environment


class EndReason(models.TextChoices):
    EXITED = "exited", "The shell exited"
    ENDED = "ended", "Ended by a user"
    IDLE = "idle", "Idle timeout"
    ENVIRONMENT_STOPPED = "environment_stopped", "Environment stopped"
    ENVIRONMENT_DELETED = "environment_deleted", "Environment deleted"
    SERVER_LOST = "server_lost", "The server process holding the terminal went away"
    SERVER_ERROR = "server_error", "The terminal could not be started"
    NODE_UNAVAILABLE = "node_unavailable", "The node the environment lives on stopped answering"


class TerminalSession(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    # SET_NULL: deleting an environment must not delete the sessions' audit trail and recordings.
    environment = models.ForeignKey(Environment, null=True, on_delete=models.SET_NULL, related_name="terminal_sessions")
    environment_name = models.CharField(max_length=63)
    name = models.CharField(max_length=100, blank=True)
    command = models.JSONField(default=list)
    creator = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="terminal_sessions")
    created_at = models.DateTimeField(default=timezone.now)
    ended_at = models.DateTimeField(null=True, blank=True)
    end_reason = models.CharField(max_length=32, choices=EndReason.choices, blank=True)
    exit_code = models.IntegerField(null=True, blank=True)
    cols = models.PositiveSmallIntegerField(default=80)
    rows = models.PositiveSmallIntegerField(default=24)
    # The channel-layer name of the process task that owns the PTY, and its last heartbeat.
    hub_channel = models.CharField(max_length=200, blank=True)
    hub_seen_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["environment", "ended_at"])]

    def __str__(self) -> str:
        return f"{self.environment_name}/{self.name or self.id.hex[:8]}"

    @property
    def live(self) -> bool:
        return self.ended_at is None

    @property
    def detached(self) -> bool:
        """Live, once served, and served by nobody now (docs/protocol.md: who owns a session)."""
        return self.ended_at is None and not self.hub_channel and self.hub_seen_at is not None


class ClientKind(models.TextChoices):
    WEB = "web", "Browser"
    CLI = "cli", "CLI"
    OTHER = "other", "Other"


class Participation(models.Model):
    session = models.ForeignKey(TerminalSession, on_delete=models.CASCADE, related_name="participations")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="participations")
    role = models.CharField(max_length=10)
    client_kind = models.CharField(max_length=10, choices=ClientKind.choices, default=ClientKind.OTHER)
    remote_addr = models.CharField(max_length=100, blank=True)
    joined_at = models.DateTimeField(default=timezone.now)
    left_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["joined_at"]

    def __str__(self) -> str:
        return f"{self.user} ({self.role}, {self.client_kind})"


class AuditKind(models.TextChoices):
    OPEN = "open", "Opened"
    JOIN = "join", "Joined"
    LEAVE = "leave", "Left"
    RESIZE = "resize", "Resized"
    ROLE_DENIED = "role_denied", "Input denied (read-only)"
    INPUT = "input", "Typed"
    END = "end", "Ended"


class AuditEvent(models.Model):
    session = models.ForeignKey(TerminalSession, on_delete=models.CASCADE, related_name="audit_events")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    kind = models.CharField(max_length=20, choices=AuditKind.choices)
    data = models.JSONField(default=dict, blank=True)
    at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["at", "id"]

    def __str__(self) -> str:
        return f"{self.at:%H:%M:%S} {self.kind} {self.user or ''}"
