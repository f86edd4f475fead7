"""The checks every Namek websocket makes, in order, after accepting:

1. a logged-in user (session cookie or bearer token), else 4401;
2. an Origin that matches ALLOWED_HOSTS; a missing Origin only with a token, else 4403;
3. for sandbox sockets: the sandbox exists (4404) and the user may see it (4403).

A connection opened with a read-only share link (``?share=<token>``, auth_method "share",
see ``viewer.auth``) has no user. Instead: the token must be valid (``scope["share"]``),
the socket a sandbox's, the link must allow that sandbox (``sharing.allows``) and the
Origin must match; else 4403. Such a connection never drives (``ControlFollower.drives``
needs a user), so the relays drop its input. It joins the group ``share-<link id>`` and
re-resolves its token every ``sharing.RECHECK_SECONDS``: a revoked or expired link closes
it with 4403. Sockets that are not a sandbox's (the dashboard feed) refuse share links;
the CDP relay and the agent bridge check credentials of their own and find none (4401).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any
from urllib.parse import urlsplit

from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings
from django.http.request import split_domain_port, validate_host

from sandboxes import sharing
from sandboxes.access import can_view
from sandboxes.backends import get_backend
from sandboxes.backends.base import BackendError
from sandboxes.models import Sandbox
from viewer.auth import share_token
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
    #: the share link this connection was opened with (a ``sharing.Grant``), if any
    share: sharing.Grant | None = None
    _share_watch: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        offered = self.scope.get("subprotocols", [])
        chosen = next((p for p in self.subprotocols if p in offered), None)
        await self.accept(subprotocol=chosen)
        code = await self.refusal()
        if code is not None:
            await self.close_with(code)
            return
        if self.scope.get("auth_method") == "share" and self.scope.get("share") is not None:
            # Whichever consumer admitted it (the wall's own refusal too): it follows the link.
            self.share = self.scope["share"]
            await self.watch_share()
        await self.opened()

    async def refusal(self) -> Close | None:
        user = self.scope.get("user")
        if self.scope.get("auth_method") == "share":
            return await self.share_refusal()
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

    async def share_refusal(self) -> Close | None:
        """The checks of a connection opened with a share link (module docstring)."""
        grant = self.scope.get("share")
        if grant is None:
            return Close.FORBIDDEN  # not 4401: logging in would not help; the page says why
        if not self.needs_sandbox or not origin_allowed(self.scope):
            return Close.FORBIDDEN
        sandbox_id = self.scope["url_route"]["kwargs"]["sandbox_id"]
        if not await database_sync_to_async(sharing.allows)(grant, sandbox_id):
            return Close.FORBIDDEN
        self.sandbox = await database_sync_to_async(
            Sandbox.objects.select_related("owner").filter(pk=sandbox_id).first
        )()
        if self.sandbox is None:
            return Close.NOT_FOUND
        return None

    async def watch_share(self) -> None:
        """Close as soon as the link is revoked (its group's ``share.revoked``) or stops
        resolving (expired; a revocation this process was not told of)."""
        assert self.share is not None
        group = sharing.group_name(self.share.link_id)
        await self.channel_layer.group_add(group, self.channel_name)
        self.groups.append(group)  # Channels leaves it on disconnect
        self._share_watch = asyncio.ensure_future(self._recheck_share())

    async def _recheck_share(self) -> None:
        token_valid = True
        while token_valid and not self.closing:
            await asyncio.sleep(sharing.RECHECK_SECONDS)
            grant = await database_sync_to_async(sharing.resolve)(share_token(self.scope))
            token_valid = grant == self.share
        await self.share_revoked({})

    async def share_revoked(self, message: dict[str, Any]) -> None:
        """The channel layer's ``share.revoked`` (and the end of ``_recheck_share``)."""
        await self.close_with(Close.FORBIDDEN, "the share link is no longer valid")

    async def websocket_disconnect(self, message: dict[str, Any]) -> None:
        if self._share_watch is not None:
            self._share_watch.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._share_watch
        await super().websocket_disconnect(message)

    def who(self) -> str:
        """How this connection is named in the event log: its user, or its share link."""
        if self.share is not None:
            return sharing.actor(self.share.link_id)
        user = self.scope.get("user")
        return user.get_username() if user is not None else ""

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
