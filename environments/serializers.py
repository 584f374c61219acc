from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from rest_framework import serializers

from accounts.models import Team
from environments.models import Environment, NetworkMode, Role, Template
from environments.policy import MountError, parse_mount


class TemplateSerializer(serializers.ModelSerializer):
    teams = serializers.SlugRelatedField(slug_field="slug", many=True, read_only=True)

    class Meta:
        model = Template
        fields = ["slug", "image", "description", "shell", "env", "cpus", "memory_mb", "pids", "network_modes",
                  "mounts", "allow_user_mounts", "allow_sudo", "setup", "user_setup", "labels", "public", "teams",
                  "snapshot_of"]


class MountField(serializers.Field):
    """Accepts `"SRC:DST[:ro]"`, `"volume:NAME:DST[:ro]"`, `{"source", "target", "read_only"}` or
    `{"volume", "target", "read_only"}`."""

    def to_internal_value(self, data: Any) -> dict[str, Any]:
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
    team = serializers.SlugRelatedField(slug_field="slug", queryset=Team.objects.all(), required=False, allow_null=True)
    template = serializers.SlugRelatedField(slug_field="slug", queryset=Template.objects.all())
    network_mode = serializers.ChoiceField(choices=NetworkMode.choices, required=False)
    mounts = serializers.ListField(child=MountField(), required=False, max_length=16)
    cpus = serializers.FloatField(required=False, min_value=0.1, max_value=64)
    memory_mb = serializers.IntegerField(required=False, min_value=16, max_value=262144)
    role = serializers.SerializerMethodField()
    name = serializers.SlugField(max_length=63)

    class Meta:
        model = Environment
        fields = ["id", "name", "owner", "team", "template", "image", "status", "container_id", "cpus", "memory_mb",
                  "pids", "network_mode", "mounts", "workspace_volume", "progress", "last_error", "role",
                  "created_at", "updated_at", "started_at", "stopped_at", "stop_reason", "setup_status", "identity"]
        read_only_fields = ["id", "owner", "image", "status", "container_id", "pids", "workspace_volume", "progress",
                            "last_error", "created_at", "updated_at", "started_at", "stopped_at", "stop_reason",
                            "setup_status", "identity"]
        validators: list[Any] = []  # uniqueness per owner is checked (with a clear message) in services

    def get_role(self, env: Environment) -> str | None:
        roles: dict[Any, Role] = self.context.get("roles", {})
        role = roles.get(env.pk)
        return role.label if role else None


class EnvironmentUpdateSerializer(serializers.Serializer):
    name = serializers.SlugField(max_length=63, required=False)
    team = serializers.SlugRelatedField(slug_field="slug", queryset=Team.objects.all(), required=False, allow_null=True)


class GrantSerializer(serializers.Serializer):
    id = serializers.CharField(read_only=True)
    kind = serializers.CharField(read_only=True)
    name = serializers.CharField(read_only=True)
    user = serializers.SlugRelatedField(slug_field="username", queryset=get_user_model().objects.filter(is_active=True),
                                        required=False, write_only=True)
    team = serializers.SlugRelatedField(slug_field="slug", queryset=Team.objects.all(), required=False, write_only=True)
    role = serializers.ChoiceField(choices=["viewer", "member", "admin"])

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if ("user" in attrs) == ("team" in attrs):
            raise serializers.ValidationError("give exactly one of 'user' or 'team'")
        return attrs

    def to_representation(self, grant: Any) -> dict[str, Any]:
        return {"id": grant.id, "kind": grant.kind, "name": grant.name, "role": grant.role.label}
