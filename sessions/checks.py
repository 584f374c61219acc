"""System check: the terminal emulator sessions need (node >= 18 and the built bundle) is there.

Without it every snapshot (late joiners, resyncs) fails with EmulatorUnavailable, so say it at
start-up, once, rather than at the first join. Cheap: one `node --version`.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, register

MIN_NODE_MAJOR = 18
HINT = "Install Node.js >= 18 (or point LSL_NODE at it), then run `make assets`."


@register()
def emulator_check(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    errors: list[CheckMessage] = []
    node = settings.LSL_NODE
    path = shutil.which(node)
    if path is None:
        errors.append(Error(f"node ({node!r}, setting LSL_NODE) was not found: terminal snapshots need it.",
                            hint=HINT, id="sessions.E001"))
    else:
        try:
            version = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10,
                                     check=False).stdout.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            version = f"unknown ({exc})"
        match = re.match(r"v?(\d+)\.", version)
        if match is None or int(match.group(1)) < MIN_NODE_MAJOR:
            errors.append(Error(f"node at {path} is version {version or 'unknown'}; terminal snapshots need "
                                f">= {MIN_NODE_MAJOR}.", hint=HINT, id="sessions.E001"))
    bundle = Path(settings.LSL_EMULATOR_BUNDLE)
    if not bundle.is_file():
        errors.append(Error(f"the terminal emulator bundle {bundle} (setting LSL_EMULATOR_BUNDLE) is missing.",
                            hint="run `make assets`", id="sessions.E001"))
    return errors
