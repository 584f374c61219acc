"""The actions: every write to environments goes through here (Zulip style), verb-named.

Each publishes its event in the same transaction (lsl_site.events), refuses with domain errors
(lsl_site.errors), and asks environments.policy for the rules. Background work (provisioning,
engine events, reconcile) is in provisioning.py, reconcile.py and worker.py, run by the worker.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone
from guardian.shortcuts import assign_perm, remove_perm

from accounts.models import Profile, Team
from environments import activity, identity, keeper, nodes, runtime, tasks
from environments.models import (
    ROLE_CODENAMES,
    Environment,
    EnvironmentGroupObjectPermission,
    EnvironmentUserObjectPermission,
    NetworkMode,
    Role,
    SetupStatus,
    KeptWorkspace,
    Node,
    Status,
    TeamVolume,
    Template,
)
from environments.policy import (
    check_host_network_role,
    check_quota,
    check_team_volume_quota,
    effective_disk_mb,
    format_mb,
    may_use_host_network,
    resolve_mounts,
)
from environments.signals import environment_stopped
from lsl_site import events
from lsl_site.errors import InvalidInput

log = logging.getLogger(__name__)

def container_spec(env: Environment) -> runtime.ContainerSpec:
    return runtime.ContainerSpec(
        environment_id=str(env.id),
        owner=env.owner.get_username(),
        template=env.template.slug,
        name=f"lsl-{env.short_id}",
        hostname=env.name,
        image=env.image,
        cpus=env.cpus,
        memory_mb=env.memory_mb,
        disk_mb=env.disk_mb,
        pids=env.pids,
        network_mode=env.network_mode,
        workspace_volume=env.workspace_volume,
        binds=[runtime.Mount(m["source"], m["target"], bool(m.get("read_only")), m.get("type", "bind")) for m in env.mounts]
        + [keeper.volume_mount()]
        + ([mount] if env.node.shares_host and (mount := keeper.container_mount(env.id)) is not None else []),
        # A UTF-8 locale unless the template says otherwise: in the C locale bash echoes a typed `ü` as
        # `\303\274`. C.UTF-8 needs no locale package (glibc 2.35+, musl, BusyBox).
        env={"LANG": "C.UTF-8", **{str(k): str(v) for k, v in (env.template.env or {}).items()}},
        # sudo is a setuid program: it cannot work under no-new-privileges. A template that allows sudo
        # trades that hardening for it (capabilities stay limited to DEV_SHELL_CAPABILITIES either way).
        no_new_privileges=not env.template.allow_sudo,
        command=identity.boot_command(Profile.for_user(env.owner), shell=env.template.shell or "/bin/sh",
                                      sudo=env.template.allow_sudo, owned_dirs=[runtime.WORKSPACE_PATH],
                                      keepalive=keeper.serve_command()),
    )


# --- events ------------------------------------------------------------------------------

def environment_payload(env: Environment) -> dict[str, Any]:
    """What an event-stream client needs to redraw an environment's row (docs/protocol.md)."""
    def iso(value: Any) -> str | None:
        return value.isoformat() if value else None

    return {"id": str(env.id), "name": env.name, "owner": env.owner.get_username(),
            "team": env.team.slug if env.team_id and env.team else None, "template": env.template.slug,
            # `node_unavailable` while its node does not answer; `recorded_status` is the last known one.
            "status": nodes.status_of(env), "recorded_status": env.status, "progress": env.progress, "last_error": env.last_error, "stop_reason": env.stop_reason,
            "setup_status": env.setup_status, "started_at": iso(env.started_at), "stopped_at": iso(env.stopped_at),
            "node": env.node.name,
            "updated_at": iso(timezone.now())}


def publish_environment(env: Environment, kind: str = "environment.changed", fields: dict[str, Any] | None = None) -> None:
    events.publish(kind, {"environment": environment_payload(env), **(fields or {})}, environment_id=env.pk,
                   user_ids=[env.owner_id])


def set_status(env: Environment, status: str, **fields: Any) -> None:
    """Save a new status (and fields) and publish the change; call inside the write's transaction."""
    env.status = status
    for key, value in fields.items():
        setattr(env, key, value)
    env.save(update_fields=["status", "updated_at", *fields])
    publish_environment(env)


@dataclass(frozen=True)
class CreateRequest:
    name: str
    template: Template
    team: Team | None = None
    network_mode: str | None = None
    mounts: tuple[dict[str, Any], ...] = ()
    cpus: float | None = None
    memory_mb: int | None = None
    disk_mb: int | None = None
    workspace: KeptWorkspace | None = None  # a kept workspace to attach instead of a fresh one


def create_environment(owner: AbstractBaseUser, req: CreateRequest) -> Environment:
    """Validate, record the environment as `creating`, and provision it in the background.

    The caller gets the row immediately; image pulls report progress in `progress`.
    """
    template = req.template
    network = req.network_mode or template.default_network
    errors: dict[str, list[str]] = {}
    if network not in (template.network_modes or [NetworkMode.BRIDGE]):
        allowed = ", ".join(template.network_modes)
        errors["network_mode"] = [f"template {template.slug!r} allows {allowed}, not {network!r}"]
    elif network == NetworkMode.HOST and not may_use_host_network(owner):
        errors["network_mode"] = ["host networking is only for staff and users whose profile allows it "
                                  "(ask an administrator), or use bridge"]
    cpus = template.cpus if req.cpus is None else req.cpus
    memory = template.memory_mb if req.memory_mb is None else req.memory_mb
    if cpus > template.cpus:
        errors["cpus"] = [f"at most {template.cpus:g} for template {template.slug!r}"]
    if memory > template.memory_mb:
        errors["memory_mb"] = [f"at most {template.memory_mb} for template {template.slug!r}"]
    template_disk = effective_disk_mb(template)
    disk = template_disk if req.disk_mb is None else req.disk_mb
    if template_disk and not 0 < disk <= template_disk:  # 0 would be "no limit": not the user's to choose
        errors["disk_mb"] = [f"at most {template_disk} (MiB) for template {template.slug!r}"]
    if req.mounts and not template.allow_user_mounts:
        errors["mounts"] = [f"template {template.slug!r} does not allow user mounts"]
    mounts, mount_problems = resolve_mounts(owner, template, req.team, req.mounts)
    if mount_problems:
        errors.setdefault("mounts", []).extend(mount_problems)
    elif not errors:
        errors.update(_create_mount_sources(mounts, Profile.for_user(owner)))
    if req.team is not None and not req.team.memberships.filter(user=owner).exists() and not owner.is_superuser:
        errors["team"] = [f"you are not a member of team {req.team.slug!r}"]
    if Environment.objects.filter(owner=owner, name=req.name).exists():
        errors["name"] = [f"you already have an environment named {req.name!r}"]
    if req.workspace is not None and req.workspace.owner_id != owner.pk:
        errors["workspace"] = ["no such kept workspace"]  # someone else's: the same answer as none at all
    if errors:
        raise InvalidInput(errors)

    env_id = uuid.uuid4()
    workspace_volume = f"lsl-ws-{env_id.hex[:12]}"
    has_setup = bool(template.setup or template.user_setup)
    try:
        with transaction.atomic():
            _lock_quota_subjects(owner, req.team)
            if req.workspace is not None:
                # Attached, it is this environment's workspace: no longer kept, nor counted twice.
                if not KeptWorkspace.objects.filter(pk=req.workspace.pk, owner=owner).delete()[0]:
                    raise InvalidInput({"workspace": ["no such kept workspace"]})
                workspace_volume = req.workspace.volume_name
            check_quota(owner, req.team, cpus=cpus, memory_mb=memory, disk_mb=disk, new=True)
            # After the quota lock: concurrent creates see each other's reservations.
            pinned, because = nodes.pinned_node(workspace=req.workspace, volume_names=[
                m["source"] for m in mounts if m.get("type") == "volume"])
            node = nodes.place(cpus=cpus, memory_mb=memory, selector=template.node_selector, pinned=pinned,
                               pinned_because=because, needs_host=any(m.get("type", "bind") == "bind" for m in mounts))
            env = Environment.objects.create(
                id=env_id, name=req.name, owner=owner, team=req.team, template=template, image=template.image, node=node,
                status=Status.CREATING, cpus=cpus, memory_mb=memory, disk_mb=disk, pids=template.pids, network_mode=network,
                mounts=mounts, workspace_volume=workspace_volume, progress={"phase": "queued"},
                setup_status=SetupStatus.PENDING if has_setup else SetupStatus.NONE,
            )
            if req.team is not None:
                # A team environment is usable by its team: members get the member role.
                _grant_new_environment(env, req.team.group, Role.MEMBER)
            # The task commits with the row (one commit for both), and the worker is woken first.
            tasks.enqueue_provisioning(env_id)
            publish_environment(env, "environment.created")
    except IntegrityError:
        raise InvalidInput({"name": [f"you already have an environment named {req.name!r}"]}) from None
    return env


def _grant_new_environment(env: Environment, group: Any, role: Role) -> None:
    """assign_perm of each of `role`'s codenames to `group` on a just-created `env`, in two queries:
    a new row has no grants yet, so guardian's get_or_create per permission has nothing to find."""
    from django.contrib.auth.models import Permission
    from django.contrib.contenttypes.models import ContentType

    codenames = role.codenames
    permissions = list(Permission.objects.filter(content_type=ContentType.objects.get_for_model(Environment),
                                                 codename__in=codenames))
    if len(permissions) != len(codenames):  # not migrated: let guardian raise its usual error
        for codename in codenames:
            assign_perm(f"environments.{codename}", group, env)
        return
    EnvironmentGroupObjectPermission.objects.bulk_create(
        [EnvironmentGroupObjectPermission(permission=permission, group=group, content_object=env) for permission in permissions])


def _create_mount_sources(mounts: list[dict[str, Any]], profile: Profile) -> dict[str, list[str]]:
    """Create the missing host directories of template mounts marked `create` (policy allowed them),
    owned by the environment user."""
    for mount in mounts:
        if not mount.pop("create", False):
            continue
        try:
            Path(mount["source"]).mkdir(parents=True, exist_ok=True)
            os.chown(mount["source"], profile.uid, profile.gid)
        except OSError as exc:
            return {"mounts": [f"{mount['source']!r}: cannot create it: {exc.strerror or exc}"]}
    return {}


def _lock_quota_subjects(owner: AbstractBaseUser, team: Team | None) -> None:
    """Serialise quota checks per user and team (PostgreSQL row locks; SQLite transactions are already serial)."""
    from django.contrib.auth import get_user_model
    from django.db import connection

    if not connection.features.has_select_for_update:
        return  # SQLite: the write transaction (BEGIN IMMEDIATE) is the lock; a SELECT would only cost time
    list(get_user_model().objects.select_for_update().filter(pk=owner.pk).values_list("pk", flat=True))
    if team is not None:
        list(Team.objects.select_for_update().filter(pk=team.pk).values_list("pk", flat=True))




# --- the environment user --------------------------------------------------------------

def shell_user(env: Environment) -> str:
    """The exec user for shells and commands in `env`: "uid:gid" of the owner's user in the container."""
    if env.identity:
        return f"{env.identity['uid']}:{env.identity['gid']}"
    profile = Profile.for_user(env.owner)
    return f"{profile.uid}:{profile.gid}"


def shell_environment(env: Environment) -> dict[str, str]:
    """HOME, USER and LOGNAME for shells and commands in `env`."""
    if env.identity:
        name, home = env.identity["name"], env.identity["home"]
    else:
        name = Profile.for_user(env.owner).shell_name
        home = f"/home/{name}"
    return {"HOME": home, "USER": name, "LOGNAME": name}


def shell_identity(env: Environment) -> tuple[str, dict[str, str]]:
    """(exec user, environment) for a shell, creating the user first if this container lacks it."""
    if not env.identity and env.container_id and env.status == Status.RUNNING:
        try:
            from environments.provisioning import ensure_identity

            ensure_identity(env)
        except runtime.EngineError as exc:
            log.warning("%s: %s", env, exc)
    return shell_user(env), shell_environment(env)


def shell_session_identity(container_id: str) -> tuple[str, dict[str, str]]:
    """`shell_identity` by container id (what a terminal hub knows). Unknown container: the image default."""
    env = Environment.objects.select_related("owner", "template", "node").filter(container_id=container_id).first()
    if env is None:
        return "", {}
    return shell_identity(env)



# --- start, stop, restart, delete ------------------------------------------------------

ACTION_STALE_AFTER = timedelta(seconds=120)  # a pending action older than this belonged to a dead process


class ActionInProgress(runtime.EngineError):
    """Another start/stop/restart/delete of this environment is under way."""


@contextmanager
def _pending(env: Environment, action: str) -> Iterator[None]:
    """Mark `action` as under way (a conditional UPDATE, so two at once conflict) for its duration.

    While it is set, the worker knows that the engine events this action causes (a `die` for a
    stop, a `destroy` for a delete) are LSL's own doing, not something that happened behind its back.
    """
    now = timezone.now()
    free = Q(pending_action="") | Q(pending_action_at__lt=now - ACTION_STALE_AFTER) | Q(pending_action_at__isnull=True)
    if not Environment.objects.filter(Q(pk=env.pk) & free).update(pending_action=action, pending_action_at=now):
        current = Environment.objects.filter(pk=env.pk).values_list("pending_action", flat=True).first()
        raise ActionInProgress(f"another action ({current or 'unknown'}) is in progress on this environment; try again shortly")
    try:
        yield
    finally:
        Environment.objects.filter(pk=env.pk, pending_action=action).update(pending_action="", pending_action_at=None)
        env.pending_action = ""


def require_container(env: Environment) -> str:
    if not env.container_id:
        raise runtime.EngineError("the environment has no container yet (still creating or failed)")
    return env.container_id


def start_environment(env: Environment) -> Environment:
    """Start the container. Always recovers an `error` or `missing` environment: a container removed
    behind LSL's back, or one left half-made by a dead worker or engine, is replaced by a fresh one
    on the same workspace volume."""
    if env.status == Status.CREATING:
        raise runtime.EngineError("the environment is still being created")
    engine = nodes.engine_for(env)
    with _pending(env, "start"):
        state = engine.container_state(env.container_id) if env.container_id else None
        if state is None or not state.running:
            check_quota(env.owner, env.team, cpus=env.cpus, memory_mb=env.memory_mb, new=False, exclude=env)
        if state is not None and state.status in ("dead", "removing"):
            engine.remove_container(state.container_id)
            state = None
        if state is None:
            spec = container_spec(env)
            # A container of ours under the same name (created, then never recorded) is in the way.
            stale = engine.find_environment_container(str(env.id), spec.name)
            if stale is not None:
                engine.remove_container(stale.container_id)
            keeper.ensure_volume(engine, env.image)
            env.container_id = engine.create_container(spec)
            env.identity = {}  # a new container has no user yet
            env.save(update_fields=["container_id", "identity", "updated_at"])
        if state is None or not state.running:
            keeper.clear_boot_identity(env.id)
            engine.start_container(env.container_id)
        if not env.identity:
            from environments.provisioning import ensure_identity

            ensure_identity(env)
        with transaction.atomic():
            now = timezone.now()
            set_status(env, Status.RUNNING, **{"started_at": now, "last_active_at": now, "last_error": "",
                                               "stop_reason": "", **_disk_grace(env, now)})
    return env


def _disk_grace(env: Environment, now: Any) -> dict[str, Any]:
    """After a stop for disk, a start is allowed so that the user can delete files; the worker gives it
    LSL_DISK_GRACE seconds to get under the limit, during which it may not grow (policy.disk_verdict).
    Any other start ends a grace period."""
    if env.stop_reason != "disk":
        if env.disk_grace_until is not None and now < env.disk_grace_until:
            return {"last_error": env.last_error}  # restarted while cleaning up: the same grace period and notice
        return {"disk_grace_until": None, "disk_grace_mb": None}
    until = now + timedelta(seconds=settings.LSL_DISK_GRACE)
    used = max(env.disk_used_mb or 0, env.disk_mb)
    return {"disk_grace_until": until, "disk_grace_mb": used,
            "last_error": f"over its disk limit ({format_mb(used)} used of {format_mb(env.disk_mb)}): delete files "
                          f"before {until:%H:%M:%S} UTC or it is stopped again"}


def stop_environment(env: Environment, *, reason: str = "stopped", detail: str = "") -> Environment:
    """Stop the container (never delete anything); `detail` says why to people (e.g. the disk limit)."""
    container_id = require_container(env)
    engine = nodes.engine_for(env)
    with _pending(env, "stop"):
        # Before the container goes: sessions then end with this reason, not "the shell exited".
        environment_stopped.send(sender=Environment, environment=env, reason=reason)
        try:
            engine.stop_container(container_id)
        except runtime.ContainerNotFound:
            pass
        with transaction.atomic():
            set_status(env, Status.STOPPED, stopped_at=timezone.now(), stop_reason=reason,
                       **({"last_error": detail} if detail else {}))
    return env


def restart_environment(env: Environment) -> Environment:
    container_id = require_container(env)
    engine = nodes.engine_for(env)
    with _pending(env, "restart"):
        environment_stopped.send(sender=Environment, environment=env, reason="restarted")
        engine.restart_container(container_id)
        with transaction.atomic():
            now = timezone.now()
            set_status(env, Status.RUNNING, **{"started_at": now, "last_error": "", "stop_reason": "",
                                               **_disk_grace(env, now)})
    return env


def delete_environment(env: Environment, *, purge: bool = False) -> None:
    """Remove the container; the workspace volume is kept unless `purge` (data loss is explicit)."""
    engine = nodes.engine_for(env)  # a node that is down: 503, and nothing is forgotten about it
    with _pending(env, "delete"):
        environment_stopped.send(sender=Environment, environment=env, reason="deleted")
        if env.container_id:
            engine.remove_container(env.container_id)
        else:
            # A dead worker may have created a container it never recorded.
            stale = engine.find_environment_container(str(env.id), f"lsl-{env.short_id}")
            if stale is not None:
                engine.remove_container(stale.container_id)
        if purge and env.workspace_volume:
            engine.remove_volume(env.workspace_volume)
        keeper.remove_host_dir(env.id)
        # Kept (and listed) only if it was made: an environment can fail before its volume exists.
        keep = not purge and bool(env.workspace_volume) and engine.volume_exists(env.workspace_volume)
        with transaction.atomic():
            payload = environment_payload(env)
            env_id, owner_id = env.pk, env.owner_id
            if keep:
                KeptWorkspace.objects.get_or_create(volume_name=env.workspace_volume, defaults={
                    "owner": env.owner, "team": env.team, "environment_name": env.name, "node": env.node,
                    "template_slug": env.template.slug if env.template_id else "", "disk_mb": env.disk_mb})
            env.delete()
            events.publish("environment.deleted", {"environment": payload}, environment_id=env_id, user_ids=[owner_id])


def update_environment(env: Environment, *, name: str | None = None, team: Team | None | Any = ...,
                       by: AbstractBaseUser | None = None) -> Environment:
    """Rename or move to another team. `by` (the acting user, when one acts) may only move it into a team
    they belong to, exactly as at creation."""
    fields: list[str] = []
    if name is not None and name != env.name:
        if Environment.objects.filter(owner=env.owner, name=name).exclude(pk=env.pk).exists():
            raise InvalidInput({"name": [f"the owner already has an environment named {name!r}"]})
        env.name = name
        fields.append("name")
    if team is not ... and team != env.team:
        if any(m.get("type") == "volume" for m in env.mounts):
            raise InvalidInput({"team": ["this environment mounts team volumes: it cannot change team"]})
        if team is not None and by is not None and not by.is_superuser and not team.memberships.filter(user=by).exists():
            raise InvalidInput({"team": [f"you are not a member of team {team.slug!r}"]})
        if team is not None:
            # The team takes it on: its environment and disk quotas, and its CPU and memory ones if it runs.
            running = env.status in (Status.RUNNING, Status.CREATING)
            check_quota(env.owner, team, cpus=env.cpus if running else 0, memory_mb=env.memory_mb if running else 0,
                        new=True, exclude=env, disk_mb=env.disk_mb)
        env.team = team
        fields.append("team")
    if fields:
        with transaction.atomic():
            env.save(update_fields=[*fields, "updated_at"])
            publish_environment(env)
    return env


def resize_environment(env: Environment, *, cpus: float, memory_mb: int, pids: int) -> Environment:
    """New CPU, memory and process limits, applied to the container at once (running or stopped) and
    counted in quotas like a start (the admin's environment form)."""
    running = env.status in (Status.RUNNING, Status.CREATING)
    if running:
        check_quota(env.owner, env.team, cpus=cpus, memory_mb=memory_mb, new=False, exclude=env)
    with transaction.atomic():
        if env.container_id:
            try:
                nodes.engine_for(env).update_resources(env.container_id, cpus=cpus, memory_mb=memory_mb, pids=pids)
            except runtime.ContainerNotFound:
                pass  # recreated with the new limits at the next start
        env.cpus, env.memory_mb, env.pids = cpus, memory_mb, pids
        env.save(update_fields=["cpus", "memory_mb", "pids", "updated_at"])
        publish_environment(env)
    return env


# --- kept workspaces ----------------------------------------------------------------

def purge_kept_workspace(kept: KeptWorkspace) -> None:
    """Delete a kept workspace's data (the volume) and its record. Explicit, like `delete --purge`."""
    nodes.engine_on(kept.node).remove_volume(kept.volume_name)  # refused by the engine (an EngineError) while a container uses it
    with transaction.atomic():
        kept.delete()
        events.publish("workspace.purged", {"workspace": str(kept.pk), "volume": kept.volume_name},
                       user_ids=[kept.owner_id])


def adopt_orphan_workspaces() -> list[KeptWorkspace]:
    """Record this instance's workspace volumes that no environment uses and nothing records: kept
    before KeptWorkspace existed, or left by a delete that died half-way. Run by the worker."""
    from django.contrib.auth import get_user_model

    in_use = set(Environment.objects.exclude(workspace_volume="").values_list("workspace_volume", flat=True))
    known = set(KeptWorkspace.objects.values_list("volume_name", flat=True))
    adopted = []
    for node in Node.objects.filter(available=True):
        try:
            volumes = nodes.engine_of_node(node).list_workspace_volumes()
        except runtime.EngineError as exc:
            log.info("listing workspace volumes on %s: %s", node, exc)
            continue
        for volume in volumes:
            if volume.name in in_use or volume.name in known:
                continue
            owner = get_user_model().objects.filter(username=volume.owner).first()
            if owner is None:
                continue  # an owner deleted since: an operator's call (`docker volume rm`), not ours
            kept, _ = KeptWorkspace.objects.get_or_create(volume_name=volume.name, defaults={
                "owner": owner, "node": node, "environment_name": f"(deleted {volume.environment_id[:8]})"
                if volume.environment_id else "(unknown)", "deleted_at": volume.created_at or timezone.now()})
            adopted.append(kept)
    return adopted


# --- access ----------------------------------------------------------------------

@dataclass(frozen=True)
class Grant:
    id: str  # "user-<pk>" or "team-<pk>"
    kind: str
    subject_id: int
    name: str
    role: Role


def _role_from_codenames(codenames: set[str]) -> Role | None:
    role = None
    for level, codename in enumerate(ROLE_CODENAMES, start=1):
        if codename in codenames:
            role = Role(level)
    return role


def list_access(env: Environment) -> list[Grant]:
    """Grants as (subject, role), derived from guardian's tables so admin edits show up too."""
    by_user: dict[int, tuple[str, set[str]]] = {}
    for row in EnvironmentUserObjectPermission.objects.filter(content_object=env).select_related("user", "permission"):
        by_user.setdefault(row.user_id, (row.user.get_username(), set()))[1].add(row.permission.codename)
    by_team: dict[int, tuple[str, set[str]]] = {}
    rows = EnvironmentGroupObjectPermission.objects.filter(content_object=env, group__team__isnull=False)
    for row in rows.select_related("group__team", "permission"):
        by_team.setdefault(row.group.team.pk, (row.group.team.slug, set()))[1].add(row.permission.codename)
    grants: list[Grant] = []
    for kind, mapping in (("user", by_user), ("team", by_team)):
        for pk, (name, codenames) in sorted(mapping.items()):
            role = _role_from_codenames(codenames)
            if role is not None:
                grants.append(Grant(id=f"{kind}-{pk}", kind=kind, subject_id=pk, name=name, role=role))
    return grants


def grant_access(env: Environment, *, role: Role, user: AbstractBaseUser | None = None, team: Team | None = None) -> Grant:
    """Give a user or a team exactly `role` (replacing any previous role)."""
    if (user is None) == (team is None):
        raise InvalidInput({"non_field_errors": ["give exactly one of 'user' or 'team'"]})
    if user is not None and user.pk == env.owner_id:
        raise InvalidInput({"user": ["the owner is always admin of their environment"]})
    if user is not None:
        # Member and admin run commands: on a host-network environment that needs the right. A team
        # grant is not refused (membership changes); role_for holds members without it at viewer.
        check_host_network_role(env, user, role)
    subject = user if user is not None else team.group  # type: ignore[union-attr]
    with transaction.atomic():
        for codename in ROLE_CODENAMES:
            if codename in role.codenames:
                assign_perm(f"environments.{codename}", subject, env)
            else:
                remove_perm(f"environments.{codename}", subject, env)
        _publish_access(env, user=user, team=team, role=role.label)
    if user is not None:
        return Grant(id=f"user-{user.pk}", kind="user", subject_id=user.pk, name=user.get_username(), role=role)
    assert team is not None
    return Grant(id=f"team-{team.pk}", kind="team", subject_id=team.pk, name=team.slug, role=role)


def revoke_access(env: Environment, grant_id: str) -> bool:
    """Remove a grant; returns False when there was nothing to revoke. Live sessions re-check at once."""
    kind, _, raw_pk = grant_id.partition("-")
    if kind not in ("user", "team") or not raw_pk.isdigit():
        return False
    with transaction.atomic():
        if kind == "user":
            deleted, _ = EnvironmentUserObjectPermission.objects.filter(content_object=env, user_id=int(raw_pk)).delete()
        else:
            deleted, _ = EnvironmentGroupObjectPermission.objects.filter(content_object=env, group__team__pk=int(raw_pk)).delete()
        if deleted:
            if kind == "user":
                _publish_access(env, user_id=int(raw_pk), role=None)
            else:
                _publish_access(env, team=Team.objects.filter(pk=int(raw_pk)).first(), role=None)
    return bool(deleted)


# --- reconciliation ----------------------------------------------------------------


def _publish_access(env: Environment, *, role: str | None, user: AbstractBaseUser | None = None, user_id: int | None = None,
                    team: Team | None = None) -> None:
    """Live terminals re-check their participants' roles on this event (no polling)."""
    if user is not None:
        user_id = user.pk
    if user_id is not None:
        subject, affected = f"user-{user_id}", [user_id]
    elif team is not None:
        subject, affected = f"team-{team.pk}", list(team.memberships.values_list("user_id", flat=True))
    else:
        return
    events.publish("access.changed", {"subject": subject, "role": role}, environment_id=env.pk,
                   user_ids=[*affected, env.owner_id])



# --- idle stop (run by the worker) ---------------------------------------------------------

def last_activity(env: Environment) -> Any:
    """The latest of: started, last seen active, last user leaving it (e.g. one of its terminal sessions)."""
    moments = [m for m in (env.started_at, env.last_active_at, activity.last_left(env)) if m is not None]
    return max(moments) if moments else env.created_at


def is_active(env: Environment) -> bool:
    """Someone is attached to it (e.g. one of its terminal sessions), or a command (exec) is running in it."""
    if activity.attached(env):
        return True
    return bool(env.container_id) and nodes.engine_for(env).running_exec_count(env.container_id) > 0


def stop_idle_environments(*, idle_after: float | None = None) -> list[Environment]:
    """Stop (never delete) running environments idle for `idle_after` seconds (LSL_IDLE_STOP_AFTER; 0 = off)."""
    idle_after = settings.LSL_IDLE_STOP_AFTER if idle_after is None else idle_after
    if not idle_after or idle_after <= 0:
        return []
    stopped: list[Environment] = []
    now = timezone.now()
    for env in (Environment.objects.filter(status=Status.RUNNING, node__available=True).exclude(container_id="")
                .select_related("owner", "template", "team", "node")):
        try:
            if is_active(env):
                Environment.objects.filter(pk=env.pk).update(last_active_at=now)
                continue
            if (now - last_activity(env)).total_seconds() < idle_after:
                continue
            env.refresh_from_db()
            if env.status != Status.RUNNING:
                continue
            log.info("stopping %s: idle for more than %gs", env, idle_after)
            stop_environment(env, reason="idle")
            stopped.append(env)
        except runtime.EngineError as exc:
            log.warning("idle check of %s failed: %s", env, exc)
    return stopped


# --- team volumes ------------------------------------------------------------------------

def create_team_volume(team: Team, name: str, *, by: AbstractBaseUser | None = None, node: Node | None = None) -> TeamVolume:
    """A volume lives on one node (`node`, else the one placement would pick for a new environment
    now); environments that mount it are placed there."""
    if TeamVolume.objects.filter(team=team, name=name).exists():
        raise InvalidInput({"name": [f"team {team.slug!r} already has a volume named {name!r}"]})
    volume_name = f"lsl-team-{team.slug[:40]}-{name[:40]}-{uuid.uuid4().hex[:8]}"
    with transaction.atomic():
        if by is not None:
            check_team_volume_quota(by)  # before anything is written; the engine's volume comes last
        node = node or nodes.place(cpus=0, memory_mb=0, selector={})
        volume = TeamVolume.objects.create(team=team, name=name, volume_name=volume_name, created_by=by, node=node)
        nodes.engine_on(node).ensure_volume(volume_name, {"lsl.team": team.slug, "lsl.team-volume": name})
    return volume


def volume_users(volume: TeamVolume) -> list[Environment]:
    return [env for env in Environment.objects.filter(team=volume.team)
            if any(m.get("type") == "volume" and m.get("source") == volume.volume_name for m in env.mounts)]


def delete_team_volume(volume: TeamVolume) -> None:
    """Delete the volume and its data; refused while an environment mounts it."""
    users = volume_users(volume)
    if users:
        names = ", ".join(f"{env.owner.get_username()}/{env.name}" for env in users[:5])
        raise InvalidInput({"volume": [f"volume {volume.name!r} is mounted by {names}: delete those environments first"]})
    nodes.engine_on(volume.node).remove_volume(volume.volume_name)
    volume.delete()


# --- snapshots ---------------------------------------------------------------------------

SNAPSHOT_REPOSITORY = "lsl-snapshots"


def snapshot_environment(env: Environment, by: AbstractBaseUser, *, slug: str, description: str = "",
                         teams: list[Team] | tuple[Team, ...] = (), include_workspace: bool = True) -> Template:
    """Commit the environment's container (and, by default, its workspace) to a new image and register
    it as a template usable by `by` and by `teams` (each of which `by` must belong to).

    The template copies the source template's settings, without setup hooks: they already ran.
    """
    from django.core.validators import validate_slug
    from django.core.exceptions import ValidationError as DjangoValidationError

    errors: dict[str, list[str]] = {}
    try:
        validate_slug(slug)
        if slug != slug.lower() or len(slug) > 63:
            raise DjangoValidationError("")
    except DjangoValidationError:
        errors["slug"] = [f"{slug!r} is not a valid template slug (lowercase letters, digits and '-')"]
    if Template.objects.filter(slug=slug).exists():
        errors["slug"] = [f"a template named {slug!r} already exists"]
    for team in teams:
        if not by.is_superuser and not team.memberships.filter(user=by).exists():
            errors.setdefault("teams", []).append(f"you are not a member of team {team.slug!r}")
    engine = nodes.engine_for(env)
    if not env.container_id or engine.container_state(env.container_id) is None:
        errors["environment"] = ["the environment has no container to snapshot"]
    if errors:
        raise InvalidInput(errors)
    source = env.template
    tag = timezone.now().strftime("%Y%m%d%H%M%S")
    repository = f"{SNAPSHOT_REPOSITORY}/{slug}"
    engine.commit_container(env.container_id, repository, tag,
                             labels={"lsl.snapshot.of": str(env.id), "lsl.snapshot.by": by.get_username()},
                            copy_paths=(runtime.WORKSPACE_PATH,) if include_workspace else ())
    with transaction.atomic():
        template = Template.objects.create(
            slug=slug, image=f"{repository}:{tag}",
            description=description or f"Snapshot of {env.owner.get_username()}/{env.name} ({source.slug})",
            shell=source.shell, env=source.env, cpus=source.cpus, memory_mb=source.memory_mb, disk_mb=source.disk_mb,
            pids=source.pids,
            network_modes=source.network_modes, mounts=source.mounts, allow_user_mounts=source.allow_user_mounts,
            allow_sudo=source.allow_sudo, setup=[], user_setup=[], labels=source.labels, public=False,
            node_selector=source.node_selector, image_node=env.node,  # other nodes copy the image from there
            managed_by_catalog=False, created_by=by, snapshot_of=f"{env.owner.get_username()}/{env.name} ({env.id})",
        )
        template.teams.set(teams)
        assign_perm("environments.use_template", by, template)
    return template
