from django.urls import path

from environments.consumers import EventStreamConsumer
from environments.forward import ForwardConsumer
from sessions.routing import websocket_urlpatterns as session_patterns

websocket_urlpatterns = [
    path("ws/events/", EventStreamConsumer.as_asgi()),
    path("ws/environments/<uuid:environment_id>/forward/<int:port>/", ForwardConsumer.as_asgi()),
    *session_patterns,
]

__all__ = ["websocket_urlpatterns"]
