from django.urls import path
from rest_framework.routers import SimpleRouter

from accounts.api import ConfigView, LoginTokenView, MeView, PingView, TeamViewSet, TokenViewSet

router = SimpleRouter()
router.register("teams", TeamViewSet, basename="team")
router.register("tokens", TokenViewSet, basename="token")

urlpatterns = [
    *router.urls,
    path("me/", MeView.as_view(), name="me"),
    path("config/", ConfigView.as_view(), name="config"),
    path("ping/", PingView.as_view(), name="ping"),
    path("auth/token/", LoginTokenView.as_view(), name="login-token"),
]
