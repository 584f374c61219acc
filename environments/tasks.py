"""Background tasks (django-tasks; run by `manage.py lsl_worker`, never by a web process).

A task is queued in the caller's transaction when there is one (create_environment queues it in
the transaction that inserts the row): it commits with the change or not at all, so a worker never
sees a task whose row might still roll back, and one commit does for both. Workers are woken once
it is committed. A task is only a nudge: the state lives on the row (see provisioning.claim), so
a task lost with a dead worker is made up for by the worker's periodic `resume_stalled` job, and a
duplicate is harmless.
"""

from __future__ import annotations

from django.db import transaction
from django_tasks import task

# Set by the worker at start-up: the name under which it takes provisioning leases.
WORKER_ID = "unset"


@task()
def provision_environment(env_id: str) -> None:
    from environments import provisioning

    provisioning.provision(env_id, WORKER_ID)


def wake_workers() -> None:
    from lsl_site import wake

    wake.notify("tasks")


def enqueue_provisioning(env_id: object) -> None:
    """Queue provisioning of `env_id`: in the current transaction if there is one (workers are woken
    when it commits), else at once."""
    provision_environment.enqueue(str(env_id))
    # A worker claims it now instead of at its next poll. Outside a transaction this runs at once.
    transaction.on_commit(wake_workers)
