from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, async_playwright

from tests.live import LiveNamek, ready_sandbox, running


@pytest.fixture(scope="session")
def live_namek(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveNamek]:
    """One real Namek (supervisor + Daphne) shared by the tests that need processes.

    Short flow-control settings so that the slow-reader test ends quickly.
    """
    with running(
        tmp_path_factory.mktemp("live"),
        NAMEK_RELAY_WINDOW=str(2 * 1024 * 1024),
        NAMEK_RELAY_STALL_SECONDS="3",
    ) as namek:
        yield namek


@pytest.fixture
def sandbox(live_namek: LiveNamek) -> Iterator[dict]:
    """A ready sandbox of the owner, deleted after the test."""
    with ready_sandbox(live_namek) as created:
        yield created


@pytest.fixture
def fresh_namek(tmp_path: Path) -> Iterator[LiveNamek]:
    """A Namek of its own, for tests that kill or restart parts of it."""
    namek = LiveNamek(tmp_path)
    try:
        yield namek
    finally:
        namek.stop()


@pytest.fixture(autouse=True)
def fast_password_hashing(settings: Any) -> None:
    """PBKDF2's deliberate slowness buys nothing in tests."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def cast(db: None) -> dict:
    """owner, outsider and staff in the test database, with their API tokens."""
    from tests import cast as cast_module

    return cast_module.create()


@pytest.fixture
def make_sandbox(cast: dict):  # type: ignore[no-untyped-def]
    """Rows only (no processes): for tests of access rules and the API's answers."""
    from sandboxes.models import Sandbox

    def make(owner: str = "owner", phase: str = "ready", name: str = "box") -> Sandbox:
        return Sandbox.objects.create(
            name=name, owner_id=cast["ids"][owner], backend="local", screen="1280x800", phase=phase
        )

    return make


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """Debian's Chromium, driven by Playwright (its own browsers cannot be downloaded here)."""
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        try:
            yield launched
        finally:
            await launched.close()
