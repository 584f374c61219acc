from django.urls import path
from rest_framework.routers import SimpleRouter

from sessions.api import EnvironmentSessionsView, SessionViewSet

router = SimpleRouter()
router.register("sessions", SessionViewSet, basename="session")

urlpatterns = [
    path("environments/<uuid:env_id>/sessions/", EnvironmentSessionsView.as_view(), name="environment-sessions"),
    *router.urls,
]
