"""`lsl list --watch`: the environment list kept current from the event stream (`/ws/events/`).

Protocol order (docs/protocol.md §3): subscribe, then fetch the list over REST, then apply
events (each carries the environment's full summary, so applying one twice is harmless). On
`resync` the list is fetched again. While the stream is down we poll every POLL_INTERVAL
seconds and turn the differences into the same kind of records, so the output never goes quiet.

Three ways to show it:
- a terminal: the table, redrawn in place (rich Live) as events arrive;
- stdout not a terminal: the table once, then one line per change (`HH:MM:SS NAME WHAT`);
- `--json`: NDJSON for scripts, one object per line: first `{"type": "snapshot",
  "environments": [...]}` (REST objects), then the server's `environment.*` frames as they
  come (another snapshot after a resync). Frames made up from a poll have `"id": null`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from rich.console import Group, RenderableType
from rich.live import Live
from rich.text import Text

from lsl.client import Client
from lsl.errors import LslError, ServerError, Unreachable
from lsl.events import EventStream, EventStreamUnavailable
from lsl.output import Column, build_table, err, out, print_json_line, print_stripped
from lsl.progress import POLL_INTERVAL

Env = dict[str, Any]
# What a poll compares to decide that an environment changed (`updated_at` alone is no change).
COMPARED = ("name", "team", "status", "stop_reason", "last_error", "progress", "setup_status")


@dataclass(frozen=True)
class Filters:
    """`lsl list`'s filters, applied by the server to the first fetch and by us to every event."""

    status: str | None = None
    team: str | None = None
    owner: str | None = None
    template: str | None = None

    def params(self, *, with_status: bool = True) -> dict[str, str | None]:
        return {"status": self.status if with_status else None, "team": self.team, "owner": self.owner,
                "template": self.template}

    def matches(self, env: Env) -> bool:
        wanted = {"status": self.status, "team": self.team, "owner": self.owner, "template": self.template}
        return all(value is None or env.get(key) == value for key, value in wanted.items())


def status_text(env: Env, *, detail: bool = True) -> str:
    """`running`, `stopped (killed)`, `missing (removed)`, `creating (pulling 40%)`...

    `detail=False` leaves out figures that change every moment (pull percentages), for the
    one-line-per-change output.
    """
    status = str(env.get("status") or "-")
    reason = env.get("stop_reason")
    if status in ("stopped", "missing") and reason:
        return f"{status} ({reason})"
    if status == "creating":
        progress = env.get("progress") or {}
        phase = progress.get("phase")
        if phase == "pulling" and detail and progress.get("total"):
            return f"creating (pulling {100 * (progress.get('current') or 0) // progress['total']}%)"
        if phase == "setup" and progress.get("step"):
            return f"creating (setup {progress['step']}/{progress.get('of', '?')})"
        if phase:
            return f"creating ({phase})"
    return status


class Watcher:
    """Keeps `rows` (id → environment) current and shows each change in the chosen form."""

    def __init__(self, client: Client, filters: Filters, columns: Sequence[Column], *, as_json: bool,
                 poll: bool) -> None:
        self.client = client
        self.filters = filters
        self.columns = columns
        self.poll = poll
        self.rows: dict[str, Env] = {}
        # json: NDJSON records; live: a table redrawn in place; lines: the table, then a line per change.
        self.mode = "json" if as_json else ("live" if out.is_terminal else "lines")
        self.live: Live | None = None
        self.stream: EventStream | None = None  # set by run()
        self.last_poll = float("-inf")
        self.unreachable = False  # the last fallback poll failed (noted once per outage)

    # --- running ---------------------------------------------------------------------------

    def run(self) -> None:
        """Until Ctrl-C (KeyboardInterrupt, which the caller turns into exit 0)."""
        self.stream = self._open_stream()
        try:
            self._reset(self._fetch(), reason=None)  # after subscribing: nothing falls in between
            if self.mode == "live":
                with Live(self._render(), console=out, auto_refresh=False, transient=False) as live:
                    self.live = live
                    self._loop()
            else:
                self._loop()
        finally:
            self.live = None
            if self.stream is not None:
                self.stream.close()

    def _open_stream(self) -> EventStream:
        """Subscribe first (protocol order). A stream that cannot open now keeps retrying in `next`."""
        stream = EventStream(self.client)
        try:
            stream.open()
        except EventStreamUnavailable as exc:
            if not self.poll:
                stream.close()
                raise Unreachable(f"{exc.message}; polling is off (LSL_CLI_NO_POLL)") from None
            self._note(f"{exc.message}; checking every {POLL_INTERVAL:g} s until it is back")
        return stream

    def _loop(self) -> None:
        stream = self.stream
        assert stream is not None
        while True:
            was_connected = stream.connected
            message = stream.next(timeout=POLL_INTERVAL)  # while down: retries the handshake with backoff
            if message is not None:
                self._handle(message)
            if was_connected != stream.connected:
                self._note("event stream back" if stream.connected else
                           f"lost the event stream ({stream.last_problem}); "
                           + (f"checking every {POLL_INTERVAL:g} s until it is back" if self.poll else "reconnecting"))
                self._redraw()
            if not stream.connected and self.poll and time.monotonic() - self.last_poll >= POLL_INTERVAL:
                self._poll()

    # --- state -----------------------------------------------------------------------------

    def _fetch(self) -> list[Env]:
        self.last_poll = time.monotonic()
        return self.client.get_all("environments/", **self.filters.params())

    def _reset(self, envs: list[Env], reason: str | None) -> None:
        self.rows = {str(env["id"]): env for env in envs}
        if self.mode == "json":
            snapshot: dict[str, Any] = {"type": "snapshot", "environments": envs}
            if reason:
                snapshot["reason"] = reason
            print_json_line(snapshot)
        elif self.mode == "lines":
            if reason is not None:
                self._line(f"(list refetched: {reason})")
            elif envs:
                print_stripped(self._table())
            else:
                err.print("[dim]no environments yet; watching for changes (Ctrl-C to quit)[/dim]")
        self._redraw()

    def _handle(self, message: dict[str, Any]) -> None:
        kind = str(message.get("type", ""))
        if kind == "resync":
            self._reset(self._fetch(), reason=str(message.get("reason") or "resync"))
            return
        if kind in ("access.changed", "team.changed"):
            # What we may see may have changed (a share, a revoke, a new team member), and no
            # environment event says so: compare a fresh list with ours.
            self._poll()
            return
        summary = message.get("environment")
        if not kind.startswith("environment.") or not isinstance(summary, dict) or "id" not in summary:
            return  # sessions, access and team events change nothing in this list
        self._apply(kind, summary, message)

    def _apply(self, kind: str, summary: Env, message: dict[str, Any]) -> None:
        env_id = str(summary["id"])
        before = self.rows.get(env_id)
        after = None if kind == "environment.deleted" else {**(before or {}), **summary}
        shown_after = after is not None and self.filters.matches(after)
        if before is None and not shown_after:
            return  # never shown, still not to be shown (another status, team...)
        if self.mode == "json":
            print_json_line(message)
        if shown_after:
            assert after is not None
            if before is None and self.mode != "json":
                after = self._complete(after)
            self.rows[env_id] = after
        else:
            self.rows.pop(env_id, None)
        if self.mode == "lines":
            self._line_for(kind, before, after, shown_after, message.get("id"))
        self._redraw()

    def _complete(self, env: Env) -> Env:
        """A row new to us: events carry a summary, so fetch its role and creation time (best effort)."""
        try:
            return {**self.client.get(f"environments/{env['id']}/"), **env}
        except LslError:
            return env  # gone again (the `deleted` event follows), or the server is away: a summary will do

    def _poll(self) -> None:
        """Diff a fresh list into synthetic event records (`"id": null`): the fallback while the
        stream is down, and the answer to access and team changes.

        Fetched without the status filter, so an environment leaving that status is seen changing
        (as an event would show it), not vanishing.
        """
        self.last_poll = time.monotonic()
        try:
            listed = self.client.get_all("environments/", **self.filters.params(with_status=False))
        except (Unreachable, ServerError) as exc:
            # A watch outlives a server restart: say so once and keep trying (Ctrl-C ends it).
            if not self.unreachable:
                self._note(f"{exc.message}; still trying")
            self.unreachable = True
            return
        if self.unreachable:
            self._note("the server answers again")
        self.unreachable = False
        fresh = {str(env["id"]): env for env in listed}
        for env_id, env in fresh.items():
            known = self.rows.get(env_id)
            if known is None or any(known.get(key) != env.get(key) for key in COMPARED):
                kind = "environment.created" if known is None and env.get("status") == "creating" else "environment.changed"
                self._apply(kind, env, {"type": kind, "id": None, "environment": env})
        for env_id in [env_id for env_id in self.rows if env_id not in fresh]:
            known = self.rows[env_id]
            self._apply("environment.deleted", known, {"type": "environment.deleted", "id": None, "environment": known})

    # --- output ----------------------------------------------------------------------------

    def _table(self) -> RenderableType:
        # Newest first, as the API lists them; a row seen only in events has no created_at yet: it is new.
        rows = sorted(self.rows.values(), key=lambda env: str(env.get("created_at") or "~"), reverse=True)
        return build_table(rows, self.columns)

    def _render(self) -> RenderableType:
        if self.stream is not None and self.stream.connected:
            how = "live"
        elif self.unreachable:
            how = "server unreachable, still trying"
        elif self.poll:
            how = f"event stream down, checking every {POLL_INTERVAL:g} s"
        else:
            how = "event stream down, reconnecting"
        count = len(self.rows)
        footer = Text(f"{count} environment{'s' * (count != 1)} · {how} · Ctrl-C to quit", style="dim")
        body = self._table() if self.rows else Text("no environments yet; watching for changes", style="dim")
        return Group(body, footer)

    def _redraw(self) -> None:
        if self.live is not None:
            self.live.update(self._render(), refresh=True)

    def _line_for(self, kind: str, before: Env | None, after: Env | None, shown_after: bool, message_id: Any) -> None:
        """One line per change that matters (not every pull percentage or setup-log flush)."""
        name = (after or before or {}).get("name", "?")
        if kind == "environment.deleted":
            # A poll cannot tell a deletion from lost access: only a real event says "deleted".
            self._line(f"{name} deleted" if message_id is not None else f"{name} gone (deleted, or no longer visible to you)")
        elif before is None and after is not None:
            self._line(f"{name} {'created' if kind == 'environment.created' else 'appeared'}: "
                       f"{status_text(after, detail=False)}")
        elif before is not None and after is not None:
            old, new = status_text(before, detail=False), status_text(after, detail=False)
            if before.get("name") != after.get("name"):
                self._line(f"{before.get('name')} renamed to {after.get('name')}")
            if old != new:
                suffix = "" if shown_after else " (no longer listed)"
                # An error says why; so does a stop for disk ("disk limit exceeded: 42 MB used of 20 MB; ...").
                explained = after.get("status") == "error" or after.get("stop_reason") == "disk"
                error = f": {after['last_error']}" if explained and after.get("last_error") else ""
                self._line(f"{name} {old} -> {new}{error}{suffix}")

    def _line(self, text: str) -> None:
        sys.stdout.write(f"{datetime.now():%H:%M:%S} {text}\n")
        sys.stdout.flush()

    def _note(self, text: str) -> None:
        if self.live is not None:
            self.live.console.print(Text(f"note: {text}", style="dim"))
        else:
            err.print(Text(f"note: {text}", style="dim"))
