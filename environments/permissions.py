"""Who may do what to an environment.

Roles are stored as guardian object permissions (direct-FK tables), granted to
users or to team groups. The owner and superusers are always admin; staff may
view everything (the monitoring page) but not type or change.
"""

from __future__ import annotations

from typing import Any, Iterable

from guardian.core import ObjectPermissionChecker
from rest_framework.exceptions import NotFound, PermissionDenied

from environments.models import ROLE_CODENAMES, Environment, Role


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
    if user.is_superuser or env.owner_id == user.pk:
        return Role.ADMIN
    checker = checker or ObjectPermissionChecker(user)
    perms = set(checker.get_perms(env))
    role: Role | None = None
    for level, codename in enumerate(ROLE_CODENAMES, start=1):
        if codename in perms:
            role = Role(level)
    if role is None and user.is_staff:
        role = Role.VIEWER
    return role


def require_role(user: Any, env: Environment, needed: Role, checker: ObjectPermissionChecker | None = None) -> Role:
    """Return the user's role, or raise: 404 if they may not even view it, 403 if too low."""
    role = role_for(user, env, checker)
    if role is None:
        raise NotFound("No such environment.")
    if role < needed:
        raise PermissionDenied(f"This needs the {needed.label} role on the environment; you are {role.label}.")
    return role
