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


@transaction.atomic
def create_team(name: str, *, owner: AbstractBaseUser | None = None, slug: str | None = None) -> Team:
    slug = slug or slugify(name)
    group = Group.objects.create(name=f"team:{slug}")
    team = Team.objects.create(name=name, slug=slug, group=group)
    if owner is not None:
        add_member(team, owner, TeamRole.OWNER)
    return team


@transaction.atomic
def add_member(team: Team, user: AbstractBaseUser, role: str = TeamRole.MEMBER) -> Membership:
    membership, _ = Membership.objects.update_or_create(team=team, user=user, defaults={"role": role})
    user.groups.add(team.group)
    return membership


@transaction.atomic
def remove_member(team: Team, user: AbstractBaseUser) -> None:
    Membership.objects.filter(team=team, user=user).delete()
    user.groups.remove(team.group)


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
