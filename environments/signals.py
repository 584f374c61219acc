"""Signals other apps listen to; environments never imports them (dependencies point one way)."""

from django.dispatch import Signal

# Sent when an environment's container is about to stop, restart or be deleted (before
# the engine call, so listeners can record why), or was found stopped/missing by the worker.
# kwargs: environment (Environment), reason (str: "stopped", "deleted", "missing", "restarted")
environment_stopped = Signal()
