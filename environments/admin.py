from typing import Any

from django import forms
from django.contrib import admin, messages
from django.http import HttpRequest
from guardian.admin import AdminGroupObjectPermissionsForm, AdminUserObjectPermissionsForm, GuardedModelAdmin

from environments import reconcile, runtime, services
from environments.models import (
    ROLE_CODENAMES,
    Environment,
    KeptWorkspace,
    PortAuditEvent,
    PreviewLink,
    Role,
    TeamQuota,
    TeamVolume,
    Template,
)
from environments.policy import HostNetworkRefused, QuotaExceeded, check_host_network_role, check_quota
from lsl_site.errors import DomainError


@admin.register(Template)
class TemplateAdmin(GuardedModelAdmin):
    list_display = ["slug", "image", "public", "cpus", "memory_mb", "disk_mb", "pids", "allow_sudo", "managed_by_catalog"]
    list_filter = ["public", "managed_by_catalog", "allow_sudo"]
    search_fields = ["slug", "image", "snapshot_of"]
    filter_horizontal = ["teams"]
    readonly_fields = ["created_by", "snapshot_of"]


def _role_choices(obj: Environment) -> list[tuple[str, str]]:
    """LSL's roles only: Django's add/change/delete permissions mean nothing on one environment."""
    labels = {codename: f"{Role(level).label} ({codename})" for level, codename in enumerate(ROLE_CODENAMES, start=1)}
    return [(codename, label) for codename, label in labels.items()]


class EnvironmentGroupPermissionsForm(AdminGroupObjectPermissionsForm):
    def get_obj_perms_field_choices(self) -> list[tuple[str, str]]:
        return _role_choices(self.obj)


class EnvironmentUserPermissionsForm(AdminUserObjectPermissionsForm):
    """guardian's per-user permission form, with the grant rule of services.grant_access: guardian
    writes permissions directly, so without this the admin would be a way around it."""

    def get_obj_perms_field_choices(self) -> list[tuple[str, str]]:
        return _role_choices(self.obj)

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        chosen = set(cleaned.get(self.get_obj_perms_field_name()) or [])
        levels = [level for level, codename in enumerate(ROLE_CODENAMES, start=1) if codename in chosen]
        if levels:
            try:
                check_host_network_role(self.obj, self.user, Role(max(levels)))
            except HostNetworkRefused as exc:
                raise forms.ValidationError(exc.detail, code=exc.code) from None
        return cleaned


class EnvironmentForm(forms.ModelForm):
    """What the admin may change on an environment is what LSL can apply: name and team (as the API
    does), and CPU, memory and process limits (`docker update`, at once, running or stopped). Quotas
    are checked here, so a refusal is a form error rather than a failed save."""

    class Meta:
        model = Environment
        fields = ["name", "team", "cpus", "memory_mb", "pids"]

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        env = self.instance
        if self.errors or env.pk is None:
            return cleaned
        try:
            if {"cpus", "memory_mb"} & set(self.changed_data) and env.status in ("running", "creating"):
                check_quota(env.owner, env.team, cpus=cleaned["cpus"], memory_mb=cleaned["memory_mb"], new=False,
                            exclude=env)
        except QuotaExceeded as exc:
            raise forms.ValidationError(exc.detail, code=exc.code) from None
        return cleaned


@admin.register(Environment)
class EnvironmentAdmin(GuardedModelAdmin):
    form = EnvironmentForm
    list_display = ["name", "owner", "team", "template", "status", "network_mode", "cpus", "memory_mb", "created_at"]
    list_filter = ["status", "template", "team", "network_mode"]
    search_fields = ["name", "owner__username", "id"]
    # Fixed when the container is made (network, mounts, image, disk allotment, owner's identity): shown,
    # never edited, because an edit here would be saved and displayed without ever being applied.
    readonly_fields = ["id", "owner", "template", "network_mode", "mounts", "disk_mb", "container_id",
                       "workspace_volume", "image", "status", "progress", "last_error", "created_at", "updated_at",
                       "started_at", "stopped_at", "stop_reason", "identity", "setup_status", "setup_log",
                       "last_active_at", "listening_ports", "ports_checked_at", "preview_links"]
    actions = ["stop_selected", "reconcile_selected"]


    @admin.display(description="Public preview links")
    def preview_links(self, obj: Environment) -> str:
        """Shown, not edited (a formset here would make every change form carry one): revoke from the
        Preview links list, where the action is."""
        from django.urls import reverse
        from django.utils.html import format_html, format_html_join

        links = list(obj.preview_links.select_related("created_by").order_by("-created_at")[:20])
        if not links:
            return "none"
        rows = format_html_join("", "<li>port {} · {}… · by {} · until {} · {}</li>", (
            (link.port, link.token_hint, link.created_by or "?", link.expires_at.strftime("%Y-%m-%d %H:%M"),
             "active" if link.is_active() else "revoked" if link.revoked_at else "expired") for link in links))
        url = reverse("admin:environments_previewlink_changelist") + f"?environment__id__exact={obj.pk}"
        return format_html('<ul style="margin:0">{}</ul><a href="{}">manage</a>', rows, url)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # environments are created through the API or the web app, which provision them

    def save_model(self, request: HttpRequest, obj: Environment, form: forms.ModelForm, change: bool) -> None:
        """Apply through the services (the one place writes happen), never by saving the row as edited."""
        stored = Environment.objects.get(pk=obj.pk)
        changed = set(form.changed_data)
        try:
            if changed & {"name", "team"}:
                stored = services.update_environment(stored, name=obj.name, team=obj.team)
            if changed & {"cpus", "memory_mb", "pids"}:
                services.resize_environment(stored, cpus=obj.cpus, memory_mb=obj.memory_mb, pids=obj.pids)
        except (DomainError, runtime.EngineError) as exc:
            self.message_user(request, f"{stored}: not changed: {getattr(exc, 'detail', exc)}", messages.ERROR)

    def get_obj_perms_manage_user_form(self, request: HttpRequest) -> type[forms.Form]:
        return EnvironmentUserPermissionsForm

    def get_obj_perms_manage_group_form(self, request: HttpRequest) -> type[forms.Form]:
        return EnvironmentGroupPermissionsForm

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
            changed = reconcile.reconcile(envs=list(queryset.select_related("owner", "template", "team", "node")))
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
    list_display = ["team", "environments", "cpus", "memory_mb", "disk_mb"]
    search_fields = ["team__slug"]


@admin.register(KeptWorkspace)
class KeptWorkspaceAdmin(admin.ModelAdmin):
    """Deleted environments' data. Made by deletes (and the worker's adoption), removed by purging."""

    list_display = ["environment_name", "owner", "team", "disk_mb", "volume_name", "deleted_at"]
    search_fields = ["environment_name", "owner__username", "volume_name"]
    readonly_fields = ["id", "owner", "team", "volume_name", "environment_name", "template_slug", "disk_mb", "deleted_at"]
    actions = ["purge_selected"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # deleting the row alone would leave its volume behind, unlisted: purge instead

    @admin.action(description="Purge selected (delete their data)")
    def purge_selected(self, request, queryset):  # type: ignore[no-untyped-def]
        for kept in queryset:
            try:
                services.purge_kept_workspace(kept)
            except runtime.EngineError as exc:
                self.message_user(request, f"{kept}: {exc}", messages.ERROR)


class PreviewLinkActiveFilter(admin.SimpleListFilter):
    title = "state"
    parameter_name = "state"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("active", "Active"), ("expired", "Expired"), ("revoked", "Revoked")]

    def queryset(self, request: HttpRequest, queryset: Any) -> Any:
        from django.utils import timezone

        now = timezone.now()
        match self.value():
            case "active":
                return queryset.filter(revoked_at__isnull=True, expires_at__gt=now)
            case "expired":
                return queryset.filter(revoked_at__isnull=True, expires_at__lte=now)
            case "revoked":
                return queryset.filter(revoked_at__isnull=False)
        return queryset


@admin.register(PreviewLink)
class PreviewLinkAdmin(admin.ModelAdmin):
    """Public preview links: anyone holding one may open a port's preview without signing in. Only the
    token's hash is stored; revoking (the action) stops a link at once and is audited."""

    list_display = ["environment", "port", "token_hint", "created_by", "created_at", "expires_at", "revoked_at", "active"]
    list_filter = [PreviewLinkActiveFilter]
    search_fields = ["environment__name", "environment__owner__username", "token_hint"]
    list_select_related = ["environment", "environment__owner", "created_by"]
    fields = ["id", "environment", "port", "token_hint", "created_by", "created_at", "expires_at", "revoked_at",
              "revoked_by"]
    readonly_fields = fields
    actions = ["revoke_selected"]

    @admin.display(boolean=True)
    def active(self, link: PreviewLink) -> bool:
        return link.is_active()

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # revoke instead: a deleted link leaves no trace of who could get in until when

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.action(description="Revoke selected links", permissions=["view"])
    def revoke_selected(self, request, queryset):  # type: ignore[no-untyped-def]
        from environments import ports

        revoked = 0
        for link in queryset.filter(revoked_at__isnull=True).select_related("environment"):
            ports.do_revoke_preview_link(link, by=request.user)
            revoked += 1
        self.message_user(request, f"{revoked} link(s) revoked")


@admin.register(PortAuditEvent)
class PortAuditEventAdmin(admin.ModelAdmin):
    """Forwards, previews, public links made and revoked, refusals: read-only."""

    list_display = ["at", "kind", "environment", "port", "user"]
    list_filter = ["kind"]
    search_fields = ["environment__name", "environment__owner__username", "user__username"]
    list_select_related = ["environment", "environment__owner", "user"]
    date_hierarchy = "at"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


# --- nodes (issue 15): the Docker engines environments are placed on --------------------------------

class NodeAddForm(forms.ModelForm):
    """Adding goes through nodes.do_add_node: the engine must answer, and a wrong address or a refused
    certificate is a form error now, not an unavailable node later."""

    class Meta:
        from environments.models import Node

        model = Node
        fields = ["name", "url", "tls_ca", "tls_cert", "tls_key", "shares_host", "labels", "cpus", "memory_mb"]

    def clean(self) -> dict[str, Any]:
        from environments import nodes
        from lsl_site.errors import InvalidInput

        data = super().clean()
        if self.errors:
            return data
        try:
            self.checked = nodes.do_add_node(
                name=data["name"], url=data["url"], labels=data.get("labels") or {}, cpus=data.get("cpus") or 0,
                memory_mb=data.get("memory_mb") or 0, tls_ca=data.get("tls_ca", ""), tls_cert=data.get("tls_cert", ""),
                tls_key=data.get("tls_key", ""), shares_host=data.get("shares_host", False))
        except InvalidInput as exc:
            for field, problems in (exc.fields or {}).items():
                self.add_error(field if field in self.fields else None, problems)
        return data


from environments.models import Node, NodeState  # noqa: E402  (next to its admin, like the form above)


@admin.register(Node)
class NodeAdmin(admin.ModelAdmin):
    list_display = ["name", "url", "state", "available", "capacity", "environments_here", "checked_at"]
    list_filter = ["state", "available"]
    readonly_fields = ["available", "unavailable_since", "last_error", "checked_at", "engine", "created_at"]
    actions = ["drain", "activate"]

    def get_form(self, request: HttpRequest, obj: Any = None, **kwargs: Any) -> Any:
        if obj is None:
            kwargs["form"] = NodeAddForm
        return super().get_form(request, obj, **kwargs)

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> list[str]:
        # The address is fixed once added: environments and volumes live on *that* engine.
        return self.readonly_fields + (["name", "url", "state"] if obj is not None else [])

    def save_model(self, request: HttpRequest, obj: Any, form: Any, change: bool) -> None:
        if change:
            super().save_model(request, obj, form, change)
        # Added: NodeAddForm.clean saved it through nodes.do_add_node already.
        elif getattr(form, "checked", None) is not None:
            obj.pk = form.checked.pk

    def delete_model(self, request: HttpRequest, obj: Any) -> None:
        from environments import nodes

        try:
            nodes.do_remove_node(obj)
        except DomainError as exc:
            self.message_user(request, exc.detail, messages.ERROR)

    @admin.display(description="CPUs / memory")
    def capacity(self, obj: Any) -> str:
        return f"{obj.capacity_cpus:g} / {obj.capacity_memory_mb} MiB"

    def get_queryset(self, request: HttpRequest) -> Any:
        from django.db.models import Count

        return super().get_queryset(request).annotate(environment_count=Count("environments"))  # one query

    @admin.display(description="environments", ordering="environment_count")
    def environments_here(self, obj: Any) -> int:
        return obj.environment_count

    @admin.action(description="Drain selected (no new environments)")
    def drain(self, request: HttpRequest, queryset: Any) -> None:
        from environments import nodes

        for node in queryset:
            nodes.do_set_node_state(node, NodeState.DRAINING)

    @admin.action(description="Activate selected")
    def activate(self, request: HttpRequest, queryset: Any) -> None:
        from environments import nodes

        for node in queryset:
            nodes.do_set_node_state(node, NodeState.ACTIVE)
