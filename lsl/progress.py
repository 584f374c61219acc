"""Follow an environment from `creating` to `running`/`error` while the worker provisions it.

The worker reports `progress = {phase: queued|pulling|creating|user|setup|ready|failed, ...}` on
the environment, and every change reaches us as an `environment.changed` event on `/ws/events/`
(lsl.events). We draw a rich progress bar on stderr (stdout stays clean for `--json`); without a
terminal we print one line per phase (and per setup step) instead.

Only while the event stream is down do we poll, slowly (every POLL_INTERVAL seconds).
LSL_CLI_NO_POLL=1 (hidden, for tests) turns polling off entirely, so a test can prove that
events alone carry an environment to the end.
"""

from __future__ import annotations

import os
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
from lsl.errors import LslError, NotFound, ServerError, Unreachable
from lsl.events import EventStream, EventStreamUnavailable
from lsl.output import err

PHASE_TEXT = {
    "queued": "waiting for a worker",
    "pulling": "pulling image",
    "creating": "creating container",
    "user": "creating the environment user",
    "setup": "running setup",
    "ready": "ready",
    "failed": "failed",
}
FINAL = {"running", "error", "stopped", "missing"}
POLL_INTERVAL = 2.0  # the fallback only: events are the normal path
UNREACHABLE_GRACE = 60.0  # how long a fallback poll may keep failing before `lsl create` gives up


def polling_allowed() -> bool:
    """False with LSL_CLI_NO_POLL=1: follow events only (tests use it to prove they suffice)."""
    return os.environ.get("LSL_CLI_NO_POLL", "") in ("", "0")


def describe(env: dict[str, Any]) -> str:
    progress = env.get("progress") or {}
    phase = progress.get("phase") or env.get("status", "")
    text = PHASE_TEXT.get(phase, phase)
    if phase == "pulling" and (progress.get("image") or env.get("image")):
        text = f"pulling {progress.get('image') or env['image']}"
    elif phase == "setup" and progress.get("step"):
        command = str(progress.get("command") or "")
        command = command if len(command) <= 60 else command[:59] + "…"
        text = f"setup step {progress['step']}/{progress.get('of', '?')}: {command}".rstrip(": ")
    return f"{env.get('name', '')}: {text}"


def open_event_stream(client: Client, *, poll: bool) -> EventStream:
    """Subscribe before the change we want to follow is made, so no event of it can be missed.

    If the stream cannot be opened now, say so and return it anyway: the waiter polls slowly
    and the stream keeps trying to connect in the background of each wait. With polling off
    that is an error instead (there would be nothing to follow the environment with).
    """
    stream = EventStream(client)
    try:
        stream.open()
    except EventStreamUnavailable as exc:
        if not poll:
            stream.close()
            raise Unreachable(f"{exc.message}; polling is off (LSL_CLI_NO_POLL), so there is nothing to wait with") from None
        err.print(Text(f"note: {exc.message}; checking every {POLL_INTERVAL:g} s until it is back", style="dim"))
    return stream


def wait_for_environment(client: Client, env: dict[str, Any], timeout: float, *, stream: EventStream | None,
                         poll: bool = True) -> dict[str, Any]:
    """Follow `env` until it leaves `creating`; returns its final state (fetched once over REST).

    `env` must have been read *after* `stream` was opened (protocol order: subscribe, then
    fetch): `lsl create` opens the stream before its POST, so the POST's answer is that read and
    every later change is an event on the stream. (A GET here would add nothing, and could run
    ahead of the queued events and end the wait before their phases were shown.)

    Events for `env` replace what we know of it; a `resync` refetches it; while the stream is
    down (or None) we poll every POLL_INTERVAL seconds unless `poll` is False.
    """
    deadline = time.monotonic() + timeout
    env_id = env["id"]
    last_poll = time.monotonic()  # `env` is fresh: the first poll (if any) is due in POLL_INTERVAL
    unreachable_since: float | None = None
    with _Display() as display:
        display.update(env)
        while env.get("status") == "creating":
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LslError(f"{env.get('name')}: still {env.get('status')} after {timeout:.0f}s "
                               f"(it keeps going on the server; check with 'lsl info {env.get('name')}')")
            if stream is not None:
                was_connected = stream.connected
                message = stream.next(timeout=min(remaining, POLL_INTERVAL))
                if message is not None:
                    env = _apply(client, env, message)
                    display.update(env)
                if was_connected and not stream.connected:
                    display.note(f"lost the event stream ({stream.last_problem}); "
                                 + (f"checking every {POLL_INTERVAL:g} s until it is back" if poll else "reconnecting"))
                elif stream.connected and not was_connected:
                    display.note("event stream back")
                if stream.connected or not poll:
                    continue
            elif not poll:  # open_event_stream refuses this combination; keep the loop honest anyway
                raise Unreachable("no event stream and polling is off")
            # The fallback: the stream is down (or never opened), so ask now and then.
            wait = last_poll + POLL_INTERVAL - time.monotonic()
            if wait > 0 and stream is None:
                time.sleep(min(wait, max(deadline - time.monotonic(), 0)))
            if time.monotonic() - last_poll >= POLL_INTERVAL:
                last_poll = time.monotonic()
                try:
                    env = client.get(f"environments/{env_id}/")
                    unreachable_since = None
                except (Unreachable, ServerError) as exc:
                    # A server restart takes both the stream and REST away for a moment: keep
                    # waiting for a while, not for ever (the environment goes on either way).
                    if unreachable_since is None:
                        unreachable_since = last_poll
                        display.note(f"{exc.message}; retrying for up to {UNREACHABLE_GRACE:g} s")
                    elif last_poll - unreachable_since > UNREACHABLE_GRACE:
                        raise
                    continue
                display.update(env)
        # Events carry a summary (no image, container, role): the caller prints the full object.
        env = client.get(f"environments/{env_id}/")
        display.update(env)
    return env


def _apply(client: Client, env: dict[str, Any], message: dict[str, Any]) -> dict[str, Any]:
    """`env` after one frame of the event stream (other environments' events change nothing)."""
    kind = str(message.get("type", ""))
    if kind == "resync":
        return dict(client.get(f"environments/{env['id']}/"))
    summary = message.get("environment")
    if not kind.startswith("environment.") or not isinstance(summary, dict) or summary.get("id") != env["id"]:
        return env
    if kind == "environment.deleted":
        raise NotFound(f"{env.get('name')}: deleted while it was being created")
    # A summary replaces what it carries; fields only REST has (image, role...) are kept.
    return {**env, **summary}


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
            SpinnerColumn(), TextColumn("{task.description}", markup=False), BarColumn(), _Downloaded(),
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
        # "ready" is left to the caller's final line ("dev: running ..."), "failed" to its error line.
        if not self.live and text != self.last_line and progress.get("phase") not in ("ready", "failed"):
            self.console.print(text, markup=False, highlight=False)
        self.last_line = text

    def note(self, text: str) -> None:
        """A one-off remark (the event stream went away or came back), above the bar."""
        self.console.print(Text(f"note: {text}", style="dim"), highlight=False)
