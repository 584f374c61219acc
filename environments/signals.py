"""Signals other apps listen to; environments never imports them (dependencies point one way)."""

from django.dispatch import Signal

# Sent after an environment's container stopped, went missing, or was deleted.
# kwargs: environment (Environment), reason (str: "stopped", "deleted", "missing", "restarted")
environment_stopped = Signal()

# Sent after any subject lost access to an environment. kwargs: environment
access_revoked = Signal()

# Sent when an environment's status or progress changed. kwargs: environment
environment_changed = Signal()
