"""Every write to environments goes through here (Zulip style): verb-named, on_commit side effects."""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import IntegrityError, transaction
from django.utils import timezone
from guardian.shortcuts import assign_perm, remove_perm
from rest_framework.exceptions import ValidationError

from accounts.models import Team
from environments import jobs, runtime
from environments.models import (
    ROLE_CODENAMES,
    Environment,
    EnvironmentGroupObjectPermission,
    EnvironmentUserObjectPermission,
    NetworkMode,
    Role,
    Status,
    Template,
)
from environments.signals import access_revoked, environment_changed, environment_stopped

log = logging.getLogger(__name__)

FORBIDDEN_TARGETS = ("/proc", "/sys", "/dev", runtime.WORKSPACE_PATH)


class MountError(ValueError):
    pass


def parse_mount(spec: str) -> dict[str, Any]:
    """`SRC:DST[:ro|rw]` → {source, target, read_only}; raises MountError with a precise message."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        raise MountError(f"{spec!r}: expected SRC:DST or SRC:DST:ro")
    mode = parts[2] if len(parts) == 3 else "rw"
    if mode not in ("ro", "rw"):
        raise MountError(f"{spec!r}: mode must be 'ro' or 'rw', not {mode!r}")
    return {"source": parts[0], "target": parts[1], "read_only": mode == "ro"}


def validate_mount(mount: dict[str, Any]) -> dict[str, Any]:
    """Check a bind mount against LSL_HOST_MOUNT_ROOTS after resolving symlinks and `..`."""
    source, target = str(mount.get("source", "")), str(mount.get("target", ""))
    if not os.path.isabs(source):
        raise MountError(f"{source!r}: host path must be absolute")
    if ".." in Path(source).parts:
        raise MountError(f"{source!r}: '..' is not allowed in a host path")
    if not os.path.isabs(target) or ".." in Path(target).parts:
        raise MountError(f"{target!r}: container path must be absolute, without '..'")
    normalized_target = os.path.normpath(target)
    for forbidden in FORBIDDEN_TARGETS:
        if normalized_target == forbidden or normalized_target.startswith(forbidden + "/") or normalized_target == "/":
            raise MountError(f"{target!r}: cannot mount over {forbidden if normalized_target != '/' else '/'}")
    roots = settings.LSL_HOST_MOUNT_ROOTS
    if not roots:
        raise MountError("host mounts are disabled on this server (LSL_HOST_MOUNT_ROOTS is empty)")
    resolved = Path(os.path.realpath(source))
    if not any(resolved == root or root in resolved.parents for root in roots):
        allowed = ", ".join(str(r) for r in roots)
        detail = f" (resolves to {resolved})" if str(resolved) != os.path.normpath(source) else ""
        raise MountError(f"{source!r}{detail} is outside the allowed host roots: {allowed}")
    if not resolved.exists():
        raise MountError(f"{source!r}: no such host directory or file")
    return {"source": str(resolved), "target": normalized_target, "read_only": bool(mount.get("read_only", False))}


def _spec(env: Environment) -> runtime.ContainerSpec:
    return runtime.ContainerSpec(
        environment_id=str(env.id),
        owner=env.owner.get_username(),
        template=env.template.slug,
        name=f"lsl-{env.short_id}",
        hostname=env.name,
        image=env.image,
        cpus=env.cpus,
        memory_mb=env.memory_mb,
        pids=env.pids,
        network_mode=env.network_mode,
        workspace_volume=env.workspace_volume,
        binds=[runtime.Mount(m["source"], m["target"], bool(m.get("read_only"))) for m in env.mounts],
        env={str(k): str(v) for k, v in (env.template.env or {}).items()},
    )


def _changed(env: Environment) -> None:
    transaction.on_commit(lambda: environment_changed.send(sender=Environment, environment=env))


def _set_status(env: Environment, status: str, **fields: Any) -> None:
    env.status = status
    for key, value in fields.items():
        setattr(env, key, value)
    env.save(update_fields=["status", "updated_at", *fields])
    _changed(env)


@dataclass(frozen=True)
class CreateRequest:
    name: str
    template: Template
    team: Team | None = None
    network_mode: str | None = None
    mounts: tuple[dict[str, Any], ...] = ()
    cpus: float | None = None
    memory_mb: int | None = None


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
    cpus = template.cpus if req.cpus is None else req.cpus
    memory = template.memory_mb if req.memory_mb is None else req.memory_mb
    if cpus > template.cpus:
        errors["cpus"] = [f"at most {template.cpus:g} for template {template.slug!r}"]
    if memory > template.memory_mb:
        errors["memory_mb"] = [f"at most {template.memory_mb} for template {template.slug!r}"]
    mounts: list[dict[str, Any]] = []
    if req.mounts and not template.allow_user_mounts:
        errors["mounts"] = [f"template {template.slug!r} does not allow user mounts"]
    for index, mount in enumerate([*(template.mounts or []), *req.mounts]):
        try:
            mounts.append(validate_mount(mount))
        except MountError as exc:
            errors.setdefault("mounts", []).append(f"[{index}] {exc}")
    if req.team is not None and not req.team.memberships.filter(user=owner).exists() and not owner.is_superuser:
        errors["team"] = [f"you are not a member of team {req.team.slug!r}"]
    if Environment.objects.filter(owner=owner, name=req.name).exists():
        errors["name"] = [f"you already have an environment named {req.name!r}"]
    if errors:
        raise ValidationError(errors)

    env_id = uuid.uuid4()
    try:
        with transaction.atomic():
            env = Environment.objects.create(
                id=env_id, name=req.name, owner=owner, team=req.team, template=template, image=template.image,
                status=Status.CREATING, cpus=cpus, memory_mb=memory, pids=template.pids, network_mode=network,
                mounts=mounts, workspace_volume=f"lsl-ws-{env_id.hex[:12]}", progress={"phase": "queued"},
            )
            if req.team is not None:
                # A team environment is usable by its team: members get the member role.
                for codename in Role.MEMBER.codenames:
                    assign_perm(f"environments.{codename}", req.team.group, env)
            jobs.submit_on_commit(provision_environment, env.id)
    except IntegrityError:
        raise ValidationError({"name": [f"you already have an environment named {req.name!r}"]}) from None
    return env


class _ProgressWriter:
    """Writes pull progress to the row at most every `interval` seconds (not a write per layer event),
    and remembers the last figures so the summary survives the pull."""

    def __init__(self, env: Environment, interval: float = 0.1) -> None:
        self.env, self.interval, self.last_write = env, interval, 0.0
        self.latest: dict[str, Any] = {}

    def __call__(self, progress: dict[str, Any]) -> None:
        self.latest = progress
        now = time.monotonic()
        if now - self.last_write < self.interval:
            return
        self.last_write = now
        Environment.objects.filter(pk=self.env.pk).update(progress=progress, updated_at=timezone.now())
        environment_changed.send(sender=Environment, environment=self.env)

    @property
    def summary(self) -> dict[str, Any]:
        return {"image": self.env.image, "bytes": self.latest.get("total", 0), "layers": self.latest.get("layers", 0)}


def provision_environment(env_id: uuid.UUID) -> None:
    """Pull (if needed), create and start the container. Runs in a background job."""
    env = Environment.objects.select_related("template", "owner").get(pk=env_id)
    pulled: dict[str, Any] = {}
    try:
        if not runtime.image_exists(env.image):
            Environment.objects.filter(pk=env.pk).update(progress={"phase": "pulling", "image": env.image, "current": 0, "total": 0})
            writer = _ProgressWriter(env)
            runtime.pull_image(env.image, writer)
            pulled = {"pulled": writer.summary}
        Environment.objects.filter(pk=env.pk).update(progress={"phase": "creating", **pulled})
        container_id = runtime.create_container(_spec(env))
        Environment.objects.filter(pk=env.pk).update(container_id=container_id)
        runtime.start_container(container_id)
    except runtime.EngineError as exc:
        log.warning("provisioning %s failed: %s", env_id, exc)
        env.refresh_from_db()
        with transaction.atomic():
            _set_status(env, Status.ERROR, last_error=str(exc), progress={"phase": "failed", "error": str(exc)})
        return
    env.refresh_from_db()
    with transaction.atomic():
        _set_status(env, Status.RUNNING, started_at=timezone.now(), last_error="", progress={"phase": "ready", **pulled})


def _require_container(env: Environment) -> str:
    if not env.container_id:
        raise runtime.EngineError("the environment has no container yet (still creating or failed)")
    return env.container_id


def start_environment(env: Environment) -> Environment:
    """Start the container; a container removed behind LSL's back is recreated (the workspace volume survives)."""
    if env.status == Status.CREATING:
        raise runtime.EngineError("the environment is still being created")
    state = runtime.container_state(env.container_id) if env.container_id else None
    if state is None:
        env.container_id = runtime.create_container(_spec(env))
        env.save(update_fields=["container_id", "updated_at"])
    runtime.start_container(env.container_id)
    with transaction.atomic():
        _set_status(env, Status.RUNNING, started_at=timezone.now(), last_error="")
    return env


def stop_environment(env: Environment, *, reason: str = "stopped") -> Environment:
    container_id = _require_container(env)
    # Before the container goes: sessions then end with this reason, not "the shell exited".
    environment_stopped.send(sender=Environment, environment=env, reason=reason)
    try:
        runtime.stop_container(container_id)
    except runtime.ContainerNotFound:
        pass
    with transaction.atomic():
        _set_status(env, Status.STOPPED, stopped_at=timezone.now())
    return env


def restart_environment(env: Environment) -> Environment:
    container_id = _require_container(env)
    environment_stopped.send(sender=Environment, environment=env, reason="restarted")
    runtime.restart_container(container_id)
    with transaction.atomic():
        _set_status(env, Status.RUNNING, started_at=timezone.now(), last_error="")
    return env


def delete_environment(env: Environment, *, purge: bool = False) -> None:
    """Remove the container; the workspace volume is kept unless `purge` (data loss is explicit)."""
    environment_stopped.send(sender=Environment, environment=env, reason="deleted")
    if env.container_id:
        runtime.remove_container(env.container_id)
    if purge and env.workspace_volume:
        runtime.remove_volume(env.workspace_volume)
    env.delete()


def update_environment(env: Environment, *, name: str | None = None, team: Team | None | Any = ...) -> Environment:
    fields: list[str] = []
    if name is not None and name != env.name:
        if Environment.objects.filter(owner=env.owner, name=name).exclude(pk=env.pk).exists():
            raise ValidationError({"name": [f"the owner already has an environment named {name!r}"]})
        env.name = name
        fields.append("name")
    if team is not ...:
        env.team = team
        fields.append("team")
    if fields:
        env.save(update_fields=[*fields, "updated_at"])
        _changed(env)
    return env


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
        raise ValidationError({"non_field_errors": ["give exactly one of 'user' or 'team'"]})
    if user is not None and user.pk == env.owner_id:
        raise ValidationError({"user": ["the owner is always admin of their environment"]})
    subject = user if user is not None else team.group  # type: ignore[union-attr]
    with transaction.atomic():
        for codename in ROLE_CODENAMES:
            if codename in role.codenames:
                assign_perm(f"environments.{codename}", subject, env)
            else:
                remove_perm(f"environments.{codename}", subject, env)
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
            transaction.on_commit(lambda: access_revoked.send(sender=Environment, environment=env))
    return bool(deleted)


# --- reconciliation ----------------------------------------------------------------

def _status_for(state: runtime.ContainerState | None) -> str:
    if state is None:
        return Status.MISSING
    return Status.RUNNING if state.running else Status.STOPPED


def reconcile(envs: list[Environment] | None = None) -> list[Environment]:
    """Make rows agree with the engine (one engine call). Returns the environments that changed.

    `creating` rows belong to their provisioning job and are left alone; `error`
    rows with no container stay errors.
    """
    states = runtime.list_managed_containers()
    candidates = envs if envs is not None else list(Environment.objects.exclude(status=Status.CREATING).select_related("owner"))
    changed: list[Environment] = []
    for env in candidates:
        if env.status == Status.CREATING or (env.status == Status.ERROR and not env.container_id):
            continue
        state = states.get(str(env.id))
        status = _status_for(state)
        if state is not None and state.container_id != env.container_id:
            env.container_id = state.container_id
        if status != env.status:
            previous = env.status
            with transaction.atomic():
                _set_status(env, status, container_id=env.container_id)
                if previous == Status.RUNNING:
                    reason = "missing" if status == Status.MISSING else "stopped"
                    transaction.on_commit(lambda e=env, r=reason: environment_stopped.send(sender=Environment, environment=e, reason=r))
            changed.append(env)
    return changed


def reconcile_quietly(envs: list[Environment]) -> None:
    """The cheap check on read: never fail a read because the engine is down."""
    try:
        reconcile(envs)
    except runtime.EngineError as exc:
        log.info("reconcile on read skipped: %s", exc)
