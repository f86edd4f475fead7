"""``/ws/sandboxes/<id>/screen/``: translates frames; the relay owns the upstream.

Every viewer gets the frames; input (``rfb.INPUT_MESSAGES``) reaches the screen only from
the connections of the person holding the control lease (``ControlFollower.drives``),
switched as the lease changes, without reconnecting."""

from __future__ import annotations

from channels.db import database_sync_to_async
from django.conf import settings

from sandboxes import rfb, services
from viewer.consumers.base import NamekConsumer
from viewer.consumers.control import ControlFollower
from viewer.screen_relay import RelayClosed, ScreenRelay

#: how the holder's input is counted in the span
INPUT_KIND = {
    rfb.MSG_KEY_EVENT: "keys",
    rfb.MSG_QEMU: "keys",
    rfb.MSG_POINTER_EVENT: "pointer",
    rfb.MSG_CLIENT_CUT_TEXT: "clipboard",
}


class ScreenConsumer(ControlFollower, NamekConsumer):
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
            on_input=self.forwarded,
            recheck=self.recheck_lease,
        )
        await self.follow_control()
        try:
            await self.relay.start()
        except RelayClosed as closed:
            await self.close_with(closed.code, closed.detail)
            return
        await database_sync_to_async(services.viewer_joined)(self.sandbox.pk)
        self.counted = True

    async def lease_applied(self) -> None:
        if self.relay is not None:
            self.relay.may_input = self.drives

    def forwarded(self, message_type: int) -> None:
        kind = INPUT_KIND.get(message_type)
        if kind:
            self.count(kind)

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
        await self.stop_following()
        if self.counted and self.sandbox is not None:
            self.counted = False
            await database_sync_to_async(services.viewer_left)(self.sandbox.pk)
