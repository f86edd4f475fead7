"""The sandbox platform: warm pool, both screen servers, caps, restart-browser, and the
idle and lifetime limits, against a real supervisor, Daphne and sandboxes."""

from __future__ import annotations

import asyncio
import json
import struct
import time
from collections.abc import Iterator
from typing import Any

import pytest

from sandboxes import rfb
from sandboxes.backends.local import LocalBackend
from sandboxes.local.supervisor import http_get_unix
from tests.live import LiveNamek, running

pytestmark = pytest.mark.processes


def supervisor(namek: LiveNamek) -> LocalBackend:
    return LocalBackend(str(namek.data_dir / "supervisor.sock"))


def wait_until(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout} s")


def warm_ready(namek: LiveNamek) -> int:
    return int(supervisor(namek).ping()["warm"]["ready"])


async def read_pixel(path: str, password: str, x: int, y: int) -> tuple[int, int, int]:
    """One full Raw update straight from the VNC server; the pixel at (x, y) as RGB."""
    reader, writer = await asyncio.open_unix_connection(path, limit=16 * 1024 * 1024)
    try:
        await rfb.authenticate(reader, writer, password)
        writer.write(b"\x01")
        init = await rfb.read_server_init(reader)
        # 32 bits per pixel, true colour, little endian, red at bit 16: bytes are B, G, R, X.
        pixel_format = struct.pack(">BBBBHHHBBB3x", 32, 24, 0, 1, 255, 255, 255, 16, 8, 0)
        writer.write(b"\x00\x00\x00\x00" + pixel_format)
        writer.write(struct.pack(">BxHi", 2, 1, 0))
        writer.write(struct.pack(">BBHHHH", 3, 0, 0, 0, init.width, init.height))
        await writer.drain()
        found: tuple[int, int, int] | None = None
        while found is None:
            kind = (await reader.readexactly(1))[0]
            if kind == 2:  # Bell
                continue
            if kind in (1, 3):  # colour map, cut text: not asked for
                raise AssertionError(f"unexpected server message {kind}")
            (count,) = struct.unpack(">xH", await reader.readexactly(3))
            for _ in range(count):
                rx, ry, rw, rh, encoding = struct.unpack(">HHHHi", await reader.readexactly(12))
                if encoding != 0:
                    continue  # a pseudo-encoding without data (none requested)
                data = await reader.readexactly(rw * rh * 4)
                if rx <= x < rx + rw and ry <= y < ry + rh:
                    offset = ((y - ry) * rw + (x - rx)) * 4
                    blue, green, red = data[offset : offset + 3]
                    found = (red, green, blue)
        return found
    finally:
        writer.close()


def hex_colour(rgb: tuple[int, int, int]) -> str:
    return "#" + "".join(f"{value:02x}" for value in rgb)


def assert_banner_on_screen(namek: LiveNamek, sandbox: dict[str, Any]) -> None:
    """The sandbox's start page (its banner colour) is on its screen, as Namek sees it."""
    path, password = namek.screen_target(sandbox["id"])
    width, height = (int(v) for v in sandbox["screen"].split("x"))
    seen: list[str] = []

    def shows_banner() -> bool:
        seen.append(hex_colour(asyncio.run(read_pixel(path, password, width // 2, height * 3 // 4))))
        return seen[-1] == sandbox["banner_color"]

    # x11vnc may answer with a stale frame for a few seconds (see shared/platform.md).
    wait_until(shows_banner, 20, f"banner {sandbox['banner_color']} on screen (saw {seen[-3:]})")


async def security_types(path: str) -> bytes:
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        await reader.readexactly(12)
        writer.write(rfb.PROTOCOL_VERSION)
        (count,) = await reader.readexactly(1)
        return await reader.readexactly(count)
    finally:
        writer.close()


@pytest.fixture(scope="module", params=["xvnc", "xvfb-x11vnc"])
def platform(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveNamek]:
    with running(
        tmp_path_factory.mktemp(f"platform-{request.param}"),
        NAMEK_SCREEN=request.param,
        NAMEK_WARM_POOL="1",
        NAMEK_MAX_SANDBOXES_PER_USER="2",
        NAMEK_MAX_SANDBOXES="3",
    ) as namek:
        yield namek


def test_a_claim_from_the_warm_pool_is_ready_at_once_and_the_pool_refills(platform: LiveNamek) -> None:
    wait_until(lambda: warm_ready(platform) == 1, 30, "a ready warm sandbox")
    started = time.monotonic()
    status, sandbox = platform.api("POST", "/api/sandboxes", body={"name": "from the pool"})
    took = time.monotonic() - started
    try:
        assert status == 201, sandbox
        assert sandbox["phase"] == "ready", "a warm claim answers ready, without a start"
        assert took < 2.5, f"the claim took {took:.2f} s"

        def tabs() -> list[str]:
            pages = json.loads(asyncio.run(http_get_unix(platform.browser_socket(sandbox["id"]), "/json/list")))
            return [page["url"] for page in pages if page["type"] == "page"]

        # The start page loads in the claimed browser's only tab (the new tab's URL is
        # empty until its navigation commits).
        wait_until(lambda: len(tabs()) == 1 and "/sandboxes/start/" in tabs()[0], 10, f"the start page ({tabs()})")
        assert_banner_on_screen(platform, sandbox)
        wait_until(lambda: warm_ready(platform) == 1, 30, "the pool to refill")
    finally:
        platform.delete_sandbox(sandbox["id"])


def test_a_screen_size_the_pool_lacks_starts_cold_and_shows_its_banner(platform: LiveNamek) -> None:
    sandbox = platform.create_sandbox(name="cold", screen="1024x768")
    try:
        path, _password = platform.screen_target(sandbox["id"])
        assert asyncio.run(security_types(path)) == bytes([rfb.SECURITY_VNC_AUTH])
        assert_banner_on_screen(platform, sandbox)
    finally:
        platform.delete_sandbox(sandbox["id"])


def test_the_vnc_server_refuses_a_wrong_password(platform: LiveNamek) -> None:
    sandbox = platform.create_sandbox(name="password")
    try:
        path, password = platform.screen_target(sandbox["id"])
        with pytest.raises(rfb.RFBError, match="authentication failed"):
            asyncio.run(rfb.probe(path, "wrong" + password[:3]))
        assert asyncio.run(rfb.probe(path, password)).width == 1280
    finally:
        platform.delete_sandbox(sandbox["id"])


def test_restart_browser_brings_cdp_back_with_the_reason_recorded(platform: LiveNamek) -> None:
    sandbox = platform.create_sandbox(name="restart me")
    try:
        status, body = platform.api("POST", f"/api/sandboxes/{sandbox['id']}/restart-browser")
        assert status == 200, body
        assert body["browser_restarts"] == 1
        assert body["last_browser_exit"] == "Chromium restarted by owner"
        version = json.loads(asyncio.run(http_get_unix(platform.browser_socket(sandbox["id"]), "/json/version")))
        assert "webSocketDebuggerUrl" in version
        assert_banner_on_screen(platform, sandbox)  # it reopened the start page
        status, body = platform.api("POST", f"/api/sandboxes/{sandbox['id']}/restart-browser", who="outsider")
        assert status == 403
    finally:
        platform.delete_sandbox(sandbox["id"])
    status, body = platform.api("POST", f"/api/sandboxes/{sandbox['id']}/restart-browser")
    assert status == 409
    assert "stopped" in body["error"]


def test_caps_refuse_with_429_for_a_user_and_503_for_namek(platform: LiveNamek) -> None:
    created = [platform.create_sandbox(name="one"), platform.create_sandbox(name="two")]
    try:
        status, body = platform.api("POST", "/api/sandboxes", body={"name": "three"})
        assert (status, body["limit"]) == (429, 2)
        assert "most one user may have" in body["error"]
        created.append(platform.create_sandbox(who="outsider", name="theirs"))
        status, body = platform.api("POST", "/api/sandboxes", who="staff", body={})
        assert (status, body["limit"]) == (503, 3)
        assert "maximum of 3 sandboxes" in body["error"]
    finally:
        for sandbox in created:
            platform.delete_sandbox(sandbox["id"], who="staff")
    assert platform.api("POST", "/api/sandboxes", body={"screen": "nonsense"})[0] == 400


@pytest.fixture(scope="module")
def short_lived(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveNamek]:
    with running(
        tmp_path_factory.mktemp("short-lived"),
        NAMEK_IDLE_TIMEOUT="3",
        NAMEK_MAX_LIFETIME="60",
        NAMEK_REAPER_INTERVAL="0.5",
    ) as namek:
        yield namek


def test_an_idle_sandbox_stops_on_time_and_a_watched_one_does_not(short_lived: LiveNamek) -> None:
    idle = short_lived.create_sandbox(name="nobody watches")
    watched = short_lived.create_sandbox(name="watched")

    async def watch_for(seconds: float) -> None:
        from websockets.asyncio.client import connect

        headers = {"Authorization": f"Bearer {short_lived.token()}"}
        url = f"{short_lived.ws_base}/ws/sandboxes/{watched['id']}/screen/"
        async with connect(url, additional_headers=headers, subprotocols=["binary"], max_size=None) as ws:
            await ws.recv()  # the relay is up: this connection counts as a viewer
            await asyncio.sleep(seconds)

    asyncio.run(watch_for(6))
    stopped = short_lived.wait_phase(idle["id"], "stopped", timeout=10)
    assert "nobody watched it for 3 s" in stopped["failure_reason"]
    _status, still = short_lived.api("GET", f"/api/sandboxes/{watched['id']}")
    assert still["phase"] == "ready", "watched for 6 s, left 0-1 s ago"
    stopped = short_lived.wait_phase(watched["id"], "stopped", timeout=10)
    assert "nobody watched" in stopped["failure_reason"]
    assert not short_lived.sandbox_dir(idle["id"]).exists()


def test_a_sandbox_stops_at_its_maximum_lifetime_even_when_watched(short_lived: LiveNamek) -> None:
    sandbox = short_lived.create_sandbox(name="old")

    async def watch_until_stopped() -> dict[str, Any]:
        from websockets.asyncio.client import connect

        headers = {"Authorization": f"Bearer {short_lived.token()}"}
        url = f"{short_lived.ws_base}/ws/sandboxes/{sandbox['id']}/screen/"
        async with connect(url, additional_headers=headers, subprotocols=["binary"], max_size=None) as ws:
            await ws.recv()  # the relay is up: someone watches, so the idle timeout cannot stop it
            # In the live database (another process's): created a minute ago, so only the
            # lifetime can stop it, and now. (A slow `manage.py shell` no longer races the
            # 3 s idle timeout: the watcher is already counted.)
            code = (
                "import datetime; from django.utils import timezone; from sandboxes.models import Sandbox; "
                f"Sandbox.objects.filter(pk={sandbox['id']}).update("
                "created_at=timezone.now() - datetime.timedelta(seconds=61))"
            )
            await asyncio.to_thread(short_lived.manage, "shell", "-c", code)
            return await asyncio.to_thread(short_lived.wait_phase, sandbox["id"], "stopped", timeout=15)

    stopped = asyncio.run(watch_until_stopped())
    assert "maximum lifetime of 60 s" in stopped["failure_reason"]
