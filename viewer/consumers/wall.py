"""``/ws/wall/``: the wall's live sandboxes, captions and thumbnails.

Server to browser:

* text frames ``{"type": "sandboxes", "sandboxes": [{"id", "name", "phase", "control",
  "goal", "activity"}]}``: every live sandbox the watcher may see, oldest first, on
  connect and whenever the list or a caption changes. ``control`` is who drives
  (``sandboxes.control.summary``), ``goal`` the newest step's goal of the agent run
  in progress (or null), ``activity`` the time of the sandbox's newest event;
* binary frames: a thumbnail of a ready sandbox, a 4-byte big-endian sandbox id then a
  JPEG of at most 480x300.

Browser to server: only ``{"type": "ack", "id": <sandbox id>}``, one per binary frame,
once it has shown it. Flow control: per watcher and sandbox at most one thumbnail is in
flight; until it is acknowledged newer ones replace each other and only the newest is
sent. A slow watcher thus holds one JPEG per tile in Namek, never a queue. Anything else
from the browser (binary frames, other JSON, an ack of nothing in flight) closes with 4400.

Who may watch: a logged-in user (the sandboxes ``sandboxes.access`` lets them see), or
an anonymous browser with a wall share link (``scope["share"]`` a grant with ``wall``
true: every live sandbox). The work is shared by every watcher of the process
(``viewer.wall``): each connection only filters the captions and forwards the frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from sandboxes.access import may_see_owner, sees_all
from viewer import wall
from viewer.closecodes import Close
from viewer.consumers.base import NamekConsumer, origin_allowed
from viewer.frames import is_int

#: longest text frame a browser may send (an ack is about 30 bytes)
MAX_TEXT = 256


class WallConsumer(NamekConsumer):
    needs_sandbox = False
    frames_skip_database = True  # acks touch no database

    joined = False
    sender: asyncio.Task[None] | None = None

    async def refusal(self) -> Close | None:
        if self.scope.get("auth_method") == "share":
            grant = self.scope.get("share")
            if grant is None or not getattr(grant, "wall", False):
                return Close.FORBIDDEN  # a link to one sandbox does not open the wall
            return None if origin_allowed(self.scope) else Close.FORBIDDEN
        return await super().refusal()

    async def opened(self) -> None:
        user = self.scope.get("user")
        self.sees_everything = self.scope.get("auth_method") == "share" or sees_all(user)
        self.wake = asyncio.Event()
        #: sandbox id -> the newest thumbnail not sent yet
        self.pending: dict[int, bytes] = {}
        #: sandboxes with a thumbnail sent and not yet acknowledged
        self.in_flight: set[int] = set()
        #: ready sandboxes this watcher gets thumbnails of
        self.tiles: set[int] = set()
        self.text: str | None = None
        self.sent_text: str | None = None
        self.hub = wall.thumbnails()
        self.feed = wall.captions()
        self.sender = asyncio.ensure_future(self._send_forever())
        self.joined = True
        self.feed.join(self)

    # --- from the shared feeds (never block) ---

    def captions(self, captions: wall.Captions) -> None:
        if self.closing:
            return
        if self.sees_everything:
            entries, text = list(captions.entries), captions.text
        else:
            user = self.scope["user"]
            entries = [e for e in captions.entries if may_see_owner(user, e["owner_id"])]
            text = wall.message(entries)
        wanted = {e["id"] for e in entries if e["phase"] == "ready"}
        for sandbox_id in self.tiles - wanted:
            self.hub.unsubscribe(sandbox_id, self)
            self.pending.pop(sandbox_id, None)
        added = wanted - self.tiles
        self.tiles = wanted
        if text != self.text:
            self.text = text
            self.wake.set()
        for sandbox_id in sorted(added):  # after the text: the browser knows the tile first
            self.hub.subscribe(sandbox_id, self)

    def thumbnail(self, sandbox_id: int, frame: bytes) -> None:
        if self.closing or sandbox_id not in self.tiles:
            return
        if sandbox_id in self.pending:
            self.hub.counters["skipped"] += 1
        self.pending[sandbox_id] = frame
        if sandbox_id not in self.in_flight:
            self.wake.set()

    # --- to the browser ---

    async def _send_forever(self) -> None:
        while not self.closing:
            await self.wake.wait()
            self.wake.clear()
            if self.text is not None and self.text != self.sent_text:
                self.sent_text = self.text
                await self.send(text_data=self.text)
            for sandbox_id in [s for s in self.pending if s not in self.in_flight]:
                frame = self.pending.pop(sandbox_id)
                self.in_flight.add(sandbox_id)
                self.hub.counters["sent"] += 1
                await self.send(bytes_data=frame)

    # --- from the browser ---

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if self.closing:
            return
        if text_data is None:
            await self.close_with(Close.BAD_MESSAGE, "only acks are expected")
            return
        sandbox_id = self._ack_of(text_data)
        if sandbox_id is None:
            await self.close_with(Close.BAD_MESSAGE, 'expected {"type": "ack", "id": <sandbox id>}')
            return
        if sandbox_id not in self.in_flight:
            await self.close_with(Close.BAD_MESSAGE, f"no thumbnail of sandbox {sandbox_id} to acknowledge")
            return
        self.in_flight.discard(sandbox_id)
        if sandbox_id in self.pending:
            self.wake.set()

    @staticmethod
    def _ack_of(text: str) -> int | None:
        if len(text) > MAX_TEXT:
            return None
        try:
            message: Any = json.loads(text)
        except ValueError:
            return None
        if not isinstance(message, dict) or set(message) != {"type", "id"} or message["type"] != "ack":
            return None
        return int(message["id"]) if is_int(message["id"]) else None

    async def disconnect(self, code: int) -> None:
        self.closing = True
        if self.sender is not None:
            self.sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.sender
        if self.joined:
            for sandbox_id in self.tiles:
                self.hub.unsubscribe(sandbox_id, self)
            self.tiles = set()
            self.pending.clear()
            await self.feed.leave(self)
