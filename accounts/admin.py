from django.contrib import admin
from django.core.exceptions import ValidationError
from django.forms.models import BaseInlineFormSet

from accounts.models import APIToken, Client, Membership, Team, TeamRole


class MembershipFormSet(BaseInlineFormSet):
    def clean(self) -> None:
        """The domain rule "a team keeps at least one owner" (accounts.services.LastOwner), checked on
        the whole formset so the admin shows it as a form error instead of failing half-way."""
        super().clean()
        if not self.instance.pk:
            return
        kept = [form.cleaned_data for form in self.forms
                if form.cleaned_data and not form.cleaned_data.get("DELETE")]
        had_owner = Membership.objects.filter(team=self.instance, role=TeamRole.OWNER).exists()
        if had_owner and not any(data.get("role") == TeamRole.OWNER for data in kept):
            raise ValidationError("A team keeps at least one owner: make someone else owner first.")


class MembershipInline(admin.TabularInline):
    model = Membership
    formset = MembershipFormSet
    extra = 1
    autocomplete_fields = ["user"]


@admin.register(Team)
class TeamAdmin(admin.ModelAdmin):
    list_display = ["slug", "name", "created_at"]
    search_fields = ["slug", "name"]
    inlines = [MembershipInline]
    exclude = ["group"]

    def save_model(self, request, obj, form, change):  # type: ignore[no-untyped-def]
        # A team always needs its backing group; create it through the service path.
        if not change:
            from django.contrib.auth.models import Group

            obj.group = Group.objects.create(name=f"team:{obj.slug}")
        super().save_model(request, obj, form, change)

    def save_formset(self, request, form, formset, change):  # type: ignore[no-untyped-def]
        # Memberships edited inline must keep the group in sync (permissions follow the group).
        from accounts import services

        instances = formset.save(commit=False)
        # New owners first, removals last: the formset's clean() checked that an owner remains, and
        # this order never passes through a moment without one (which the services refuse).
        for membership in sorted(instances, key=lambda m: m.role != TeamRole.OWNER):
            services.add_member(membership.team, membership.user, membership.role)
        for deleted in formset.deleted_objects:
            services.remove_member(deleted.team, deleted.user)
        formset.save_m2m()


@admin.register(APIToken)
class APITokenAdmin(admin.ModelAdmin):
    list_display = ["name", "user", "prefix", "created_at", "expires_at", "last_used_at", "revoked_at"]
    list_filter = ["revoked_at"]
    search_fields = ["name", "user__username", "prefix"]
    readonly_fields = ["prefix", "created_at", "last_used_at"]
    exclude = ["digest"]  # never shown, not even to superusers

    def has_add_permission(self, request):  # type: ignore[no-untyped-def]
        return False  # keys are shown once; create them where they can be shown (API, web, lsl_token)


@admin.register(Client)
class ClientAdmin(admin.ModelAdmin):
    list_display = ["client_id", "user", "hostname", "version", "remote_addr", "last_seen_at", "online"]
    search_fields = ["hostname", "user__username", "client_id"]
    readonly_fields = ["client_id", "user", "hostname", "version", "remote_addr", "first_seen_at", "last_seen_at"]

    @admin.display(boolean=True)
    def online(self, obj: Client) -> bool:
        return obj.is_online


from accounts.models import Profile  # noqa: E402


@admin.register(Profile)
class ProfileAdmin(admin.ModelAdmin):
    """Identity inside environments (uid/gid/user name), host-network permission and per-user quotas."""

    list_display = ["user", "shell_name", "uid", "gid", "allow_host_network", "quota_environments", "quota_cpus", "quota_memory_mb",
                    "quota_disk_mb", "quota_teams", "quota_team_volumes"]
    search_fields = ["user__username", "shell_name"]
    autocomplete_fields = ["user"]
