"""The checks every Namek websocket makes, in order, after accepting:

1. a logged-in user (session cookie or bearer token), else 4401;
2. an Origin that matches ALLOWED_HOSTS; a missing Origin only with a token, else 4403;
3. for sandbox sockets: the sandbox exists (4404) and the user may see it (4403).
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlsplit

from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings
from django.http.request import split_domain_port, validate_host

from sandboxes.access import can_view
from sandboxes.backends import get_backend
from sandboxes.backends.base import BackendError
from sandboxes.models import Sandbox
from viewer.closecodes import Close, reason

log = logging.getLogger(__name__)


def origin_allowed(scope: dict[str, Any]) -> bool:
    headers = dict(scope.get("headers", []))
    origin = headers.get(b"origin")
    if origin is None:
        return scope.get("auth_method") == "token"
    try:
        host = urlsplit(origin.decode("latin-1")).netloc
    except ValueError:
        return False
    domain, _port = split_domain_port(host)
    return bool(domain) and validate_host(domain, settings.ALLOWED_HOSTS)


class NamekConsumer(AsyncWebsocketConsumer):
    #: subprotocols this socket speaks, in order of preference
    subprotocols: tuple[str, ...] = ()
    #: whether the URL names a sandbox that must exist and be visible
    needs_sandbox = True
    #: whether the browser's frames skip Channels' per-handler thread hop (see dispatch)
    frames_skip_database = False

    sandbox: Sandbox | None = None
    closing = False

    async def connect(self) -> None:
        offered = self.scope.get("subprotocols", [])
        chosen = next((p for p in self.subprotocols if p in offered), None)
        await self.accept(subprotocol=chosen)
        code = await self.refusal()
        if code is not None:
            await self.close_with(code)
            return
        await self.opened()

    async def refusal(self) -> Close | None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            return Close.UNAUTHENTICATED
        if not origin_allowed(self.scope):
            return Close.FORBIDDEN
        if self.needs_sandbox:
            sandbox_id = self.scope["url_route"]["kwargs"]["sandbox_id"]
            self.sandbox = await database_sync_to_async(
                Sandbox.objects.select_related("owner").filter(pk=sandbox_id).first
            )()
            if self.sandbox is None:
                return Close.NOT_FOUND
            if not can_view(user, self.sandbox):
                return Close.FORBIDDEN
        return None

    async def opened(self) -> None:
        """Called once the connection passed every check."""

    async def dispatch(self, message: dict[str, Any]) -> None:
        # Channels closes stale database connections in a worker thread before every
        # handler: one hop per browser frame through asgiref's one shared thread. Relays
        # whose frames never touch the database skip it (measured on the screen relay:
        # about 20 % less CPU per relayed MB, see tests/benchmarks).
        if self.frames_skip_database and message["type"] == "websocket.receive":
            await self.websocket_receive(message)
        else:
            await super().dispatch(message)

    async def ask_backend(self, method: str, **kwargs: Any) -> Any:
        """Call the sandbox's backend (``screen_target``, ``browser_target``,
        ``open_shell``...) in a thread. Returns None, having closed with 1011, when the
        sandbox is not ready or the backend fails."""
        assert self.sandbox is not None
        if self.sandbox.phase != "ready":
            await self.close_with(Close.UNREACHABLE, f"the sandbox is {self.sandbox.phase}")
            return None
        call = getattr(get_backend(self.sandbox.backend), method)
        try:
            return await sync_to_async(call, thread_sensitive=False)(self.sandbox.pk, **kwargs)
        except BackendError as exc:
            await self.close_with(Close.UNREACHABLE, str(exc))
            return None

    async def close_with(self, code: Close, detail: str = "") -> None:
        if self.closing:
            return
        self.closing = True
        await self.close(code=int(code), reason=reason(code, detail))
