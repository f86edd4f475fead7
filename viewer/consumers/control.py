"""What a sandbox connection (screen, terminal, CDP) knows of the control lease.

Each such connection joins the channel-layer group ``control-<id>`` before reading the
lease, so no change can fall between the two, and applies only leases newer than the
one it has (``version``): whichever web process changed the lease, every connection of
the sandbox follows within a channel-layer hop, without reconnecting. While its user
holds the lease (``drives``), the connection shows that the holder is still there
(``control.touch``, for the lapse) and adds the input it forwarded to the span
(``count``). Every web process also runs the lapse check (``ensure_ticker``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from typing import Any

from channels.db import database_sync_to_async
from django.conf import settings

from sandboxes import control

log = logging.getLogger(__name__)

#: how often a driving connection adds up its input counts
FLUSH_SECONDS = 0.5
#: how often input that is about to be dropped may re-read the lease
RECHECK_SECONDS = 1.0
_ticker: asyncio.Task[None] | None = None


def touch_interval() -> float:
    return max(0.25, min(5.0, settings.NAMEK_CONTROL_LAPSE / 4))


class ControlFollower:
    """A mixin for ``NamekConsumer`` subclasses with a sandbox."""

    lease: dict[str, Any] | None = None
    following = False
    _rechecked = float("-inf")
    _beat: asyncio.Task[None] | None = None

    async def follow_control(self) -> None:
        sandbox_id = self.sandbox.pk  # type: ignore[attr-defined]
        self.inputs: Counter[str] = Counter()
        await self.channel_layer.group_add(control.group_name(sandbox_id), self.channel_name)  # type: ignore[attr-defined]
        self.following = True
        await self.apply_lease(await self._read_lease())
        ensure_ticker()

    @property
    def drives(self) -> bool:
        user = self.scope.get("user")  # type: ignore[attr-defined]
        return control.holds(self.lease, user.pk if user is not None and user.is_authenticated else None)

    @property
    def person_drives(self) -> bool:
        """Some person (maybe this connection's user) holds the granted lease."""
        return bool(self.lease and self.lease["holder"] == "person" and self.lease["granted"])

    async def recheck_lease(self) -> None:
        """Read the lease from the database (at most once a second): for input that would
        be dropped, in case the grant was committed (the take-over answered) but its
        message has not reached this process yet."""
        loop = asyncio.get_running_loop()
        if loop.time() - self._rechecked < RECHECK_SECONDS:
            return
        self._rechecked = loop.time()
        await self.apply_lease(await self._read_lease())

    async def _read_lease(self) -> dict[str, Any]:
        sandbox_id = self.sandbox.pk  # type: ignore[attr-defined]
        return await database_sync_to_async(lambda: control.wire(control.lease_of(sandbox_id)))()

    async def control_changed(self, message: dict[str, Any]) -> None:
        """The channel layer's ``control.changed``."""
        await self.apply_lease(message["lease"])

    async def apply_lease(self, lease: dict[str, Any]) -> None:
        if self.lease is not None and lease["version"] <= self.lease["version"]:
            return
        drove, span = self.drives, (self.lease or {}).get("span")
        self.lease = lease
        if drove and not self.drives and span:
            await self._flush(span, final=True)
        if self.drives and (self._beat is None or self._beat.done()):
            self._beat = asyncio.ensure_future(self._heartbeat())
        await self.lease_applied()

    async def lease_applied(self) -> None:
        """Called after every newer lease: make the connection follow it."""

    def count(self, kind: str, n: int = 1) -> None:
        if self.drives:
            self.inputs[kind] += n

    async def _heartbeat(self) -> None:
        interval = touch_interval()
        last_touch = 0.0
        loop = asyncio.get_running_loop()
        try:
            while self.drives and self.lease is not None:
                span = self.lease["span"]
                if loop.time() - last_touch >= interval:
                    last_touch = loop.time()
                    await database_sync_to_async(control.touch)(self.lease["sandbox"], span)
                await self._flush(span)
                await asyncio.sleep(FLUSH_SECONDS)
        except asyncio.CancelledError:
            raise
        except Exception:  # a lost heartbeat only brings the lapse closer
            log.exception("control heartbeat failed")

    async def _flush(self, span: int, *, final: bool = False) -> None:
        counts, self.inputs = dict(self.inputs), Counter()
        if counts:
            await database_sync_to_async(control.count_inputs)(span, counts)
        if final and self.lease is not None:
            await database_sync_to_async(control.touch)(self.lease["sandbox"], span)

    async def stop_following(self) -> None:
        if not self.following:
            return
        self.following = False
        if self._beat is not None:
            self._beat.cancel()
        with contextlib.suppress(Exception):
            if self.drives and self.lease is not None:
                # The last sign of this connection: the lapse counts from its close.
                await self._flush(self.lease["span"], final=True)
        sandbox_id = self.sandbox.pk  # type: ignore[attr-defined]
        await self.channel_layer.group_discard(control.group_name(sandbox_id), self.channel_name)  # type: ignore[attr-defined]


def ensure_ticker() -> None:
    """One lapse check per web process, every second (or faster for short lapses)."""
    global _ticker  # noqa: PLW0603 - one per process
    if _ticker is None or _ticker.done() or _ticker.get_loop() is not asyncio.get_running_loop():
        _ticker = asyncio.ensure_future(_tick())


async def _tick() -> None:
    interval = min(1.0, touch_interval())
    while True:
        await asyncio.sleep(interval)
        try:
            await database_sync_to_async(control.expire_lapsed)()
        except Exception:
            log.exception("the control lapse check failed")
