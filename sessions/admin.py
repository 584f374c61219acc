from django.contrib import admin, messages
from django.urls import reverse
from django.utils.html import format_html

from sessions import services
from sessions.models import AuditEvent, Participation, TerminalSession


class ParticipationInline(admin.TabularInline):
    model = Participation
    extra = 0
    can_delete = False
    max_num = 0  # a record of who was there: never added by hand
    readonly_fields = ["user", "role", "client_kind", "remote_addr", "joined_at", "left_at"]


class AuditEventInline(admin.TabularInline):
    model = AuditEvent
    extra = 0
    can_delete = False
    max_num = 0  # an audit trail: never added or edited by hand
    readonly_fields = ["at", "kind", "user", "data"]


@admin.register(TerminalSession)
class TerminalSessionAdmin(admin.ModelAdmin):
    list_display = ["__str__", "creator", "created_at", "ended_at", "end_reason", "exit_code", "recording_link"]
    list_filter = ["end_reason"]
    search_fields = ["environment_name", "name", "creator__username", "id"]
    readonly_fields = ["id", "environment", "environment_name", "command", "creator", "created_at", "ended_at",
                       "end_reason", "exit_code", "cols", "rows", "hub_channel", "hub_seen_at", "recording_link"]
    inlines = [ParticipationInline, AuditEventInline]
    actions = ["end_selected"]

    def has_add_permission(self, request) -> bool:  # type: ignore[no-untyped-def]
        return False  # sessions are opened from a terminal, where a hub runs them

    @admin.display(description="Recording")
    def recording_link(self, obj: TerminalSession) -> str:
        url = reverse("session-recording", args=[obj.pk])
        return format_html('<a href="{}">asciicast</a>', url)

    @admin.action(description="End selected sessions")
    def end_selected(self, request, queryset):  # type: ignore[no-untyped-def]
        for session in queryset.filter(ended_at__isnull=True):
            services.end_session(session)
        self.message_user(request, "Asked the selected sessions to end.", messages.INFO)


@admin.register(AuditEvent)
class AuditEventAdmin(admin.ModelAdmin):
    list_display = ["at", "session", "kind", "user"]
    list_filter = ["kind"]
    readonly_fields = ["at", "session", "kind", "user", "data"]

    # An audit trail is written by LSL only: no adding, editing or deleting from the admin.
    def has_add_permission(self, request) -> bool:  # type: ignore[no-untyped-def]
        return False

    def has_change_permission(self, request, obj=None) -> bool:  # type: ignore[no-untyped-def]
        return False

    def has_delete_permission(self, request, obj=None) -> bool:  # type: ignore[no-untyped-def]
        return False
