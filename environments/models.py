"""Templates (the catalog) and environments (containers + workspace volumes)."""

from __future__ import annotations

import uuid
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models
from django.db.models import Exists, OuterRef, Q
from django.utils import timezone
from guardian.models import GroupObjectPermissionBase, UserObjectPermissionBase

from accounts.models import Team


class NetworkMode(models.TextChoices):
    BRIDGE = "bridge", "Bridge"
    HOST = "host", "Host"
    NONE = "none", "None"


class NodeState(models.TextChoices):
    ACTIVE = "active", "Active"
    DRAINING = "draining", "Draining (no new environments)"


class Node(models.Model):
    """A Docker engine that environments live on. Each environment (with its workspace volume) lives on
    exactly one node; placement (environments.nodes) picks it by free CPU and memory and the template's
    `node_selector`. Written only through environments.nodes' do_* actions (admin, `lsl_node`)."""

    LOCAL = "local"

    name = models.SlugField(max_length=63, unique=True)
    url = models.CharField(max_length=255, blank=True, help_text="unix:///var/run/docker.sock, tcp://host:2376 "
                           "or ssh://user@host; empty for the `local` node: the server's own LSL_DOCKER_HOST.")
    tls_ca = models.CharField(max_length=500, blank=True, help_text="tcp:// only: CA certificate file (verifies the engine).")
    tls_cert = models.CharField(max_length=500, blank=True, help_text="tcp:// only: client certificate file.")
    tls_key = models.CharField(max_length=500, blank=True, help_text="tcp:// only: client key file.")
    # The engine runs on the server's own machine: the keepers' socket directory (LSL_KEEPER_DIR) and
    # host-path mounts resolve on it. Elsewhere terminals reach the keeper through `docker exec`.
    shares_host = models.BooleanField(default=False, help_text="The engine runs on this server's machine "
                                      "(keeper sockets and host-path mounts are reachable).")
    labels = models.JSONField(default=dict, blank=True, help_text='Matched by templates\' node_selector, e.g. '
                              '{"arch": "arm64", "gpu": "true"}. `arch` is filled from the engine when not set.')
    cpus = models.FloatField(default=0, help_text="CPUs environments may reserve here; 0: all the engine reports.")
    memory_mb = models.PositiveIntegerField(default=0, help_text="Memory (MiB) environments may reserve; 0: all the engine reports.")
    state = models.CharField(max_length=16, choices=NodeState.choices, default=NodeState.ACTIVE)
    # Health, written by the worker's node check only (nodes.check_nodes).
    available = models.BooleanField(default=True)
    unavailable_since = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True)
    checked_at = models.DateTimeField(null=True, blank=True)
    engine = models.JSONField(default=dict, blank=True)  # the engine's ncpu, mem_total, arch, version, id
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @property
    def capacity_cpus(self) -> float:
        """What placement may reserve: `cpus` if set, else the engine's CPUs times LSL_NODE_CPU_OVERCOMMIT
        (dev environments idle most of the time: reserving a whole core each would leave machines empty)."""
        return self.cpus or float(self.engine.get("ncpu") or 0) * settings.LSL_NODE_CPU_OVERCOMMIT

    @property
    def capacity_memory_mb(self) -> int:
        """`memory_mb` if set, else the engine's memory times LSL_NODE_MEMORY_OVERCOMMIT (1: none)."""
        return self.memory_mb or int((self.engine.get("mem_total") or 0) // (1024 * 1024) * settings.LSL_NODE_MEMORY_OVERCOMMIT)

    @property
    def effective_labels(self) -> dict[str, str]:
        derived = {"arch": self.engine["arch"]} if self.engine.get("arch") else {}
        return {**derived, **{str(k): str(v) for k, v in (self.labels or {}).items()}}


def local_node_id() -> int:
    """The default node of rows made without placement (admin, fixtures): the server's own engine."""
    return Node.objects.get_or_create(name=Node.LOCAL, defaults={"url": "", "shares_host": True})[0].pk


class Template(models.Model):
    """A catalog entry. Written only by `lsl_apply` (catalog YAML) and admin."""

    slug = models.SlugField(max_length=64, unique=True)
    image = models.CharField(max_length=255)
    description = models.TextField(blank=True)
    shell = models.CharField(max_length=255, default="/bin/sh")
    env = models.JSONField(default=dict, blank=True)
    cpus = models.FloatField(default=1.0)
    memory_mb = models.PositiveIntegerField(default=1024)
    # Disk limit of its environments (workspace + container layer); null = LSL_DEFAULT_DISK_MB, 0 = none.
    disk_mb = models.PositiveIntegerField(null=True, blank=True, help_text="Disk limit in MiB (workspace and "
                                          "container layer); empty: LSL_DEFAULT_DISK_MB; 0: no limit.")
    pids = models.PositiveIntegerField(default=512)
    network_modes = models.JSONField(default=list)  # allowed modes; first is the default
    mounts = models.JSONField(default=list, blank=True)  # default mounts [{source, target, read_only}]
    allow_user_mounts = models.BooleanField(default=True)
    setup = models.JSONField(default=list, blank=True)  # shell commands run once after create, as root
    user_setup = models.JSONField(default=list, blank=True)  # then these, as the environment user
    # Ports its environments serve on, declared by the catalog: [{port, name}] (shown as preview links
    # on the environment page even before anything listens there).
    ports = models.JSONField(default=list, blank=True)
    allow_sudo = models.BooleanField(default=False, help_text="The environment user gets passwordless sudo. "
                                     "Turns off no-new-privileges for the container (sudo is setuid).")
    labels = models.JSONField(default=dict, blank=True)
    # Placement constraints: its environments go only to nodes whose labels include all of these.
    node_selector = models.JSONField(default=dict, blank=True, help_text='Node labels required, e.g. {"gpu": "true"}.')
    # A snapshot's image exists on the node it was committed on; other nodes get it copied from there.
    image_node = models.ForeignKey("Node", null=True, blank=True, on_delete=models.SET_NULL, related_name="+",
                                   help_text="The node holding this (snapshot) image; empty: pulled by every node.")
    public = models.BooleanField(default=True, help_text="Usable by everyone; otherwise only by `teams`.")
    teams = models.ManyToManyField(Team, blank=True, related_name="templates")
    managed_by_catalog = models.BooleanField(default=True)
    # Set for templates made by snapshotting an environment.
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="+")
    snapshot_of = models.CharField(max_length=200, blank=True, help_text="owner/name (id) of the snapshotted environment")
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["slug"]
        permissions = [("use_template", "Can create environments from this template")]

    def __str__(self) -> str:
        return self.slug

    @property
    def default_network(self) -> str:
        return (self.network_modes or [NetworkMode.BRIDGE])[0]


class TemplateUserObjectPermission(UserObjectPermissionBase):
    content_object = models.ForeignKey(Template, on_delete=models.CASCADE)


class TemplateGroupObjectPermission(GroupObjectPermissionBase):
    content_object = models.ForeignKey(Template, on_delete=models.CASCADE)


def usable_templates(user: Any) -> models.QuerySet[Template]:
    """Templates `user` may create environments from: public, their team's, or granted."""
    if not user.is_authenticated:
        return Template.objects.none()
    if user.is_superuser:
        return Template.objects.all()
    group_ids = user.groups.values("id")
    granted_user = TemplateUserObjectPermission.objects.filter(
        content_object=OuterRef("pk"), user=user, permission__codename="use_template"
    )
    granted_group = TemplateGroupObjectPermission.objects.filter(
        content_object=OuterRef("pk"), group__in=group_ids, permission__codename="use_template"
    )
    team_member = Template.teams.through.objects.filter(template=OuterRef("pk"), team__group__in=group_ids)
    return Template.objects.filter(Q(public=True) | Exists(team_member) | Exists(granted_user) | Exists(granted_group))


class SetupStatus(models.TextChoices):
    NONE = "", "No setup"
    PENDING = "pending", "Pending"
    RUNNING = "running", "Running"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"


class Status(models.TextChoices):
    CREATING = "creating", "Creating"
    RUNNING = "running", "Running"
    STOPPED = "stopped", "Stopped"
    ERROR = "error", "Error"
    MISSING = "missing", "Missing"


class Role(models.IntegerChoices):
    """Roles on an environment; each includes the ones below it."""

    VIEWER = 1, "viewer"
    MEMBER = 2, "member"
    ADMIN = 3, "admin"

    @classmethod
    def from_name(cls, name: str) -> "Role":
        for role in cls:
            if role.label == name:
                return role
        raise ValueError(f"unknown role {name!r}; expected one of viewer, member, admin")

    @property
    def codenames(self) -> list[str]:
        """The guardian permission codenames that make up this role."""
        return ROLE_CODENAMES[: self.value]


# Order matters: role N holds the first N codenames.
ROLE_CODENAMES = ["view_environment", "use_environment", "admin_environment"]


class EnvironmentQuerySet(models.QuerySet["Environment"]):
    def visible_to(self, user: Any) -> "EnvironmentQuerySet":
        """Environments `user` may view, in one query (NetBox: filter by permission first)."""
        if not user.is_authenticated or not user.is_active:
            return self.none()
        if user.is_superuser or user.is_staff:
            return self.all()
        user_grant = EnvironmentUserObjectPermission.objects.filter(
            content_object=OuterRef("pk"), user=user, permission__codename="view_environment"
        )
        group_grant = EnvironmentGroupObjectPermission.objects.filter(
            content_object=OuterRef("pk"), group__user=user, permission__codename="view_environment"
        )
        return self.filter(Q(owner=user) | Exists(user_grant) | Exists(group_grant))


class Environment(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.SlugField(max_length=63)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="environments")
    team = models.ForeignKey(Team, null=True, blank=True, on_delete=models.SET_NULL, related_name="environments")
    template = models.ForeignKey(Template, on_delete=models.PROTECT, related_name="environments")
    # Where the container and the workspace volume live (placement at create; fixed from then on).
    node = models.ForeignKey(Node, default=local_node_id, on_delete=models.PROTECT, related_name="environments")
    image = models.CharField(max_length=255)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.CREATING)
    container_id = models.CharField(max_length=64, blank=True)
    cpus = models.FloatField()
    memory_mb = models.PositiveIntegerField()
    # Disk limit in MiB (workspace volume + container layer), fixed at creation; 0 = none. Enforced by the
    # worker's measurements (and by the engine for the container layer where it can): see policy.disk_verdict.
    disk_mb = models.PositiveIntegerField(default=0)
    pids = models.PositiveIntegerField()
    network_mode = models.CharField(max_length=10, choices=NetworkMode.choices, default=NetworkMode.BRIDGE)
    mounts = models.JSONField(default=list, blank=True)  # [{source, target, read_only}]
    workspace_volume = models.CharField(max_length=128, blank=True)
    progress = models.JSONField(default=dict, blank=True)  # pull/create progress a client can poll
    last_error = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(auto_now=True)
    started_at = models.DateTimeField(null=True, blank=True)
    stopped_at = models.DateTimeField(null=True, blank=True)
    # Why it is not running: "stopped" (by a user), "idle", or what the engine saw happen behind LSL's
    # back: "oom", "killed", "exited N", "removed".
    stop_reason = models.CharField(max_length=32, blank=True)
    # The user shells run as, once created in the container: {name, uid, gid, home}; empty until then.
    identity = models.JSONField(default=dict, blank=True)
    setup_status = models.CharField(max_length=16, choices=SetupStatus.choices, blank=True, default=SetupStatus.NONE)
    setup_log = models.TextField(blank=True)
    last_active_at = models.DateTimeField(null=True, blank=True)  # last seen with a session attached or an exec running
    # Provisioning lease: the worker holding it renews `lease_until`; a row whose lease ran out is
    # claimed again by another worker (or the same one after a restart) with a conditional UPDATE.
    lease_owner = models.CharField(max_length=64, blank=True)
    lease_until = models.DateTimeField(null=True, blank=True)
    # A start/stop/restart/delete in progress (and since when): engine events it causes are its own,
    # not something that happened behind LSL's back. Stale after ACTION_STALE_AFTER.
    pending_action = models.CharField(max_length=16, blank=True)
    pending_action_at = models.DateTimeField(null=True, blank=True)
    setup_deadline_at = models.DateTimeField(null=True, blank=True)
    # Container figures sampled by the worker (reads never ask the engine).
    stats = models.JSONField(default=dict, blank=True)
    stats_at = models.DateTimeField(null=True, blank=True)
    # Disk use measured by the worker (MiB, workspace + container layer). After a stop for disk, the next
    # start has until `disk_grace_until` to get under the limit; meanwhile it may not grow past
    # `disk_grace_mb` (its use when stopped). Separate columns: the worker and a start write different ones.
    disk_used_mb = models.PositiveIntegerField(null=True, blank=True)
    disk_checked_at = models.DateTimeField(null=True, blank=True)
    disk_grace_until = models.DateTimeField(null=True, blank=True)
    disk_grace_mb = models.PositiveIntegerField(null=True, blank=True)
    # TCP ports something listens on inside the container, found by the worker (via the keeper, from
    # /proc/net/tcp*): [{port, loopback_only}], sorted by port. Empty when not running.
    listening_ports = models.JSONField(default=list, blank=True)
    ports_checked_at = models.DateTimeField(null=True, blank=True)

    objects = EnvironmentQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        constraints = [models.UniqueConstraint(fields=["owner", "name"], name="unique_environment_name_per_owner")]
        default_permissions = ("add", "change", "delete", "view")
        permissions = [
            ("use_environment", "Member: type in terminals, start and stop"),
            ("admin_environment", "Admin: change, delete, grant and revoke"),
        ]

    def __str__(self) -> str:
        return f"{self.owner}/{self.name}"

    def clean(self) -> None:
        if self.network_mode not in (self.template.network_modes or [NetworkMode.BRIDGE]):
            raise ValidationError({"network_mode": f"template {self.template.slug} does not allow {self.network_mode}"})

    @property
    def short_id(self) -> str:
        return self.id.hex[:12]

    @property
    def shown_status(self) -> str:
        """What people see: `status`, or `node_unavailable` while its node does not answer (select_related("node"))."""
        return "node_unavailable" if not self.node.available else self.status


class EnvironmentUserObjectPermission(UserObjectPermissionBase):
    content_object = models.ForeignKey(Environment, on_delete=models.CASCADE)


class EnvironmentGroupObjectPermission(GroupObjectPermissionBase):
    content_object = models.ForeignKey(Environment, on_delete=models.CASCADE)


class TeamVolume(models.Model):
    """A named Docker volume owned by a team, mountable into that team's environments (`volume:NAME:/dst`)."""

    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="volumes")
    name = models.SlugField(max_length=63)
    volume_name = models.CharField(max_length=128, unique=True, editable=False)
    # A volume lives on one engine: environments that mount it are placed on this node.
    node = models.ForeignKey(Node, default=local_node_id, on_delete=models.PROTECT, related_name="team_volumes")
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["team__slug", "name"]
        constraints = [models.UniqueConstraint(fields=["team", "name"], name="unique_volume_name_per_team")]

    def __str__(self) -> str:
        return f"{self.team.slug}/{self.name}"


class KeptWorkspace(models.Model):
    """A workspace volume whose environment was deleted without `purge`: the data is kept (deleting
    data is always explicit), listed for its owner, counted in their disk quota at the deleted
    environment's allotment, and either attached to a new environment or purged."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="kept_workspaces")
    team = models.ForeignKey(Team, null=True, blank=True, on_delete=models.SET_NULL, related_name="kept_workspaces")
    volume_name = models.CharField(max_length=128, unique=True, editable=False)
    node = models.ForeignKey(Node, default=local_node_id, on_delete=models.PROTECT, related_name="kept_workspaces")  # where the volume is
    environment_name = models.CharField(max_length=63, help_text="The deleted environment's name.")
    template_slug = models.CharField(max_length=64, blank=True)
    disk_mb = models.PositiveIntegerField(default=0, help_text="The deleted environment's disk allotment (MiB), "
                                          "which the owner's disk quota keeps counting.")
    deleted_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-deleted_at"]

    def __str__(self) -> str:
        return f"{self.environment_name} ({self.volume_name})"


class TeamQuota(models.Model):
    """Limits on a team's environments (those created with `team`). 0 = unlimited."""

    team = models.OneToOneField(Team, on_delete=models.CASCADE, related_name="quota")
    environments = models.PositiveIntegerField(default=0)
    cpus = models.FloatField(default=0)
    memory_mb = models.PositiveIntegerField(default=0)
    disk_mb = models.PositiveIntegerField(default=0, help_text="Total disk limit (MiB) of the team's environments, "
                                          "whatever their status; 0 = unlimited.")

    def __str__(self) -> str:
        return f"quota for {self.team.slug}"


# --- ports: forwarding and preview (issue 14) ---------------------------------------------------

class PortVia(models.TextChoices):
    FORWARD = "forward", "lsl forward"
    PREVIEW = "preview", "Browser preview"
    PUBLIC = "public", "Public preview link"


class PreviewLink(models.Model):
    """An explicit, expiring, revocable public link to one port of one environment: anyone holding it
    may open the preview without signing in. Made only by an admin of the environment. The token is
    shown once; only its SHA-256 is stored (a leaked database does not leak working links)."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    environment = models.ForeignKey(Environment, on_delete=models.CASCADE, related_name="preview_links")
    port = models.PositiveIntegerField()
    token_hash = models.CharField(max_length=64, unique=True, editable=False)
    token_hint = models.CharField(max_length=8, editable=False, help_text="The token's first characters, to tell links apart.")
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField()
    revoked_at = models.DateTimeField(null=True, blank=True)
    revoked_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.environment.name}:{self.port} ({self.token_hint}…)"

    def is_active(self, now: Any = None) -> bool:
        return self.revoked_at is None and self.expires_at > (now or timezone.now())


class PortTraffic(models.Model):
    """Connections and bytes through LSL to one port of an environment, per way in. Counted in the
    database (added to when a connection ends, and every few seconds while it lasts), so every
    server process answers a /metrics scrape with the same totals."""

    environment = models.ForeignKey(Environment, on_delete=models.CASCADE, related_name="port_traffic")
    port = models.PositiveIntegerField()
    via = models.CharField(max_length=10, choices=PortVia.choices)
    connections = models.PositiveBigIntegerField(default=0)
    bytes_to_environment = models.PositiveBigIntegerField(default=0)
    bytes_from_environment = models.PositiveBigIntegerField(default=0)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["environment", "port", "via"], name="unique_port_traffic")]


class PortAuditKind(models.TextChoices):
    FORWARD_OPENED = "forward_opened", "Forward opened"
    FORWARD_CLOSED = "forward_closed", "Forward closed"
    PREVIEW_OPENED = "preview_opened", "Preview opened"
    LINK_CREATED = "link_created", "Public link created"
    LINK_REVOKED = "link_revoked", "Public link revoked"
    ACCESS_REFUSED = "access_refused", "Port access refused"


class PortAuditEvent(models.Model):
    """Who reached which port of an environment, how, and public links made and revoked."""

    environment = models.ForeignKey(Environment, on_delete=models.CASCADE, related_name="port_audit_events")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    kind = models.CharField(max_length=20, choices=PortAuditKind.choices)
    port = models.PositiveIntegerField(null=True, blank=True)
    data = models.JSONField(default=dict, blank=True)
    at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-at", "-id"]
        indexes = [models.Index(fields=["environment", "-at"])]

    def __str__(self) -> str:
        return f"{self.at:%Y-%m-%d %H:%M:%S} {self.kind} :{self.port or ''} {self.user or ''}"
