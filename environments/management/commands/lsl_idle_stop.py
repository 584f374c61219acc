"""`manage.py lsl_idle_stop [--after SECONDS]`: stop environments idle for too long (one pass)."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from environments import runtime, services


class Command(BaseCommand):
    help = ("Stop (never delete) running environments with no attached terminal session and no running command "
            "for LSL_IDLE_STOP_AFTER seconds.")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--after", type=float, default=None,
                            help=f"idle seconds (default LSL_IDLE_STOP_AFTER, now {settings.LSL_IDLE_STOP_AFTER:g}; 0 = off)")

    def handle(self, *args: Any, after: float | None, **options: Any) -> None:
        idle_after = settings.LSL_IDLE_STOP_AFTER if after is None else after
        if idle_after <= 0:
            self.stdout.write("idle stop is off (LSL_IDLE_STOP_AFTER=0); nothing to do")
            return
        try:
            stopped = services.stop_idle_environments(idle_after=idle_after)
        except runtime.EngineUnavailableError as exc:
            raise CommandError(str(exc)) from None
        for env in stopped:
            self.stdout.write(f"{env.owner.username}/{env.name}: stopped (idle)")
        self.stdout.write(f"idle stop: {len(stopped)} stopped")
