"""Rendering: rich tables for people, JSON (stable keys, as the API sends them) for scripts."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timezone
from typing import Any

from rich.console import Console
from rich.table import Table


def _console(stderr: bool) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    # Piped output must not be cut at rich's 80-column default: `lsl list | grep` needs whole cells.
    width = None if stream.isatty() else 200
    return Console(stderr=stderr, width=width, highlight=False, soft_wrap=False)


out = _console(stderr=False)
err = _console(stderr=True)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def print_json_line(data: Any) -> None:
    """One compact JSON object per line (NDJSON), flushed at once: a script reads it as it happens."""
    sys.stdout.write(json.dumps(data, default=str, separators=(",", ":")) + "\n")
    sys.stdout.flush()


Column = tuple[str, Callable[[dict[str, Any]], Any]]


def table(rows: Iterable[dict[str, Any]], columns: Sequence[Column], empty: str = "nothing to show") -> None:
    """Print `rows` as a plain, grep-friendly table (like `docker ps`)."""
    rows = list(rows)
    if not rows:
        err.print(f"[dim]{empty}[/dim]")
        return
    print_stripped(build_table(rows, columns))


def build_table(rows: Iterable[dict[str, Any]], columns: Sequence[Column]) -> Table:
    """The grid `table` prints, as a renderable (`lsl list --watch` redraws it in place)."""
    grid = Table(box=None, pad_edge=False, header_style="bold")
    for title, _ in columns:
        grid.add_column(title, overflow="fold")
    for row in rows:
        grid.add_row(*(cell(getter(row)) for _, getter in columns))
    return grid


def print_stripped(renderable: Any) -> None:
    """Print without rich's padding at line ends (trailing blanks trip up `diff`, `awk '$NF'`...)."""
    with out.capture() as captured:
        out.print(renderable)
    sys.stdout.write("\n".join(line.rstrip() for line in captured.get().split("\n")))
    sys.stdout.flush()


def details(pairs: Sequence[tuple[str, Any]]) -> None:
    grid = Table(box=None, show_header=False, pad_edge=False)
    grid.add_column(style="bold")
    grid.add_column(overflow="fold")
    for key, value in pairs:
        grid.add_row(key, cell(value))
    print_stripped(grid)


def cell(value: Any) -> str:
    """Escape rich markup so user data (names, commands) prints literally."""
    from rich.markup import escape

    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return escape(", ".join(str(v) for v in value)) or "-"
    return escape(str(value))


def ago(timestamp: str | None) -> str:
    """'3m ago' from an ISO timestamp; the raw value if it does not parse."""
    if not timestamp:
        return "-"
    try:
        then = datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    except ValueError:
        return timestamp
    seconds = (datetime.now(timezone.utc) - then.astimezone(timezone.utc)).total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{max(int(seconds), 0)}s ago"


def human_bytes(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "-"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"
