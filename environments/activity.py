"""Who is using an environment right now, and since when not: told by the apps that know.

Idle stop (services.stop_idle_environments) needs to know whether anyone is attached to one of an
environment's terminal sessions. Those live in the `sessions` app, which depends on this one, not
the other way round: so `sessions` registers a source here at start-up (its AppConfig.ready)
instead of this app reaching into its tables.
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

from environments.models import Environment


class ActivitySource(Protocol):
    def attached(self, env: Environment) -> bool:
        """Someone is using the environment through this source now."""

    def last_left(self, env: Environment) -> datetime | None:
        """When the last user of this source left it, if ever."""


_SOURCES: list[ActivitySource] = []


def register(source: ActivitySource) -> None:
    if not any(type(existing) is type(source) for existing in _SOURCES):
        _SOURCES.append(source)


def attached(env: Environment) -> bool:
    return any(source.attached(env) for source in _SOURCES)


def last_left(env: Environment) -> datetime | None:
    moments = [moment for source in _SOURCES if (moment := source.last_left(env)) is not None]
    return max(moments) if moments else None
