"""Users come from django.contrib.auth; this app adds teams, API tokens and clients."""

from __future__ import annotations

import re
import uuid

from django.conf import settings
from django.contrib.auth.models import Group
from django.core.validators import MaxValueValidator, MinValueValidator, RegexValidator, validate_slug
from django.db import models
from django.utils import timezone


class TeamRole(models.TextChoices):
    OWNER = "owner", "Owner"
    MAINTAINER = "maintainer", "Maintainer"
    MEMBER = "member", "Member"


class Team(models.Model):
    """A team is backed by a Django Group so per-object grants can target it."""

    name = models.CharField(max_length=100, unique=True)
    slug = models.SlugField(max_length=100, unique=True, validators=[validate_slug])
    group = models.OneToOneField(Group, on_delete=models.PROTECT, related_name="team")
    created_at = models.DateTimeField(default=timezone.now)
    members = models.ManyToManyField(settings.AUTH_USER_MODEL, through="Membership", related_name="teams")
    # Who created it: the per-user team quota counts these (handing the team on does not free a slot).
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="+")

    class Meta:
        ordering = ["slug"]

    def __str__(self) -> str:
        return self.slug


class Membership(models.Model):
    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="memberships")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=20, choices=TeamRole.choices, default=TeamRole.MEMBER)
    joined_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["team", "user"], name="unique_team_member")]

    def __str__(self) -> str:
        return f"{self.user} in {self.team} ({self.role})"


class APIToken(models.Model):
    """A personal API token. Only `prefix` (lookup) and an HMAC `digest` are stored.

    The full key is `lsl_<prefix>_<secret>` and is shown exactly once, at creation.
    """

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=16, unique=True, editable=False)
    digest = models.CharField(max_length=64, editable=False)
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [models.UniqueConstraint(fields=["user", "name"], condition=models.Q(revoked_at__isnull=True), name="unique_live_token_name")]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    @property
    def is_live(self) -> bool:
        now = timezone.now()
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)


class Client(models.Model):
    """An `lsl` CLI installation that pinged the server (the original write-up's client UUID)."""

    client_id = models.UUIDField(unique=True, default=uuid.uuid4)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="clients")
    hostname = models.CharField(max_length=255, blank=True)
    version = models.CharField(max_length=50, blank=True)
    remote_addr = models.GenericIPAddressField(null=True, blank=True)
    first_seen_at = models.DateTimeField(default=timezone.now)
    last_seen_at = models.DateTimeField(default=timezone.now)

    ONLINE_WINDOW_SECONDS = 120

    class Meta:
        ordering = ["-last_seen_at"]

    def __str__(self) -> str:
        return f"{self.hostname or self.client_id} ({self.user})"

    @property
    def is_online(self) -> bool:
        return (timezone.now() - self.last_seen_at).total_seconds() < self.ONLINE_WINDOW_SECONDS


# --- identity inside environments (issue 6) -----------------------------------------

# Names an image is likely to own already; a profile never defaults to one of them. Not "admin": it is
# the account `make run` creates, and its shell should say admin@, not u10001@; the rare image that has
# an admin account is handled at start (ENSURE_USER_SCRIPT falls back to lsl<uid> on a clash).
RESERVED_SHELL_NAMES = frozenset({
    "root", "daemon", "bin", "sys", "sync", "games", "man", "lp", "mail", "news", "uucp", "proxy", "www-data",
    "backup", "list", "irc", "gnats", "nobody", "nogroup", "systemd-network", "systemd-resolve", "messagebus",
    "sshd", "ubuntu", "debian", "fedora", "operator", "ftp", "halt", "shutdown", "adm", "wheel",
    "users", "staff", "sudo", "docker", "postgres", "mysql", "redis", "node", "lsl",
})
_SHELL_NAME_BAD = re.compile(r"[^a-z0-9_-]+")


def sanitize_shell_name(username: str) -> str:
    """A valid, portable Linux user name for `username` (lowercase, [a-z_][a-z0-9_-]*, at most 32), or ""."""
    name = _SHELL_NAME_BAD.sub("_", username.lower()).strip("_-")
    if name and not (name[0].isalpha() or name[0] == "_"):
        name = f"u{name}"
    name = name[:32].rstrip("_-")
    return "" if name in RESERVED_SHELL_NAMES else name


class Profile(models.Model):
    """Who a user is inside environments (uid, gid, user name) plus per-user policy.

    Created on first use with a stable mapping: uid = gid = LSL_UID_BASE + user id.
    Changing uid/gid later affects environments whose container is created afterwards.
    """

    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="lsl_profile")
    uid = models.PositiveIntegerField(unique=True, blank=True, validators=[MinValueValidator(1000), MaxValueValidator(2**31 - 2)],
                                      help_text="Numeric user id inside environments (and of files in host mounts).")
    gid = models.PositiveIntegerField(blank=True, validators=[MinValueValidator(1000), MaxValueValidator(2**31 - 2)])
    shell_name = models.CharField(max_length=32, unique=True, blank=True,
                                  validators=[RegexValidator(r"^[a-z_][a-z0-9_-]{0,31}$", "not a valid Linux user name")])
    allow_host_network = models.BooleanField(default=False, help_text="May create environments on the host network "
                                             "(where the template allows it). Staff always may.")
    quota_environments = models.PositiveIntegerField(null=True, blank=True, help_text="Overrides LSL_QUOTA_USER_ENVIRONMENTS; 0 = unlimited.")
    quota_cpus = models.FloatField(null=True, blank=True, validators=[MinValueValidator(0)], help_text="Overrides LSL_QUOTA_USER_CPUS; 0 = unlimited.")
    quota_memory_mb = models.PositiveIntegerField(null=True, blank=True, help_text="Overrides LSL_QUOTA_USER_MEMORY_MB; 0 = unlimited.")
    quota_disk_mb = models.PositiveIntegerField(null=True, blank=True, help_text="Overrides LSL_QUOTA_USER_DISK_MB; 0 = unlimited.")
    quota_teams = models.PositiveIntegerField(null=True, blank=True, help_text="Overrides LSL_QUOTA_USER_TEAMS (teams this "
                                              "user may create); 0 = unlimited. Staff are not limited.")
    quota_team_volumes = models.PositiveIntegerField(null=True, blank=True, help_text="Overrides LSL_QUOTA_USER_TEAM_VOLUMES "
                                                     "(team volumes this user may create); 0 = unlimited. Staff are not limited.")

    def __str__(self) -> str:
        return f"{self.shell_name} ({self.uid}:{self.gid})"

    def save(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        if self.uid is None:
            base = int(getattr(settings, "LSL_UID_BASE", 10000))
            uid = base + int(self.user_id)
            while Profile.objects.filter(uid=uid).exclude(pk=self.pk).exists():
                uid = max(uid, (Profile.objects.aggregate(models.Max("uid"))["uid__max"] or uid)) + 1
            self.uid = uid
        if self.gid is None:
            self.gid = self.uid
        if not self.shell_name:
            base_name = sanitize_shell_name(self.user.get_username()) or f"u{self.uid}"
            name, n = base_name, 1
            while Profile.objects.filter(shell_name=name).exclude(pk=self.pk).exists():
                n += 1
                name = f"{base_name[:30]}{n}"
            self.shell_name = name
        super().save(*args, **kwargs)

    @classmethod
    def for_user(cls, user) -> "Profile":  # type: ignore[no-untyped-def]
        """The user's profile, created with the default mapping on first use."""
        try:
            return user.lsl_profile
        except cls.DoesNotExist:
            pass
        profile = cls.objects.filter(user=user).first()
        if profile is None:
            from django.db import IntegrityError, transaction

            try:
                with transaction.atomic():
                    profile = cls(user=user)
                    profile.save()
            except IntegrityError:  # created concurrently
                profile = cls.objects.get(user=user)
        user.lsl_profile = profile
        return profile
