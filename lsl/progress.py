"""Follow an environment from `creating` to `running`/`error` while the server pulls its image.

The server reports `progress = {phase: queued|pulling|creating|ready|failed, current, total, ...}`
on the environment; we poll it and draw a rich progress bar on stderr (stdout stays
clean for `--json`). Without a terminal we print one line per phase instead.
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console, RenderableType
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    SpinnerColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.text import Text

from lsl.client import Client
from lsl.errors import LslError
from lsl.output import err

PHASE_TEXT = {
    "queued": "waiting for a worker",
    "pulling": "pulling image",
    "creating": "creating container",
    "ready": "ready",
    "failed": "failed",
}
FINAL = {"running", "error", "stopped", "missing"}


def describe(env: dict[str, Any]) -> str:
    progress = env.get("progress") or {}
    phase = progress.get("phase") or env.get("status", "")
    text = PHASE_TEXT.get(phase, phase)
    if phase == "pulling" and env.get("image"):
        text = f"pulling {env['image']}"
    return f"{env.get('name', '')}: {text}"


def wait_for_environment(client: Client, env: dict[str, Any], timeout: float, interval: float = 0.5) -> dict[str, Any]:
    """Poll until the environment leaves `creating`; returns the last state seen."""
    deadline = time.monotonic() + timeout
    with _Display() as display:
        while env.get("status") == "creating":
            display.update(env)
            if time.monotonic() > deadline:
                raise LslError(f"{env.get('name')}: still {env.get('status')} after {timeout:.0f}s "
                               f"(it keeps going on the server; check with 'lsl info {env.get('name')}')")
            time.sleep(interval)
            env = client.get(f"environments/{env['id']}/")
        display.update(env)
    return env


class _PullOnly:
    """Byte counters mean something only while pulling: blank otherwise (no '0/? bytes' noise)."""

    def render(self, task: Task) -> RenderableType:
        return Text("") if task.total is None else super().render(task)  # type: ignore[misc]


class _Downloaded(_PullOnly, DownloadColumn):
    pass


class _Speed(_PullOnly, TransferSpeedColumn):
    pass


class _Display:
    """A rich bar on a terminal, one line per phase change otherwise."""

    def __init__(self, console: Console = err) -> None:
        self.console = console
        self.live = console.is_terminal
        self.progress = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), _Downloaded(),
            _Speed(), TimeElapsedColumn(), console=console, transient=True, disable=not self.live,
        )
        self.task = self.progress.add_task("queued", total=None)
        self.last_line = ""

    def __enter__(self) -> _Display:
        self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()

    def update(self, env: dict[str, Any]) -> None:
        text = describe(env)
        progress = env.get("progress") or {}
        total, current = progress.get("total"), progress.get("current")
        if progress.get("phase") == "pulling" and isinstance(total, (int, float)) and total > 0:
            self.progress.update(self.task, description=text, total=total, completed=current or 0)
        else:
            self.progress.update(self.task, description=text, total=None)
        # "ready" is left to the caller's final line ("dev: running ...").
        if not self.live and text != self.last_line and progress.get("phase") != "ready":
            self.console.print(text)
        self.last_line = text
