"""Template helpers for the live pages' status cells.

They mirror frontend/src/render.js (describeStopReason, describeProgress): the server renders the
first view, the page's script redraws the same markup when an event arrives. Keep the two in step.
"""

from __future__ import annotations

import re
from typing import Any

from django import template
from datetime import timezone as dt_timezone

from django.utils import timezone
from django.utils.html import format_html
from django.utils.safestring import SafeString

register = template.Library()

_EXITED = re.compile(r"^exited (-?\d+)$")


def _bytes(n: float) -> str:
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    value, i = abs(float(n)), 0
    while value >= 1024 and i < len(units) - 1:
        value /= 1024
        i += 1
    digits = 0 if value >= 100 or i == 0 else 1 if value >= 10 else 2
    return f"{value:.{digits}f} {units[i]}"


@register.filter
def stop_reason(reason: str) -> dict[str, Any] | None:
    """{text, title, bad} for a stop_reason worth showing; None for none or a plain stop."""
    if not reason or reason == "stopped":
        return None
    if reason == "idle":
        return {"text": "idle", "title": "Stopped automatically after being idle", "bad": False}
    if reason == "killed":
        return {"text": "killed", "title": "Its container was killed (SIGKILL, e.g. docker kill)", "bad": True}
    if reason == "oom":
        return {"text": "out of memory", "title": "The kernel killed it: it ran out of memory (oom)", "bad": True}
    if reason == "disk":
        return {"text": "disk limit", "title": "Stopped by LSL: over its disk limit (nothing was deleted; start it, "
                "then delete files)", "bad": True}
    if reason == "removed":
        return {"text": "container removed", "title": "Its container was removed outside LSL; starting it makes a new one",
                "bad": True}
    exited = _EXITED.match(reason)
    if exited:
        code = int(exited.group(1))
        return {"text": reason, "title": f"Its main process exited with code {code}", "bad": code != 0}
    return {"text": reason, "title": reason, "bad": True}


@register.filter
def progress_text(progress: dict[str, Any] | None) -> str:
    p = progress or {}
    phase = p.get("phase") or "queued"
    if phase == "pulling":
        image = p.get("image") or "the image"
        total, current = p.get("total") or 0, p.get("current") or 0
        if total:
            return f"pulling {image}: {min(100, round(100 * current / total))}% ({_bytes(current)} of {_bytes(total)})"
        return f"pulling {image}…"
    if phase == "setup":
        if p.get("of"):
            command = f": {p['command']}" if p.get("command") else ""
            return f"setup step {p.get('step')} of {p['of']}{command}"
        return "running setup"
    if phase == "failed":
        return f"failed: {p['error']}" if p.get("error") else "failed"
    return {"creating": "creating the container", "user": "creating the user"}.get(phase, phase)


def failure(env: Any) -> str:
    """"error" (red), "failed" (a stop with an error or an abnormal reason: amber) or "" (nothing wrong).
    Mirrors failureOf() in frontend/src/render.js."""
    if env.status in ("error", "missing") or getattr(env, "shown_status", env.status) == "node_unavailable":
        return "error"
    if env.status == "stopped":
        reason = stop_reason(env.stop_reason)
        if env.last_error or (reason and reason["bad"]):
            return "failed"
    return ""


@register.filter
def failure_class(env: Any) -> str:
    return failure(env)


@register.inclusion_tag("frontend/_status_cell.html")
def status_cell(env: Any) -> dict[str, Any]:
    """The pill and the line that explains it (why it stopped, what failed, how far creating got)."""
    return {"env": env, "failed": failure(env) == "failed",
            "reason": stop_reason(env.stop_reason) if env.status not in ("running", "creating") else None}


@register.filter
def when(value: Any, arg: str = "") -> SafeString | str:
    """A <time> in the one date convention (docs: README "Web app"): the server writes UTC, page.js turns it into
    the browser's local time with the UTC time in the title. `|when:"date"` shows the day only."""
    if not value:
        return ""
    utc = value.astimezone(dt_timezone.utc) if timezone.is_aware(value) else value
    text = utc.strftime("%Y-%m-%d") if arg == "date" else utc.strftime("%Y-%m-%d %H:%M UTC")
    return format_html('<time datetime="{}"{}>{}</time>', utc.isoformat(), " data-date" if arg == "date" else "", text)
