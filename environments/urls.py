from django.urls import path
from rest_framework.routers import SimpleRouter

from environments import api_host, api_ports, api_workspaces
from environments.api import EnvironmentViewSet, MonitorView, TemplateViewSet

router = SimpleRouter()
router.register("templates", TemplateViewSet, basename="template")
router.register("environments", EnvironmentViewSet, basename="environment")
router.register("volumes", api_host.TeamVolumeViewSet, basename="volume")
router.register("workspaces", api_workspaces.KeptWorkspaceViewSet, basename="workspace")

urlpatterns = [
    *router.urls,
    path("monitor/", MonitorView.as_view(), name="monitor"),
    # Host integration (docs/host-integration.md).
    path("environments/from-yaml/", api_host.FromYamlView.as_view(), name="environment-from-yaml"),
    path("environments/<uuid:pk>/files/", api_host.FilesView.as_view(), name="environment-files"),
    path("environments/<uuid:pk>/setup-log/", api_host.SetupLogView.as_view(), name="environment-setup-log"),
    path("environments/<uuid:pk>/snapshot/", api_host.SnapshotView.as_view(), name="environment-snapshot"),
    path("environments/<uuid:pk>/export/", api_host.ExportView.as_view(), name="environment-export"),
    path("quotas/", api_host.QuotaView.as_view(), name="quotas"),
    # Ports and public preview links (issue 14; environments/api_ports.py).
    path("environments/<uuid:pk>/ports/", api_ports.PortsView.as_view(), name="environment-ports"),
    path("environments/<uuid:pk>/ports/links/", api_ports.PreviewLinksView.as_view(), name="environment-port-links"),
    path("environments/<uuid:pk>/ports/links/<uuid:link_id>/", api_ports.PreviewLinkView.as_view(),
         name="environment-port-link"),
]
