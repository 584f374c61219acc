"""ASGI entry point: HTTP through Django, websockets through Channels; browser previews (a path
under /preview/, or a Host under LSL_PREVIEW_DOMAIN) through environments.preview first."""

import gc
import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "lsl_site.settings")
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from environments.preview import PreviewRouter  # noqa: E402
from lsl_site import httpserver, shutdown  # noqa: E402
from lsl_site.routing import websocket_urlpatterns  # noqa: E402
from sessions.auth import WebsocketAuthMiddleware  # noqa: E402

application = PreviewRouter(ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": WebsocketAuthMiddleware(URLRouter(websocket_urlpatterns)),
    }
))

# Request bodies bounded before they are read (daphne would otherwise queue any body whole, in RAM).
httpserver.install()

# SIGTERM: terminals are handed back (their shells live on in the keepers) and clients are told to reconnect.
shutdown.install()

# Everything imported so far lives as long as the process. Freezing it keeps the
# garbage collector's full passes from re-scanning it: those passes otherwise pause
# the event loop, and with it every terminal stream, for tens of milliseconds.
gc.freeze()
