"""Forms for the web app. Writes still go through the services modules; forms only parse input."""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

from django import forms
from django.contrib.auth import get_user_model
from django.contrib.auth.forms import AuthenticationForm
from django.contrib.auth.models import Group
from django.core.cache import cache
from django.http import HttpRequest
from django.utils.text import slugify

from accounts.models import Team, TeamRole
from environments.models import NetworkMode, Role, usable_templates
from lsl_site.throttling import AuthFailures, client_ident

# Password guessing: 5 failures per username + IP within 5 minutes lock that pair for 5 minutes.
LOGIN_MAX_FAILURES = 5
LOGIN_WINDOW_SECONDS = 300
LOGIN_LOCK_SECONDS = 300


def _login_keys(request: HttpRequest | None, username: str) -> tuple[str, str]:
    # Usernames are hashed so arbitrary input never becomes a raw cache key (memcached rejects spaces).
    ip = (request.META.get("REMOTE_ADDR") if request is not None else None) or "unknown"
    digest = hashlib.sha256(f"{username.strip().lower()}\0{ip}".encode()).hexdigest()[:32]
    return f"lsl:login-failures:{digest}", f"lsl:login-lock:{digest}"


def _cached(operation: str, *args: Any, default: Any = None) -> Any:
    """A cache call that survives the cache (Redis) being down: the lockout then fails open, like
    the API's throttles (lsl_site.throttling), rather than making sign-in impossible."""
    try:
        return getattr(cache, operation)(*args)
    except ValueError:
        raise
    except Exception as exc:
        logging.getLogger(__name__).warning("login lockout is off: its cache is unavailable (%s)", exc.__class__.__name__)
        return default


class ThrottledAuthenticationForm(AuthenticationForm):
    """Django's login form plus a per username+IP lockout kept in the cache."""

    error_messages = {
        **AuthenticationForm.error_messages,
        "locked": "Too many failed sign-in attempts for this account from your address. "
                  "Try again in %(minutes)d minute(s).",
        "throttled": "Too many failed sign-in attempts from your address. Try again in %(seconds)d second(s).",
    }
    # Seconds until the address may try again, when it is over the failed-authentication rate (the view
    # answers 429 with Retry-After then).
    retry_after: float | None = None

    def clean(self) -> dict[str, Any]:
        username = self.cleaned_data.get("username") or ""
        # Per address, across usernames (password spraying), shared with the API's tokens
        # (lsl_site/throttling.py): checked before the password, which is then not even looked at.
        address_failures = AuthFailures(client_ident(self.request.META if self.request is not None else {}))
        self.retry_after = address_failures.wait()
        if self.retry_after is not None:
            raise forms.ValidationError(self.error_messages["throttled"], code="throttled",
                                        params={"seconds": self.retry_after})
        failures_key, lock_key = _login_keys(self.request, username)
        locked_until = _cached("get", lock_key)
        if locked_until is not None:
            # Refuse without checking the password, so a locked account cannot be probed further.
            raise self._locked_error(locked_until)
        try:
            return super().clean()
        except forms.ValidationError:
            address_failures.record()
            if username:
                _cached("add", failures_key, 0, LOGIN_WINDOW_SECONDS)
                try:
                    failures = _cached("incr", failures_key, default=0)
                except ValueError:  # expired between add and incr
                    _cached("set", failures_key, 1, LOGIN_WINDOW_SECONDS)
                    failures = 1
                if failures >= LOGIN_MAX_FAILURES:
                    until = time.time() + LOGIN_LOCK_SECONDS
                    _cached("set", lock_key, until, LOGIN_LOCK_SECONDS)
                    _cached("delete", failures_key)
                    raise self._locked_error(until) from None
            raise

    def confirm_login_allowed(self, user: Any) -> None:
        super().confirm_login_allowed(user)
        # A successful sign-in forgets earlier failures.
        failures_key, _ = _login_keys(self.request, self.cleaned_data.get("username") or "")
        _cached("delete", failures_key)

    def _locked_error(self, until: float) -> forms.ValidationError:
        minutes = max(1, int((until - time.time() + 59) // 60))
        return forms.ValidationError(self.error_messages["locked"], code="locked", params={"minutes": minutes})


class EnvironmentCreateForm(forms.Form):
    template = forms.ModelChoiceField(queryset=None, to_field_name="slug", empty_label=None)
    name = forms.SlugField(max_length=63, help_text="Letters, digits, - and _ (it becomes the hostname).")
    network_mode = forms.ChoiceField(choices=[("", "template default"), *NetworkMode.choices], required=False)
    team = forms.ModelChoiceField(queryset=None, to_field_name="slug", required=False, empty_label="— personal —",
                                  help_text="Team members get the member role.")

    def __init__(self, *args: Any, user: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["template"].queryset = usable_templates(user)
        self.fields["team"].queryset = Team.objects.all() if user.is_superuser else Team.objects.filter(memberships__user=user)


class ShareForm(forms.Form):
    kind = forms.ChoiceField(choices=[("user", "User"), ("team", "Team")], initial="user")
    name = forms.CharField(max_length=150, label="Username or team slug")
    role = forms.ChoiceField(choices=[(r.label, r.label) for r in Role], initial=Role.VIEWER.label)

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        kind, name = data.get("kind"), (data.get("name") or "").strip()
        if not kind or not name:
            return data
        if kind == "user":
            user = get_user_model().objects.filter(username=name, is_active=True).first()
            if user is None:
                self.add_error("name", f"No active user named {name!r}.")
            data["subject"] = user
        else:
            team = Team.objects.filter(slug=name).first()
            if team is None:
                self.add_error("name", f"No team with slug {name!r}.")
            data["subject"] = team
        return data


class MemberForm(forms.Form):
    username = forms.CharField(max_length=150)
    role = forms.ChoiceField(choices=TeamRole.choices, initial=TeamRole.MEMBER)

    def clean_username(self) -> Any:
        name = self.cleaned_data["username"].strip()
        user = get_user_model().objects.filter(username=name, is_active=True).first()
        if user is None:
            raise forms.ValidationError(f"No active user named {name!r}.")
        return user


class TokenCreateForm(forms.Form):
    name = forms.CharField(max_length=100, help_text="e.g. the machine or script using it")
    expires_in_days = forms.IntegerField(min_value=1, max_value=3650, required=False,
                                         help_text="Leave empty for a token that does not expire.")


class TeamCreateForm(forms.Form):
    name = forms.CharField(max_length=100, label="Team name", help_text="Its slug (used to share environments) is derived from it.")

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        name = (data.get("name") or "").strip()
        if not name:
            return data
        slug = slugify(name)
        if not slug:
            self.add_error("name", "A team name needs at least one letter or digit.")
        elif Team.objects.filter(name__iexact=name).exists() or Team.objects.filter(slug=slug).exists() \
                or Group.objects.filter(name=f"team:{slug}").exists():
            # Names differing only in case or punctuation would share a slug: refuse them the same way.
            self.add_error("name", f"A team named {name!r} (slug {slug!r}) already exists.")
        data["name"], data["slug"] = name, slug
        return data
