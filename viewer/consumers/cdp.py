"""``/ws/sandboxes/<id>/cdp/``: the sandbox's Chromium over the Chrome DevTools Protocol,
browser level, for agents elsewhere (Playwright's ``connect_over_cdp``, browser-use's
``cdp_url``, chrome-devtools-mcp). The relay (``viewer.cdp_relay``) owns the upstream.

Checks, in order, after accepting:

1. a logged-in user (session cookie or bearer token) or an agent run
   (``scope["agent_run"]``, set from a run's token), else 4401;
2. the Origin rule of every Namek socket (``origin_allowed``; a run's token counts as a
   bearer token), else 4403;
3. the sandbox exists, else 4404;
4. the user may *use* it (``can_use``: CDP is full control, seeing is not enough) or
   ``run_may_drive()`` admits the run, else 4403;
5. the sandbox is ready and its DevTools answer, else 1011 with the reason.

While a person holds the sandbox's control lease, the commands of every connection but
theirs are held (``CdpRelay.hold``) and forwarded on hand-back.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any, ClassVar

from channels.db import database_sync_to_async
from django.conf import settings

from sandboxes import services
from sandboxes.access import can_use
from sandboxes.models import Sandbox
from viewer.cdp_relay import CdpRelay, Unflushed
from viewer.closecodes import Close, reason
from viewer.consumers.base import NamekConsumer, origin_allowed
from viewer.consumers.control import ControlFollower
from viewer.screen_relay import RelayClosed

log = logging.getLogger(__name__)


def daphne_unflushed(send: Any) -> Unflushed | None:
    """How many bytes Daphne holds for this client, not yet written to the socket.

    ASGI offers no way to know, and Daphne queues whatever a consumer sends (django/daphne
    #170). Under Daphne the ASGI ``send`` is ``functools.partial(Server.handle_reply,
    protocol)``, possibly behind Channels' session wrapper (``real_send``); the protocol's
    Twisted transport keeps unsent bytes in ``dataBuffer`` (from ``offset``) and
    ``_tempDataBuffer`` (``_tempDataLen`` bytes), as Twisted's ``FileDescriptor`` has for
    years. None when that chain is not there (another server, TLS, a test communicator):
    the relay then cannot bound what the server buffers.
    """
    transport = _daphne_transport(send)
    if transport is None or not all(hasattr(transport, name) for name in ("dataBuffer", "offset", "_tempDataLen")):
        return None

    def unflushed() -> int | None:
        try:
            return len(transport.dataBuffer) - int(transport.offset) + int(transport._tempDataLen)
        except (AttributeError, TypeError):  # the connection is gone
            return None

    return unflushed


def _daphne_transport(send: Any) -> Any:
    target = send
    for _ in range(4):
        if isinstance(target, functools.partial):
            protocol = target.args[0] if target.args else None
            return getattr(protocol, "transport", None)
        target = getattr(getattr(target, "__self__", None), "real_send", None)
    return None


class CdpConsumer(ControlFollower, NamekConsumer):
    frames_skip_database = True
    relay: CdpRelay | None = None
    #: whether this connection counts as a viewer (for the idle timeout)
    counted = False
    opened_at = 0.0
    #: whether the log already says that the send buffer cannot be observed
    warned_unobservable: ClassVar[bool] = False

    async def refusal(self) -> Close | None:
        user = self.scope.get("user")
        has_user = user is not None and user.is_authenticated
        if not has_user and self.scope.get("agent_run") is None:
            return Close.UNAUTHENTICATED
        # A run's token (auth_method "run") is a bearer credential like a user's API token,
        # never sent by a browser on its own: a missing Origin is accepted as for tokens.
        scope = self.scope
        if scope.get("auth_method") == "run":
            scope = {**scope, "auth_method": "token"}
        if not origin_allowed(scope):
            return Close.FORBIDDEN
        sandbox_id = self.scope["url_route"]["kwargs"]["sandbox_id"]
        self.sandbox = await database_sync_to_async(
            Sandbox.objects.select_related("owner").filter(pk=sandbox_id).first
        )()
        if self.sandbox is None:
            return Close.NOT_FOUND
        if not await database_sync_to_async(self.may_drive)():
            return Close.FORBIDDEN
        return None

    def may_drive(self) -> bool:
        """A user who may use the sandbox, or else an agent run admitted by ``run_may_drive``."""
        assert self.sandbox is not None
        user = self.scope.get("user")
        if user is not None and user.is_authenticated and can_use(user, self.sandbox):
            return True
        return self.run_may_drive()

    def run_may_drive(self) -> bool:
        """A run's token drives its own sandbox, while the run is active.

        Called (in a thread, so it may query the database) when the connection has no user
        who may use ``self.sandbox`` (already loaded): with no user at all when
        ``self.scope.get("agent_run")`` is set (the auth middleware found the token's
        active run), or with a user who lacks ``can_use``. True admits the connection.
        """
        run = self.scope.get("agent_run")
        return bool(run and self.sandbox is not None and run["sandbox_id"] == self.sandbox.pk)

    def who(self) -> str:
        user = self.scope.get("user")
        if user is not None and user.is_authenticated:
            return str(user.get_username())
        run = self.scope.get("agent_run")
        return "anonymous" if run is None else f"agent run {run}"

    async def opened(self) -> None:
        assert self.sandbox is not None
        target = await self.ask_backend("browser_target")
        if target is None:
            return
        unflushed = daphne_unflushed(self.base_send)
        if unflushed is None and not CdpConsumer.warned_unobservable:
            CdpConsumer.warned_unobservable = True
            log.warning("cdp: cannot observe the server's send buffer; a client that reads nothing is not bounded")
        self.relay = CdpRelay(
            target.endpoint,
            self.send_text,
            self.send_bytes,
            self.close_with,
            unflushed=unflushed,
            stall_seconds=settings.NAMEK_RELAY_STALL_SECONDS,
        )
        await self.follow_control()
        # Counted before the relay starts: if counting fails, no upstream is left behind
        # (an exception here ends the consumer without a disconnect).
        await database_sync_to_async(services.viewer_joined)(self.sandbox.pk)
        self.counted = True
        self.opened_at = time.monotonic()
        try:
            await self.relay.start()
        except RelayClosed as closed:
            self.relay = None
            await self.close_with(closed.code, closed.detail)
            return
        log.info("sandbox %s: CDP opened by %s", self.sandbox.pk, self.who())

    async def lease_applied(self) -> None:
        """While a person drives, every other connection's commands wait."""
        if self.relay is None:
            return
        if self.person_drives and not self.drives:
            self.relay.hold()
        elif self.relay.holding:
            try:
                await self.relay.release()
            except RelayClosed as closed:
                await self.close_with(closed.code, closed.detail)

    async def send_text(self, text: str) -> None:
        if not self.closing:
            await self.send(text_data=text)

    async def send_bytes(self, data: bytes) -> None:
        if not self.closing:
            await self.send(bytes_data=data)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if self.relay is None or self.closing:
            return
        try:
            await self.relay.from_client(text_data, bytes_data)
        except RelayClosed as closed:
            await self.close_with(closed.code, closed.detail)

    async def close_with(self, code: Close, detail: str = "") -> None:
        if not self.closing:
            sandbox_id = self.scope["url_route"]["kwargs"]["sandbox_id"]
            # A client too slow to read is worth an operator's attention; the rest is routine.
            level = logging.WARNING if code == Close.TOO_SLOW else logging.INFO
            log.log(
                level, "sandbox %s: CDP of %s closing with %d %s", sandbox_id, self.who(), code, reason(code, detail)
            )
        await super().close_with(code, detail)

    async def disconnect(self, code: int) -> None:
        self.closing = True
        await self.stop_following()
        relay, self.relay = self.relay, None
        if relay is not None:
            await relay.stop()
            assert self.sandbox is not None
            log.info(
                "sandbox %s: CDP of %s closed (%s) after %.1f s: %s",
                self.sandbox.pk,
                self.who(),
                code,
                time.monotonic() - self.opened_at,
                relay.stats(),
            )
        if self.counted and self.sandbox is not None:
            self.counted = False
            await database_sync_to_async(services.viewer_left)(self.sandbox.pk)
