"""Environment files: one environment's setup as YAML, to export and to create from.

They are checked by the same machinery as catalog files (`catalog.check_yaml`:
YAML with positions, a JSON Schema, problems as `FILE:LINE:COL: path: message`),
against `schema/environment.schema.json`. Creating from a file goes through
`services.create_environment`, so every rule (mount roots, team volumes, host
network, quotas) applies; its field errors are reported at their place in the file.
"""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Any

import yaml
from django.contrib.auth.models import AbstractBaseUser
from django.utils import timezone
from lsl_site.errors import InvalidInput

from accounts.models import Team
from environments import catalog, policy, services
from environments.catalog import JsonPath, Problem, format_path, parse_memory
from environments.models import Environment, usable_templates

SCHEMA_PATH = Path(__file__).resolve().parent / "schema" / "environment.schema.json"


def load_schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


def _memory(mb: int) -> str | int:
    return f"{mb // 1024}g" if mb % 1024 == 0 else f"{mb}m"


def export_environment(env: Environment) -> str:
    """The environment as an environment file (template, team, network, limits, the user's own mounts)."""
    body: dict[str, Any] = {"name": env.name, "template": env.template.slug}
    if env.team is not None:
        body["team"] = env.team.slug
    body["network"] = env.network_mode
    body["resources"] = {"cpus": env.cpus, "memory": _memory(env.memory_mb)}
    if env.disk_mb:  # 0 (no limit, made before limits or on a server without a default): the template's then
        body["resources"]["disk"] = _memory(env.disk_mb)
    mounts = []
    for mount in env.mounts:
        if mount.get("template"):
            continue  # the template adds these again
        entry: dict[str, Any] = ({"volume": mount["volume"]} if mount.get("type") == "volume" else {"source": mount["source"]})
        entry["target"] = mount["target"]
        if mount.get("read_only"):
            entry["read_only"] = True
        mounts.append(entry)
    if mounts:
        body["mounts"] = mounts
    header = (f"# LSL environment file: {env.owner.get_username()}/{env.name}, exported {timezone.now():%Y-%m-%d %H:%M} UTC.\n"
              "# Create an environment from it: POST /api/v1/environments/from-yaml/ (lsl create --from FILE).\n")
    return header + yaml.safe_dump({"version": 1, "environment": body}, sort_keys=False, default_flow_style=False)


# Where a create_environment field error points in the file.
_FIELD_PATHS: dict[str, JsonPath] = {
    "name": ("environment", "name"),
    "template": ("environment", "template"),
    "team": ("environment", "team"),
    "network_mode": ("environment", "network"),
    "cpus": ("environment", "resources", "cpus"),
    "memory_mb": ("environment", "resources", "memory"),
    "disk_mb": ("environment", "resources", "disk"),
    "mounts": ("environment", "mounts"),
}
_INDEXED = re.compile(r"^\[(\d+)\] (.*)$", re.S)


def create_from_yaml(owner: AbstractBaseUser, text: str, *, name: str | None = None,
                     filename: str = "environment.yaml") -> Environment:
    """Validate an environment file and create the environment it describes (provisioned in the background).

    Problems raise InvalidInput({"yaml": ["FILE:LINE:COL: path: message", ...]}); a
    quota refusal is raised as is (a 403 naming the limit).
    """
    document, problems = catalog.check_yaml(text, filename, load_schema())

    def problem(path: JsonPath, message: str) -> None:
        assert document is not None
        problems.append(Problem(filename, *document.position(path), format_path(path), message))

    template = team = None
    spec: dict[str, Any] = {}
    if document is not None and not problems:
        spec = document.data["environment"]
        template = usable_templates(owner).filter(slug=spec["template"]).first()
        if template is None:
            problem(("environment", "template"), f"no template {spec['template']!r} that you may use")
        if "team" in spec:
            team = Team.objects.filter(slug=spec["team"]).first()
            if team is None:
                problem(("environment", "team"), f"unknown team {spec['team']!r}")
        for key in ("memory", "disk"):
            size = spec.get("resources", {}).get(key)
            if isinstance(size, str) and parse_memory(size) is None:
                problem(("environment", "resources", key), f"{size!r} is not a whole number of MiB")
        for index, mount in enumerate(spec.get("mounts", [])):
            if ("source" in mount) == ("volume" in mount):
                problem(("environment", "mounts", index), "give exactly one of 'source' (a host path) or 'volume' (a team volume)")
    if problems or template is None:
        raise InvalidInput({"yaml": [str(p) for p in sorted(set(problems))]})

    resources = spec.get("resources", {})
    memory, disk = resources.get("memory"), resources.get("disk")
    request = services.CreateRequest(
        name=name or spec.get("name") or f"{template.slug}-{uuid.uuid4().hex[:6]}",
        template=template, team=team, network_mode=spec.get("network"),
        mounts=tuple({k: v for k, v in m.items()} for m in spec.get("mounts", [])),
        cpus=float(resources["cpus"]) if "cpus" in resources else None,
        memory_mb=parse_memory(memory) if memory is not None else None,
        disk_mb=parse_memory(disk) if disk is not None else None,
    )
    try:
        return services.create_environment(owner, request)
    except policy.QuotaExceeded:
        raise
    except InvalidInput as exc:
        for field, messages in (exc.fields or {}).items():
            path = _FIELD_PATHS.get(field, ("environment",))
            if field == "name" and name:
                path = ()  # the name came from the request, not the file
            for message in messages if isinstance(messages, list) else [messages]:
                text_message, where = str(message), path
                match = _INDEXED.match(text_message)
                if field == "mounts" and match:
                    # create_environment numbers template mounts first, then the file's.
                    index = int(match[1]) - len(template.mounts or [])
                    text_message = match[2]
                    where = (*path, index) if index >= 0 else ("environment", "template")
                problem(where, text_message)
        raise InvalidInput({"yaml": [str(p) for p in sorted(set(problems))]}) from None
