"""Nodes: the Docker engines environments live on (issue 15).

Each environment, with its workspace volume, lives on exactly one node, chosen when it is created
(`place`) and fixed from then on. Everything that touches its container (terminals, exec, files,
snapshots, stats, reconcile) reaches it through `engine_for(env)`, the only way from a row to a
`runtime.Engine`.

Health: the worker's `check_nodes` asks every node's engine for `docker info` with a short timeout
every LSL_NODE_CHECK_INTERVAL seconds. A node that does not answer LSL_NODE_FAILURES times running is
marked unavailable: its environments read as `node_unavailable` (the API and the pages still answer
from the rows) and actions on them raise `runtime.NodeUnavailableError` (HTTP 503) at once instead of
each waiting out a timeout. Nothing on other nodes is touched. When it answers again the worker
reconciles it (what happened while it was away shows with its reason), then marks it available.

Writes go through the do_* actions (admin and `manage.py lsl_node` both use them).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from django.conf import settings
from django.db import transaction
from django.db.models import Count, Q, Sum
from django.utils import timezone

from environments import runtime
from environments.models import Environment, KeptWorkspace, Node, NodeState, Status, TeamVolume
from lsl_site import events
from lsl_site.errors import DomainError, InvalidInput

log = logging.getLogger(__name__)

# Environments that hold their CPU and memory reservation on a node: a stopped one gives it back.
RESERVING = (Status.CREATING, Status.RUNNING)


class NoNodeFits(DomainError):
    """No node can take the environment now (all full, draining, unavailable, or none matches the
    template's node_selector); the detail says why for each node."""

    status = 503
    code = "no_node_available"


class NodeInUse(DomainError):
    status = 409
    code = "node_in_use"


# --- from rows to engines -------------------------------------------------------------------

def address_of(node: Node) -> runtime.EngineAddress:
    if node.name == Node.LOCAL and not node.url:
        return runtime.EngineAddress(url=settings.LSL_DOCKER_HOST)
    return runtime.EngineAddress(url=node.url, tls_ca=node.tls_ca, tls_cert=node.tls_cert, tls_key=node.tls_key)


def engine_of_node(node: Node) -> runtime.Engine:
    """The node's engine, whatever its health (the health check and reconcile use this)."""
    return runtime.connect(address_of(node))


def engine_on(node: Node) -> runtime.Engine:
    """The node's engine for an action; NodeUnavailableError when the node is marked down."""
    if not node.available:
        raise runtime.NodeUnavailableError(node.name, node.last_error)
    return engine_of_node(node)


def engine_for(env: Environment) -> runtime.Engine:
    """The engine of the environment's node; NodeUnavailableError when that node is marked down."""
    return engine_on(env.node)  # select_related("node") by callers that handle many


def engine_for_environment_id(environment_id: Any) -> runtime.Engine:
    """For code that knows only the id (terminal hubs, tunnels): one query."""
    node = Node.objects.get(environments__pk=environment_id)
    if not node.available:
        raise runtime.NodeUnavailableError(node.name, node.last_error)
    return engine_of_node(node)


def local_node() -> Node:
    """The server's own engine (LSL_DOCKER_HOST): made by migration 0007, remade here if deleted."""
    node, _ = Node.objects.get_or_create(name=Node.LOCAL, defaults={"url": "", "shares_host": True})
    return node


def status_of(env: Environment) -> str:
    """What users see: the row's status, or `node_unavailable` while its node does not answer."""
    return env.shown_status


# --- placement ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Load:
    """A node as placement sees it (pure: tests/test_nodes_logic.py)."""

    name: str
    cpus: float  # capacity
    memory_mb: int
    reserved_cpus: float
    reserved_memory_mb: int
    labels: dict[str, str]
    active: bool  # not draining
    available: bool

    @property
    def free_cpus(self) -> float:
        return self.cpus - self.reserved_cpus

    @property
    def free_memory_mb(self) -> int:
        return self.memory_mb - self.reserved_memory_mb


def why_not(load: Load, *, cpus: float, memory_mb: int, selector: dict[str, str]) -> str | None:
    """Why `load` cannot take an environment of this size and selector (None: it can)."""
    if not load.available:
        return "not answering"
    if not load.active:
        return "draining"
    missing = {k: v for k, v in selector.items() if load.labels.get(k) != str(v)}
    if missing:
        return "labels do not match " + ", ".join(f"{k}={v}" for k, v in sorted(missing.items()))
    # A capacity of 0 is unknown (a node added unchecked, not yet probed): no limit until the check says.
    if load.cpus and load.free_cpus + 1e-9 < cpus:
        return f"{load.free_cpus:g} of {load.cpus:g} CPUs free, {cpus:g} needed"
    if load.memory_mb and load.free_memory_mb < memory_mb:
        return f"{load.free_memory_mb} of {load.memory_mb} MiB free, {memory_mb} needed"
    return None


def choose(loads: Iterable[Load], *, cpus: float, memory_mb: int, selector: dict[str, str]) -> tuple[Load | None, dict[str, str]]:
    """The node to place on: of those that fit, the one left with the largest share of its memory and
    CPU free (so environments spread, and a big node takes more than a small one); ties by name.
    Returns it (or None) and, for every node that does not fit, why."""
    fits, refused = [], {}
    for load in loads:
        reason = why_not(load, cpus=cpus, memory_mb=memory_mb, selector=selector)
        if reason is None:
            fits.append(load)
        else:
            refused[load.name] = reason

    def headroom(load: Load) -> tuple[float, str]:
        memory_share = (load.free_memory_mb - memory_mb) / load.memory_mb if load.memory_mb else 0.0
        cpu_share = (load.free_cpus - cpus) / load.cpus if load.cpus else 0.0
        return (-min(memory_share, cpu_share), load.name)

    return (min(fits, key=headroom) if fits else None), refused


def loads(nodes: Iterable[Node] | None = None) -> list[Load]:
    """Every node with what its creating and running environments reserve, in one query."""
    queryset = Node.objects.all() if nodes is None else Node.objects.filter(pk__in=[n.pk for n in nodes])
    reserving = Q(environments__status__in=RESERVING)
    rows = queryset.annotate(reserved_cpus=Sum("environments__cpus", filter=reserving),
                             reserved_memory=Sum("environments__memory_mb", filter=reserving))
    return [Load(name=n.name, cpus=n.capacity_cpus, memory_mb=n.capacity_memory_mb,
                 reserved_cpus=float(n.reserved_cpus or 0), reserved_memory_mb=int(n.reserved_memory or 0),
                 labels=n.effective_labels, active=n.state == NodeState.ACTIVE, available=n.available) for n in rows]


def place(*, cpus: float, memory_mb: int, selector: dict[str, str], pinned: Node | None = None,
          pinned_because: str = "", needs_host: bool = False) -> Node:
    """Choose the node for a new environment. Call inside the create transaction: the node rows are
    locked until it commits, so two creates at once see each other's reservations.

    `pinned`: the environment must go to this node (its kept workspace or a team volume it mounts
    lives there); it must still be able to take it. `needs_host`: it mounts host paths, which exist
    only on nodes that share this server's machine."""
    if not Node.objects.exists():
        local_node()
    # Lock the node rows (in pk order: no deadlock between two creates) so that creates by different
    # users, which the quota lock does not serialise, see each other's reservations.
    list(Node.objects.select_for_update().order_by("pk").values_list("pk", flat=True))
    candidates = loads([pinned] if pinned is not None else None)
    refused: dict[str, str] = {}
    if needs_host:
        sharing = set(Node.objects.filter(shares_host=True).values_list("name", flat=True))
        refused = {c.name: "host-path mounts need a node on the server's machine" for c in candidates if c.name not in sharing}
        candidates = [c for c in candidates if c.name in sharing]
    chosen, more = choose(candidates, cpus=cpus, memory_mb=memory_mb, selector={str(k): str(v) for k, v in selector.items()})
    refused.update(more)
    if chosen is None:
        reasons = "; ".join(f"{name}: {why}" for name, why in sorted(refused.items()))
        where = f"node {pinned.name} (where {pinned_because} lives)" if pinned is not None else "no node"
        raise NoNodeFits(f"{where} can take this environment now ({reasons})" if pinned is not None
                         else f"no node can take this environment now ({reasons})")
    return Node.objects.get(name=chosen.name)


# --- actions (admin and `manage.py lsl_node`) ------------------------------------------------------

def _publish_node(node: Node) -> None:
    from django.contrib.auth import get_user_model

    # For staff (admins watch nodes); users hear of it through their environments' own events.
    staff = get_user_model().objects.filter(is_active=True).filter(Q(is_staff=True) | Q(is_superuser=True))
    events.publish("node.changed", {"node": node_payload(node)}, user_ids=list(staff.values_list("pk", flat=True)))


def node_payload(node: Node) -> dict[str, Any]:
    return {"name": node.name, "url": node.url or "(local)", "state": node.state, "available": node.available,
            "labels": node.effective_labels, "cpus": node.capacity_cpus, "memory_mb": node.capacity_memory_mb,
            "last_error": node.last_error}


def validate_url(url: str, *, tls_cert: str = "", tls_key: str = "", tls_ca: str = "") -> dict[str, list[str]]:
    """Problems with a node's address, by field (pure apart from checking that certificate files exist)."""
    import os

    errors: dict[str, list[str]] = {}
    scheme = urlparse(url).scheme
    if scheme not in ("unix", "tcp", "ssh"):
        errors["url"] = [f"must start with unix://, tcp:// or ssh://, not {url!r}"]
    elif scheme == "tcp" and not urlparse(url).port:
        errors["url"] = [f"tcp:// needs a port (the engine's TLS port is usually 2376): {url!r}"]
    if (tls_cert or tls_key or tls_ca) and scheme != "tcp":
        errors.setdefault("url", []).append("TLS certificates apply to tcp:// only")
    if bool(tls_cert) != bool(tls_key):
        errors["tls_key" if tls_cert else "tls_cert"] = ["a client certificate needs its key, and a key its certificate"]
    for field, path in (("tls_ca", tls_ca), ("tls_cert", tls_cert), ("tls_key", tls_key)):
        if path and not os.path.isfile(path):
            errors.setdefault(field, []).append(f"no such file: {path}")
    if scheme == "tcp" and not tls_cert:
        errors.setdefault("tls_cert", []).append(
            "a tcp:// engine without TLS client certificates is root on that host for anyone who can reach it; "
            "give --tls-ca, --tls-cert and --tls-key")
    elif scheme == "tcp" and not tls_ca:
        errors.setdefault("tls_ca", []).append(
            "the CA that signed the engine's certificate is needed too: without it the engine's identity is not "
            "checked, and whoever can pose as it gets every command and file sent to that node")
    return errors


def do_add_node(*, name: str, url: str, labels: dict[str, str] | None = None, cpus: float = 0, memory_mb: int = 0,
                tls_ca: str = "", tls_cert: str = "", tls_key: str = "", shares_host: bool = False,
                check: bool = True) -> Node:
    """Register an engine. With `check` (the default) it must answer first, so a typo or a refused
    certificate is an error now, not an unavailable node later."""
    errors = validate_url(url, tls_cert=tls_cert, tls_key=tls_key, tls_ca=tls_ca)
    if Node.objects.filter(name=name).exists():
        errors["name"] = [f"a node named {name!r} exists already"]
    if cpus < 0 or memory_mb < 0:
        errors["capacity"] = ["cpus and memory_mb must be 0 (all the engine has) or more"]
    if errors:
        raise InvalidInput(errors)
    node = Node(name=name, url=url, labels={str(k): str(v) for k, v in (labels or {}).items()}, cpus=cpus,
                memory_mb=memory_mb, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key, shares_host=shares_host)
    if check:
        try:
            node.engine = engine_of_node(node).probe(settings.LSL_NODE_CHECK_TIMEOUT)
        except runtime.EngineError as exc:
            raise InvalidInput({"url": [f"the engine at {url} did not answer: {exc}"]}) from None
        same = Node.objects.filter(engine__id=node.engine["id"]).first() if node.engine.get("id") else None
        if same is not None:
            raise InvalidInput({"url": [f"that engine is node {same.name!r} already (same engine ID)"]})
        node.checked_at = timezone.now()
    node.save()
    transaction.on_commit(lambda: _publish_node(node))
    return node


def do_set_node_state(node: Node, state: str) -> Node:
    """Drain (no new environments; those there keep running) or activate a node."""
    if state not in NodeState.values:
        raise InvalidInput({"state": [f"must be one of {', '.join(NodeState.values)}"]})
    Node.objects.filter(pk=node.pk).update(state=state)
    node.state = state
    transaction.on_commit(lambda: _publish_node(node))
    return node


def do_forget_node_contents(node: Node) -> dict[str, int]:
    """For a node that is gone for good (its machine lost): forget the records of what lived there, so
    the node can be removed. Nothing on the engine is touched (it is unreachable); said explicitly by
    the operator (`lsl_node remove --forget`), never done on a node that answers."""
    if node.available:
        raise NodeInUse(f"node {node.name!r} answers: delete its environments and volumes through LSL instead")
    from environments import services

    forgotten = {"environments": 0, "team volumes": 0, "kept workspaces": 0}
    with transaction.atomic():
        for env in Environment.objects.filter(node=node).select_related("owner", "template", "team", "node"):
            payload = services.environment_payload(env)
            env_id, owner_id = env.pk, env.owner_id
            env.delete()
            events.publish("environment.deleted", {"environment": payload, "reason": "node_forgotten"},
                           environment_id=env_id, user_ids=[owner_id])
            forgotten["environments"] += 1
        forgotten["team volumes"] = TeamVolume.objects.filter(node=node).delete()[0]
        forgotten["kept workspaces"] = KeptWorkspace.objects.filter(node=node).delete()[0]
    log.warning("node %s: forgot %s", node.name, forgotten)
    return forgotten


def do_remove_node(node: Node) -> None:
    """Forget a node. Only an empty one: environments, team volumes and kept workspaces hold data there."""
    counts = Node.objects.filter(pk=node.pk).aggregate(
        environments=Count("environments", distinct=True), volumes=Count("team_volumes", distinct=True),
        kept=Count("kept_workspaces", distinct=True))
    held = [f"{n} {what}" for what, n in (("environments", counts["environments"]), ("team volumes", counts["volumes"]),
                                          ("kept workspaces", counts["kept"])) if n]
    if held:
        raise NodeInUse(f"node {node.name!r} still holds {', '.join(held)}: drain it, then delete or move them first")
    if node.name == Node.LOCAL and not Node.objects.exclude(pk=node.pk).exists():
        raise NodeInUse("the local node is the only node; add another before removing it")
    node.delete()


# --- health (worker) --------------------------------------------------------------------------------

def _failures_key(node: Node) -> str:
    return f"{node.pk}:{node.url}"


_failures: dict[str, int] = {}  # consecutive failed checks per node, in the checking worker


def check_node(node: Node) -> bool | None:
    """Probe one node and record the outcome. Returns True when it just came back, False when it was
    just marked unavailable, None when nothing changed."""
    now = timezone.now()
    key = _failures_key(node)
    try:
        info = engine_of_node(node).probe(settings.LSL_NODE_CHECK_TIMEOUT)
    except runtime.EngineError as exc:
        _failures[key] = _failures.get(key, 0) + 1
        if node.available and _failures[key] >= settings.LSL_NODE_FAILURES:
            with transaction.atomic():
                if Node.objects.filter(pk=node.pk, available=True).update(
                        available=False, unavailable_since=now, last_error=str(exc)[:2000], checked_at=now):
                    node.available, node.unavailable_since, node.last_error = False, now, str(exc)[:2000]
                    transaction.on_commit(lambda: _announce(node))
                    log.warning("node %s is not answering: %s", node.name, exc)
                    return False
        else:
            Node.objects.filter(pk=node.pk).update(checked_at=now, last_error=str(exc)[:2000])
        return None
    _failures.pop(key, None)
    came_back = not node.available
    if came_back:
        # Catch up with what happened while it was away *before* its environments read from their
        # rows again: marked available first, they read the status recorded before it went down
        # (often "running", while a restarted dockerd has stopped every container) until a later
        # reconcile, and an action taken in between met the wrong state.
        from environments import reconcile

        try:
            reconcile.reconcile(node)
        except runtime.EngineError as exc:
            Node.objects.filter(pk=node.pk).update(checked_at=now, last_error=str(exc)[:2000])
            log.info("node %s answers but could not be reconciled yet: %s", node.name, exc)
            return None
    with transaction.atomic():
        Node.objects.filter(pk=node.pk).update(available=True, unavailable_since=None, last_error="", checked_at=now,
                                               engine=info)
        node.available, node.engine, node.last_error = True, info, ""
        if came_back:
            transaction.on_commit(lambda: _announce(node))
            log.warning("node %s is answering again", node.name)
    return True if came_back else None


def _announce(node: Node) -> None:
    """A node went down or came back: every environment on it reads differently now."""
    from environments import services

    _publish_node(node)
    for env in Environment.objects.filter(node=node).select_related("node", "owner", "template", "team"):
        services.publish_environment(env)


def check_nodes() -> dict[str, Any]:
    """The worker's periodic node check: every node, at once (a dead one costs its timeout, not more)."""
    from concurrent.futures import ThreadPoolExecutor

    nodes = list(Node.objects.all())  # none: nothing to check (never made here: migrations and placement do)
    if not nodes:
        return {"nodes": 0}
    with ThreadPoolExecutor(max_workers=min(8, len(nodes)), thread_name_prefix="lsl-node-check") as pool:
        outcomes = dict(zip([n.name for n in nodes], pool.map(_checked, nodes)))
    return {"nodes": len(nodes), "unavailable": [n.name for n in nodes if not n.available],
            "came_back": [name for name, o in outcomes.items() if o is True],
            "went_down": [name for name, o in outcomes.items() if o is False]}


def _checked(node: Node) -> bool | None:
    from django.db import connection

    try:
        return check_node(node)
    finally:
        connection.close()  # a pool thread's own connection


def pinned_node(*, workspace: KeptWorkspace | None, volume_names: Iterable[str]) -> tuple[Node | None, str]:
    """The node a new environment must go to, if its data already lives somewhere (a kept workspace, a
    team volume it mounts), and what lives there. Several different ones: InvalidInput."""
    pins: dict[int, tuple[Node, str]] = {}
    if workspace is not None:
        pins[workspace.node_id] = (workspace.node, "the kept workspace")
    for volume in TeamVolume.objects.filter(volume_name__in=list(volume_names)).select_related("node", "team"):
        pins.setdefault(volume.node_id, (volume.node, f"team volume {volume}"))
    if len(pins) > 1:
        where = ", ".join(f"{what} on {node.name}" for node, what in pins.values())
        raise InvalidInput({"mounts": [f"these live on different nodes and cannot be mounted together: {where}"]})
    return next(iter(pins.values()), (None, ""))
