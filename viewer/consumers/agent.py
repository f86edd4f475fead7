"""``/ws/agent/<run_id>/``: the agent bridge, the one way any agent talks to Namek.

Authenticated with the run's own secret token, ``Authorization: Bearer nmkrun_...``,
handed to the runner when the run starts (a token of another run, or of a run that has
ended, is refused). Every frame is a JSON object with a ``type``.

Agent → Namek:

- ``{"type": "hello", "agent": "browser-use 0.13.14"}`` first, within 30 s. Namek answers
  ``{"type": "welcome", "run", "sandbox", "task", "script", "base_url", "cdp_url",
  "status"}``: ``script`` is the step file for the scripted model (null: an LLM drives),
  ``cdp_url`` the sandbox's browser through Namek (``/ws/sandboxes/<id>/cdp/``, the same
  token as bearer), ``base_url`` where the sandbox's browser reaches Namek.
- ``{"type": "event", "kind": "agent.step" | "agent.log", "text": str, "data": {...},
  "screenshot": base64?, "screenshot_type": "png" | "jpeg"}``: a step (``data``: goal,
  thinking, evaluation, actions, url, title) or a log line. A screenshot is at most
  ``MAX_SCREENSHOT`` bytes once decoded (Daphne refuses frames over 4 MiB).
- ``{"type": "status", "status": "running" | "paused" | "done" | "failed", "result"?,
  "error"?}``: ``paused`` only once the step in flight has finished.
- ``{"type": "ack", "id": n, "command": "pause" | "resume" | "stop"}``.

Namek → agent: ``{"type": "pause", "id": n}``, ``{"type": "resume", "id": n, "note":
str}`` (the note is added to the agent's task), ``{"type": "stop", "id": n}``.

Bad input closes the bridge: a missing or unknown token 4401, a token of another run or
of an ended run 4403, an event claiming another sandbox 4403, malformed JSON, unknown
types or kinds, bad fields or no hello first 4400, a screenshot over the limit 4413.
The run itself is ended by its runner's exit (``sandboxes.runs.runner_exited``), not by
a dropped connection: a runner may reconnect.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from typing import Any

from channels.db import database_sync_to_async
from django.conf import settings

from sandboxes import events, runs
from sandboxes.auth import bearer_token
from sandboxes.models import AgentRun
from viewer.closecodes import Close
from viewer.consumers.base import NamekConsumer, origin_allowed
from viewer.frames import is_int

log = logging.getLogger(__name__)

MAX_SCREENSHOT = int(2.5 * 1024 * 1024)
AGENT_KINDS = ("agent.step", "agent.log")
STATUSES = ("running", "paused", "done", "failed")
COMMANDS = ("pause", "resume", "stop")


class AgentBridgeConsumer(NamekConsumer):
    needs_sandbox = False
    run: AgentRun | None = None
    greeted = False
    joined = False
    command_id = 0
    resume_note = ""

    async def refusal(self) -> Close | None:
        headers = dict(self.scope.get("headers", []))
        if b"origin" in headers and not origin_allowed({**self.scope, "auth_method": None}):
            return Close.FORBIDDEN  # a page elsewhere must not drive a run through a visitor
        token = bearer_token(headers.get(b"authorization", b"").decode("latin-1")) or ""
        run_id = self.scope["url_route"]["kwargs"]["run_id"]
        self.run = await database_sync_to_async(runs.run_for_token)(token)
        if self.run is None:
            ended = await database_sync_to_async(runs.run_for_token)(token, active=False)
            return Close.FORBIDDEN if ended else Close.UNAUTHENTICATED
        if self.run.pk != run_id:
            return Close.FORBIDDEN
        return None

    async def opened(self) -> None:
        assert self.run is not None
        await self.channel_layer.group_add(runs.group_name(self.run.pk), self.channel_name)
        self.joined = True

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if self.closing or self.run is None:
            return
        if text_data is None:
            await self.close_with(Close.BAD_MESSAGE, "binary frames are not accepted")
            return
        try:
            message = json.loads(text_data)
            if not isinstance(message, dict) or not isinstance(message.get("type"), str):
                raise ValueError("expected a JSON object with a type")
            await self.handle(message)
        except BridgeError as exc:
            await self.close_with(exc.code, str(exc))
        except (ValueError, TypeError) as exc:
            await self.close_with(Close.BAD_MESSAGE, str(exc)[:100])

    async def handle(self, message: dict[str, Any]) -> None:
        assert self.run is not None
        kind = message["type"]
        if not self.greeted:
            if kind != "hello":
                raise ValueError("say hello first")
            self.greeted = True
            await self.send_json(await database_sync_to_async(self._welcome)())
            return
        if kind == "event":
            await database_sync_to_async(self._event)(message)
        elif kind == "status":
            await self._status(message)
        elif kind == "ack":
            if message.get("command") not in COMMANDS or not is_int(message.get("id")):
                raise ValueError("ack needs an integer id and a command")
            log.info("run %s: %s %s acknowledged", self.run.pk, message["command"], message["id"])
        elif kind == "hello":
            raise ValueError("hello twice")
        else:
            raise ValueError(f"unknown message type {kind[:40]!r}")

    def _welcome(self) -> dict[str, Any]:
        assert self.run is not None
        self.run.refresh_from_db()
        return {
            "type": "welcome",
            "run": self.run.pk,
            "sandbox": self.run.sandbox_id,
            "task": self.run.task,
            "script": self.run.script or None,
            "base_url": settings.NAMEK_INTERNAL_URL,
            "cdp_url": runs.cdp_url(self.run.sandbox_id),
            "status": self.run.status,
        }

    def _event(self, message: dict[str, Any]) -> None:
        assert self.run is not None
        kind, text, data = message.get("kind"), message.get("text", ""), message.get("data", {})
        if kind not in AGENT_KINDS:
            raise ValueError(f"kind must be one of {', '.join(AGENT_KINDS)}")
        if "sandbox" in message and message["sandbox"] != self.run.sandbox_id:
            raise BridgeError(Close.FORBIDDEN, f"run {self.run.pk} belongs to sandbox {self.run.sandbox_id}")
        if not isinstance(text, str) or not isinstance(data, dict):
            raise ValueError("text must be a string and data an object")
        screenshot = _screenshot(message)
        try:
            runs.record_step(self.run.pk, events.NewEvent(kind, text, data, screenshot=screenshot))
        except events.EventError as exc:
            raise ValueError(str(exc)) from None

    async def _status(self, message: dict[str, Any]) -> None:
        assert self.run is not None
        status = message.get("status")
        if status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}")
        result, error = message.get("result") or "", message.get("error") or ""
        if not isinstance(result, str) or not isinstance(error, str):
            raise ValueError("result and error must be strings")
        note = self.resume_note if status == "running" else ""
        await database_sync_to_async(runs.report_status)(self.run.pk, status, result, error, note)
        if status == "running":
            self.resume_note = ""

    async def run_command(self, message: dict[str, Any]) -> None:
        command = message["command"]
        if command == "ended":
            await self.close_with(Close.NORMAL, "the run has ended")
            return
        self.command_id += 1
        out: dict[str, Any] = {"type": command, "id": self.command_id}
        if command == "resume":
            out["note"] = self.resume_note = message.get("note", "")
        await self.send_json(out)

    async def send_json(self, message: dict[str, Any]) -> None:
        if not self.closing:
            await self.send(text_data=json.dumps(message))

    async def disconnect(self, code: int) -> None:
        self.closing = True
        if self.joined and self.run is not None:
            await self.channel_layer.group_discard(runs.group_name(self.run.pk), self.channel_name)


class BridgeError(Exception):
    def __init__(self, code: Close, message: str) -> None:
        super().__init__(message)
        self.code = code


def _screenshot(message: dict[str, Any]) -> bytes | None:
    encoded = message.get("screenshot")
    if encoded is None:
        return None
    if not isinstance(encoded, str) or message.get("screenshot_type", "png") not in ("png", "jpeg"):
        raise ValueError("screenshot must be base64 text, screenshot_type png or jpeg")
    if len(encoded) > MAX_SCREENSHOT * 4 // 3 + 4:
        raise BridgeError(Close.TOO_BIG, f"screenshot over {MAX_SCREENSHOT} bytes")
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("screenshot is not valid base64") from None
