from django.contrib.auth import views as auth_views
from django.templatetags.static import static
from django.urls import path
from django.views.generic.base import RedirectView

from environments.metrics import metrics_view
from frontend import views

urlpatterns = [
    # Pages link their icon (<link rel="icon">, base.html); this answers what asks /favicon.ico anyway.
    path("favicon.ico", RedirectView.as_view(url=static("frontend/favicon.svg"), permanent=True), name="favicon"),
    path("login/", views.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("", views.dashboard, name="dashboard"),
    path("monitor/", views.monitor, name="monitor"),
    # Prometheus scrapes this (Bearer $LSL_METRICS_TOKEN or a staff session; see docs/monitoring.md).
    path("metrics", metrics_view, name="metrics"),
    path("environments/new/", views.environment_create, name="environment-create"),
    path("environments/<uuid:env_id>/", views.environment_detail, name="environment"),
    path("environments/<uuid:env_id>/delete/", views.environment_delete, name="environment-delete"),
    path("environments/<uuid:env_id>/share/", views.environment_share, name="environment-share"),
    # Before the catch-all action route below, which would otherwise take "monitor" as an action.
    path("environments/<uuid:env_id>/monitor/", views.environment_monitor, name="environment-monitor"),
    path("environments/<uuid:env_id>/access/<str:grant_id>/revoke/", views.environment_revoke, name="environment-revoke"),
    path("environments/<uuid:env_id>/<str:action>/", views.environment_action, name="environment-action"),
    path("sessions/<uuid:session_id>/", views.terminal, name="terminal"),
    path("sessions/<uuid:session_id>/replay/", views.replay, name="replay"),
    path("teams/", views.teams, name="teams"),
    path("teams/new/", views.team_create, name="team-create"),
    path("teams/<slug:slug>/members/", views.team_add_member, name="team-add-member"),
    path("teams/<slug:slug>/members/<str:username>/remove/", views.team_remove_member, name="team-remove-member"),
    path("tokens/", views.tokens, name="tokens"),
    path("tokens/<int:token_id>/revoke/", views.token_revoke, name="token-revoke"),
]
