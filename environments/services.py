"""Every write to environments goes through here (Zulip style): verb-named, on_commit side effects."""

from __future__ import annotations

import codecs
import logging
import os
import threading
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

from accounts.models import Profile, Team
from environments import identity, jobs, runtime
from environments.models import (
    ROLE_CODENAMES,
    Environment,
    EnvironmentGroupObjectPermission,
    EnvironmentUserObjectPermission,
    NetworkMode,
    Role,
    SetupStatus,
    Status,
    TeamQuota,
    TeamVolume,
    Template,
)
from environments.signals import access_revoked, environment_changed, environment_stopped

log = logging.getLogger(__name__)

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


def _validate_target(target: str) -> str:
    if not os.path.isabs(target) or ".." in Path(target).parts:
        raise MountError(f"{target!r}: container path must be absolute, without '..'")
    normalized_target = os.path.normpath(target)
    for forbidden in FORBIDDEN_TARGETS:
        if normalized_target == forbidden or normalized_target.startswith(forbidden + "/") or normalized_target == "/":
            raise MountError(f"{target!r}: cannot mount over {forbidden if normalized_target != '/' else '/'}")
    return normalized_target


def validate_mount(mount: dict[str, Any], *, create_as: Profile | None = None) -> dict[str, Any]:
    """Check a bind mount against LSL_HOST_MOUNT_ROOTS after resolving symlinks and `..`.

    `create_as`: create a missing source directory (inside the roots), owned by that profile's uid/gid.
    """
    source, target = str(mount.get("source", "")), str(mount.get("target", ""))
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
    if not resolved.exists() and create_as is not None:
        try:
            resolved.mkdir(parents=True, exist_ok=True)
            os.chown(resolved, create_as.uid, create_as.gid)
        except OSError as exc:
            raise MountError(f"{source!r}: cannot create it: {exc.strerror or exc}") from None
    if not resolved.exists():
        raise MountError(f"{source!r}: no such host directory or file")
    return {"type": "bind", "source": str(resolved), "target": normalized_target,
            "read_only": bool(mount.get("read_only", False))}


def validate_volume_mount(mount: dict[str, Any], *, owner: AbstractBaseUser, team: Team | None) -> dict[str, Any]:
    """A team volume may only go into an environment of its team, created by a member of that team."""
    name = str(mount.get("volume", ""))
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
                resolved = validate_mount({**mount, "source": source}, create_as=profile if mount.get("create") else None)
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

class QuotaExceeded(ValidationError):
    """A 4xx naming the limit: {"quota": ["..."]}. Raised before anything is created or started."""

    status_code = 403
    default_code = "quota_exceeded"

    def __init__(self, scope: str, limit: str, message: str) -> None:
        super().__init__({"quota": [message]}, code="quota_exceeded")
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
        binds=[runtime.Mount(m["source"], m["target"], bool(m.get("read_only")), m.get("type", "bind")) for m in env.mounts],
        env={str(k): str(v) for k, v in (env.template.env or {}).items()},
        # sudo is a setuid program: it cannot work under no-new-privileges. A template that allows sudo
        # trades that hardening for it (capabilities stay limited to DEV_SHELL_CAPABILITIES either way).
        no_new_privileges=not env.template.allow_sudo,
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
    elif network == NetworkMode.HOST and not may_use_host_network(owner):
        errors["network_mode"] = ["host networking is only for staff and users whose profile allows it "
                                  "(ask an administrator), or use bridge"]
    cpus = template.cpus if req.cpus is None else req.cpus
    memory = template.memory_mb if req.memory_mb is None else req.memory_mb
    if cpus > template.cpus:
        errors["cpus"] = [f"at most {template.cpus:g} for template {template.slug!r}"]
    if memory > template.memory_mb:
        errors["memory_mb"] = [f"at most {template.memory_mb} for template {template.slug!r}"]
    if req.mounts and not template.allow_user_mounts:
        errors["mounts"] = [f"template {template.slug!r} does not allow user mounts"]
    mounts, mount_problems = resolve_mounts(owner, template, req.team, req.mounts)
    if mount_problems:
        errors.setdefault("mounts", []).extend(mount_problems)
    if req.team is not None and not req.team.memberships.filter(user=owner).exists() and not owner.is_superuser:
        errors["team"] = [f"you are not a member of team {req.team.slug!r}"]
    if Environment.objects.filter(owner=owner, name=req.name).exists():
        errors["name"] = [f"you already have an environment named {req.name!r}"]
    if errors:
        raise ValidationError(errors)

    env_id = uuid.uuid4()
    has_setup = bool(template.setup or template.user_setup)
    try:
        with transaction.atomic():
            _lock_quota_subjects(owner, req.team)
            check_quota(owner, req.team, cpus=cpus, memory_mb=memory, new=True)
            env = Environment.objects.create(
                id=env_id, name=req.name, owner=owner, team=req.team, template=template, image=template.image,
                status=Status.CREATING, cpus=cpus, memory_mb=memory, pids=template.pids, network_mode=network,
                mounts=mounts, workspace_volume=f"lsl-ws-{env_id.hex[:12]}", progress={"phase": "queued"},
                setup_status=SetupStatus.PENDING if has_setup else SetupStatus.NONE,
            )
            if req.team is not None:
                # A team environment is usable by its team: members get the member role.
                for codename in Role.MEMBER.codenames:
                    assign_perm(f"environments.{codename}", req.team.group, env)
            jobs.submit_on_commit(provision_environment, env.id)
    except IntegrityError:
        raise ValidationError({"name": [f"you already have an environment named {req.name!r}"]}) from None
    return env


def _lock_quota_subjects(owner: AbstractBaseUser, team: Team | None) -> None:
    """Serialise quota checks per user and team (PostgreSQL row locks; SQLite transactions are already serial)."""
    from django.contrib.auth import get_user_model

    list(get_user_model().objects.select_for_update().filter(pk=owner.pk).values_list("pk", flat=True))
    if team is not None:
        list(Team.objects.select_for_update().filter(pk=team.pk).values_list("pk", flat=True))


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
    """Pull (if needed), create and start the container, create the user, run setup. Runs in a background job.

    The environment becomes `running` only when all of that worked; a failed setup
    leaves it in `error` (container stopped, setup log kept), never half-ready.
    """
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
        env.container_id = container_id
        runtime.start_container(container_id)
        Environment.objects.filter(pk=env.pk).update(progress={"phase": "user", **pulled})
        ensure_identity(env)
    except runtime.EngineError as exc:
        log.warning("provisioning %s failed: %s", env_id, exc)
        env.refresh_from_db()
        with transaction.atomic():
            _set_status(env, Status.ERROR, last_error=str(exc), progress={"phase": "failed", "error": str(exc)})
        return
    if env.template.setup or env.template.user_setup:
        failure = run_setup(env)
        if failure is not None:
            log.info("setup of %s failed: %s", env_id, failure)
            try:
                runtime.stop_container(env.container_id, timeout=2)
            except runtime.EngineError:
                pass
            env.refresh_from_db()
            with transaction.atomic():
                _set_status(env, Status.ERROR, last_error=failure, setup_status=SetupStatus.FAILED,
                            stopped_at=timezone.now(), progress={"phase": "failed", "error": failure, **pulled})
            return
    env.refresh_from_db()
    with transaction.atomic():
        setup_status = SetupStatus.SUCCEEDED if (env.template.setup or env.template.user_setup) else SetupStatus.NONE
        now = timezone.now()
        _set_status(env, Status.RUNNING, started_at=now, last_active_at=now, last_error="", setup_status=setup_status,
                    progress={"phase": "ready", **pulled})


# --- the environment user ------------------------------------------------------------

def ensure_identity(env: Environment) -> dict[str, Any]:
    """Create the owner's user in the (running) container if needed, and record it on the row."""
    profile = Profile.for_user(env.owner)
    command = identity.ensure_user_command(profile, shell=env.template.shell or "/bin/sh", sudo=env.template.allow_sudo,
                                           owned_dirs=[runtime.WORKSPACE_PATH])
    result = runtime.exec_run(_require_container(env), command, user="0:0")
    found = identity.parse_identity(result.output)
    if result.exit_code != 0 or found is None:
        detail = result.output.decode(errors="replace").strip()[-500:]
        raise runtime.EngineError(f"could not create the environment user {profile.shell_name!r} "
                                  f"(exit {result.exit_code}): {detail}")
    shared = [m["target"] for m in env.mounts if m.get("type") == "volume" and not m.get("read_only")]
    if shared:
        runtime.exec_run(env.container_id, ["/bin/sh", "-c", identity.SHARE_DIR_SCRIPT, "lsl-share", *shared], user="0:0")
    env.identity = found
    Environment.objects.filter(pk=env.pk).update(identity=found)
    return found


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
            ensure_identity(env)
        except runtime.EngineError as exc:
            log.warning("%s: %s", env, exc)
    return shell_user(env), shell_environment(env)


def shell_session_identity(container_id: str) -> tuple[str, dict[str, str]]:
    """`shell_identity` by container id (what a terminal hub knows). Unknown container: the image default."""
    env = Environment.objects.select_related("owner", "template").filter(container_id=container_id).first()
    if env is None:
        return "", {}
    return shell_identity(env)


# --- setup hooks -----------------------------------------------------------------------

class _SetupLog:
    """Appends command output to `setup_log`, written to the row at most every `interval` seconds."""

    def __init__(self, env: Environment, interval: float = 0.25) -> None:
        self.env, self.interval = env, interval
        self.text, self.dropped, self.last_write = "", 0, 0.0
        self.limit = settings.LSL_SETUP_LOG_MAX_BYTES  # counted in characters
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # chunks may split a character

    def write(self, data: bytes | str, *, flush: bool = False) -> None:
        self.text += self.decoder.decode(data) if isinstance(data, bytes) else self.decoder.decode(b"", final=True) + data
        if len(self.text) > self.limit:  # keep the end: that is where failures are
            cut = len(self.text) - self.limit
            self.dropped += cut
            self.text = self.text[cut:]
        if flush or time.monotonic() - self.last_write >= self.interval:
            self.flush()

    def flush(self) -> None:
        self.last_write = time.monotonic()
        text = (f"[... {self.dropped} earlier characters dropped ...]\n" if self.dropped else "") + self.text
        Environment.objects.filter(pk=self.env.pk).update(setup_log=text, updated_at=timezone.now())
        environment_changed.send(sender=Environment, environment=self.env)


def run_setup(env: Environment) -> str | None:
    """Run the template's `setup` (as root) then `user_setup` (as the environment user) commands, in order,
    in /workspace, logging their output. Returns None on success, else what failed."""
    template = env.template
    steps = [("root", cmd) for cmd in template.setup or []] + [("user", cmd) for cmd in template.user_setup or []]
    user, user_env = shell_user(env), shell_environment(env)
    info = {"LSL_USER": user_env["USER"], "LSL_UID": user.split(":")[0], "LSL_GID": user.split(":")[-1], "LSL_HOME": user_env["HOME"]}
    Environment.objects.filter(pk=env.pk).update(setup_status=SetupStatus.RUNNING, setup_log="")
    out = _SetupLog(env)
    # Docker cannot kill an exec, and a hung hook (a prompt, a stalled download) would
    # leave the environment `creating` forever: past the deadline the container is
    # stopped, which ends every process in it, and the output stream with them.
    timed_out = threading.Event()

    def expire() -> None:
        timed_out.set()
        try:
            runtime.stop_container(env.container_id, timeout=1)
        except runtime.EngineError as exc:
            log.warning("setup of %s timed out and its container could not be stopped: %s", env.pk, exc)

    deadline = threading.Timer(float(settings.LSL_SETUP_TIMEOUT), expire)
    deadline.daemon = True
    deadline.start()
    try:
        failure = _run_setup_steps(env, steps, user, user_env, info, out)
    finally:
        deadline.cancel()
    if timed_out.is_set():
        limit = f"{settings.LSL_SETUP_TIMEOUT:g} s"
        out.write(f"\n[setup timed out after {limit}; the container was stopped]\n", flush=True)
        return f"setup did not finish within {limit} (LSL_SETUP_TIMEOUT); see the setup log"
    return failure


def _run_setup_steps(env: Environment, steps: list[tuple[str, str]], user: str, user_env: dict[str, str],
                     info: dict[str, str], out: _SetupLog) -> str | None:
    handed_over = False
    for number, (who, command) in enumerate(steps, start=1):
        if who == "user" and not handed_over:
            _hand_over_workspace(env, user)
            handed_over = True
        Environment.objects.filter(pk=env.pk).update(progress={"phase": "setup", "step": number, "of": len(steps), "command": command})
        out.write(f"{'#' if who == 'root' else '$'} {command}\n", flush=True)
        try:
            chunks, exit_code = runtime.exec_stream(
                env.container_id, ["/bin/sh", "-c", command], user="0:0" if who == "root" else user,
                workdir=runtime.WORKSPACE_PATH, environment={**info, **(user_env if who == "user" else {})})
            for chunk in chunks:
                out.write(chunk)
            code = exit_code()
        except runtime.EngineError as exc:
            out.write(f"\n[setup step {number} could not run: {exc}]\n", flush=True)
            return f"setup step {number} ({command!r}) could not run: {exc}"
        if code != 0:
            out.write(f"\n[setup step {number} exited with status {code}]\n", flush=True)
            return f"setup step {number} ({command!r}) failed with exit status {code}; see the setup log"
    if not handed_over:
        _hand_over_workspace(env, user)
    out.write(f"[setup finished: {len(steps)} step{'s' * (len(steps) != 1)}]\n", flush=True)
    return None


def _hand_over_workspace(env: Environment, user: str) -> None:
    """Files root's setup left in the workspace and home belong to the environment user."""
    home = shell_environment(env)["HOME"]
    runtime.exec_run(env.container_id, ["chown", "-R", "-h", user, runtime.WORKSPACE_PATH, home], user="0:0")


def _require_container(env: Environment) -> str:
    if not env.container_id:
        raise runtime.EngineError("the environment has no container yet (still creating or failed)")
    return env.container_id


def start_environment(env: Environment) -> Environment:
    """Start the container; a container removed behind LSL's back is recreated (the workspace volume survives)."""
    if env.status == Status.CREATING:
        raise runtime.EngineError("the environment is still being created")
    state = runtime.container_state(env.container_id) if env.container_id else None
    if state is None or not state.running:
        check_quota(env.owner, env.team, cpus=env.cpus, memory_mb=env.memory_mb, new=False, exclude=env)
    if state is None:
        env.container_id = runtime.create_container(_spec(env))
        env.identity = {}  # a new container has no user yet
        env.save(update_fields=["container_id", "identity", "updated_at"])
    runtime.start_container(env.container_id)
    if not env.identity:
        ensure_identity(env)
    with transaction.atomic():
        now = timezone.now()
        _set_status(env, Status.RUNNING, started_at=now, last_active_at=now, last_error="", stop_reason="")
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
        _set_status(env, Status.STOPPED, stopped_at=timezone.now(), stop_reason=reason)
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
    if team is not ... and team != env.team:
        if any(m.get("type") == "volume" for m in env.mounts):
            raise ValidationError({"team": ["this environment mounts team volumes: it cannot change team"]})
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
        if env.status == Status.CREATING or (env.status == Status.ERROR and (not env.container_id or env.setup_status == SetupStatus.FAILED)):
            continue  # a failed setup stays an error (with its log) until someone starts or deletes it
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


# --- idle stop -------------------------------------------------------------------------

def last_activity(env: Environment) -> Any:
    """The latest of: started, last seen active, last participant leaving one of its terminal sessions."""
    from django.apps import apps
    from django.db.models import Max

    participation = apps.get_model("terminals", "Participation")
    left = participation.objects.filter(session__environment=env).aggregate(left=Max("left_at"))["left"]
    moments = [m for m in (env.started_at, env.last_active_at, left) if m is not None]
    return max(moments) if moments else env.created_at


def is_active(env: Environment) -> bool:
    """Someone is attached to one of its terminal sessions, or a command (exec) is running in it."""
    from django.apps import apps

    participation = apps.get_model("terminals", "Participation")
    if participation.objects.filter(session__environment=env, session__ended_at__isnull=True, left_at__isnull=True).exists():
        return True
    return bool(env.container_id) and runtime.running_exec_count(env.container_id) > 0


def stop_idle_environments(*, idle_after: float | None = None) -> list[Environment]:
    """Stop (never delete) running environments idle for `idle_after` seconds (LSL_IDLE_STOP_AFTER; 0 = off)."""
    idle_after = settings.LSL_IDLE_STOP_AFTER if idle_after is None else idle_after
    if not idle_after or idle_after <= 0:
        return []
    stopped: list[Environment] = []
    now = timezone.now()
    for env in Environment.objects.filter(status=Status.RUNNING).exclude(container_id="").select_related("owner", "template"):
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

def create_team_volume(team: Team, name: str, *, by: AbstractBaseUser | None = None) -> TeamVolume:
    if TeamVolume.objects.filter(team=team, name=name).exists():
        raise ValidationError({"name": [f"team {team.slug!r} already has a volume named {name!r}"]})
    volume_name = f"lsl-team-{team.slug[:40]}-{name[:40]}-{uuid.uuid4().hex[:8]}"
    with transaction.atomic():
        volume = TeamVolume.objects.create(team=team, name=name, volume_name=volume_name, created_by=by)
        runtime.ensure_volume(volume_name, {"lsl.team": team.slug, "lsl.team-volume": name})
    return volume


def volume_users(volume: TeamVolume) -> list[Environment]:
    return [env for env in Environment.objects.filter(team=volume.team)
            if any(m.get("type") == "volume" and m.get("source") == volume.volume_name for m in env.mounts)]


def delete_team_volume(volume: TeamVolume) -> None:
    """Delete the volume and its data; refused while an environment mounts it."""
    users = volume_users(volume)
    if users:
        names = ", ".join(f"{env.owner.get_username()}/{env.name}" for env in users[:5])
        raise ValidationError({"volume": [f"volume {volume.name!r} is mounted by {names}: delete those environments first"]})
    runtime.remove_volume(volume.volume_name)
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
    if not env.container_id or runtime.container_state(env.container_id) is None:
        errors["environment"] = ["the environment has no container to snapshot"]
    if errors:
        raise ValidationError(errors)
    source = env.template
    tag = timezone.now().strftime("%Y%m%d%H%M%S")
    repository = f"{SNAPSHOT_REPOSITORY}/{slug}"
    runtime.commit_container(env.container_id, repository, tag,
                             labels={"lsl.snapshot.of": str(env.id), "lsl.snapshot.by": by.get_username()},
                             copy_paths=(runtime.WORKSPACE_PATH,) if include_workspace else ())
    with transaction.atomic():
        template = Template.objects.create(
            slug=slug, image=f"{repository}:{tag}",
            description=description or f"Snapshot of {env.owner.get_username()}/{env.name} ({source.slug})",
            shell=source.shell, env=source.env, cpus=source.cpus, memory_mb=source.memory_mb, pids=source.pids,
            network_modes=source.network_modes, mounts=source.mounts, allow_user_mounts=source.allow_user_mounts,
            allow_sudo=source.allow_sudo, setup=[], user_setup=[], labels=source.labels, public=False,
            managed_by_catalog=False, created_by=by, snapshot_of=f"{env.owner.get_username()}/{env.name} ({env.id})",
        )
        template.teams.set(teams)
        assign_perm("environments.use_template", by, template)
    return template
