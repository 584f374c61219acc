"""`manage.py lsl_apply FILE [--dry-run] [--prune]`: apply a template catalog file."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from environments.catalog import apply_catalog


class Command(BaseCommand):
    help = "Create or update templates from a catalog YAML file. A file with any problem changes nothing."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "file", nargs="?", default=settings.LSL_CATALOG, help="catalog file (default: LSL_CATALOG, %(default)s)"
        )
        parser.add_argument("--dry-run", action="store_true", help="report what would change, change nothing")
        parser.add_argument("--prune", action="store_true", help="delete catalog-managed templates the file omits")

    def handle(self, *args: Any, file: str, dry_run: bool, prune: bool, verbosity: int, **options: Any) -> None:
        try:
            result = apply_catalog(file, dry_run=dry_run, prune=prune)
        except OSError as exc:
            raise CommandError(f"cannot read {file}: {exc.strerror or exc}") from None
        if result.problems:
            for problem in result.problems:
                self.stderr.write(str(problem))
            count = len(result.problems)
            raise CommandError(f"{count} problem{'s' * (count != 1)} in {file}; nothing was changed")
        if verbosity >= 2:
            for outcome in ("created", "updated", "unchanged", "pruned"):
                for slug in getattr(result, outcome):
                    self.stdout.write(f"{outcome} {slug}")
        self.stdout.write(("(dry run) " if dry_run else "") + result.summary())
