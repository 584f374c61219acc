from django.urls import path

from environments.consumers import EventStreamConsumer
from sessions.routing import websocket_urlpatterns as session_patterns

websocket_urlpatterns = [
    path("ws/events/", EventStreamConsumer.as_asgi()),
    *session_patterns,
]

__all__ = ["websocket_urlpatterns"]
