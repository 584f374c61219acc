"""Every write to accounts goes through here (Zulip style)."""

from __future__ import annotations

import uuid
from datetime import datetime

from django.contrib.auth.models import AbstractBaseUser, Group
from django.db import transaction
from django.utils import timezone
from django.utils.text import slugify

from accounts.models import APIToken, Client, Membership, Team, TeamRole
from accounts.tokens import generate_key
from lsl_site import events
from lsl_site.errors import DomainError, InvalidInput


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


@transaction.atomic
def create_team(name: str, *, owner: AbstractBaseUser | None = None, slug: str | None = None) -> Team:
    slug = team_slug(name, slug)
    group = Group.objects.create(name=f"team:{slug}")
    team = Team.objects.create(name=name, slug=slug, group=group)
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
