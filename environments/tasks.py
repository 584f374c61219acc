"""Background tasks (django-tasks; run by `manage.py lsl_worker`, never by a web process).

Tasks are queued on commit, so a worker never sees a row that might still roll back. A task is
only a nudge: the state lives on the row (see provisioning.claim), so a task lost with a dead
worker is made up for by the worker's periodic `resume_stalled` job, and a duplicate is harmless.
"""

from __future__ import annotations

from django_tasks import task

# Set by the worker at start-up: the name under which it takes provisioning leases.
WORKER_ID = "unset"


@task()
def provision_environment(env_id: str) -> None:
    from environments import provisioning

    provisioning.provision(env_id, WORKER_ID)


def enqueue_provisioning(env_id: object) -> None:
    from lsl_site import wake

    provision_environment.enqueue(str(env_id))
    wake.notify("tasks")  # a worker claims it now instead of at its next poll
