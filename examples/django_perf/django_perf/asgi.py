"""ASGI entry point: the HTTP API and the live-updates websocket (``/ws/signatures/``).

daphne -b 127.0.0.1 -p 8001 django_perf.asgi:application
"""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "django_perf.settings")

from django.core.asgi import get_asgi_application

http = get_asgi_application()  # sets Django up before the consumers import models

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.urls import path  # noqa: E402
from perf.consumers import SignatureUpdates  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": http,
        "websocket": URLRouter([path("ws/signatures/", SignatureUpdates.as_asgi())]),
    }
)
