"""One channel-layer subscription per web process and sandbox, for every local subscriber.

Without it each events socket would be a member of the sandbox's group itself, so every
event would travel as one channel-layer message per subscriber: with Redis, 100 events/s
and 50 subscribers, 5000 messages/s through Redis and the layer's receive loop. Here the
process's hub joins ``events-<id>`` once, receives each event once, serialises it once and
hands it to its local subscribers (``viewer.consumers.events``), which keep their own
order and gap checks: a lost message still only delays an event.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import weakref
from typing import Any, Protocol

from channels.layers import get_channel_layer

from sandboxes import events

log = logging.getLogger(__name__)

#: groups expire in the channel layers (a day by default): the hub joins again this often
REJOIN_SECONDS = 3600.0


class Subscriber(Protocol):
    async def deliver(self, message: dict[str, Any]) -> None: ...


class EventHub:
    def __init__(self) -> None:
        self.layer = get_channel_layer()
        self.channel = ""
        self.subscribers: dict[int, set[Subscriber]] = {}
        self.tasks: list[asyncio.Task[None]] = []
        self.deliveries: set[asyncio.Task[None]] = set()

    async def join(self, sandbox_id: int, subscriber: Subscriber) -> None:
        if not self.channel:
            # The default prefix: channels_redis reads every process-local channel of a
            # process from one Redis list, named after the prefix (another prefix would
            # only be read when no consumer of this process is waiting: seconds late).
            self.channel = await self.layer.new_channel()
            self.tasks = [asyncio.ensure_future(self._receive()), asyncio.ensure_future(self._rejoin())]
        members = self.subscribers.setdefault(sandbox_id, set())
        if not members:
            await self.layer.group_add(events.group_name(sandbox_id), self.channel)
        members.add(subscriber)

    async def leave(self, sandbox_id: int, subscriber: Subscriber) -> None:
        members = self.subscribers.get(sandbox_id)
        if members is None:
            return
        members.discard(subscriber)
        if not members:
            del self.subscribers[sandbox_id]
            with contextlib.suppress(Exception):  # the layer may be gone: the group expires
                await self.layer.group_discard(events.group_name(sandbox_id), self.channel)

    async def _receive(self) -> None:
        while True:
            try:
                message = await self.layer.receive(self.channel)
            except asyncio.CancelledError:
                raise
            except Exception:  # e.g. Redis restarting: subscribers re-check the database meanwhile
                log.exception("the event hub could not receive; retrying")
                await asyncio.sleep(1)
                continue
            self._hand_out(message)

    def _hand_out(self, message: dict[str, Any]) -> None:
        if message.get("type") == "events.new" and message.get("events"):
            sandbox_id = message["events"][0]["sandbox"]
            # Serialised once for every subscriber.
            message = {**message, "texts": [json.dumps(event) for event in message["events"]]}
        elif message.get("type") == "events.poke":
            sandbox_id = message.get("sandbox")
        else:
            return
        for subscriber in list(self.subscribers.get(sandbox_id, ())):
            # A task each: a subscriber reading the database holds up nobody else. Each
            # takes its subscriber's lock first, so they deliver in the order sent.
            delivery = asyncio.ensure_future(subscriber.deliver(message))
            self.deliveries.add(delivery)
            delivery.add_done_callback(self.deliveries.discard)

    async def _rejoin(self) -> None:
        while True:
            await asyncio.sleep(REJOIN_SECONDS)
            for sandbox_id in list(self.subscribers):
                with contextlib.suppress(Exception):
                    await self.layer.group_add(events.group_name(sandbox_id), self.channel)


_hubs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, EventHub] = weakref.WeakKeyDictionary()


def hub() -> EventHub:
    """This event loop's hub (Daphne has one loop; tests make one per test)."""
    loop = asyncio.get_running_loop()
    if loop not in _hubs:
        _hubs[loop] = EventHub()
    return _hubs[loop]
