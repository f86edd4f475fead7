"""``/ws/sandboxes/<id>/screen/``: translates frames; the relay owns the upstream."""

from __future__ import annotations

from channels.db import database_sync_to_async
from django.conf import settings

from sandboxes import services
from viewer.consumers.base import NamekConsumer
from viewer.screen_relay import RelayClosed, ScreenRelay


class ScreenConsumer(NamekConsumer):
    subprotocols = ("binary",)
    frames_skip_database = True
    relay: ScreenRelay | None = None
    #: whether this connection counts as a viewer (for the idle timeout)
    counted = False

    async def opened(self) -> None:
        assert self.sandbox is not None
        target = await self.ask_backend("screen_target")
        if target is None:
            return
        self.relay = ScreenRelay(
            target,
            self.send_binary,
            self.close_with,
            window=settings.NAMEK_RELAY_WINDOW,
            stall_seconds=settings.NAMEK_RELAY_STALL_SECONDS,
        )
        try:
            await self.relay.start()
        except RelayClosed as closed:
            await self.close_with(closed.code, closed.detail)
            return
        await database_sync_to_async(services.viewer_joined)(self.sandbox.pk)
        self.counted = True

    async def send_binary(self, data: bytes) -> None:
        if not self.closing:
            await self.send(bytes_data=data)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if self.relay is None or self.closing:
            return
        try:
            if bytes_data is not None:
                await self.relay.from_browser(bytes_data)
            elif text_data is not None:
                await self.relay.from_browser_text(text_data)
        except RelayClosed as closed:
            await self.close_with(closed.code, closed.detail)

    async def disconnect(self, code: int) -> None:
        self.closing = True
        if self.relay:
            await self.relay.stop()
        if self.counted and self.sandbox is not None:
            self.counted = False
            await database_sync_to_async(services.viewer_left)(self.sandbox.pk)
