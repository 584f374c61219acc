from django.contrib import admin, messages
from guardian.admin import GuardedModelAdmin

from environments import reconcile, runtime, services
from environments.models import Environment, TeamQuota, TeamVolume, Template


@admin.register(Template)
class TemplateAdmin(GuardedModelAdmin):
    list_display = ["slug", "image", "public", "cpus", "memory_mb", "pids", "allow_sudo", "managed_by_catalog"]
    list_filter = ["public", "managed_by_catalog", "allow_sudo"]
    search_fields = ["slug", "image", "snapshot_of"]
    filter_horizontal = ["teams"]
    readonly_fields = ["created_by", "snapshot_of"]


@admin.register(Environment)
class EnvironmentAdmin(GuardedModelAdmin):
    list_display = ["name", "owner", "team", "template", "status", "network_mode", "created_at"]
    list_filter = ["status", "template", "team", "network_mode"]
    search_fields = ["name", "owner__username", "id"]
    readonly_fields = ["id", "container_id", "workspace_volume", "image", "status", "progress", "last_error",
                       "created_at", "updated_at", "started_at", "stopped_at", "stop_reason", "identity",
                       "setup_status", "setup_log", "last_active_at"]
    actions = ["stop_selected", "reconcile_selected"]

    @admin.action(description="Stop selected environments")
    def stop_selected(self, request, queryset):  # type: ignore[no-untyped-def]
        for env in queryset:
            try:
                services.stop_environment(env)
            except runtime.EngineError as exc:
                self.message_user(request, f"{env}: {exc}", messages.ERROR)

    @admin.action(description="Reconcile selected with the engine")
    def reconcile_selected(self, request, queryset):  # type: ignore[no-untyped-def]
        try:
            changed = reconcile.reconcile(list(queryset))
        except runtime.EngineError as exc:
            self.message_user(request, str(exc), messages.ERROR)
            return
        self.message_user(request, f"{len(changed)} environment(s) changed status")


@admin.register(TeamVolume)
class TeamVolumeAdmin(admin.ModelAdmin):
    list_display = ["name", "team", "volume_name", "created_by", "created_at"]
    list_filter = ["team"]
    search_fields = ["name", "team__slug", "volume_name"]
    readonly_fields = ["volume_name", "created_by", "created_at"]
    actions = ["delete_volumes"]

    def has_add_permission(self, request):  # type: ignore[no-untyped-def]
        return False  # created through the API, which also creates the Docker volume

    def get_actions(self, request):  # type: ignore[no-untyped-def]
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)  # would leave the Docker volumes behind
        return actions

    def has_delete_permission(self, request, obj=None):  # type: ignore[no-untyped-def]
        return False

    @admin.action(description="Delete selected volumes and their data (refused while mounted)")
    def delete_volumes(self, request, queryset):  # type: ignore[no-untyped-def]
        from rest_framework.exceptions import ValidationError

        for volume in queryset:
            try:
                services.delete_team_volume(volume)
            except (ValidationError, runtime.EngineError) as exc:
                detail = exc.detail if isinstance(exc, ValidationError) else str(exc)
                self.message_user(request, f"{volume}: {detail}", messages.ERROR)


@admin.register(TeamQuota)
class TeamQuotaAdmin(admin.ModelAdmin):
    list_display = ["team", "environments", "cpus", "memory_mb"]
    search_fields = ["team__slug"]
