"""Tables every app writes to: the event outbox and the worker's periodic-job claims."""

from __future__ import annotations

from django.db import models
from django.utils import timezone


class Event(models.Model):
    """One change, written in the same transaction as the change itself (a transactional outbox).

    Every process tails this table (lsl_site.events.EventBus) and hands new rows to its own
    subscribers: event-stream websockets, terminal hubs and consumers. So the web process hears
    what the worker did (and the other way round) with nothing but the database, and a client
    that reconnects resumes after the last id it saw instead of missing what happened meanwhile.
    """

    id = models.BigAutoField(primary_key=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    kind = models.CharField(max_length=40)
    # Who may see it: viewers of `environment_id` when set, else the users in `user_ids`.
    environment_id = models.UUIDField(null=True, blank=True, db_index=True)
    session_id = models.UUIDField(null=True, blank=True)
    user_ids = models.JSONField(default=list, blank=True)
    payload = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return f"#{self.id} {self.kind}"


class PeriodicJob(models.Model):
    """A periodic job's next due time. A worker runs a job only after moving `due_at` forward with a
    conditional UPDATE, so with several workers each run happens once (healthchecks' claim)."""

    name = models.CharField(max_length=64, primary_key=True)
    due_at = models.DateTimeField(default=timezone.now)
    last_run_by = models.CharField(max_length=64, blank=True)
    last_run_at = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True)
    result = models.JSONField(default=dict, blank=True)  # what the last run found, for reads (e.g. engine figures)

    def __str__(self) -> str:
        return self.name
