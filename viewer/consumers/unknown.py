"""Any other websocket path: accept, then close 4404 (instead of an opaque HTTP 403)."""

from __future__ import annotations

from typing import Any

from django.urls import re_path

from viewer.closecodes import Close
from viewer.consumers.base import NamekConsumer


class UnknownPathConsumer(NamekConsumer):
    needs_sandbox = False

    async def refusal(self) -> Close | None:
        return Close.NOT_FOUND

    @classmethod
    def route(cls) -> Any:
        return re_path(r"", cls.as_asgi())
