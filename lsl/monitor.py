"""`lsl monitor`: the `/api/v1/monitor/` answer as rich renderables."""

from __future__ import annotations

from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from lsl.output import ago, cell, human_bytes


def render_monitor(data: dict[str, Any]) -> RenderableType:
    return Group(_host_line(data.get("host") or {}), _environments(data.get("environments") or []))


def _host_line(host: dict[str, Any]) -> Text:
    load = host.get("load_average") or []
    engine = host.get("engine") or {}
    parts = [
        f"host cpu {host.get('cpu_percent', '-')}% of {host.get('cpu_count', '-')}",
        f"load {' '.join(f'{x:.2f}' for x in load) if load else '-'}",
        f"mem {human_bytes(host.get('memory_used_bytes'))}/{human_bytes(host.get('memory_total_bytes'))}",
        f"disk {human_bytes(host.get('disk_used_bytes'))}/{human_bytes(host.get('disk_total_bytes'))}",
    ]
    if engine.get("error"):
        parts.append(f"engine error: {engine['error']}")
    return Text("  ".join(parts), style="bold")


def _environments(envs: list[dict[str, Any]]) -> Table:
    grid = Table(box=None, pad_edge=False, header_style="bold")
    for title in ("NAME", "OWNER", "TEMPLATE", "STATUS", "CPU", "MEMORY", "PIDS", "UP"):
        grid.add_column(title, overflow="fold")
    for env in envs:
        stats = env.get("stats") or {}
        grid.add_row(cell(env.get("name")), cell(env.get("owner")), cell(env.get("template")), cell(env.get("status")),
                     *_stats_cells(stats), ago(env.get("started_at")) if env.get("status") == "running" else "-")
    return grid


def _stats_cells(stats: dict[str, Any]) -> list[str]:
    if not stats:
        return ["-", "-", "-"]
    if stats.get("error"):
        return ["error", cell(stats["error"]), "-"]
    cpu = stats.get("cpu_percent")
    memory = human_bytes(stats.get("memory_bytes") or stats.get("memory_usage_bytes"))
    limit = stats.get("memory_limit_bytes")
    if limit:
        memory += f" / {human_bytes(limit)}"
    return [f"{cpu:.1f}%" if isinstance(cpu, (int, float)) else "-", memory, cell(stats.get("pids"))]
