"""The event log: storing and numbering (``sandboxes.events``), the API, the websocket
through Channels' WebsocketCommunicator, and a resume test against a live Namek.

Bad input tried: unknown and reserved kinds, data that is not an object or too big or
not JSON, a screenshot that is not an image or is a GIF, `after` and `limit` that are
negative, non-numeric, fractional, huge or empty, notes without text or with unknown
fields, events and screenshots of a sandbox the user may not see, and messages sent to a
socket that only sends.
"""

from __future__ import annotations

import asyncio
import io
import json
import random
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.test import Client
from PIL import Image
from websockets.asyncio.client import connect

from namek_web.asgi import application
from sandboxes import events, services
from sandboxes.models import Event, Phase
from tests.live import ROOT, LiveNamek, ready_sandbox
from viewer.closecodes import Close


@pytest.fixture(autouse=True)
def own_media(settings: Any, tmp_path: Any) -> None:
    """Each test's screenshots in a directory of its own."""
    settings.MEDIA_ROOT = tmp_path / "media"


def png(width: int = 640, height: int = 400, colour: str = "#3a86ff") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(out, "PNG")
    return out.getvalue()


# --- storing ----------------------------------------------------------------------------


@pytest.mark.django_db
def test_events_are_numbered_per_sandbox_from_one_without_gaps(make_sandbox) -> None:
    first, second = make_sandbox(name="a"), make_sandbox(name="b")
    for n in range(3):
        events.record(first.pk, "person.note", f"a{n}", actor="owner")
    events.record(second.pk, "person.note", "b0", actor="owner")
    assert list(Event.objects.filter(sandbox=first).values_list("seq", "text")) == [(1, "a0"), (2, "a1"), (3, "a2")]
    assert list(Event.objects.filter(sandbox=second).values_list("seq", flat=True)) == [1]
    first.refresh_from_db()
    assert first.event_seq == 3


@pytest.mark.django_db
def test_an_event_as_json_has_every_field(make_sandbox) -> None:
    box = make_sandbox()
    event = events.record(box.pk, "person.note", "look <b>here</b>", data={"ticket": 42}, actor="owner")
    assert event is not None
    assert set(event) >= {"seq", "at", "kind", "source", "actor", "text", "data", "screenshot_url"}
    assert event["text"] == "look <b>here</b>"  # stored as given; pages show it literally
    assert (event["kind"], event["source"], event["actor"], event["data"]) == (
        "person.note",
        "person",
        "owner",
        {"ticket": 42},
    )
    assert event["screenshot_url"] is None and event["thumbnail_url"] is None


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"kind": "no.such.kind"}, "unknown"),
        ({"kind": "share.closed"}, "unknown"),
        ({"kind": "person.note", "data": ["a", "list"]}, "JSON object"),
        ({"kind": "person.note", "data": {"x": "y" * 20000}}, "bytes as JSON"),
        ({"kind": "person.note", "data": {"x": float("nan")}}, "not JSON"),
        ({"kind": "person.note", "data": {"x": object()}}, "not JSON"),
        ({"kind": "person.note", "source": "robot"}, "source"),
        ({"kind": "person.note", "screenshot": b"not an image"}, "not a readable PNG or JPEG"),
        ({"kind": "person.note", "screenshot": b"GIF89a" + b"\0" * 40}, "PNG or JPEG"),
    ],
)
def test_bad_events_are_refused_and_nothing_is_stored(make_sandbox, settings: Any, fields: dict, message: str) -> None:
    box = make_sandbox()
    kind = fields.pop("kind")
    with pytest.raises(events.EventError, match=message):
        events.record(box.pk, kind, "text", **fields)
    assert not Event.objects.exists()
    box.refresh_from_db()
    assert box.event_seq == 0
    media = settings.MEDIA_ROOT / "screenshots"
    assert not media.exists() or not any(media.rglob("*.*"))


@pytest.mark.django_db
def test_long_text_is_cut_and_nul_removed(make_sandbox) -> None:
    box = make_sandbox()
    event = events.record(box.pk, "person.note", "x\0y" + "z" * 5000)
    assert event is not None
    assert len(event["text"]) == events.MAX_TEXT
    assert event["text"].startswith("xyz") and event["text"].endswith("…")


@pytest.mark.django_db
def test_a_screenshot_is_kept_with_a_thumbnail(make_sandbox, settings: Any) -> None:
    box = make_sandbox()
    event = events.record(box.pk, "person.note", "shot", screenshot=png(1280, 800))
    assert event is not None and event["screenshot_url"] and event["thumbnail_url"]
    stored = Event.objects.get(sandbox=box, seq=event["seq"])
    with Image.open(settings.MEDIA_ROOT / stored.thumbnail) as thumb:
        assert thumb.format == "JPEG"
        assert thumb.size == (320, 200)
    assert (settings.MEDIA_ROOT / stored.screenshot).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.django_db
def test_an_event_for_a_missing_sandbox_stores_nothing_and_leaves_no_file(settings: Any) -> None:
    assert events.record(424242, "person.note", "lost", screenshot=png()) is None
    assert not any((settings.MEDIA_ROOT / "screenshots").rglob("*.*"))


@pytest.mark.django_db
def test_phase_changes_are_logged_with_their_reasons(make_sandbox) -> None:
    box = make_sandbox(phase="pending")
    services.record_phase(box.pk, Phase.STARTING)
    services.record_phase(box.pk, Phase.READY)
    services.record_phase(box.pk, Phase.READY, extra={"browser_exit": "exit code 139", "browser_restarts": 1})
    services.record_phase(box.pk, Phase.STOPPING, by="owner")
    services.record_phase(box.pk, Phase.STOPPED)
    services.record_phase(box.pk, Phase.STOPPED)  # no change, no event
    logged = list(Event.objects.filter(sandbox=box).values_list("kind", "source", "actor", "data"))
    assert [row[0] for row in logged] == [
        "sandbox.ready",
        "sandbox.browser_restarted",
        "sandbox.stopping",
        "sandbox.stopped",
    ]
    assert logged[1][3] == {"reason": "exit code 139", "restarts": 1}
    assert logged[2][1:3] == ("person", "owner")
    assert logged[3][1:3] == ("system", "namek")

    failing = make_sandbox(phase="starting")
    services.record_phase(failing.pk, Phase.FAILED, "Chromium did not start")
    assert list(Event.objects.filter(sandbox=failing).values_list("kind", "text")) == [
        ("sandbox.failed", "Failed: Chromium did not start")
    ]


def test_the_kinds_table_in_the_docstring_and_readme_names_every_kind() -> None:
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for kind in [*events.KINDS, *(prefix + "*" for prefix in events.RESERVED_PREFIXES)]:
        assert f"\n{kind} " in events.__doc__, kind  # type: ignore[operator]
        assert f"`{kind}`" in readme, kind


# --- the API ----------------------------------------------------------------------------


def bearer(cast: dict, who: str = "owner") -> dict[str, str]:
    return {"HTTP_AUTHORIZATION": f"Bearer {cast['tokens'][who]}"}


@pytest.mark.django_db
def test_the_api_pages_through_the_log(client: Client, cast: dict, make_sandbox) -> None:
    box = make_sandbox()
    for n in range(5):
        events.record(box.pk, "person.note", f"n{n}")
    url = f"/api/sandboxes/{box.pk}/events"
    page = client.get(url, {"limit": 2}, **bearer(cast)).json()
    assert [e["seq"] for e in page["events"]] == [1, 2] and page["next_after"] == 2
    page = client.get(url, {"after": page["next_after"], "limit": 10}, **bearer(cast)).json()
    assert [e["text"] for e in page["events"]] == ["n2", "n3", "n4"] and page["next_after"] == 5
    assert client.get(url, {"after": 5}, **bearer(cast)).json() == {"events": [], "next_after": 5}
    assert client.get(url, {"after": 99}, **bearer(cast)).json() == {"events": [], "next_after": 99}
    assert client.get(url, **bearer(cast, "staff")).status_code == 200


@pytest.mark.django_db
@pytest.mark.parametrize(
    "query",
    [
        {"after": "-1"},
        {"after": "abc"},
        {"after": "1.5"},
        {"after": ""},
        {"after": "9" * 30},
        {"after": "\u0661"},  # ARABIC-INDIC DIGIT ONE: a digit to str.isdigit, not to us
        {"limit": "0"},
        {"limit": "1001"},
        {"limit": "ten"},
    ],
)
def test_bad_after_and_limit_answer_400(client: Client, cast: dict, make_sandbox, query: dict) -> None:
    box = make_sandbox()
    response = client.get(f"/api/sandboxes/{box.pk}/events", query, **bearer(cast))
    assert response.status_code == 400
    assert next(iter(query)) in response.json()["error"]


@pytest.mark.django_db
def test_outsiders_get_neither_events_nor_screenshots(client: Client, cast: dict, make_sandbox) -> None:
    box = make_sandbox()
    event = events.record(box.pk, "person.note", "secret", screenshot=png())
    assert event is not None
    for url in (f"/api/sandboxes/{box.pk}/events", event["screenshot_url"], event["thumbnail_url"]):
        assert client.get(url, **bearer(cast, "outsider")).status_code == 403, url
        assert client.get(url).status_code == 401, url
    shot = client.get(event["screenshot_url"], **bearer(cast))
    assert shot.status_code == 200 and shot["Content-Type"] == "image/png"
    assert b"".join(shot.streaming_content)[:4] == b"\x89PNG"
    shot.close()
    thumb = client.get(event["thumbnail_url"], **bearer(cast, "staff"))
    assert thumb.status_code == 200 and thumb["Content-Type"] == "image/jpeg"
    thumb.close()
    plain = events.record(box.pk, "person.note", "no picture")
    assert plain is not None
    missing = client.get(f"/api/sandboxes/{box.pk}/events/{plain['seq']}/screenshot", **bearer(cast))
    assert missing.status_code == 404 and "no screenshot" in missing.json()["error"]
    assert client.get(f"/api/sandboxes/{box.pk}/events/77/thumbnail", **bearer(cast)).status_code == 404


@pytest.mark.django_db
def test_a_note_is_added_by_its_author(client: Client, cast: dict, make_sandbox) -> None:
    box = make_sandbox()
    url = f"/api/sandboxes/{box.pk}/events"
    response = client.post(
        url, {"text": "checkout is slow", "data": {"ticket": "OPS-1"}}, "application/json", **bearer(cast)
    )
    assert response.status_code == 201, response.content
    assert response.json()["kind"] == "person.note" and response.json()["actor"] == "owner"
    for body, fragment in [
        ({}, "text"),
        ({"text": "   "}, "text"),
        ({"text": 5}, "text"),
        ({"text": "x", "colour": "red"}, "unknown fields"),
        ({"text": "x", "data": [1]}, "JSON object"),
        ([1, 2], "JSON object"),
    ]:
        bad = client.post(url, body, "application/json", **bearer(cast))
        assert bad.status_code == 400 and fragment in bad.json()["error"], (body, bad.content)
    assert client.post(url, {"text": "x"}, "application/json", **bearer(cast, "outsider")).status_code == 403
    assert Event.objects.filter(sandbox=box).count() == 1


# --- the websocket ------------------------------------------------------------------------


def communicator(path: str, token: str) -> WebsocketCommunicator:
    headers = [(b"authorization", f"Bearer {token}".encode()), (b"origin", b"http://127.0.0.1:8000")]
    return WebsocketCommunicator(application, path, headers=headers)


async def receive_events(comm: WebsocketCommunicator, count: int, timeout: float = 5) -> list[dict[str, Any]]:
    return [json.loads(await comm.receive_from(timeout)) for _ in range(count)]


async def close_code(comm: WebsocketCommunicator) -> int:
    message = await comm.receive_output(timeout=5)
    assert message["type"] == "websocket.close", message
    return int(message["code"])


record = database_sync_to_async(events.record)


@pytest.mark.django_db(transaction=True)
async def test_the_socket_sends_what_was_missed_then_live_events(cast: dict, make_sandbox) -> None:
    box = await database_sync_to_async(make_sandbox)()
    for n in range(3):
        await record(box.pk, "person.note", f"old{n}")
    comm = communicator(f"/ws/sandboxes/{box.pk}/events/?after=1", cast["tokens"]["owner"])
    assert (await comm.connect())[0]
    assert [e["text"] for e in await receive_events(comm, 2)] == ["old1", "old2"]
    await record(box.pk, "person.note", "live", data={"n": 1})
    (live,) = await receive_events(comm, 1)
    assert (live["seq"], live["text"], live["data"]) == (4, "live", {"n": 1})
    assert await comm.receive_nothing(0.3)
    await comm.disconnect()


@pytest.mark.django_db(transaction=True)
async def test_an_after_beyond_the_newest_means_nothing_missed(cast: dict, make_sandbox) -> None:
    box = await database_sync_to_async(make_sandbox)()
    await record(box.pk, "person.note", "one")
    comm = communicator(f"/ws/sandboxes/{box.pk}/events/?after=1000", cast["tokens"]["owner"])
    assert (await comm.connect())[0]
    assert await comm.receive_nothing(0.3)
    await record(box.pk, "person.note", "two")
    assert [e["seq"] for e in await receive_events(comm, 1)] == [2]
    await comm.disconnect()


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("after", ["-1", "abc", "1.5", "", "1e3", "9" * 25, "%F0%9F%92%A9"])
async def test_a_bad_after_closes_4400(cast: dict, make_sandbox, after: str) -> None:
    box = await database_sync_to_async(make_sandbox)()
    comm = communicator(f"/ws/sandboxes/{box.pk}/events/?after={after}", cast["tokens"]["owner"])
    assert (await comm.connect())[0]
    assert await close_code(comm) == Close.BAD_MESSAGE


@pytest.mark.django_db(transaction=True)
async def test_outsiders_and_talkers_are_closed(cast: dict, make_sandbox) -> None:
    box = await database_sync_to_async(make_sandbox)()
    await record(box.pk, "person.note", "private")
    outsider = communicator(f"/ws/sandboxes/{box.pk}/events/", cast["tokens"]["outsider"])
    assert (await outsider.connect())[0]
    assert await close_code(outsider) == Close.FORBIDDEN
    talker = communicator(f"/ws/sandboxes/{box.pk}/events/", cast["tokens"]["owner"])
    assert (await talker.connect())[0]
    await receive_events(talker, 1)
    await talker.send_to(text_data='{"type": "hello"}')
    assert await close_code(talker) == Close.BAD_MESSAGE
    # The server keeps serving others.
    other = communicator(f"/ws/sandboxes/{box.pk}/events/", cast["tokens"]["staff"])
    assert (await other.connect())[0]
    assert [e["text"] for e in await receive_events(other, 1)] == ["private"]
    await other.disconnect()


@pytest.mark.django_db(transaction=True)
async def test_a_lost_group_message_is_read_from_the_database(cast: dict, make_sandbox, monkeypatch) -> None:
    """A channel layer may drop messages (a full queue): the gap and the tail still arrive."""
    box = await database_sync_to_async(make_sandbox)()
    comm = communicator(f"/ws/sandboxes/{box.pk}/events/", cast["tokens"]["owner"])
    assert (await comm.connect())[0]
    real_publish = events.publish
    dropped: list[int] = []

    def lossy(sandbox_id: int, payloads: list[dict[str, Any]]) -> None:
        if payloads[0]["seq"] in (2, 3, 5):
            dropped.append(payloads[0]["seq"])
            return
        real_publish(sandbox_id, payloads)

    monkeypatch.setattr(events, "publish", lossy)
    for n in range(1, 6):
        await record(box.pk, "person.note", f"e{n}")
    # 4 arrives and reveals the gap 2-3 at once; 5, the tail, comes with the periodic check.
    got = await receive_events(comm, 5, timeout=10)
    assert [e["seq"] for e in got] == [1, 2, 3, 4, 5]
    assert dropped == [2, 3, 5]
    await comm.disconnect()


# --- resume, against a live Namek ---------------------------------------------------------


@pytest.mark.processes
def test_a_subscriber_that_keeps_reconnecting_gets_every_event_once_in_order(live_namek: LiveNamek) -> None:  # noqa: PLR0915
    """Writers: four threads posting notes through the API (Daphne's thread pool writes them
    concurrently) and another process writing straight to the database, as the supervisor
    does. The subscriber drops its connection every few messages or tenths of a second and
    comes back with ``after`` = the last seq it holds."""
    with ready_sandbox(live_namek, name="resume") as box:
        sandbox_id = box["id"]
        start_seq = live_namek.api("GET", f"/api/sandboxes/{sandbox_id}")[1]["last_event_seq"]
        per_thread, from_process = 60, 150
        failures: list[Any] = []

        def post_notes(thread: int) -> None:
            for n in range(per_thread):
                status, body = live_namek.api(
                    "POST", f"/api/sandboxes/{sandbox_id}/events", body={"text": f"t{thread}-{n}"}
                )
                if status != 201:
                    failures.append(body)

        script = (
            "import time\nfrom sandboxes import events\n"
            f"for n in range({from_process}):\n"
            f"    events.record({sandbox_id}, 'person.note', f'p-{{n}}', actor='script')\n"
            "    time.sleep(0.005)\n"
        )
        writers = [threading.Thread(target=post_notes, args=(t,)) for t in range(4)]
        held: list[dict[str, Any]] = []
        reconnects = 0

        async def subscribe(until_seq: int | None) -> None:
            nonlocal reconnects
            rng = random.Random(7)
            headers = {"Authorization": f"Bearer {live_namek.token()}"}
            deadline = time.monotonic() + 90
            while until_seq is None or (held[-1]["seq"] if held else start_seq) < until_seq:
                if time.monotonic() > deadline:
                    page = live_namek.api("GET", f"/api/sandboxes/{sandbox_id}/events?after={start_seq}&limit=1000")[1]
                    got = [e["seq"] for e in held]
                    raise AssertionError(
                        f"stuck at {got[-1:]}; stored {[e['seq'] for e in page['events']][-5:]} "
                        f"{len(page['events'])}; held {len(got)} unique {len(set(got))}"
                    )
                after = held[-1]["seq"] if held else start_seq
                url = f"{live_namek.ws_base}/ws/sandboxes/{sandbox_id}/events/?after={after}"
                # max_queue=None: with unread messages queued, websockets would stop reading
                # and wait out its close timeout for the server's close frame.
                async with connect(url, additional_headers=headers, max_queue=None) as ws:
                    reconnects += 1
                    stay = time.monotonic() + rng.uniform(0.02, 0.3)
                    for _ in range(rng.randint(1, 40)):
                        left = stay - time.monotonic()
                        if left <= 0:
                            break
                        try:
                            held.append(json.loads(await asyncio.wait_for(ws.recv(), left)))
                        except TimeoutError:
                            break
                if until_seq is None and not any(w.is_alive() for w in writers) and process.poll() is not None:
                    return

        manage = [sys.executable, str(ROOT / "manage.py"), "shell", "-c", script]
        process = subprocess.Popen(manage, env=live_namek.env, cwd=ROOT, stdout=subprocess.DEVNULL)
        try:
            for writer in writers:
                writer.start()
            asyncio.run(subscribe(None))
        finally:
            for writer in writers:
                writer.join(60)
            try:
                process.wait(60)
            finally:
                process.kill()
        assert failures == [] and process.returncode == 0
        total = start_seq + 4 * per_thread + from_process
        asyncio.run(subscribe(total))
        assert [e["seq"] for e in held] == list(range(start_seq + 1, total + 1))
        texts = sorted(e["text"] for e in held)
        expected = sorted(
            [f"t{t}-{n}" for t in range(4) for n in range(per_thread)] + [f"p-{n}" for n in range(from_process)]
        )
        assert texts == expected
        assert reconnects > 20, reconnects


@pytest.mark.django_db(transaction=True)
async def test_a_process_holds_one_group_membership_for_all_its_subscribers(cast: dict, make_sandbox) -> None:
    from channels.layers import get_channel_layer

    box = await database_sync_to_async(make_sandbox)()
    layer = get_channel_layer()
    group = events.group_name(box.pk)
    viewers = [communicator(f"/ws/sandboxes/{box.pk}/events/", cast["tokens"][who]) for who in ("owner", "staff")]
    viewers.append(communicator(f"/ws/sandboxes/{box.pk}/events/", cast["tokens"]["owner"]))
    for viewer in viewers:
        assert (await viewer.connect())[0]
    assert len(layer.groups.get(group, {})) == 1
    await record(box.pk, "person.note", "to all")
    for viewer in viewers:
        assert [e["text"] for e in await receive_events(viewer, 1)] == ["to all"]
    for viewer in viewers:
        await viewer.disconnect()
    assert group not in layer.groups or not layer.groups[group]


@pytest.fixture
def redis_layer(settings: Any, tmp_path: Any) -> Any:
    """A real Redis (Debian's redis-server) as the channel layer, stopped after the test."""
    from tests.live import redis_server

    with redis_server(tmp_path) as server:
        settings.CHANNEL_LAYERS = {
            "default": {"BACKEND": "channels_redis.core.RedisChannelLayer", "CONFIG": {"hosts": [server.url]}}
        }
        yield server.port


@pytest.mark.processes
@pytest.mark.django_db(transaction=True)
async def test_with_redis_live_events_arrive_at_once(redis_layer: int, cast: dict, make_sandbox, monkeypatch) -> None:
    """Not by the periodic re-check (pushed out of reach here): through Redis and the hub,
    while other consumers of the process (the dashboard's) wait on the layer too."""
    from viewer.consumers import events as events_consumer

    monkeypatch.setattr(events_consumer, "RECHECK_SECONDS", 60.0)
    box = await database_sync_to_async(make_sandbox)()
    dashboard = communicator("/ws/sandboxes/", cast["tokens"]["owner"])
    assert (await dashboard.connect())[0]
    await dashboard.receive_from(5)  # its snapshot
    viewers = [communicator(f"/ws/sandboxes/{box.pk}/events/", cast["tokens"]["owner"]) for _ in range(3)]
    for viewer in viewers:
        assert (await viewer.connect())[0]
    for n in range(5):
        await record(box.pk, "person.note", f"live {n}")
        for viewer in viewers:
            assert [e["text"] for e in await receive_events(viewer, 1, timeout=1.5)] == [f"live {n}"]
    for comm in [*viewers, dashboard]:
        await comm.disconnect()
