"""Every write to accounts goes through here (Zulip style)."""

from __future__ import annotations

import uuid
from datetime import datetime

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser, Group
from django.db import connection, transaction
from django.utils import timezone
from django.utils.text import slugify

from accounts.models import APIToken, Client, Membership, Profile, Team, TeamRole
from accounts.tokens import generate_key
from lsl_site import events
from lsl_site.errors import DomainError, InvalidInput, QuotaExceeded


class LastOwner(DomainError):
    """A team keeps at least one owner: one without could only be repaired in the admin."""

    status = 409
    code = "last_owner"


def _publish_team(team: Team, *also: int) -> None:
    """Members' live terminals and event streams re-check what they may see (team grants)."""
    members = list(Membership.objects.filter(team=team).values_list("user_id", flat=True))
    events.publish("team.changed", {"team": team.slug}, user_ids=[*members, *also])


def _refuse_losing_last_owner(team: Team, user: AbstractBaseUser) -> None:
    owners = Membership.objects.filter(team=team, role=TeamRole.OWNER)
    if owners.filter(user=user).exists() and owners.count() == 1:
        raise LastOwner(f"{user.get_username()} is the last owner of {team.name}; make someone else owner first")


def team_slug(name: str, slug: str | None = None) -> str:
    """`slug`, or the one derived from `name`; refused (InvalidInput on `name`) when the name has nothing
    to derive one from ("!!!", "---", only emoji): an empty slug names no team in a URL."""
    slug = slug or slugify(name)
    if not slug:
        raise InvalidInput({"name": ["the name must contain at least one letter or digit (a-z, 0-9) to make the "
                                     "team's slug from; or give a slug"]})
    return slug


# --- object quotas (issue 12: one user made 104 teams and 19 team volumes in 15 minutes) ------------

OBJECT_QUOTAS = {"teams": "LSL_QUOTA_USER_TEAMS", "team_volumes": "LSL_QUOTA_USER_TEAM_VOLUMES"}


def object_limit(user: AbstractBaseUser, kind: str) -> int:
    """How many `kind` ("teams", "team_volumes") `user` may have created; 0 = unlimited.

    Staff and superusers are not limited: they create teams and volumes for others as administration,
    and can already do anything in the admin. The profile's `quota_<kind>` overrides the server default.
    """
    if getattr(user, "is_staff", False) or getattr(user, "is_superuser", False):
        return 0
    override = getattr(Profile.for_user(user), f"quota_{kind}")
    return int(getattr(settings, OBJECT_QUOTAS[kind]) if override is None else override)


def check_object_quota(user: AbstractBaseUser, kind: str, used: int) -> None:
    """Raise QuotaExceeded when `user`, who created `used` of `kind`, may not create one more.
    Call inside the creating transaction, after lock_user, so that two concurrent creations cannot both pass."""
    limit = object_limit(user, kind)
    if limit and used + 1 > limit:
        noun = kind.replace("_", " ")
        raise QuotaExceeded("user", kind, f"user quota exceeded: {kind}: user {user.get_username()!r} may create at most "
                            f"{limit} {noun} and has {used}; delete one or ask an administrator to raise the limit")


def lock_user(user: AbstractBaseUser) -> None:
    """Serialise one user's quota-checked creations (PostgreSQL row lock; SQLite's BEGIN IMMEDIATE
    write transaction already serialises them, and a SELECT there would only cost time)."""
    from django.contrib.auth import get_user_model

    if connection.features.has_select_for_update:
        list(get_user_model().objects.select_for_update().filter(pk=user.pk).values_list("pk", flat=True))


@transaction.atomic
def create_team(name: str, *, owner: AbstractBaseUser | None = None, slug: str | None = None) -> Team:
    """Create a team (owned by `owner`, who counts it against their team quota); refused before anything
    is written when the quota is used up."""
    slug = team_slug(name, slug)
    if owner is not None:
        lock_user(owner)
        check_object_quota(owner, "teams", Team.objects.filter(created_by=owner).count())
    group = Group.objects.create(name=f"team:{slug}")
    team = Team.objects.create(name=name, slug=slug, group=group, created_by=owner)
    if owner is not None:
        add_member(team, owner, TeamRole.OWNER)
    return team


@transaction.atomic
def add_member(team: Team, user: AbstractBaseUser, role: str = TeamRole.MEMBER) -> Membership:
    """Add `user` with `role`, or change their role (a team's last owner cannot be demoted)."""
    if role != TeamRole.OWNER:
        _refuse_losing_last_owner(team, user)
    membership, _ = Membership.objects.update_or_create(team=team, user=user, defaults={"role": role})
    user.groups.add(team.group)
    _publish_team(team)
    return membership


@transaction.atomic
def remove_member(team: Team, user: AbstractBaseUser) -> None:
    _refuse_losing_last_owner(team, user)
    Membership.objects.filter(team=team, user=user).delete()
    user.groups.remove(team.group)
    _publish_team(team, user.pk)


def create_token(user: AbstractBaseUser, name: str, *, expires_at: datetime | None = None) -> tuple[APIToken, str]:
    """Create a token; returns it with the raw key, which is never retrievable again."""
    new = generate_key()
    token = APIToken.objects.create(user=user, name=name, prefix=new.prefix, digest=new.digest, expires_at=expires_at)
    return token, new.key


def revoke_token(token: APIToken) -> None:
    if token.revoked_at is None:
        token.revoked_at = timezone.now()
        token.save(update_fields=["revoked_at"])


def record_ping(user: AbstractBaseUser, client_id: uuid.UUID, *, hostname: str, version: str, remote_addr: str | None) -> Client:
    now = timezone.now()
    client, created = Client.objects.get_or_create(
        client_id=client_id,
        defaults={"user": user, "hostname": hostname, "version": version, "remote_addr": remote_addr, "last_seen_at": now},
    )
    if not created:
        client.user = user
        client.hostname = hostname
        client.version = version
        client.remote_addr = remote_addr
        client.last_seen_at = now
        client.save(update_fields=["user", "hostname", "version", "remote_addr", "last_seen_at"])
    return client
