from django.urls import path

from viewer.consumers.agent import AgentBridgeConsumer
from viewer.consumers.cdp import CdpConsumer
from viewer.consumers.dashboard import DashboardConsumer
from viewer.consumers.events import EventsConsumer
from viewer.consumers.screen import ScreenConsumer
from viewer.consumers.terminal import TerminalConsumer
from viewer.consumers.wall import WallConsumer

websocket_urlpatterns = [
    path("ws/sandboxes/", DashboardConsumer.as_asgi()),
    path("ws/sandboxes/<int:sandbox_id>/screen/", ScreenConsumer.as_asgi()),
    path("ws/sandboxes/<int:sandbox_id>/terminal/", TerminalConsumer.as_asgi()),
    path("ws/sandboxes/<int:sandbox_id>/events/", EventsConsumer.as_asgi()),
    path("ws/sandboxes/<int:sandbox_id>/cdp/", CdpConsumer.as_asgi()),
    path("ws/agent/<int:run_id>/", AgentBridgeConsumer.as_asgi()),
    path("ws/wall/", WallConsumer.as_asgi()),
]
