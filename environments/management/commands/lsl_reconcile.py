from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError

from environments import reconcile, runtime


class Command(BaseCommand):
    help = "Make every environment's status agree with the Docker engine."

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            changed = reconcile.reconcile()
        except runtime.EngineUnavailableError as exc:
            raise CommandError(str(exc)) from None
        for env in changed:
            self.stdout.write(f"{env.owner.username}/{env.name}: now {env.status}")
        self.stdout.write(f"reconciled: {len(changed)} changed")
