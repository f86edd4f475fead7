"""Carries the supervisor's phase changes into this process's channel layer.

With Redis the supervisor's own broadcasts reach every web process. With the in-memory
layer (the embedded default) they cannot leave the supervisor's process, so each web
process follows the supervisor's ``watch`` stream and re-broadcasts from the database,
and pokes the sandbox's event subscribers (the supervisor stored a phase event).
"""

from __future__ import annotations

import asyncio
import logging

from channels.db import database_sync_to_async
from channels.layers import InMemoryChannelLayer, get_channel_layer

from sandboxes import events, services
from sandboxes.backends import get_backend
from sandboxes.backends.base import BackendError
from sandboxes.models import Sandbox

log = logging.getLogger(__name__)
_task: asyncio.Task[None] | None = None


def ensure_running() -> None:
    global _task  # noqa: PLW0603 - one feed per process
    if _task is not None and not _task.done():
        return
    if not isinstance(get_channel_layer(), InMemoryChannelLayer):
        return
    backend = get_backend()
    if not hasattr(backend, "watch"):
        return
    _task = asyncio.ensure_future(_follow(backend))


@database_sync_to_async
def _rebroadcast(sandbox_id: int) -> None:
    sandbox = Sandbox.objects.select_related("owner").filter(pk=sandbox_id).first()
    if sandbox is not None:
        services.broadcast(sandbox)
        events.poke(sandbox_id)


async def _follow(backend: object) -> None:
    while True:
        try:
            async for message in backend.watch():  # type: ignore[attr-defined]
                await _rebroadcast(int(message["id"]))
        except BackendError:
            pass
        except Exception:
            log.exception("following the supervisor's phase changes failed")
        await asyncio.sleep(2)
