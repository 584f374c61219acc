"""Prometheus metrics (`GET /metrics`) and the host/container sampling shared with the monitor API.

The collector reads LSL's state at scrape time instead of keeping counters in
process memory: LSL may run as several server processes, and every one of them
must answer a scrape with the same, complete picture. Names follow Prometheus
conventions: base units (`_bytes`, `_seconds`, `_ratio`), `_total` on counters.

Access: a scrape needs `Authorization: Bearer <LSL_METRICS_TOKEN>` or the session
of an active staff user. The client's address is never trusted: every process on
the host (a host-network environment, a reverse proxy's clients) connects from
loopback, and the metrics name every environment and owner.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from functools import lru_cache
from typing import Any

import psutil
from django.conf import settings
from django.db.models import Count, Q
from django.http import HttpRequest, HttpResponse
from django.utils import timezone
from django.views.decorators.http import require_safe
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

from environments import nodes, runtime
from environments.models import Environment, Status

log = logging.getLogger(__name__)

# docker-py keeps 10 pooled connections per client; more workers would only churn connections.
STATS_WORKERS = 10
# A stats call takes about a second (the engine waits for a second CPU sample). Prometheus' default
# scrape timeout is 10 s: containers that have not answered within this budget are left out.
STATS_BUDGET_SECONDS = 8.0
ENV_LABELS = ["environment", "owner", "template"]


# --- sampling (also used by the monitor API and page) ----------------------------------------

class _HostCpu:
    """Host CPU busy ratio since the previous reading, shared by every caller in the process.

    psutil.cpu_percent(interval=None) remembers its previous sample per thread, and
    requests run on whichever worker thread is free, so its figures would jump
    around. One shared sample gives the average since the last scrape or poll.
    """

    MIN_INTERVAL = 1.0  # shorter intervals are mostly noise: repeat the last figure instead

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._previous: Any = None
        self._previous_at = 0.0
        self._ratio = 0.0

    @staticmethod
    def _busy_total(times: Any) -> tuple[float, float]:
        # Linux counts guest time inside user/nice too; leave it out of the total as psutil does.
        total = sum(times) - getattr(times, "guest", 0.0) - getattr(times, "guest_nice", 0.0)
        idle = times.idle + getattr(times, "iowait", 0.0)
        return total - idle, total

    def ratio(self) -> float:
        with self._lock:
            now = time.monotonic()
            if self._previous is None:
                # The very first reading in this process: measure a short interval right away.
                self._previous, self._previous_at = psutil.cpu_times(), now
                time.sleep(0.1)
                now = time.monotonic()
            elif now - self._previous_at < self.MIN_INTERVAL:
                return self._ratio
            current = psutil.cpu_times()
            busy_then, total_then = self._busy_total(self._previous)
            busy_now, total_now = self._busy_total(current)
            total = total_now - total_then
            self._ratio = min(1.0, max(0.0, (busy_now - busy_then) / total)) if total > 0 else 0.0
            self._previous, self._previous_at = current, now
            return self._ratio


HOST_CPU = _HostCpu()


def host_snapshot() -> dict[str, Any]:
    """Host CPU, memory and disk, in the shape the monitor API returns (`host`)."""
    memory = psutil.virtual_memory()
    disk = psutil.disk_usage("/")
    return {
        "cpu_percent": round(HOST_CPU.ratio() * 100, 1),
        "cpu_count": psutil.cpu_count(),
        "load_average": [round(x, 2) for x in psutil.getloadavg()],
        "memory_total_bytes": memory.total,
        # "available" counts reclaimable page cache as free, which is what an operator means by used.
        "memory_used_bytes": memory.total - memory.available,
        "disk_total_bytes": disk.total,
        "disk_used_bytes": disk.used,
    }


def sample_container_stats(envs: Iterable[Environment], budget: float = STATS_BUDGET_SECONDS) -> dict[uuid.UUID, dict[str, Any]]:
    """One stats sample per running environment, taken concurrently.

    Each value is `runtime.container_stats(...)` or `{"error": "..."}`; environments
    that are not running, or did not answer within `budget` seconds, are absent.
    """
    running = [env for env in envs if env.status == Status.RUNNING and env.container_id]
    if not running:
        return {}

    def sample(env: Environment) -> dict[str, Any]:
        try:
            return nodes.engine_for(env).container_stats(env.container_id)
        except runtime.EngineError as exc:
            return {"error": str(exc)}

    pool = ThreadPoolExecutor(max_workers=min(STATS_WORKERS, len(running)), thread_name_prefix="lsl-stats")
    try:
        futures = {pool.submit(sample, env): env.pk for env in running}
        done, late = wait(futures, timeout=budget)
        if late:
            log.warning("container stats: %d of %d environments did not answer within %.0fs", len(late), len(running), budget)
        return {futures[future]: future.result() for future in done}
    finally:
        # Do not wait for stragglers: the answer is already late enough.
        pool.shutdown(wait=False, cancel_futures=True)


def uptime_seconds(env: Environment) -> float | None:
    if env.status != Status.RUNNING or env.started_at is None:
        return None
    return max(0.0, (timezone.now() - env.started_at).total_seconds())


# --- the collector ---------------------------------------------------------------------------

def engine_snapshot() -> dict[str, Any]:
    """The worker's latest engine sample: {"engine": {...}, "engine_up": bool, "sampled_at": iso} or {}."""
    from lsl_site.models import PeriodicJob

    return PeriodicJob.objects.filter(name="sample_stats").values_list("result", flat=True).first() or {}


def stored_stats(env: Environment) -> dict[str, Any] | None:
    """The worker's latest sample of a running environment's container, with its time."""
    if env.status != Status.RUNNING or not env.stats:
        return None
    return {**env.stats, "sampled_at": env.stats_at.isoformat() if env.stats_at else None}


class LSLCollector:
    """Builds every LSL metric family from the database, the engine and the host at scrape time."""

    def collect(self) -> Iterator[Metric]:
        # Everything comes from the database: a scrape never asks the engine (the worker samples it).
        up = bool(engine_snapshot().get("engine_up"))
        # Session counts come through the reverse relations by name: this app must not import `sessions`.
        envs = list(
            Environment.objects.select_related("owner", "template", "node")
            .annotate(
                live_sessions=Count("terminal_sessions", filter=Q(terminal_sessions__ended_at__isnull=True), distinct=True),
                attached=Count("terminal_sessions__participations", distinct=True, filter=Q(
                    terminal_sessions__ended_at__isnull=True, terminal_sessions__participations__left_at__isnull=True)),
            )
            .order_by("owner__username", "name")
        )
        stats = {env.pk: env.stats for env in envs if env.status == Status.RUNNING and env.stats}

        yield from self._inventory(envs, up)
        yield from self._environments(envs, stats)
        yield from self._ports()
        yield from self._host()

    def _ports(self) -> Iterator[Metric]:
        """Traffic through `lsl forward`, the browser preview and public links, per port (two queries in all)."""
        from environments.models import PortTraffic, PreviewLink

        labels = ["environment", "owner", "port", "via"]
        connections = CounterMetricFamily("lsl_port_connections", "Connections made through LSL to a port of an "
                                          "environment, per way in (forward, preview, public).", labels=labels)
        transferred = CounterMetricFamily("lsl_port_bytes", "Bytes carried through LSL to and from a port of an "
                                          "environment (direction: to_environment, from_environment).",
                                          labels=[*labels, "direction"])
        rows = (PortTraffic.objects.order_by("environment__owner__username", "environment__name", "port", "via")
                .values_list("environment__name", "environment__owner__username", "port", "via", "connections",
                             "bytes_to_environment", "bytes_from_environment"))
        for name, owner, port, via, count, to_env, from_env in rows:
            base = [name, owner, str(port), via]
            connections.add_metric(base, count)
            transferred.add_metric([*base, "to_environment"], to_env)
            transferred.add_metric([*base, "from_environment"], from_env)
        yield connections
        yield transferred
        active = PreviewLink.objects.filter(revoked_at__isnull=True, expires_at__gt=timezone.now()).count()
        yield GaugeMetricFamily("lsl_preview_links_active", "Public preview links neither expired nor revoked.", value=active)

    def _inventory(self, envs: list[Environment], up: bool) -> Iterator[Metric]:
        build = GaugeMetricFamily("lsl_build_info", "LSL version; always 1.", labels=["version"])
        build.add_metric([settings.LSL_VERSION], 1)
        yield build
        yield GaugeMetricFamily("lsl_engine_up", "1 when the Docker engine answered the worker's last sample, else 0.", value=1 if up else 0)
        from environments.models import Node

        node_up = GaugeMetricFamily("lsl_node_up", "1 while the node's engine answers the worker's checks, else 0.",
                                    labels=["node", "state"])
        reserved = GaugeMetricFamily("lsl_node_reserved_ratio", "Share of the node's memory reserved by its creating and "
                                     "running environments (placement's measure).", labels=["node"])
        memory: Counter[int] = Counter()
        for env in envs:
            if env.status in (Status.RUNNING, Status.CREATING):
                memory[env.node_id] += env.memory_mb
        for node in Node.objects.order_by("name"):
            node_up.add_metric([node.name, node.state], 1 if node.available else 0)
            capacity = node.capacity_memory_mb
            reserved.add_metric([node.name], memory[node.pk] / capacity if capacity else 0.0)
        yield node_up
        yield reserved
        by_status = Counter(env.status for env in envs)
        gauge = GaugeMetricFamily("lsl_environments", "Environments by status.", labels=["status"])
        for status in Status.values:
            gauge.add_metric([status], by_status.get(status, 0))
        yield gauge

    def _environments(self, envs: list[Environment], stats: dict[uuid.UUID, dict[str, Any]]) -> Iterator[Metric]:
        families: dict[str, Metric] = {
            "cpu": GaugeMetricFamily("lsl_environment_cpu_usage_ratio",
                                     "CPU used by the environment's container, in cores (1.0 = one full core).", labels=ENV_LABELS),
            "memory": GaugeMetricFamily("lsl_environment_memory_usage_bytes",
                                        "Container memory in use, page cache excluded.", labels=ENV_LABELS),
            "memory_limit": GaugeMetricFamily("lsl_environment_memory_limit_bytes",
                                              "Container memory limit.", labels=ENV_LABELS),
            "rx": CounterMetricFamily("lsl_environment_network_receive_bytes",
                                      "Bytes received by the container (resets when it restarts).", labels=ENV_LABELS),
            "tx": CounterMetricFamily("lsl_environment_network_transmit_bytes",
                                      "Bytes sent by the container (resets when it restarts).", labels=ENV_LABELS),
            "pids": GaugeMetricFamily("lsl_environment_pids", "Processes and threads in the container.", labels=ENV_LABELS),
            "uptime": GaugeMetricFamily("lsl_environment_uptime_seconds",
                                        "Seconds since the environment was last started (running ones only).", labels=ENV_LABELS),
            "sessions": GaugeMetricFamily("lsl_sessions_live", "Live terminal sessions per environment.", labels=ENV_LABELS),
            "participants": GaugeMetricFamily("lsl_session_participants",
                                              "Connections attached to the environment's live sessions.", labels=ENV_LABELS),
        }
        for env in envs:
            labels = [env.name, env.owner.username, env.template.slug]
            families["sessions"].add_metric(labels, env.live_sessions)
            families["participants"].add_metric(labels, env.attached)
            uptime = uptime_seconds(env)
            if uptime is not None:
                families["uptime"].add_metric(labels, uptime)
            sample = stats.get(env.pk)
            if not sample or "error" in sample:
                continue
            families["cpu"].add_metric(labels, sample["cpu_percent"] / 100.0)
            families["memory"].add_metric(labels, sample["memory_bytes"])
            families["memory_limit"].add_metric(labels, sample["memory_limit_bytes"])
            families["rx"].add_metric(labels, sample["network_rx_bytes"])
            families["tx"].add_metric(labels, sample["network_tx_bytes"])
            families["pids"].add_metric(labels, sample["pids"])
        yield from families.values()

    def _host(self) -> Iterator[Metric]:
        host = host_snapshot()
        yield GaugeMetricFamily("lsl_host_cpu_usage_ratio", "Host CPU busy ratio (0-1, all cores) since the previous sample.",
                                value=host["cpu_percent"] / 100.0)
        yield GaugeMetricFamily("lsl_host_memory_used_bytes", "Host memory in use (total minus available).",
                                value=host["memory_used_bytes"])
        yield GaugeMetricFamily("lsl_host_memory_total_bytes", "Host memory.", value=host["memory_total_bytes"])
        yield GaugeMetricFamily("lsl_host_disk_used_bytes", "Used bytes on the filesystem holding /.", value=host["disk_used_bytes"])
        yield GaugeMetricFamily("lsl_host_disk_total_bytes", "Size of the filesystem holding /.", value=host["disk_total_bytes"])


@lru_cache(maxsize=1)
def registry() -> CollectorRegistry:
    # A registry of our own: the global one would also carry whatever other libraries register.
    # Registering calls no collect() (no describe(), auto_describe off), so nothing is queried here.
    reg = CollectorRegistry()
    reg.register(LSLCollector())
    return reg


# --- the view --------------------------------------------------------------------------------

def _bearer_token(request: HttpRequest) -> str | None:
    """The credentials of an `Authorization: Bearer ...` header (scheme case-insensitive, RFC 7235), else None."""
    scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
    return credentials.strip() if scheme.lower() == "bearer" else None


def _is_staff_session(request: HttpRequest) -> bool:
    user = getattr(request, "user", None)  # set by AuthenticationMiddleware (session cookie)
    return bool(user is not None and user.is_authenticated and user.is_active and (user.is_staff or user.is_superuser))


def _refusal(status: int, reason: str) -> HttpResponse:
    response = HttpResponse(f"{status} {'Unauthorized' if status == 401 else 'Forbidden'}: {reason}\n", status=status,
                            content_type="text/plain; charset=utf-8")
    if status == 401:
        response["WWW-Authenticate"] = 'Bearer realm="lsl-metrics"'
    return response


def _refuse(request: HttpRequest) -> HttpResponse | None:
    """None when the request may scrape, else the plain-text refusal (Prometheus logs the body).

    401 when no credentials came at all; 403 when the ones that came are not good enough (a wrong
    token, a token while none is configured, a non-staff session).
    """
    configured = settings.LSL_METRICS_TOKEN
    token = _bearer_token(request)
    # hmac.compare_digest: the time taken must not tell how much of a guessed token was right.
    if configured and token is not None and hmac.compare_digest(token.encode(), configured.encode()):
        return None
    if _is_staff_session(request):
        return None
    how = ("send 'Authorization: Bearer <LSL_METRICS_TOKEN>' or sign in as staff" if configured
           else "LSL_METRICS_TOKEN is not set on this server, so only a signed-in staff user may scrape")
    if token is not None:
        return _refusal(403, f"wrong bearer token; {how}" if configured else f"no token is accepted: {how}")
    if "Authorization" in request.headers:
        return _refusal(401, f"the Authorization header must use the Bearer scheme; {how}")
    user = getattr(request, "user", None)
    if user is not None and user.is_authenticated:
        return _refusal(403, f"{user.get_username()!r} is not staff; {how}")
    return _refusal(401, f"credentials required: {how}")


@require_safe
def metrics_view(request: HttpRequest) -> HttpResponse:
    refusal = _refuse(request)
    if refusal is not None:
        return refusal
    # The text format by default; OpenMetrics when the scraper asks for it (Prometheus does).
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    return HttpResponse(encoder(registry()), content_type=content_type)
