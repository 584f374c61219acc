from __future__ import annotations

import os
import secrets
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Make sure an admin account exists; print how to log in (password saved to var/admin-password)."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--url", default="http://127.0.0.1:8000/", help="where the server will be (for the message)")

    def handle(self, *args: Any, **options: Any) -> None:
        User = get_user_model()
        url = options["url"]
        username = os.environ.get("LSL_ADMIN_USERNAME", "admin")
        password_file = settings.VAR_DIR / "admin-password"
        if User.objects.filter(username=username).exists():
            hint = f"password in {password_file}" if password_file.exists() else "password unchanged"
            self.stdout.write(f"Admin account: {username} ({hint}). Log in at {url}")
            return
        password = os.environ.get("LSL_ADMIN_PASSWORD") or secrets.token_urlsafe(12)
        User.objects.create_superuser(username=username, email="", password=password)
        password_file.write_text(password + "\n")
        password_file.chmod(0o600)
        self.stdout.write(f"Created admin account {username!r} with password {password!r} "
                          f"(also saved to {password_file}). Log in at {url}")
