"""``/ws/sandboxes/<id>/events/?after=<seq>``: a sandbox's event log, missed part then live.

Server to browser only: one text frame per event, the JSON object of
``sandboxes.events.event_json``, in ``seq`` order, each exactly once. ``after`` (default 0)
is the last ``seq`` the client holds: the socket first sends every later event from the
database, then live ones. An ``after`` beyond the newest means "nothing missed". A
negative or non-numeric ``after`` closes with 4400, and so does anything the browser
sends.

How nothing is lost or doubled, whichever process stored an event:

1. the consumer subscribes (through this process's ``viewer.event_hub``, which holds one
   membership of the sandbox's group for all of them) *before* reading the database, so
   an event stored during the read arrives as a message afterwards, and waits for the
   consumer's lock until the read is done;
2. it remembers the last ``seq`` sent: a message at or below it is dropped, a message
   that skips numbers makes it read the gap from the database first (events are
   published only after their transaction commits, so the gap is there to read);
3. a channel layer may drop messages when a consumer's queue is full, and the in-memory
   layer does not cross processes: so every ``RECHECK_SECONDS`` it compares its last
   ``seq`` with the sandbox's newest and reads what it lacks. ``viewer.phase_feed``
   pokes it at once when the supervisor (another process) stored a phase change.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any
from urllib.parse import parse_qs

from channels.db import database_sync_to_async

from sandboxes import events
from viewer import event_hub, phase_feed
from viewer.closecodes import Close
from viewer.consumers.base import NamekConsumer

#: events read from the database at a time
PAGE = 500
RECHECK_SECONDS = 2.0


class EventsConsumer(NamekConsumer):
    last = 0
    joined = False
    lock: asyncio.Lock | None = None
    recheck: asyncio.Task[None] | None = None

    async def opened(self) -> None:
        assert self.sandbox is not None
        query = parse_qs(self.scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        try:
            after = events.parse_seq(query.get("after", [None])[-1], "after", 0)
        except ValueError as exc:
            await self.close_with(Close.BAD_MESSAGE, str(exc))
            return
        self.lock = asyncio.Lock()
        phase_feed.ensure_running()
        async with self.lock:
            await event_hub.hub().join(self.sandbox.pk, self)
            self.joined = True
            newest = await database_sync_to_async(events.newest_seq)(self.sandbox.pk)
            self.last = min(after, newest)
            await self.catch_up()
        self.recheck = asyncio.ensure_future(self.recheck_forever())

    async def catch_up(self) -> None:
        """Send every stored event after ``last`` (the caller holds the lock)."""
        assert self.sandbox is not None
        while not self.closing:
            page = await database_sync_to_async(events.events_after)(self.sandbox.pk, self.last, PAGE)
            for event in page:
                await self.send_event(event)
            if len(page) < PAGE:
                return

    async def send_event(self, event: dict[str, Any]) -> None:
        if event["seq"] > self.last and not self.closing:
            await self.send(text_data=json.dumps(event))
            self.last = event["seq"]

    async def deliver(self, message: dict[str, Any]) -> None:
        """From the hub: ``events.new`` (with each event's JSON text) or ``events.poke``."""
        if self.lock is None:
            return
        async with self.lock:
            if self.closing:
                return
            if message["type"] == "events.poke":
                await self.catch_up()
                return
            for event, text in zip(message["events"], message["texts"], strict=True):
                if event["seq"] == self.last + 1:
                    await self.send(text_data=text)
                    self.last = event["seq"]
                elif event["seq"] > self.last:
                    await self.catch_up()  # a gap: the database has it

    async def recheck_forever(self) -> None:
        assert self.sandbox is not None
        while not self.closing:
            await asyncio.sleep(RECHECK_SECONDS)
            newest = await database_sync_to_async(events.newest_seq)(self.sandbox.pk)
            if newest > self.last:
                assert self.lock is not None
                async with self.lock:
                    await self.catch_up()

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        await self.close_with(Close.BAD_MESSAGE, "this socket only sends")

    async def disconnect(self, code: int) -> None:
        self.closing = True
        if self.recheck is not None:
            self.recheck.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.recheck
        if self.joined and self.sandbox is not None:
            await event_hub.hub().leave(self.sandbox.pk, self)
