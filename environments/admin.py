from django.contrib import admin, messages
from guardian.admin import GuardedModelAdmin

from environments import runtime, services
from environments.models import Environment, Template


@admin.register(Template)
class TemplateAdmin(GuardedModelAdmin):
    list_display = ["slug", "image", "public", "cpus", "memory_mb", "pids", "managed_by_catalog"]
    search_fields = ["slug", "image"]
    filter_horizontal = ["teams"]


@admin.register(Environment)
class EnvironmentAdmin(GuardedModelAdmin):
    list_display = ["name", "owner", "team", "template", "status", "network_mode", "created_at"]
    list_filter = ["status", "template", "team", "network_mode"]
    search_fields = ["name", "owner__username", "id"]
    readonly_fields = ["id", "container_id", "workspace_volume", "image", "status", "progress", "last_error",
                       "created_at", "updated_at", "started_at", "stopped_at"]
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
            changed = services.reconcile(list(queryset))
        except runtime.EngineError as exc:
            self.message_user(request, str(exc), messages.ERROR)
            return
        self.message_user(request, f"{len(changed)} environment(s) changed status")
