"""The websocket checks and the dashboard feed, through Channels' WebsocketCommunicator
and the real ASGI application (auth middleware and routing included)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator

from namek_web.asgi import application
from sandboxes import services
from viewer.closecodes import Close

pytestmark = [pytest.mark.django_db(transaction=True)]


def communicator(path: str, token: str | None = None, origin: str | None = "http://127.0.0.1:8000") -> Any:
    headers = []
    if token:
        headers.append((b"authorization", f"Bearer {token}".encode()))
    if origin:
        headers.append((b"origin", origin.encode()))
    return WebsocketCommunicator(application, path, headers=headers, subprotocols=["binary"])


async def close_code(comm: WebsocketCommunicator) -> int:
    connected, _ = await comm.connect()
    assert connected, "consumers accept first, then close with a code"
    message = await comm.receive_output(timeout=5)
    assert message["type"] == "websocket.close"
    return int(message["code"])


async def test_anonymous_gets_4401(cast: dict) -> None:
    assert await close_code(communicator("/ws/sandboxes/")) == Close.UNAUTHENTICATED
    assert await close_code(communicator("/ws/sandboxes/1/screen/", token="nmk_bogus")) == Close.UNAUTHENTICATED


async def test_unknown_sandbox_gets_4404_and_an_outsider_4403(cast: dict, make_sandbox) -> None:
    box = await database_sync_to_async(make_sandbox)()
    owner, outsider = cast["tokens"]["owner"], cast["tokens"]["outsider"]
    assert await close_code(communicator("/ws/sandboxes/999999/screen/", owner)) == Close.NOT_FOUND
    assert await close_code(communicator(f"/ws/sandboxes/{box.pk}/screen/", outsider)) == Close.FORBIDDEN
    assert await close_code(communicator("/ws/no/such/path/", owner)) == Close.NOT_FOUND


async def test_a_foreign_origin_is_refused_even_with_a_token(cast: dict) -> None:
    token = cast["tokens"]["owner"]
    assert await close_code(communicator("/ws/sandboxes/", token, origin="http://evil.example")) == Close.FORBIDDEN


async def test_a_screen_that_is_not_ready_closes_1011(cast: dict, make_sandbox) -> None:
    box = await database_sync_to_async(make_sandbox)(phase="starting")
    assert await close_code(communicator(f"/ws/sandboxes/{box.pk}/screen/", cast["tokens"]["owner"])) == 1011


async def test_a_ready_sandbox_without_a_supervisor_closes_1011(cast: dict, make_sandbox) -> None:
    box = await database_sync_to_async(make_sandbox)(phase="ready")
    assert await close_code(communicator(f"/ws/sandboxes/{box.pk}/screen/", cast["tokens"]["owner"])) == 1011


async def test_dashboard_sends_a_snapshot_then_live_changes_of_visible_sandboxes(cast: dict, make_sandbox) -> None:
    mine = await database_sync_to_async(make_sandbox)(owner="owner", phase="starting", name="mine")
    theirs = await database_sync_to_async(make_sandbox)(owner="outsider", phase="starting", name="theirs")
    comm = communicator("/ws/sandboxes/", cast["tokens"]["owner"])
    connected, _ = await comm.connect()
    assert connected
    snapshot = json.loads(await comm.receive_from(timeout=5))
    assert snapshot["type"] == "snapshot"
    assert [s["name"] for s in snapshot["sandboxes"]] == ["mine"]

    await database_sync_to_async(services.record_phase)(theirs.pk, "ready")
    await database_sync_to_async(services.record_phase)(mine.pk, "failed", "it broke")
    update = json.loads(await comm.receive_from(timeout=5))
    assert update["type"] == "sandbox"
    assert update["sandbox"]["name"] == "mine"
    assert update["sandbox"]["phase"] == "failed"
    assert update["sandbox"]["failure_reason"] == "it broke"
    assert await comm.receive_nothing(timeout=0.3)
    await comm.disconnect()


async def test_dashboard_closes_4400_when_the_browser_talks(cast: dict) -> None:
    comm = communicator("/ws/sandboxes/", cast["tokens"]["owner"])
    await comm.connect()
    await comm.receive_from(timeout=5)
    await comm.send_to(text_data="hello")
    message = await comm.receive_output(timeout=5)
    assert message == {
        "type": "websocket.close",
        "code": Close.BAD_MESSAGE,
        "reason": "bad message: this socket only sends",
    }
