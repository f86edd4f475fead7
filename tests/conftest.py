from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.live import LiveNamek


@pytest.fixture(scope="session")
def live_namek(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveNamek]:
    """One real Namek (supervisor + Daphne) shared by the tests that need processes.

    Short flow-control settings so that the slow-reader test ends quickly.
    """
    namek = LiveNamek(
        tmp_path_factory.mktemp("live"),
        NAMEK_RELAY_WINDOW=str(2 * 1024 * 1024),
        NAMEK_RELAY_STALL_SECONDS="3",
    )
    try:
        yield namek.start()
    finally:
        namek.stop()


@pytest.fixture
def sandbox(live_namek: LiveNamek) -> Iterator[dict]:
    """A ready sandbox of the owner, deleted after the test."""
    created = live_namek.create_sandbox()
    try:
        yield created
    finally:
        live_namek.delete_sandbox(created["id"])


@pytest.fixture
def fresh_namek(tmp_path: Path) -> Iterator[LiveNamek]:
    """A Namek of its own, for tests that kill or restart parts of it."""
    namek = LiveNamek(tmp_path)
    try:
        yield namek
    finally:
        namek.stop()
