"""The template catalog: parse and check a catalog YAML file, then apply it to the database.

A catalog file is declarative: applying it makes each listed template look exactly
like its entry (absent keys mean defaults), and `prune` removes catalog-managed
templates the file no longer lists. Every problem in a file is reported at once,
as `FILE:LINE:COL: key.path: message`, and a file with any problem changes nothing.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable

import yaml
from django.db import transaction
from django.db.models import ProtectedError
from jsonschema import Draft202012Validator, ValidationError
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from accounts.models import Team
from environments.models import NetworkMode, Template

SCHEMA_PATH = Path(__file__).resolve().parent / "schema" / "catalog.schema.json"

DEFAULT_CPUS = 1.0
DEFAULT_MEMORY_MB = 1024
DEFAULT_PIDS = 512
DEFAULT_NETWORK_MODES = (NetworkMode.BRIDGE.value,)
DEFAULT_SHELL = "/bin/sh"

MEMORY_MIN_MB = 16
MEMORY_MAX_MB = 256 * 1024
DISK_MIN_MB = 16
DISK_MAX_MB = 16 * 1024 * 1024
_MEMORY_RE = re.compile(r"^(?P<amount>[0-9]+(?:\.[0-9]+)?)(?P<unit>[mMgG])(?:i?[bB])?$")
_MEMORY_UNIT_MB = {"m": 1, "g": 1024}

# Docker's reference grammar (distribution/reference), restricted to sha256 digests:
# [host[:port]/]path[:tag][@sha256:hex], where path components are lowercase.
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?"
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[_.]|__|-+)[a-z0-9]+)*"
_NAME = rf"(?:{_DOMAIN}/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*"
IMAGE_REFERENCE_RE = re.compile(rf"^{_NAME}(?::[\w][\w.-]{{0,127}})?(?:@sha256:[a-f0-9]{{64}})?$", re.ASCII)

_MERGE_TAG = "tag:yaml.org,2002:merge"

JsonPath = tuple[str | int, ...]
Position = tuple[int, int]  # 1-based (line, column)


@dataclass(frozen=True, order=True)
class Problem:
    """One thing wrong with a catalog file, ordered by where it is in the file."""

    file: str = field(compare=False)
    line: int
    column: int
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}: {self.path}: {self.message}"


@dataclass
class ApplyResult:
    """Template slugs by outcome. With problems, nothing was changed and the lists are empty."""

    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    pruned: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"created {len(self.created)}, updated {len(self.updated)}, "
            f"unchanged {len(self.unchanged)}, pruned {len(self.pruned)}"
        )


def load_schema() -> dict[str, Any]:
    """The catalog JSON Schema (a fresh dict: callers may modify it)."""
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


def format_path(path: JsonPath) -> str:
    """`("templates", 2, "resources")` -> `templates[2].resources`; keys that aren't identifiers are quoted."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", part):
            text += f".{part}" if text else part
        else:
            text += f"[{json.dumps(part)}]"
    return text or "(root)"


def describe(value: Any) -> str:
    """A value as a message fragment: `string 'two'`, `integer 5`, `a list`."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"number {value}"
    if isinstance(value, str):
        shown = value if len(value) <= 60 else value[:57] + "..."
        return f"string {shown!r}"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value}"


def parse_memory(value: str | int) -> int | None:
    """Memory in MiB from `512m`/`2g`/`1.5GiB` or an integer number of MiB; None if malformed or fractional."""
    if isinstance(value, int):
        return value
    match = _MEMORY_RE.match(value)
    if not match:
        return None
    mib = Decimal(match["amount"]) * _MEMORY_UNIT_MB[match["unit"].lower()]
    return int(mib) if mib == mib.to_integral_value() else None


# --- YAML with positions ------------------------------------------------------


@dataclass
class _Document:
    data: Any
    value_positions: dict[JsonPath, Position]
    key_positions: dict[JsonPath, Position]  # where the key introducing a mapping value is

    def position(self, path: JsonPath) -> Position:
        """Where `path` is, or its nearest ancestor that exists (e.g. for a missing key)."""
        while path not in self.value_positions and path:
            path = path[:-1]
        return self.value_positions.get(path, (1, 1))

    def key_position(self, path: JsonPath) -> Position:
        return self.key_positions.get(path) or self.position(path)


def _mark(node: Node) -> Position:
    return node.start_mark.line + 1, node.start_mark.column + 1


class _Builder:
    """Turns a composed YAML node tree into plain data, remembering every node's position.

    Walking the nodes ourselves (instead of `yaml.safe_load`) is what gives us
    positions, and lets us reject duplicate keys, which PyYAML silently overwrites.
    """

    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.constructor = yaml.constructor.SafeConstructor()
        self.value_positions: dict[JsonPath, Position] = {}
        self.key_positions: dict[JsonPath, Position] = {}
        self.problems: list[Problem] = []
        self._active: set[int] = set()

    def problem(self, position: Position, path: JsonPath, message: str) -> None:
        self.problems.append(Problem(self.filename, *position, format_path(path), message))

    def build(self, node: Node, path: JsonPath) -> Any:
        # setdefault: a key set explicitly keeps its position over one merged in with `<<`.
        self.value_positions.setdefault(path, _mark(node))
        if id(node) in self._active:
            self.problem(_mark(node), path, "recursive YAML alias")
            return None
        self._active.add(id(node))
        try:
            if isinstance(node, MappingNode):
                return self._mapping(node, path)
            if isinstance(node, SequenceNode):
                return [self.build(child, (*path, index)) for index, child in enumerate(node.value)]
            return self._scalar(node, path)
        finally:
            self._active.discard(id(node))

    def _scalar(self, node: Node, path: JsonPath) -> Any:
        try:
            return self.constructor.construct_object(node, deep=True)
        except yaml.MarkedYAMLError as exc:
            self.problem(_mark(node), path, exc.problem or str(exc))
            return None

    def _mapping(self, node: MappingNode, path: JsonPath) -> dict[str, Any]:
        result: dict[str, Any] = {}
        first_at: dict[str, Position] = {}
        merges: list[Node] = []
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                merges.append(value_node)
                continue
            key = self._key(key_node, path)
            if key is None:
                continue
            if key in first_at:
                message = f"duplicate key {key!r} (first at line {first_at[key][0]})"
                self.problem(_mark(key_node), (*path, key), message)
                continue
            first_at[key] = _mark(key_node)
            self.key_positions.setdefault((*path, key), first_at[key])
            result[key] = self.build(value_node, (*path, key))
        for source in merges:
            self._merge(source, result, path)
        return result

    def _key(self, node: Node, path: JsonPath) -> str | None:
        if not isinstance(node, ScalarNode):
            self.problem(_mark(node), path, "keys must be strings, got a complex key")
            return None
        key = self._scalar(node, path)
        if isinstance(key, str):
            return key
        self.problem(_mark(node), path, f"keys must be strings, got {describe(key)} (quote it)")
        return None

    def _merge(self, source: Node, into: dict[str, Any], path: JsonPath) -> None:
        """`<<: *anchor` (or a list of anchors): fill in keys not set explicitly; earlier sources win."""
        sources = source.value if isinstance(source, SequenceNode) else [source]
        for mapping in sources:
            if not isinstance(mapping, MappingNode):
                self.problem(_mark(mapping), path, "'<<' must merge a mapping or a list of mappings")
                continue
            for key, value in (self.build(mapping, path) or {}).items():
                into.setdefault(key, value)


def _read(path: Path, filename: str) -> tuple[str | None, list[Problem]]:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8"), []
    except UnicodeDecodeError as exc:
        before = raw[: exc.start]
        line = before.count(b"\n") + 1
        column = len(before) - (before.rfind(b"\n") + 1) + 1
        return None, [Problem(filename, line, column, "(yaml)", "file is not valid UTF-8")]


def _parse_yaml(text: str, filename: str) -> tuple[_Document | None, list[Problem]]:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        message = f"{exc.context}: {exc.problem}" if exc.context else str(exc.problem)
        return None, [Problem(filename, line, column, "(yaml)", message)]
    except yaml.YAMLError as exc:  # e.g. a control character the reader rejects
        return None, [Problem(filename, 1, 1, "(yaml)", str(exc))]
    if root is None:  # empty file
        return _Document(None, {(): (1, 1)}, {}), []
    builder = _Builder(filename)
    data = builder.build(root, ())
    return _Document(data, builder.value_positions, builder.key_positions), builder.problems


# --- schema errors in human words ------------------------------------------------

_TYPE_NAMES = {
    "number": "a number",
    "integer": "an integer",
    "string": "a string",
    "boolean": "true or false",
    "object": "a mapping",
    "array": "a list",
    "null": "null",
}


def _number(value: float) -> str:
    return f"{value:g}"


def _schema_problems(error: ValidationError, document: _Document, filename: str) -> list[Problem]:
    """One jsonschema error as problems (an unknown-keys error names several keys: one problem each)."""
    path: JsonPath = tuple(error.absolute_path)
    instance, schema, expected = error.instance, error.schema, error.validator_value

    def at(where: JsonPath, message: str, position: Position | None = None) -> Problem:
        line, column = position or document.position(where)
        return Problem(filename, line, column, format_path(where), message)

    if error.validator == "additionalProperties":
        allowed = list(schema.get("properties", {}))
        return [
            at((*path, key), _unknown_key_message(key, allowed), document.key_position((*path, key)))
            for key in instance
            if key not in allowed
        ]
    if error.validator == "required":
        # jsonschema yields one error per missing key without naming it; report them all
        # here and let duplicates collapse when problems are deduplicated.
        return [at(path, f"missing required key {key!r}") for key in expected if key not in instance]
    if error.validator == "pattern" and len(error.schema_path) >= 2 and error.schema_path[-2] == "propertyNames":
        key_path = (*path, instance)
        return [at(key_path, f"{instance!r} {schema['x-message']}", document.key_position(key_path))]
    if error.validator == "uniqueItems":
        index = next(i for i, item in enumerate(instance) if item in instance[:i])
        return [at((*path, index), f"{instance[index]!r} is listed more than once")]
    return [at(path, _message(error))]


def _unknown_key_message(key: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1)
    return f"unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")


def _message(error: ValidationError) -> str:
    instance, expected = error.instance, error.validator_value
    match error.validator:
        case "type":
            types = [expected] if isinstance(expected, str) else expected
            return f"expected {' or '.join(_TYPE_NAMES[t] for t in types)}, got {describe(instance)}"
        case "const":
            return f"must be {expected!r}, got {describe(instance)}"
        case "enum":
            return f"{instance!r} is not one of: {', '.join(map(str, expected))}"
        case "minimum":
            return f"must be >= {_number(expected)}"
        case "maximum":
            return f"must be <= {_number(expected)}"
        case "minItems":
            return "must not be empty" if expected == 1 else f"must have at least {expected} items"
        case "minLength":
            return "must not be empty" if expected == 1 else f"must be at least {expected} characters"
        case "maxLength":
            return f"must be at most {expected} characters"
        case "pattern":
            return f"{instance!r} {error.schema.get('x-message', f'does not match {expected}')}"
    return error.message


# --- checks the schema cannot express ----------------------------------------------


def _semantic_problems(data: Any, document: _Document, filename: str) -> list[Problem]:
    problems: list[Problem] = []

    def add(path: JsonPath, message: str) -> None:
        problems.append(Problem(filename, *document.position(path), format_path(path), message))

    first_slug_line: dict[str, int] = {}
    for index, entry in enumerate(_templates(data)):
        path: JsonPath = ("templates", index)
        slug = entry.get("slug")
        if isinstance(slug, str):
            if slug in first_slug_line:
                add((*path, "slug"), f"duplicate slug {slug!r} (first at line {first_slug_line[slug]})")
            else:
                first_slug_line[slug] = document.position((*path, "slug"))[0]
        image = entry.get("image")
        if isinstance(image, str) and image and not IMAGE_REFERENCE_RE.match(image):
            add((*path, "image"), f"{image!r} is not a valid image reference")
        resources = entry.get("resources")
        if isinstance(resources, dict):
            _check_resources(resources, (*path, "resources"), add)
        _check_mount_targets(entry.get("mounts"), (*path, "mounts"), add)
        _check_ports(entry.get("ports"), (*path, "ports"), document, add)
    return problems


def _check_ports(declared: Any, path: JsonPath, document: _Document, add: Callable[[JsonPath, str], None]) -> None:
    """A port declared twice (maybe under two names) is a mistake the schema cannot see."""
    first_line: dict[int, int] = {}
    for index, entry in enumerate(declared if isinstance(declared, list) else []):
        port = entry.get("port") if isinstance(entry, dict) else None
        if not isinstance(port, int) or isinstance(port, bool):
            continue  # the schema reports it
        if port in first_line:
            add((*path, index, "port"), f"port {port} is declared more than once (first at line {first_line[port]})")
        else:
            first_line[port] = document.position((*path, index, "port"))[0]


def _check_mount_targets(mounts: Any, path: JsonPath, add: Callable[[JsonPath, str], None]) -> None:
    """A template mount over /etc (or any refused container path) fails at `lsl_apply`, at its line,
    instead of in every environment created from the template."""
    from environments.policy import MountError, check_target

    for index, mount in enumerate(mounts if isinstance(mounts, list) else []):
        target = mount.get("target") if isinstance(mount, dict) else None
        if not isinstance(target, str) or not target.startswith("/"):
            continue  # the schema reports those
        try:
            check_target(target)
        except MountError as exc:
            add((*path, index, "target"), str(exc))


def _templates(data: Any) -> list[dict[str, Any]]:
    """The template entries that are mappings (the schema reports anything else)."""
    templates = data.get("templates") if isinstance(data, dict) else None
    if not isinstance(templates, list):
        return []
    return [entry if isinstance(entry, dict) else {} for entry in templates]


def _check_resources(resources: dict[str, Any], path: JsonPath, add: Callable[[JsonPath, str], None]) -> None:
    cpus = resources.get("cpus")
    if isinstance(cpus, float) and not math.isfinite(cpus):
        add((*path, "cpus"), "must be a finite number")
    memory = resources.get("memory")
    if isinstance(memory, str) and _MEMORY_RE.match(memory):
        mib = parse_memory(memory)
        if mib is None:
            add((*path, "memory"), f"{memory!r} is not a whole number of MiB")
        elif not MEMORY_MIN_MB <= mib <= MEMORY_MAX_MB:
            add((*path, "memory"), f"{memory!r} is out of range ({MEMORY_MIN_MB}m to {MEMORY_MAX_MB // 1024}g)")
    disk = resources.get("disk")
    if isinstance(disk, bool):
        return  # the schema reports it
    if isinstance(disk, int) and 0 < disk < DISK_MIN_MB:
        add((*path, "disk"), f"must be 0 (no limit) or at least {DISK_MIN_MB} (MiB)")
    elif isinstance(disk, str) and _MEMORY_RE.match(disk):
        mib = parse_memory(disk)
        if mib is None:
            add((*path, "disk"), f"{disk!r} is not a whole number of MiB")
        elif not DISK_MIN_MB <= mib <= DISK_MAX_MB:
            add((*path, "disk"), f"{disk!r} is out of range ({DISK_MIN_MB}m to {DISK_MAX_MB // 1024}g, or 0 for no limit)")


def _team_problems(data: Any, document: _Document, filename: str) -> tuple[dict[str, Team], list[Problem]]:
    """Look up every team the file names; unknown slugs are problems."""
    named: list[tuple[JsonPath, str]] = []
    for index, entry in enumerate(_templates(data)):
        teams = entry.get("teams")
        if isinstance(teams, list):
            named += [(("templates", index, "teams", i), slug) for i, slug in enumerate(teams) if isinstance(slug, str)]
    found = {team.slug: team for team in Team.objects.filter(slug__in={slug for _, slug in named})}
    problems = [
        Problem(filename, *document.position(path), format_path(path), f"unknown team {slug!r}")
        for path, slug in named
        if slug not in found
    ]
    return found, problems


@dataclass
class _Checked:
    document: _Document | None  # None when the file isn't even YAML
    teams: dict[str, Team]
    problems: list[Problem]


def check_yaml(text: str, filename: str, schema: dict[str, Any]) -> tuple[_Document | None, list[Problem]]:
    """Parse YAML text with positions and validate it against `schema`; problems as FILE:LINE:COL.

    The shared machinery for catalog files and environment files (`environments.envfile`).
    """
    document, problems = _parse_yaml(text, filename)
    if document is None:
        return None, problems
    validator = Draft202012Validator(schema)
    for error in validator.iter_errors(document.data):
        problems += _schema_problems(error, document, filename)
    return document, problems


def _check(path: Path | str) -> _Checked:
    """Parse and check a catalog file, collecting every problem in file order."""
    filename = str(path)
    text, problems = _read(Path(path), filename)
    if text is None:
        return _Checked(None, {}, problems)
    document, problems = check_yaml(text, filename, load_schema())
    if document is None:
        return _Checked(None, {}, problems)
    problems += _semantic_problems(document.data, document, filename)
    teams, team_problems = _team_problems(document.data, document, filename)
    return _Checked(document, teams, sorted(set(problems + team_problems)))


def validate_catalog(path: Path | str) -> list[Problem]:
    """Every problem in the catalog file at `path` (reads the database to check team slugs)."""
    return _check(path).problems


# --- applying ---------------------------------------------------------------------


def template_fields(entry: dict[str, Any]) -> dict[str, Any]:
    """Model field values for a valid catalog entry; absent keys get their defaults."""
    resources = entry.get("resources", {})
    memory_mb = parse_memory(resources.get("memory", DEFAULT_MEMORY_MB))
    assert memory_mb is not None  # validation rejected malformed sizes
    return {
        "image": entry["image"],
        "description": entry.get("description", ""),
        "shell": entry.get("shell", DEFAULT_SHELL),
        "env": entry.get("env", {}),
        "cpus": float(resources.get("cpus", DEFAULT_CPUS)),
        "memory_mb": memory_mb,
        # Absent: None, the server's LSL_DEFAULT_DISK_MB when an environment is created (policy.effective_disk_mb).
        "disk_mb": parse_memory(resources["disk"]) if "disk" in resources else None,
        "pids": int(resources.get("pids", DEFAULT_PIDS)),
        "network_modes": list(entry.get("network", {}).get("modes", DEFAULT_NETWORK_MODES)),
        "mounts": [
            {"source": mount["source"], "target": mount["target"], "read_only": mount.get("read_only", False),
             **({"create": True} if mount.get("create") else {})}
            for mount in entry.get("mounts", [])
        ],
        "allow_user_mounts": entry.get("allow_user_mounts", True),
        "allow_sudo": entry.get("sudo", False),
        "setup": entry.get("setup", []),
        "user_setup": entry.get("user_setup", []),
        "labels": entry.get("labels", {}),
        "node_selector": {str(k): str(v) for k, v in entry.get("node_selector", {}).items()},
        "ports": [{"port": p["port"], "name": p.get("name", "")} for p in entry.get("ports", [])],
        "public": "teams" not in entry,
        "managed_by_catalog": True,
    }


def _upsert(entries: list[dict[str, Any]], teams: dict[str, Team], result: ApplyResult) -> None:
    existing = {t.slug: t for t in Template.objects.filter(slug__in=[e["slug"] for e in entries]).prefetch_related("teams")}
    for entry in entries:
        slug, fields = entry["slug"], template_fields(entry)
        wanted_teams = {teams[team_slug] for team_slug in entry.get("teams", [])}
        template = existing.get(slug)
        if template is None:
            template = Template.objects.create(slug=slug, **fields)
            template.teams.set(wanted_teams)
            result.created.append(slug)
            continue
        fields_changed = any(getattr(template, name) != value for name, value in fields.items())
        teams_changed = set(template.teams.all()) != wanted_teams
        if not (fields_changed or teams_changed):
            result.unchanged.append(slug)
            continue
        if fields_changed:
            for name, value in fields.items():
                setattr(template, name, value)
            template.save()
        if teams_changed:
            template.teams.set(wanted_teams)
        result.updated.append(slug)


def _prune(keep: list[str], result: ApplyResult, document: _Document, filename: str) -> None:
    """Delete catalog-managed templates not in `keep`; one still in use is a problem."""
    line, column = document.key_position(("templates",))
    for template in Template.objects.filter(managed_by_catalog=True).exclude(slug__in=keep):
        try:
            template.delete()
        except ProtectedError as exc:
            count = len(exc.protected_objects)
            message = f"cannot prune template {template.slug!r}: still used by {count} environment{'s' * (count != 1)}"
            result.problems.append(Problem(filename, line, column, "templates", message))
        else:
            result.pruned.append(template.slug)


def apply_catalog(path: Path | str, *, dry_run: bool = False, prune: bool = False) -> ApplyResult:
    """Make the catalog-managed templates match the file at `path`, all or nothing.

    `prune` also deletes catalog-managed templates the file doesn't list. `dry_run`
    reports what would change and rolls everything back.
    """
    with transaction.atomic():
        # Teams are looked up inside the transaction so the ones we link are the ones we checked.
        checked = _check(path)
        if checked.problems or checked.document is None:
            return ApplyResult(problems=checked.problems)
        entries = checked.document.data["templates"]
        result = ApplyResult()
        _upsert(entries, checked.teams, result)
        if prune:
            _prune([entry["slug"] for entry in entries], result, checked.document, str(path))
        if result.problems:
            transaction.set_rollback(True)
            return ApplyResult(problems=result.problems)
        if dry_run:
            transaction.set_rollback(True)
        return result
