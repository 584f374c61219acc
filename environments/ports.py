"""Ports of an environment: who may reach them, public preview links, traffic counts and audit.

The one place every way into an environment's ports goes through (`lsl forward`, the browser
preview, public links). The bytes themselves travel through the environment's keeper
(environments.keeper.open_tunnel), which connects to 127.0.0.1:<port> inside the container: so a
port is only ever one of the environment's own, never the host's, the engine's or another
container's, whatever the request says.

Threading: everything here blocks on the database; call it from a worker thread (or
`database_sync_to_async`), never on the event loop. `parse_proc_net_tcp` is pure.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from environments.models import (Environment, NetworkMode, PortAuditEvent, PortAuditKind, PortTraffic, PortVia,
                                 PreviewLink, Role, Status)
from environments.permissions import require_role
from lsl_site import events
from lsl_site.errors import DomainError, InvalidInput

MIN_PORT, MAX_PORT = 1, 65535
TOKEN_BYTES = 20  # 32 base32 characters: one DNS label, for subdomain previews


class PortUnavailable(DomainError):
    """A 409: the environment cannot serve a port right now (stopped, host network, nothing listening)."""

    status = 409
    code = "port_unavailable"


class PortClosed(PortUnavailable):
    """Nothing listens on the port inside the environment."""

    code = "port_closed"


# --- pure ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ListeningPort:
    port: int
    loopback_only: bool  # bound to 127.0.0.1/::1 only: reachable through LSL, not on the container's address

    def as_json(self) -> dict[str, Any]:
        return {"port": self.port, "loopback_only": self.loopback_only}


_LOOPBACK_V4 = "0100007F"  # 127.0.0.1 as /proc/net/tcp prints it (little-endian hex)
_LOOPBACK_V6 = "00000000000000000000000001000000"  # ::1
_LISTEN = "0A"


def parse_proc_net_tcp(text: str) -> list[ListeningPort]:
    """The listening TCP ports in the text of /proc/net/tcp and /proc/net/tcp6 (either or both,
    concatenated), sorted. A port bound on loopback only is `loopback_only` unless it is also
    bound on another address. Lines that do not parse are skipped (a header, a truncated read)."""
    loopback: dict[int, bool] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 4 or fields[3].upper() != _LISTEN or ":" not in fields[1]:
            continue
        address, _, port_hex = fields[1].rpartition(":")
        try:
            port = int(port_hex, 16)
        except ValueError:
            continue
        if not MIN_PORT <= port <= MAX_PORT:
            continue
        on_loopback = address.upper() in (_LOOPBACK_V4, _LOOPBACK_V6) or (
            len(address) == 32 and address.upper().startswith("0000000000000000FFFF0000") and address.upper().endswith("7F"))
        loopback[port] = loopback.get(port, True) and on_loopback
    return [ListeningPort(port, only) for port, only in sorted(loopback.items())]


def check_port(value: Any, field: str = "port") -> int:
    """A port number from a request, or InvalidInput naming the field."""
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).isdigit():
        raise InvalidInput({field: [f"A port is a whole number from {MIN_PORT} to {MAX_PORT}."]})
    port = int(value)
    if not MIN_PORT <= port <= MAX_PORT:
        raise InvalidInput({field: [f"A port is a whole number from {MIN_PORT} to {MAX_PORT}; {port} is not."]})
    return port


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """Lowercase base32, no padding: safe in a path and as a DNS label."""
    import base64
    return base64.b32encode(secrets.token_bytes(TOKEN_BYTES)).decode().rstrip("=").lower()


# --- who may reach a port ------------------------------------------------------------------

def check_reachable(env: Environment) -> None:
    """Raise PortUnavailable unless LSL may connect to the environment's ports now."""
    if env.network_mode == NetworkMode.HOST:
        # Its 127.0.0.1 is the host's: a tunnel there would reach the host's loopback-only services.
        raise PortUnavailable("This environment is on the host network: its ports are the host's own, so LSL does "
                              "not forward them; connect to the host directly.")
    if env.status != Status.RUNNING or not env.container_id:
        raise PortUnavailable(f"The environment is {env.get_status_display().lower()}; start it to reach its ports.")


def require_port_access(user: Any, env: Environment) -> Role:
    """The user's role if they may connect to the environment's ports (member or admin), else the
    model's errors: NotFound (404) if they may not see it, PermissionDenied (403) if only a viewer.
    Viewers may watch terminals but not talk to services in the container."""
    role = require_role(user, env, Role.MEMBER)
    check_reachable(env)
    return role


# --- public links --------------------------------------------------------------------------

def do_create_preview_link(env: Environment, port: int, *, by: Any, ttl_seconds: float | None = None) -> tuple[PreviewLink, str]:
    """Make a public link (the caller has checked the admin role); returns it and its token, which
    is shown this once."""
    port = check_port(port)
    ttl = settings.LSL_PREVIEW_LINK_TTL if ttl_seconds is None else ttl_seconds
    if not 60 <= ttl <= settings.LSL_PREVIEW_LINK_MAX_TTL:
        raise InvalidInput({"expires_in": [f"A link lasts from 60 to {int(settings.LSL_PREVIEW_LINK_MAX_TTL)} seconds "
                                           f"(LSL_PREVIEW_LINK_MAX_TTL)."]})
    if env.network_mode == NetworkMode.HOST:
        check_reachable(env)
    token = new_token()
    with transaction.atomic():
        link = PreviewLink.objects.create(environment=env, port=port, token_hash=hash_token(token), token_hint=token[:6],
                                          created_by=by if getattr(by, "pk", None) else None,
                                          expires_at=timezone.now() + timedelta(seconds=ttl))
        audit(env, by, PortAuditKind.LINK_CREATED, port, link=str(link.id), expires_at=link.expires_at.isoformat())
        _publish_links(env)
    return link, token


def do_revoke_preview_link(link: PreviewLink, *, by: Any) -> PreviewLink:
    """Revoke a link at once (every process checks the row on each request). Revoking twice is a no-op."""
    with transaction.atomic():
        updated = PreviewLink.objects.filter(pk=link.pk, revoked_at__isnull=True).update(
            revoked_at=timezone.now(), revoked_by=by if getattr(by, "pk", None) else None)
        link.refresh_from_db()
        if updated:
            audit(link.environment, by, PortAuditKind.LINK_REVOKED, link.port, link=str(link.id))
            _publish_links(link.environment)
    return link


def find_public_link(token: str) -> PreviewLink | None:
    """The active link with this token, or None (unknown, expired and revoked look the same)."""
    if not token or len(token) > 64:
        return None
    link = PreviewLink.objects.select_related("environment").filter(token_hash=hash_token(token)).first()
    return link if link is not None and link.is_active() else None


def _publish_links(env: Environment) -> None:
    transaction.on_commit(lambda: events.publish("environment.ports", {"environment_id": str(env.pk), "links": True},
                                                 environment_id=env.pk, user_ids=[env.owner_id]))


# --- what listens ------------------------------------------------------------------------------

def do_update_listening_ports(env: Environment, ports: list[ListeningPort]) -> bool:
    """Store what the worker found listening; publish only a change. Returns whether it changed."""
    found = [p.as_json() for p in ports]
    changed = found != (env.listening_ports or [])
    env.listening_ports = found
    env.ports_checked_at = timezone.now()
    Environment.objects.filter(pk=env.pk).update(listening_ports=found, ports_checked_at=env.ports_checked_at)
    if changed:
        events.publish("environment.ports", {"environment_id": str(env.pk), "listening_ports": found,
                                             "checked_at": env.ports_checked_at.isoformat()},
                       environment_id=env.pk, user_ids=[env.owner_id])
    return changed


# --- counting and audit ------------------------------------------------------------------------

def record_traffic(environment_id: Any, port: int, via: str, *, connections: int = 0, to_environment: int = 0,
                   from_environment: int = 0) -> None:
    """Add to the counters of (environment, port, via). Called when a connection opens (connections=1),
    every few seconds while bytes flow, and when it closes."""
    if not (connections or to_environment or from_environment):
        return
    PortTraffic.objects.get_or_create(environment_id=environment_id, port=port, via=via)
    PortTraffic.objects.filter(environment_id=environment_id, port=port, via=via).update(
        connections=F("connections") + connections, bytes_to_environment=F("bytes_to_environment") + to_environment,
        bytes_from_environment=F("bytes_from_environment") + from_environment, updated_at=timezone.now())


def audit(env: Environment | Any, user: Any, kind: str, port: int | None = None, **data: Any) -> PortAuditEvent:
    env_id = env.pk if isinstance(env, Environment) else env
    user_id = getattr(user, "pk", None) if user is not None and not isinstance(user, int) else user
    return PortAuditEvent.objects.create(environment_id=env_id, user_id=user_id, kind=kind, port=port, data=data)


__all__ = ["ListeningPort", "PortClosed", "PortUnavailable", "PortVia", "audit", "check_port", "check_reachable",
           "do_create_preview_link", "do_revoke_preview_link", "do_update_listening_ports", "find_public_link",
           "parse_proc_net_tcp", "record_traffic", "require_port_access"]
