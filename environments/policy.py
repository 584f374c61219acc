"""LSL's rules, with no side effects: which mounts are allowed, who may use host networking, quotas.

Pure policy (Zulip keeps such checks apart from its actions): these functions read settings, the
database and the host's file system to decide, and never change anything. The actions in
`services` call them before they write; the API and the web pages see their refusals as domain
errors (MountError lines, QuotaExceeded).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser

from accounts.models import Profile, Team
from environments import runtime
from environments.models import Environment, Status, TeamQuota, TeamVolume, Template
from lsl_site.errors import DomainError

FORBIDDEN_TARGETS = ("/proc", "/sys", "/dev", runtime.WORKSPACE_PATH)


class MountError(ValueError):
    pass


VOLUME_PREFIX = "volume:"


def parse_mount(spec: str) -> dict[str, Any]:
    """`SRC:DST[:ro|rw]` → {source, target, read_only}, or `volume:NAME:DST[:ro|rw]` → {volume, target, read_only};
    raises MountError with a precise message."""
    if spec.startswith(VOLUME_PREFIX):
        parts = spec[len(VOLUME_PREFIX):].split(":")
        if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
            raise MountError(f"{spec!r}: expected volume:NAME:DST or volume:NAME:DST:ro")
        mode = parts[2] if len(parts) == 3 else "rw"
        if mode not in ("ro", "rw"):
            raise MountError(f"{spec!r}: mode must be 'ro' or 'rw', not {mode!r}")
        return {"volume": parts[0], "target": parts[1], "read_only": mode == "ro"}
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        raise MountError(f"{spec!r}: expected SRC:DST or SRC:DST:ro")
    mode = parts[2] if len(parts) == 3 else "rw"
    if mode not in ("ro", "rw"):
        raise MountError(f"{spec!r}: mode must be 'ro' or 'rw', not {mode!r}")
    return {"source": parts[0], "target": parts[1], "read_only": mode == "ro"}


def _refuse_nul(value: str, what: str) -> None:
    """A NUL byte cannot be in a path (the OS refuses it: a ValueError, not an OSError) nor in a JSON column."""
    if "\x00" in value:
        raise MountError(f"{what} {value!r}: NUL bytes are not allowed")


def _validate_target(target: str) -> str:
    _refuse_nul(target, "target")
    if not os.path.isabs(target) or ".." in Path(target).parts:
        raise MountError(f"{target!r}: container path must be absolute, without '..'")
    normalized_target = os.path.normpath(target)
    for forbidden in FORBIDDEN_TARGETS:
        if normalized_target == forbidden or normalized_target.startswith(forbidden + "/") or normalized_target == "/":
            raise MountError(f"{target!r}: cannot mount over {forbidden if normalized_target != '/' else '/'}")
    return normalized_target


def validate_mount(mount: dict[str, Any], *, may_create: bool = False) -> dict[str, Any]:
    """Check a bind mount against LSL_HOST_MOUNT_ROOTS after resolving symlinks and `..`.

    `may_create`: a missing source directory inside the roots is fine (a template mount with
    `create: true`); the result then says `create: true` and the action creates it.
    """
    source, target = str(mount.get("source", "")), str(mount.get("target", ""))
    _refuse_nul(source, "source")
    if not os.path.isabs(source):
        raise MountError(f"{source!r}: host path must be absolute")
    if ".." in Path(source).parts:
        raise MountError(f"{source!r}: '..' is not allowed in a host path")
    normalized_target = _validate_target(target)
    roots = settings.LSL_HOST_MOUNT_ROOTS
    if not roots:
        raise MountError("host mounts are disabled on this server (LSL_HOST_MOUNT_ROOTS is empty)")
    resolved = Path(os.path.realpath(source))
    if not any(resolved == root or root in resolved.parents for root in roots):
        allowed = ", ".join(str(r) for r in roots)
        detail = f" (resolves to {resolved})" if str(resolved) != os.path.normpath(source) else ""
        raise MountError(f"{source!r}{detail} is outside the allowed host roots: {allowed}")
    if not resolved.exists() and not may_create:
        raise MountError(f"{source!r}: no such host directory or file")
    resolved_mount = {"type": "bind", "source": str(resolved), "target": normalized_target,
                      "read_only": bool(mount.get("read_only", False))}
    if not resolved.exists():
        resolved_mount["create"] = True
    return resolved_mount


def validate_volume_mount(mount: dict[str, Any], *, owner: AbstractBaseUser, team: Team | None) -> dict[str, Any]:
    """A team volume may only go into an environment of its team, created by a member of that team."""
    name = str(mount.get("volume", ""))
    _refuse_nul(name, "volume")
    normalized_target = _validate_target(str(mount.get("target", "")))
    if team is None:
        raise MountError(f"volume {name!r}: team volumes can only be mounted into a team environment (set its team)")
    volume = TeamVolume.objects.filter(team=team, name=name).first()
    if volume is None:
        raise MountError(f"volume {name!r}: team {team.slug!r} has no such volume")
    if not owner.is_superuser and not team.memberships.filter(user=owner).exists():
        raise MountError(f"volume {name!r}: you are not a member of team {team.slug!r}")
    return {"type": "volume", "volume": name, "source": volume.volume_name, "target": normalized_target,
            "read_only": bool(mount.get("read_only", False))}


def expand_template_source(source: str, owner: AbstractBaseUser, profile: Profile) -> str:
    """Template mount sources may name the user: {user} (LSL user name), {shell_user}, {uid}."""
    values = {"{user}": owner.get_username(), "{shell_user}": profile.shell_name, "{uid}": str(profile.uid)}
    for placeholder, value in values.items():
        if placeholder in source:
            if value in ("", ".", "..") or "/" in value:
                raise MountError(f"{source!r}: the user name {value!r} cannot be used in a host path")
            source = source.replace(placeholder, value)
    return source


def resolve_mounts(owner: AbstractBaseUser, template: Template, team: Team | None,
                   user_mounts: tuple[dict[str, Any] | str, ...] | list[Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """Template default mounts (placeholders expanded) then the user's (dicts or "SRC:DST[:ro]" strings);
    returns (mounts, problems)."""
    profile = Profile.for_user(owner)
    mounts: list[dict[str, Any]] = []
    problems: list[str] = []
    entries = [(True, m) for m in (template.mounts or [])] + [(False, m) for m in user_mounts]
    for index, (from_template, mount) in enumerate(entries):
        try:
            if isinstance(mount, str):
                mount = parse_mount(mount)
            if "volume" in mount:
                resolved = validate_volume_mount(mount, owner=owner, team=team)
            elif from_template:
                source = expand_template_source(str(mount.get("source", "")), owner, profile)
                resolved = validate_mount({**mount, "source": source}, may_create=bool(mount.get("create")))
            else:
                resolved = validate_mount(mount)
            if any(m["target"] == resolved["target"] for m in mounts):
                raise MountError(f"{resolved['target']!r}: two mounts have this container path")
            if from_template:
                resolved["template"] = True
            mounts.append(resolved)
        except MountError as exc:
            problems.append(f"[{index}] {exc}")
    return mounts, problems


def may_use_host_network(user: AbstractBaseUser) -> bool:
    if settings.LSL_HOST_NETWORK_ALL_USERS or user.is_staff or user.is_superuser:
        return True
    return Profile.for_user(user).allow_host_network


# --- quotas -------------------------------------------------------------------------

class QuotaExceeded(DomainError):
    """A 403 naming the limit: {"quota": ["..."]}. Raised before anything is created or started."""

    status = 403
    code = "quota_exceeded"

    def __init__(self, scope: str, limit: str, message: str) -> None:
        super().__init__(message, fields={"quota": [message]})
        self.scope, self.limit = scope, limit


def user_limits(user: AbstractBaseUser) -> dict[str, float]:
    profile = Profile.for_user(user)

    def pick(override: Any, default: Any) -> Any:
        return default if override is None else override

    return {"environments": pick(profile.quota_environments, settings.LSL_QUOTA_USER_ENVIRONMENTS),
            "cpus": pick(profile.quota_cpus, settings.LSL_QUOTA_USER_CPUS),
            "memory_mb": pick(profile.quota_memory_mb, settings.LSL_QUOTA_USER_MEMORY_MB)}


def team_limits(team: Team) -> dict[str, float]:
    quota = TeamQuota.objects.filter(team=team).first()
    if quota is None:
        return {"environments": 0, "cpus": 0, "memory_mb": 0}
    return {"environments": quota.environments, "cpus": quota.cpus, "memory_mb": quota.memory_mb}


ACTIVE_STATUSES = (Status.RUNNING, Status.CREATING)


def quota_usage(qs: Any) -> dict[str, float]:
    from django.db.models import Sum

    active = qs.filter(status__in=ACTIVE_STATUSES).aggregate(cpus=Sum("cpus"), memory_mb=Sum("memory_mb"))
    return {"environments": qs.count(), "cpus": float(active["cpus"] or 0), "memory_mb": int(active["memory_mb"] or 0)}


def check_quota(owner: AbstractBaseUser, team: Team | None, *, cpus: float, memory_mb: int, new: bool,
                exclude: Environment | None = None) -> None:
    """Raise QuotaExceeded if creating (`new`) or starting an environment of this size breaks a user or team limit.

    Environments count whatever their status; CPUs and memory count for running (and creating) ones.
    """
    scopes: list[tuple[str, str, dict[str, float], Any]] = [
        ("user", owner.get_username(), user_limits(owner), Environment.objects.filter(owner=owner))]
    if team is not None:
        scopes.append(("team", team.slug, team_limits(team), Environment.objects.filter(team=team)))
    for scope, subject, limits, qs in scopes:
        if exclude is not None:
            qs = qs.exclude(pk=exclude.pk)
        used = quota_usage(qs)
        if new and limits["environments"] and used["environments"] + 1 > limits["environments"]:
            raise QuotaExceeded(scope, "environments", f"{scope} quota exceeded: environments: {scope} {subject!r} may have "
                                f"at most {limits['environments']:g} environments and has {used['environments']:g}")
        if limits["cpus"] and used["cpus"] + cpus > limits["cpus"] + 1e-9:
            raise QuotaExceeded(scope, "cpus", f"{scope} quota exceeded: cpus: {scope} {subject!r} may run at most "
                                f"{limits['cpus']:g} CPUs at once; {used['cpus']:g} in use, this needs {cpus:g}")
        if limits["memory_mb"] and used["memory_mb"] + memory_mb > limits["memory_mb"]:
            raise QuotaExceeded(scope, "memory_mb", f"{scope} quota exceeded: memory_mb: {scope} {subject!r} may run at most "
                                f"{limits['memory_mb']:g} MiB at once; {used['memory_mb']:g} MiB in use, this needs {memory_mb} MiB")
