from django.urls import path
from rest_framework.routers import SimpleRouter

from environments.api import EnvironmentViewSet, MonitorView, TemplateViewSet

router = SimpleRouter()
router.register("templates", TemplateViewSet, basename="template")
router.register("environments", EnvironmentViewSet, basename="environment")

urlpatterns = [*router.urls, path("monitor/", MonitorView.as_view(), name="monitor")]
