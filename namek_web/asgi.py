"""ASGI entry point: HTTP through Django, websockets through Channels."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "namek_web.settings")
# Django must be set up before the consumers (and the models they import) are imported.
django_asgi_app = get_asgi_application()

from namek_web import daphne_close  # noqa: E402

daphne_close.install()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler  # noqa: E402

from viewer.auth import WebsocketAuthStack  # noqa: E402
from viewer.consumers.unknown import UnknownPathConsumer  # noqa: E402
from viewer.routing import websocket_urlpatterns  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": ASGIStaticFilesHandler(django_asgi_app),
        "websocket": WebsocketAuthStack(URLRouter([*websocket_urlpatterns, UnknownPathConsumer.route()])),
    }
)
