"""The agent bridge (``/ws/agent/<run_id>/``) through WebsocketCommunicator, and the runs
API, with rows only: no runner is launched here (``tests/test_agent_runs.py`` runs real
ones).

Bad input tried: no token, a user's API token, a token of another run, of an ended run;
a page's foreign Origin; no hello first, hello twice, binary frames, malformed JSON,
unknown types, kinds an agent may not write, events claiming another sandbox, bad
statuses and acks, screenshots that are not base64, not images, or over the limit; run
requests without an LLM or script, with a broken script, an unknown demo, both, a task
too long, on a sandbox that is not ready or already has a run, by an outsider.
"""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.test import Client
from PIL import Image

from namek_web.asgi import application
from sandboxes import runs
from sandboxes.models import AgentRun, Event, RunStatus
from viewer.closecodes import Close

pytestmark = [pytest.mark.django_db(transaction=True)]


@pytest.fixture(autouse=True)
def own_media(settings: Any, tmp_path: Any) -> None:
    settings.MEDIA_ROOT = tmp_path / "media"


def make_run(sandbox: Any, status: str = "pending") -> tuple[AgentRun, str]:
    token, digest = AgentRun.new_token()
    run = AgentRun.objects.create(
        sandbox=sandbox,
        task="find the lamp",
        script="steps:\n  - done: {text: ok}\n",
        status=status,
        model_settings={"model": "scripted"},
        token_digest=digest,
    )
    return run, token


def bridge(run_id: int, token: str | None, origin: str | None = None) -> WebsocketCommunicator:
    headers = []
    if token:
        headers.append((b"authorization", f"Bearer {token}".encode()))
    if origin:
        headers.append((b"origin", origin.encode()))
    return WebsocketCommunicator(application, f"/ws/agent/{run_id}/", headers=headers)


async def closed_with(comm: WebsocketCommunicator) -> int:
    while True:
        message = await comm.receive_output(timeout=5)
        if message["type"] == "websocket.close":
            return int(message["code"])


async def greeted(comm: WebsocketCommunicator) -> dict[str, Any]:
    assert (await comm.connect())[0]
    await comm.send_json_to({"type": "hello", "agent": "test agent 1.0"})
    return await comm.receive_json_from(timeout=5)


def png_base64(size: tuple[int, int] = (320, 200)) -> str:
    out = io.BytesIO()
    Image.new("RGB", size, "#ff006e").save(out, "PNG")
    return base64.b64encode(out.getvalue()).decode()


async def test_a_run_token_gets_a_welcome_with_what_the_agent_needs(make_sandbox) -> None:
    box = await database_sync_to_async(make_sandbox)()
    run, token = await database_sync_to_async(make_run)(box)
    comm = bridge(run.pk, token)
    welcome = await greeted(comm)
    assert welcome["type"] == "welcome"
    assert (welcome["run"], welcome["sandbox"], welcome["task"], welcome["status"]) == (
        run.pk,
        box.pk,
        "find the lamp",
        "pending",
    )
    assert welcome["script"].startswith("steps:")
    assert welcome["cdp_url"].endswith(f"/ws/sandboxes/{box.pk}/cdp/") and welcome["cdp_url"].startswith("ws://")
    assert welcome["base_url"].startswith("http://")
    await comm.disconnect()


@pytest.mark.parametrize("which", ["none", "user-token", "garbage", "other-run", "ended-run", "foreign-origin"])
async def test_the_wrong_credentials_are_refused(cast: dict, make_sandbox, which: str) -> None:
    box = await database_sync_to_async(make_sandbox)()
    other = await database_sync_to_async(make_sandbox)(name="other")
    run, token = await database_sync_to_async(make_run)(box)
    other_run, other_token = await database_sync_to_async(make_run)(other)
    ended, ended_token = await database_sync_to_async(make_run)(await database_sync_to_async(make_sandbox)(), "done")
    token_for, run_id, origin, expected = {
        "none": (None, run.pk, None, Close.UNAUTHENTICATED),
        "user-token": (cast["tokens"]["owner"], run.pk, None, Close.UNAUTHENTICATED),
        "garbage": ("nmkrun_nonsense", run.pk, None, Close.UNAUTHENTICATED),
        "other-run": (other_token, run.pk, None, Close.FORBIDDEN),
        "ended-run": (ended_token, ended.pk, None, Close.FORBIDDEN),
        "foreign-origin": (token, run.pk, "http://evil.example", Close.FORBIDDEN),
    }[which]
    comm = bridge(run_id, token_for, origin)
    assert (await comm.connect())[0]
    assert await closed_with(comm) == expected
    assert other_run.pk != run.pk


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ("not json", Close.BAD_MESSAGE),
        ('["event"]', Close.BAD_MESSAGE),
        ('{"type": "shout"}', Close.BAD_MESSAGE),
        ('{"type": "hello"}', Close.BAD_MESSAGE),
        ('{"type": "event", "kind": "sandbox.ready", "text": "lies"}', Close.BAD_MESSAGE),
        ('{"type": "event", "kind": "agent.step", "text": 5}', Close.BAD_MESSAGE),
        ('{"type": "event", "kind": "agent.step", "data": [1]}', Close.BAD_MESSAGE),
        ('{"type": "event", "kind": "agent.step", "sandbox": 999999}', Close.FORBIDDEN),
        ('{"type": "event", "kind": "agent.step", "screenshot": "@@not base64@@"}', Close.BAD_MESSAGE),
        ('{"type": "event", "kind": "agent.step", "screenshot": "aGVsbG8="}', Close.BAD_MESSAGE),
        ('{"type": "event", "kind": "agent.step", "screenshot": "' + "A" * 3_600_000 + '"}', Close.TOO_BIG),
        ('{"type": "status", "status": "sleeping"}', Close.BAD_MESSAGE),
        ('{"type": "status", "status": "done", "result": 7}', Close.BAD_MESSAGE),
        ('{"type": "ack", "id": "one", "command": "pause"}', Close.BAD_MESSAGE),
        (b"\x00binary", Close.BAD_MESSAGE),
    ],
)
async def test_bad_messages_close_the_bridge_and_store_nothing(make_sandbox, message: str | bytes, code: int) -> None:
    box = await database_sync_to_async(make_sandbox)()
    run, token = await database_sync_to_async(make_run)(box)
    comm = bridge(run.pk, token)
    await greeted(comm)
    if isinstance(message, bytes):
        await comm.send_to(bytes_data=message)
    else:
        await comm.send_to(text_data=message)
    assert await closed_with(comm) == code
    assert not await database_sync_to_async(Event.objects.filter(sandbox=box, kind__startswith="agent.").exists)()


async def test_no_hello_first_closes_4400(make_sandbox) -> None:
    box = await database_sync_to_async(make_sandbox)()
    run, token = await database_sync_to_async(make_run)(box)
    comm = bridge(run.pk, token)
    assert (await comm.connect())[0]
    await comm.send_json_to({"type": "status", "status": "running"})
    assert await closed_with(comm) == Close.BAD_MESSAGE


def kinds(box: Any) -> list[tuple[str, str]]:
    return list(Event.objects.filter(sandbox=box, kind__startswith="agent.").values_list("kind", "text"))


async def test_a_run_from_start_to_done_is_in_the_log(make_sandbox) -> None:
    box = await database_sync_to_async(make_sandbox)()
    run, token = await database_sync_to_async(make_run)(box)
    comm = bridge(run.pk, token)
    await greeted(comm)
    await comm.send_json_to({"type": "status", "status": "running"})
    step = {"goal": "Open the form", "actions": [{"name": "navigate", "params": {"url": "/demo/quote"}}], "url": "x"}
    await comm.send_json_to(
        {"type": "event", "kind": "agent.step", "text": "Open the form", "data": step, "screenshot": png_base64()}
    )
    await comm.send_json_to({"type": "event", "kind": "agent.log", "text": "thinking hard"})
    # A pause from Namek, acknowledged, then the agent at rest.
    await database_sync_to_async(runs.pause)(run)
    assert (await comm.receive_json_from(timeout=5)) == {"type": "pause", "id": 1}
    await comm.send_json_to({"type": "ack", "id": 1, "command": "pause"})
    await comm.send_json_to({"type": "status", "status": "paused"})
    await database_sync_to_async(runs.resume)(run, run.started_by, "use the blue one")
    assert (await comm.receive_json_from(timeout=5)) == {"type": "resume", "id": 2, "note": "use the blue one"}
    await comm.send_json_to({"type": "status", "status": "running"})
    await comm.send_json_to({"type": "status", "status": "done", "result": "Quote requested"})
    assert await closed_with(comm) == Close.NORMAL

    await database_sync_to_async(run.refresh_from_db)()
    assert (run.status, run.result, run.steps) == (RunStatus.DONE, "Quote requested", 1)
    logged = await database_sync_to_async(kinds)(box)
    assert [k for k, _ in logged] == [
        "agent.started",
        "agent.step",
        "agent.log",
        "agent.paused",
        "agent.resumed",
        "agent.done",
    ]
    assert dict(logged)["agent.resumed"] == "Agent resumed with the note: use the blue one"
    stored = await database_sync_to_async(Event.objects.get)(sandbox=box, kind="agent.step")
    assert stored.data["step"] == 1 and stored.data["run"] == run.pk and stored.data["goal"] == "Open the form"
    assert stored.source == "agent" and stored.screenshot and stored.thumbnail


async def test_stopping_a_run_tells_the_agent_and_ends_it(make_sandbox) -> None:
    box = await database_sync_to_async(make_sandbox)()
    run, token = await database_sync_to_async(make_run)(box, "running")
    comm = bridge(run.pk, token)
    await greeted(comm)
    # No supervisor runs here: stopping the runner fails and is only logged.
    await database_sync_to_async(runs.stop)(run, "owner")
    assert (await comm.receive_json_from(timeout=5)) == {"type": "stop", "id": 1}
    assert await closed_with(comm) == Close.NORMAL
    await database_sync_to_async(run.refresh_from_db)()
    assert (run.status, run.error) == (RunStatus.FAILED, "stopped by owner")
    # Its token no longer opens the bridge.
    again = bridge(run.pk, token)
    assert (await again.connect())[0]
    assert await closed_with(again) == Close.FORBIDDEN


async def test_a_runner_that_dies_fails_its_run_with_the_reason(make_sandbox) -> None:
    box = await database_sync_to_async(make_sandbox)()
    run, _token = await database_sync_to_async(make_run)(box, "running")
    await database_sync_to_async(runs.runner_exited)(run.pk, -9, "killed by SIGKILL")
    await database_sync_to_async(run.refresh_from_db)()
    assert run.status == RunStatus.FAILED and run.exit_code == -9
    assert "killed by SIGKILL" in run.error
    # A second report (the exit after a stop) changes nothing.
    await database_sync_to_async(runs.runner_exited)(run.pk, 0, "exit status 0")
    await database_sync_to_async(run.refresh_from_db)()
    assert "killed by SIGKILL" in run.error
    assert [k for k, _ in await database_sync_to_async(kinds)(box)] == ["agent.failed"]


# --- the runs API -------------------------------------------------------------------------


def bearer(cast: dict, who: str = "owner") -> dict[str, str]:
    return {"HTTP_AUTHORIZATION": f"Bearer {cast['tokens'][who]}"}


def test_run_requests_are_checked_before_anything_starts(
    client: Client, cast: dict, make_sandbox, settings: Any
) -> None:
    settings.NAMEK_LLM_CONFIGURED = False
    box = make_sandbox()
    url = f"/api/sandboxes/{box.pk}/runs"
    for body, status, fragment in [
        ({"task": "find the lamp"}, 400, "no LLM is configured"),
        ({"task": "x", "script": "steps:\n  - fly: {to: moon}\n"}, 400, "step 1"),
        ({"task": "x", "script": "steps: []"}, 400, "script"),
        ({"task": "x", "script": 42}, 400, "script"),
        ({"demo": "no-such-demo"}, 400, "demo"),
        ({"demo": "quote", "script": "steps:\n  - done: {text: ok}\n"}, 400, "not both"),
        ({"task": "x" * 4001, "script": "steps:\n  - done: {text: ok}\n"}, 400, "task"),
        ({"task": "   ", "script": "steps:\n  - done: {text: ok}\n"}, 400, "task"),
        ({"task": "x", "colour": "red"}, 400, "unknown fields"),
    ]:
        response = client.post(url, body, "application/json", **bearer(cast))
        assert response.status_code == status, (body, response.content)
        assert fragment in response.json()["error"], (body, response.json())
    assert client.post(url, {"demo": "quote"}, "application/json", **bearer(cast, "outsider")).status_code == 403
    assert not AgentRun.objects.exists()

    starting = make_sandbox(phase="starting")
    response = client.post(f"/api/sandboxes/{starting.pk}/runs", {"demo": "quote"}, "application/json", **bearer(cast))
    assert response.status_code == 409 and "not ready" in response.json()["error"]
    make_run(box, "running")
    response = client.post(url, {"demo": "quote"}, "application/json", **bearer(cast))
    assert response.status_code == 409 and "already has an active run" in response.json()["error"]


def test_runs_are_listed_and_commanded_only_by_those_allowed(client: Client, cast: dict, make_sandbox) -> None:
    box = make_sandbox()
    run, _ = make_run(box, "done")
    listed = client.get(f"/api/sandboxes/{box.pk}/runs", **bearer(cast)).json()["runs"]
    assert [r["id"] for r in listed] == [run.pk] and listed[0]["status"] == "done"
    assert client.get(f"/api/runs/{run.pk}", **bearer(cast, "outsider")).status_code == 403
    assert client.get(f"/api/runs/{run.pk}", **bearer(cast, "staff")).json()["task"] == "find the lamp"
    for command in ("stop", "pause", "resume"):
        response = client.post(f"/api/runs/{run.pk}/{command}", content_type="application/json", **bearer(cast))
        assert response.status_code == 409 and "the run is done" in response.json()["error"]
        assert client.post(f"/api/runs/{run.pk}/{command}", **bearer(cast, "outsider")).status_code == 403
    assert client.post("/api/runs/999999/stop", **bearer(cast)).status_code == 404
    live, _ = make_run(make_sandbox(name="b"), "paused")
    bad = client.post(f"/api/runs/{live.pk}/resume", json.dumps({"note": 5}), "application/json", **bearer(cast))
    assert bad.status_code == 400
