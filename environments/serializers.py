from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from accounts.models import Team
from environments.models import Environment, NetworkMode, Role, Template
from environments.policy import MountError, effective_disk_mb, parse_mount
from lsl_site.fields import StrictSlugField, StrictSlugRelatedField


class TemplateSerializer(serializers.ModelSerializer):
    teams = serializers.SlugRelatedField(slug_field="slug", many=True, read_only=True)
    disk_mb = serializers.SerializerMethodField(help_text="Disk limit (MiB) of its environments; 0 = none.")

    class Meta:
        model = Template
        fields = ["slug", "image", "description", "shell", "env", "cpus", "memory_mb", "disk_mb", "pids", "network_modes",
                  "mounts", "allow_user_mounts", "allow_sudo", "setup", "user_setup", "labels", "public", "teams",
                  "snapshot_of", "ports"]

    def get_disk_mb(self, template: Template) -> int:
        return effective_disk_mb(template)  # the server default where the catalog sets none


@extend_schema_field({"oneOf": [
    {"type": "string", "pattern": r"^(volume:)?[^:\x00]+:[^:\x00]+(:(ro|rw))?$", "not": {"pattern": r"^volume:[^:]*(:(ro|rw))?$"},
     "description": "SRC:DST[:ro|rw] or volume:NAME:DST[:ro|rw]"},
    {"type": "object", "required": ["source", "target"], "additionalProperties": False,
     "properties": {"source": {"type": "string"}, "target": {"type": "string"}, "read_only": {"type": "boolean"}}},
    {"type": "object", "required": ["volume", "target"], "additionalProperties": False,
     "properties": {"volume": {"type": "string"}, "target": {"type": "string"}, "read_only": {"type": "boolean"}}},
]})
class MountField(serializers.Field):
    """Accepts `"SRC:DST[:ro]"`, `"volume:NAME:DST[:ro]"`, `{"source", "target", "read_only"}` or
    `{"volume", "target", "read_only"}`."""

    def to_internal_value(self, data: Any) -> dict[str, Any]:
        if isinstance(data, dict) and not isinstance(data.get("read_only", False), bool):
            raise serializers.ValidationError("read_only must be true or false")
        if isinstance(data, str):
            try:
                return parse_mount(data)
            except MountError as exc:
                raise serializers.ValidationError(str(exc)) from None
        if isinstance(data, dict) and isinstance(data.get("source"), str) and isinstance(data.get("target"), str):
            extra = set(data) - {"source", "target", "read_only"}
            if extra:
                raise serializers.ValidationError(f"unknown keys: {', '.join(sorted(extra))}")
            return {"source": data["source"], "target": data["target"], "read_only": bool(data.get("read_only", False))}
        if isinstance(data, dict) and isinstance(data.get("volume"), str) and isinstance(data.get("target"), str):
            extra = set(data) - {"volume", "target", "read_only"}
            if extra:
                raise serializers.ValidationError(f"unknown keys: {', '.join(sorted(extra))}")
            return {"volume": data["volume"], "target": data["target"], "read_only": bool(data.get("read_only", False))}
        raise serializers.ValidationError('expected "SRC:DST[:ro]", "volume:NAME:DST[:ro]", '
                                          'or {"source"|"volume": ..., "target": ..., "read_only": bool}')

    def to_representation(self, value: Any) -> Any:
        return value


class EnvironmentSerializer(serializers.ModelSerializer):
    owner = serializers.CharField(source="owner.username", read_only=True)
    team = StrictSlugRelatedField(slug_field="slug", queryset=Team.objects.all(), required=False, allow_null=True)
    template = StrictSlugRelatedField(slug_field="slug", queryset=Template.objects.all())
    network_mode = serializers.ChoiceField(choices=NetworkMode.choices, required=False)
    mounts = serializers.ListField(child=MountField(), required=False, max_length=16)
    cpus = serializers.FloatField(required=False, min_value=0.1, max_value=64)
    memory_mb = serializers.IntegerField(required=False, min_value=16, max_value=262144)
    disk_mb = serializers.IntegerField(required=False, min_value=16, max_value=16 * 1024 * 1024,
                                       help_text="Disk limit in MiB (workspace and container layer); at most the template's.")
    workspace = serializers.UUIDField(write_only=True, required=False,
                                      help_text="A kept workspace of yours (GET /api/v1/workspaces/) to attach instead of a new one.")
    role = serializers.SerializerMethodField()
    name = StrictSlugField(max_length=63)
    status = serializers.SerializerMethodField(help_text="creating, running, stopped, error, missing, or "
                                               "node_unavailable while the node it lives on does not answer.")
    recorded_status = serializers.CharField(source="status", read_only=True,
                                            help_text="The last status known (the same as status unless node_unavailable).")
    node = serializers.CharField(source="node.name", read_only=True, help_text="The Docker engine it lives on.")

    class Meta:
        model = Environment
        fields = ["id", "name", "owner", "team", "template", "image", "status", "recorded_status", "node", "container_id", "cpus", "memory_mb",
                  "disk_mb", "disk_used_mb", "disk_checked_at", "disk_grace_until", "pids", "network_mode", "mounts", "workspace_volume", "workspace", "progress", "last_error", "role",
                  "created_at", "updated_at", "started_at", "stopped_at", "stop_reason", "setup_status", "identity"]
        read_only_fields = ["id", "owner", "image", "status", "container_id", "pids", "workspace_volume", "progress",
                            "last_error", "created_at", "updated_at", "started_at", "stopped_at", "stop_reason",
                            "setup_status", "identity", "disk_used_mb", "disk_checked_at", "disk_grace_until"]
        validators: list[Any] = []  # uniqueness per owner is checked (with a clear message) in services

    def get_status(self, env: Environment) -> str:
        from environments.nodes import status_of

        return status_of(env)

    def get_role(self, env: Environment) -> str | None:
        roles: dict[Any, Role] = self.context.get("roles", {})
        role = roles.get(env.pk)
        return role.label if role else None


class EnvironmentUpdateSerializer(serializers.Serializer):
    name = StrictSlugField(max_length=63, required=False)
    team = StrictSlugRelatedField(slug_field="slug", queryset=Team.objects.all(), required=False, allow_null=True)


class GrantSerializer(serializers.Serializer):
    id = serializers.CharField(read_only=True)
    kind = serializers.CharField(read_only=True)
    name = serializers.CharField(read_only=True)
    user = StrictSlugRelatedField(slug_field="username", queryset=get_user_model().objects.filter(is_active=True),
                                        required=False, write_only=True)
    team = StrictSlugRelatedField(slug_field="slug", queryset=Team.objects.all(), required=False, write_only=True)
    role = serializers.ChoiceField(choices=["viewer", "member", "admin"])

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if ("user" in attrs) == ("team" in attrs):
            raise serializers.ValidationError("give exactly one of 'user' or 'team'")
        return attrs

    def to_representation(self, grant: Any) -> dict[str, Any]:
        return {"id": grant.id, "kind": grant.kind, "name": grant.name, "role": grant.role.label}


# --- ports: listening, declared, public preview links (issue 14; environments/api_ports.py) ------------

class ListeningPortSerializer(serializers.Serializer):
    port = serializers.IntegerField(min_value=1, max_value=65535)
    loopback_only = serializers.BooleanField(help_text="Bound to 127.0.0.1/::1 only (still reachable through LSL).")
    preview_url = serializers.CharField(allow_null=True, help_text="The browser preview; null when you may not open it "
                                        "(viewer role, host network).")


class DeclaredPortSerializer(serializers.Serializer):
    port = serializers.IntegerField(min_value=1, max_value=65535)
    name = serializers.CharField(allow_blank=True, help_text="The template's name for it (catalog `ports`).")
    listening = serializers.BooleanField(help_text="Whether something listens on it now.")
    preview_url = serializers.CharField(allow_null=True)


class PreviewLinkSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    port = serializers.IntegerField()
    url = serializers.CharField(allow_null=True, help_text="Always null: only the token's hash is stored, so the URL "
                                "is shown once, when the link is made.")
    token_hint = serializers.CharField(help_text="The token's first characters, to tell links apart.")
    created_by = serializers.CharField(allow_null=True, source="created_by.username", default=None)
    created_at = serializers.DateTimeField()
    expires_at = serializers.DateTimeField()
    revoked_at = serializers.DateTimeField(allow_null=True)
    active = serializers.SerializerMethodField()

    def get_active(self, link: Any) -> bool:
        return bool(link.is_active())

    def to_representation(self, link: Any) -> dict[str, Any]:
        data = super().to_representation(link)
        data["url"] = None
        return data


class PortsSerializer(serializers.Serializer):
    listening = ListeningPortSerializer(many=True)
    declared = DeclaredPortSerializer(many=True)
    checked_at = serializers.DateTimeField(allow_null=True, help_text="When the worker last looked (null: never).")
    preview_url_template = serializers.CharField(allow_null=True, help_text=(
        "A preview URL with `{port}` in place of the port (null when you may not open previews): a page fills "
        "it in for the ports an `environment.ports` event lists, without asking again."))
    links = PreviewLinkSerializer(many=True, allow_null=True,
                                  help_text="Public preview links, newest first: admins only (null for others).")


class PreviewLinkCreateSerializer(serializers.Serializer):
    port = serializers.IntegerField(min_value=1, max_value=65535)
    expires_in = serializers.IntegerField(required=False, min_value=60,
                                          help_text="Seconds until the link stops working (default LSL_PREVIEW_LINK_TTL, "
                                                    "at most LSL_PREVIEW_LINK_MAX_TTL).")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        from django.conf import settings
        from django.core.validators import MaxValueValidator

        super().__init__(*args, **kwargs)
        field = self.fields["expires_in"]
        field.max_value = int(settings.LSL_PREVIEW_LINK_MAX_TTL)
        field.validators.append(MaxValueValidator(field.max_value, message=field.error_messages["max_value"].format(
            max_value=field.max_value)))


class CreatedPreviewLinkSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    port = serializers.IntegerField()
    url = serializers.CharField(help_text="The public URL: shown this once.")
    token = serializers.CharField(help_text="The link's secret: shown this once.")
    expires_at = serializers.DateTimeField()
