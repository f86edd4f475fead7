"""``/ws/sandboxes/``: live phase updates for the dashboard.

Server to browser only, JSON objects: ``{"type": "snapshot", "sandboxes": [...]}`` once,
then ``{"type": "sandbox", "sandbox": {...}}`` for every change of a visible sandbox.
The browser sends nothing; anything it sends closes the socket with 4400.
"""

from __future__ import annotations

import json
from typing import Any

from channels.db import database_sync_to_async

from sandboxes import services
from sandboxes.access import may_see_owner, visible_sandboxes
from sandboxes.models import LIVE_PHASES
from viewer import phase_feed
from viewer.closecodes import Close
from viewer.consumers.base import NamekConsumer


class DashboardConsumer(NamekConsumer):
    needs_sandbox = False
    joined = False

    async def opened(self) -> None:
        phase_feed.ensure_running()
        await self.channel_layer.group_add(services.DASHBOARD_GROUP, self.channel_name)
        self.joined = True
        snapshot = await database_sync_to_async(self._snapshot)()
        await self.send(text_data=json.dumps({"type": "snapshot", "sandboxes": snapshot}))

    def _snapshot(self) -> list[dict[str, Any]]:
        user = self.scope["user"]
        sandboxes = visible_sandboxes(user).filter(phase__in=LIVE_PHASES)
        return [services.sandbox_json(s) for s in sandboxes]

    async def sandbox_changed(self, event: dict[str, Any]) -> None:
        if may_see_owner(self.scope["user"], event["owner_id"]):
            await self.send(text_data=json.dumps({"type": "sandbox", "sandbox": event["sandbox"]}))

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        await self.close_with(Close.BAD_MESSAGE, "this socket only sends")

    async def disconnect(self, code: int) -> None:
        if self.joined:
            await self.channel_layer.group_discard(services.DASHBOARD_GROUP, self.channel_name)
