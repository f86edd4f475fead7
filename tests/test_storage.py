"""Event screenshots in the database (NAMEK_MEDIA_STORAGE=database), for web replicas that
share no volume: stored, served through the API, removed with their sandbox's records.

Bad input tried: opening a missing file, writing through open(), a URL asked of it."""

from __future__ import annotations

import io
from datetime import timedelta
from typing import Any

import pytest
from django.core.files.storage import storages
from django.core.management import call_command
from django.test import Client
from django.utils import timezone
from PIL import Image

from sandboxes import events
from sandboxes.models import Sandbox, StoredFile
from sandboxes.storage import DatabaseStorage

pytestmark = pytest.mark.django_db


@pytest.fixture
def database_storage(settings: Any) -> None:
    settings.STORAGES = {**settings.STORAGES, "default": {"BACKEND": "sandboxes.storage.DatabaseStorage"}}
    assert isinstance(storages["default"], DatabaseStorage)


def png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (640, 400), "#2a9d8f").save(out, "PNG")
    return out.getvalue()


def test_screenshots_live_in_the_database_and_are_served_from_it(
    database_storage: None, client: Client, cast: dict, make_sandbox
) -> None:
    box = make_sandbox("owner")
    image = png()
    event = events.record(box.pk, "person.note", "look", screenshot=image, actor="owner")
    assert event is not None
    names = sorted(StoredFile.objects.values_list("name", flat=True))
    assert len(names) == 2 and all(name.startswith(f"screenshots/{box.pk}/") for name in names)
    auth = {"HTTP_AUTHORIZATION": f"Bearer {cast['tokens']['owner']}"}
    served = client.get(event["screenshot_url"], **auth)
    assert served.status_code == 200 and served["Content-Type"] == "image/png"
    assert b"".join(served.streaming_content) == image
    thumb = client.get(event["thumbnail_url"], **auth)
    assert thumb.status_code == 200 and b"".join(thumb.streaming_content)[:2] == b"\xff\xd8"
    assert (
        client.get(
            event["screenshot_url"], **{"HTTP_AUTHORIZATION": f"Bearer {cast['tokens']['outsider']}"}
        ).status_code
        == 403
    )

    # Pruned with the sandbox's records.
    Sandbox.objects.filter(pk=box.pk).update(phase="stopped", stopped_at=timezone.now() - timedelta(days=40))
    call_command("namek_prune", "--days", "30", stdout=io.StringIO())
    assert not StoredFile.objects.exists()


def test_the_database_storage_refuses_what_it_cannot_do(database_storage: None) -> None:
    storage = DatabaseStorage()
    with pytest.raises(FileNotFoundError):
        storage.open("screenshots/1/missing.png")
    with pytest.raises(FileNotFoundError):
        storage.size("screenshots/1/missing.png")
    name = storage.save("screenshots/1/a.png", io.BytesIO(b"data"))
    assert storage.exists(name) and storage.size(name) == 4 and storage.open(name).read() == b"data"
    assert storage.save("screenshots/1/a.png", io.BytesIO(b"more")) != name, "names are never reused"
    with pytest.raises(ValueError, match="written with save"):
        storage.open(name, "wb")
    with pytest.raises(NotImplementedError, match="served by Namek's views"):
        storage.url(name)
    storage.delete_tree("screenshots/1")
    assert not storage.exists(name)
