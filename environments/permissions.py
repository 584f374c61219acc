"""Who may do what to an environment.

Roles are stored as guardian object permissions (direct-FK tables), granted to
users or to team groups. The owner and superusers are always admin; staff may
view everything (the monitoring page) but not type or change.

On a host-network environment, a user whose profile does not allow host networking
is never more than a viewer, whatever the grant says (their own, their team's, or
being the owner): running anything there would reach the host's loopback-only
services (policy.may_use_host_network). Worked out on every check, so a right taken
away later takes effect at the next request or terminal re-check.
"""

from __future__ import annotations

from typing import Any, Iterable

from django.conf import settings
from django.db import transaction
from guardian.core import ObjectPermissionChecker
from rest_framework.exceptions import NotFound, PermissionDenied

from environments.models import ROLE_CODENAMES, Environment, NetworkMode, Role
from environments.policy import host_network_denied
from lsl_site import events


def make_checker(user: Any, environments: Iterable[Environment] = ()) -> ObjectPermissionChecker | None:
    """One checker per request; prefetching makes role lookups for a list O(1) queries."""
    if not user.is_authenticated:
        return None
    checker = ObjectPermissionChecker(user)
    envs = [env for env in environments]
    if envs:
        checker.prefetch_perms(envs)
    return checker


def role_for(user: Any, env: Environment, checker: ObjectPermissionChecker | None = None) -> Role | None:
    if not user.is_authenticated or not user.is_active:
        return None
    if user.is_superuser:
        return Role.ADMIN
    role: Role | None = None
    if env.owner_id == user.pk:
        role = Role.ADMIN
    else:
        checker = checker or ObjectPermissionChecker(user)
        perms = set(checker.get_perms(env))  # the user's grants and their teams' (guardian's group permissions)
        for level, codename in enumerate(ROLE_CODENAMES, start=1):
            if codename in perms:
                role = Role(level)
        if role is None and user.is_staff:
            role = Role.VIEWER
    # Last, so no way of holding a role (owner, own grant, team grant) gets around it.
    if role is not None and role > Role.VIEWER and host_network_denied(user, env):
        role = Role.VIEWER
    return role


def require_role(user: Any, env: Environment, needed: Role, checker: ObjectPermissionChecker | None = None) -> Role:
    """Return the user's role, or raise: 404 if they may not even view it, 403 if too low."""
    role = role_for(user, env, checker)
    if role is None:
        raise NotFound("No such environment.")
    if role < needed:
        reason = ""
        if host_network_denied(user, env):
            reason = (" This is a host-network environment and your profile does not allow host networking, so you "
                      "may only watch it; ask an administrator.")
        raise PermissionDenied(f"This needs the {needed.label} role on the environment; you are {role.label}.{reason}")
    return role


# --- a host-network right that changes ------------------------------------------------

def profile_pre_save(sender: Any, instance: Any, **kwargs: Any) -> None:
    """Remember the stored right, so post_save knows whether it changed (None: a new profile)."""
    stored = type(instance).objects.filter(pk=instance.pk) if instance.pk else None
    instance._lsl_host_network_before = stored.values_list("allow_host_network", flat=True).first() if stored else None


def profile_post_save(sender: Any, instance: Any, created: bool, **kwargs: Any) -> None:
    """An administrator changed a profile's `allow_host_network`: live terminals on the user's
    host-network environments re-check their role now (they do on `access.changed`), so taking the
    right away stops their typing at once instead of at their next connection."""
    before = getattr(instance, "_lsl_host_network_before", None)
    if created or before is None or before == instance.allow_host_network:
        return
    user = instance.user
    if user.is_staff or user.is_superuser or settings.LSL_HOST_NETWORK_ALL_USERS:
        return  # the flag changes nothing for them
    envs = Environment.objects.visible_to(user).filter(network_mode=NetworkMode.HOST)
    with transaction.atomic():
        for env in envs:
            role = role_for(user, env)
            events.publish("access.changed", {"subject": f"user-{user.pk}", "role": role.label if role else None},
                           environment_id=env.pk, user_ids=[user.pk, env.owner_id])


def connect_signals() -> None:
    from django.db.models.signals import post_save, pre_save

    from accounts.models import Profile

    pre_save.connect(profile_pre_save, sender=Profile, dispatch_uid="lsl-host-network-before")
    post_save.connect(profile_post_save, sender=Profile, dispatch_uid="lsl-host-network-recheck")
