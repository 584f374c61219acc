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
from environments.models import (
    Environment,
    KeptWorkspace,
    NetworkMode,
    Role,
    Status,
    TeamQuota,
    TeamVolume,
    Template,
)
from lsl_site.errors import DomainError, QuotaExceeded  # noqa: F401 (QuotaExceeded: `policy.QuotaExceeded` too)

# Container paths a mount may not be on, inside, or above (a mount on /var would hide /var/run).
# System locations: what the image's programs, libraries and their configuration live in. A host
# directory over one would let whoever writes that directory decide what runs when LSL executes
# something in the container as root (setup hooks, the environment user's creation) or what sudo
# and every participant's shell trust (/etc/sudoers, /etc/ld.so.preload, /usr/bin, /root/.profile).
# /var/lib holds the package manager's state that root setup hooks rely on. Data goes under /data,
# /srv, /opt, /mnt, /home/<user>, /tmp or similar, which stay allowed.
SYSTEM_TARGETS = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc", "/root", "/run",
                  "/sbin", "/sys", "/usr", "/var/lib", "/var/run")
# Paths LSL mounts itself: covering them would break the workspace or the session keeper
# (keeper.BIN_DIR_IN_CONTAINER and its socket directory live under /.lsl).
RESERVED_TARGETS = {runtime.WORKSPACE_PATH: "the environment's workspace volume", "/.lsl": "LSL's session keeper"}
FORBIDDEN_TARGETS = (*SYSTEM_TARGETS, *RESERVED_TARGETS)


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


def normalize_target(target: str) -> str:
    """The container path `target` names, as the engine will see it: absolute, no `..`, no `.`, no
    repeated or trailing slashes. POSIX lets `//x` differ from `/x` and os.path.normpath keeps it,
    but Docker (and Linux) read it as `/x`, so leading slashes are collapsed too."""
    _refuse_nul(target, "target")
    if not target.startswith("/"):
        raise MountError(f"{target!r}: container path must be absolute (start with '/')")
    if ".." in target.split("/"):
        # Refused rather than resolved: `/usr/../etc` is a spelling meant to get past a check.
        raise MountError(f"{target!r}: container path must not contain '..'")
    return "/" + os.path.normpath(target).lstrip("/")


def check_target(target: str) -> str:
    """Refuse a container path that would cover a system location, a path LSL mounts itself or a
    Docker socket; returns it normalized. Case is kept: Linux paths are case-sensitive, so `/ETC`
    is a new, harmless directory, not `/etc`."""
    normalized = normalize_target(target)
    if normalized == "/":
        raise MountError(f"{target!r}: cannot mount over / (the container's root file system)")
    for forbidden in FORBIDDEN_TARGETS:
        what = RESERVED_TARGETS.get(forbidden, "a system location of the container")
        if normalized == forbidden or normalized.startswith(forbidden + "/"):
            raise MountError(f"{target!r}: cannot mount over {forbidden}: it is {what}; "
                             "mount data elsewhere (e.g. /data, /srv, /opt, /mnt or your home)")
        if forbidden.startswith(normalized + "/"):
            raise MountError(f"{target!r}: cannot mount over {normalized}: it contains {forbidden} ({what})")
    if os.path.basename(normalized) == "docker.sock":
        # Programs look for the engine there: nothing may pose as (or hide) a Docker socket.
        raise MountError(f"{target!r}: cannot mount anything as a Docker socket (docker.sock)")
    return normalized


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
    normalized_target = check_target(target)
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
    if resolved.is_socket():
        # The Docker socket (or any engine's) is root on the host: even a root that holds one must not lend it.
        detail = f" (resolves to {resolved})" if str(resolved) != os.path.normpath(source) else ""
        raise MountError(f"{source!r}{detail} is a socket (such as the Docker socket): only directories and files "
                         "can be mounted")
    resolved_mount = {"type": "bind", "source": str(resolved), "target": normalized_target,
                      "read_only": bool(mount.get("read_only", False))}
    if not resolved.exists():
        resolved_mount["create"] = True
    return resolved_mount


def validate_volume_mount(mount: dict[str, Any], *, owner: AbstractBaseUser, team: Team | None) -> dict[str, Any]:
    """A team volume may only go into an environment of its team, created by a member of that team."""
    name = str(mount.get("volume", ""))
    _refuse_nul(name, "volume")
    normalized_target = check_target(str(mount.get("target", "")))
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


# --- host networking ----------------------------------------------------------------
# A host-network container shares the host's network namespace: it reaches every service bound to
# 127.0.0.1 on the host (LSL itself, a local Redis or database) and can bind host ports. Whoever can
# run commands in one (member, admin: shell, exec, file writes, terminal input) uses host networking,
# so that needs the right, checked when a role is granted and again whenever a role is worked out
# (permissions.role_for), so a right removed later, or a team grant, gives no more than watching.

def may_use_host_network(user: AbstractBaseUser) -> bool:
    if settings.LSL_HOST_NETWORK_ALL_USERS or user.is_staff or user.is_superuser:
        return True
    # Read from the database each time, not through the profile cached on `user`: a live terminal
    # keeps its user object for hours, and a right taken away must count at its next re-check.
    return bool(Profile.objects.filter(user=user).values_list("allow_host_network", flat=True).first())


class HostNetworkRefused(DomainError):
    """A 403: a role that runs commands on a host-network environment, for a user without the right."""

    status = 403
    code = "host_network_not_allowed"


def host_network_denied(user: AbstractBaseUser, env: Environment) -> bool:
    """True when `env` is on the host network and `user` may not use host networking (then they
    may watch it, as a viewer, but not run anything in it)."""
    return env.network_mode == NetworkMode.HOST and not may_use_host_network(user)


def check_host_network_role(env: Environment, user: AbstractBaseUser, role: Role) -> None:
    """Refuse giving `user` a role above viewer on a host-network environment they may not use."""
    if role <= Role.VIEWER or not host_network_denied(user, env):
        return
    name = user.get_username()
    message = (f"{name!r} cannot be given the {role.label} role on {env.name!r}: it is a host-network environment "
               f"(commands in it reach the host's loopback-only services) and {name}'s profile does not allow "
               "host networking. Give the viewer role (watching only), or ask an administrator to allow host "
               "networking in their profile.")
    raise HostNetworkRefused(message, fields={"user": [message]})


# --- quotas -------------------------------------------------------------------------
# QuotaExceeded (a 403 naming the limit) lives in lsl_site.errors so that accounts raises it too.


def user_limits(user: AbstractBaseUser) -> dict[str, float]:
    """The user's limits (0 = unlimited): environment resources, and objects they may create."""
    from accounts.services import object_limit

    profile = Profile.for_user(user)

    def pick(override: Any, default: Any) -> Any:
        return default if override is None else override

    return {"environments": pick(profile.quota_environments, settings.LSL_QUOTA_USER_ENVIRONMENTS),
            "cpus": pick(profile.quota_cpus, settings.LSL_QUOTA_USER_CPUS),
            "memory_mb": pick(profile.quota_memory_mb, settings.LSL_QUOTA_USER_MEMORY_MB),
            "disk_mb": pick(profile.quota_disk_mb, settings.LSL_QUOTA_USER_DISK_MB),
            "teams": object_limit(user, "teams"), "team_volumes": object_limit(user, "team_volumes")}


def user_usage(user: AbstractBaseUser) -> dict[str, float]:
    """What counts against `user_limits`."""
    return {**quota_usage(Environment.objects.filter(owner=user), KeptWorkspace.objects.filter(owner=user)),
            "teams": Team.objects.filter(created_by=user).count(),
            "team_volumes": TeamVolume.objects.filter(created_by=user).count()}


def team_limits(team: Team) -> dict[str, float]:
    quota = TeamQuota.objects.filter(team=team).first()
    if quota is None:
        return {"environments": 0, "cpus": 0, "memory_mb": 0, "disk_mb": 0}
    return {"environments": quota.environments, "cpus": quota.cpus, "memory_mb": quota.memory_mb, "disk_mb": quota.disk_mb}


ACTIVE_STATUSES = (Status.RUNNING, Status.CREATING)


def quota_usage(qs: Any, kept: Any = None) -> dict[str, float]:
    """Environments and disk count whatever the status (a stopped environment keeps its workspace);
    CPUs and memory count running (and creating) ones. `kept`: KeptWorkspaces whose disk allotment
    still counts (their environments are gone, their data is not)."""
    from django.db.models import Sum

    active = qs.filter(status__in=ACTIVE_STATUSES).aggregate(cpus=Sum("cpus"), memory_mb=Sum("memory_mb"))
    every = qs.aggregate(disk_mb=Sum("disk_mb"))
    kept_mb = int((kept.aggregate(disk_mb=Sum("disk_mb"))["disk_mb"] or 0) if kept is not None else 0)
    return {"environments": qs.count(), "cpus": float(active["cpus"] or 0), "memory_mb": int(active["memory_mb"] or 0),
            "disk_mb": int(every["disk_mb"] or 0) + kept_mb}


def check_quota(owner: AbstractBaseUser, team: Team | None, *, cpus: float, memory_mb: int, new: bool,
                exclude: Environment | None = None, disk_mb: int = 0) -> None:
    """Raise QuotaExceeded if creating (`new`) or starting an environment of this size breaks a user or team limit.

    Environments and disk count whatever their status; CPUs and memory count running (and creating) ones.
    Disk is checked at creation only: a stopped environment's disk is already counted, so starting it
    changes nothing. Under a disk quota, an environment needs a disk limit (`disk_mb` 0 is "none").
    """
    scopes: list[tuple[str, str, dict[str, float], Any, Any]] = [
        ("user", owner.get_username(), user_limits(owner), Environment.objects.filter(owner=owner),
         KeptWorkspace.objects.filter(owner=owner))]
    if team is not None:
        scopes.append(("team", team.slug, team_limits(team), Environment.objects.filter(team=team),
                       KeptWorkspace.objects.filter(team=team)))
    for scope, subject, limits, qs, kept in scopes:
        if exclude is not None:
            qs = qs.exclude(pk=exclude.pk)
        used = quota_usage(qs, kept)
        if new and limits["environments"] and used["environments"] + 1 > limits["environments"]:
            raise QuotaExceeded(scope, "environments", f"{scope} quota exceeded: environments: {scope} {subject!r} may have "
                                f"at most {limits['environments']:g} environments and has {used['environments']:g}")
        if limits["cpus"] and used["cpus"] + cpus > limits["cpus"] + 1e-9:
            raise QuotaExceeded(scope, "cpus", f"{scope} quota exceeded: cpus: {scope} {subject!r} may run at most "
                                f"{limits['cpus']:g} CPUs at once; {used['cpus']:g} in use, this needs {cpus:g}")
        if limits["memory_mb"] and used["memory_mb"] + memory_mb > limits["memory_mb"]:
            raise QuotaExceeded(scope, "memory_mb", f"{scope} quota exceeded: memory_mb: {scope} {subject!r} may run at most "
                                f"{limits['memory_mb']:g} MiB at once; {used['memory_mb']:g} MiB in use, this needs {memory_mb} MiB")
        if new and limits["disk_mb"] and (not disk_mb or used["disk_mb"] + disk_mb > limits["disk_mb"]):
            needs = f"this needs {disk_mb} MiB" if disk_mb else "this one would have no disk limit (give it one)"
            raise QuotaExceeded(scope, "disk_mb", f"{scope} quota exceeded: disk_mb: {scope} {subject!r} may have at most "
                                f"{limits['disk_mb']:g} MiB of disk across its environments; {used['disk_mb']:g} MiB "
                                f"allotted, {needs} (delete an environment or a kept workspace, or ask for less disk)")


def check_team_volume_quota(user: AbstractBaseUser) -> None:
    """Raise QuotaExceeded if `user` may not create another team volume (call inside the creating transaction)."""
    from accounts.services import check_object_quota, lock_user

    lock_user(user)
    check_object_quota(user, "team_volumes", TeamVolume.objects.filter(created_by=user).count())


# --- disk limits (enforced by the worker's measurements) -----------------------------------

def effective_disk_mb(template: Template) -> int:
    """The disk limit a new environment of `template` gets at most (0 = none)."""
    return settings.LSL_DEFAULT_DISK_MB if template.disk_mb is None else template.disk_mb


def format_mb(mb: float) -> str:
    """MiB as the unit people read: "20 MB", "5.3 GB" (binary units, named as `df -h` names them)."""
    if mb >= 1024:
        return f"{mb / 1024:.1f}".removesuffix(".0") + " GB"
    return f"{mb:.0f} MB"


def disk_verdict(env: Environment, used_mb: float, now: Any) -> str | None:
    """Why `env`, using `used_mb` of disk, must be stopped now; None if it may go on.

    Over its limit: stopped. After a stop for disk, the next start is allowed (the user must be able to get
    in and delete files: nothing is ever deleted for them) and has until `disk_grace_until` to get under the
    limit; meanwhile it may not grow past `disk_grace_mb`, its use when stopped, so stopping and starting
    again never buys room to write.
    """
    limit = env.disk_mb
    if not limit or used_mb <= limit:
        return None
    if env.disk_grace_until is not None and now < env.disk_grace_until:
        ceiling = max(limit, env.disk_grace_mb or 0)
        if used_mb <= ceiling:
            return None
        return (f"disk limit exceeded: {format_mb(used_mb)} used of {format_mb(limit)}, and growing while it was "
                f"being cleaned up (at most {format_mb(ceiling)} until then); delete files and start again")
    return f"disk limit exceeded: {format_mb(used_mb)} used of {format_mb(limit)}; delete files and start again"
