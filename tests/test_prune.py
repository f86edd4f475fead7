"""manage.py namek_prune: rows of sandboxes that ended long ago go; live and recent ones stay."""

from __future__ import annotations

from datetime import timedelta
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from sandboxes.models import Sandbox

pytestmark = pytest.mark.django_db

DAY = timedelta(days=1)


def prune(*args: str) -> str:
    out = StringIO()
    call_command("namek_prune", *args, stdout=out, stderr=out)
    return out.getvalue()


@pytest.fixture
def aged(make_sandbox) -> Any:  # type: ignore[no-untyped-def]
    """A sandbox in ``phase`` whose timestamps are set as if it ended ``ago`` (update() skips auto_now)."""

    def make(phase: str, ago: timedelta, *, stopped_at: bool = True, name: str = "") -> Sandbox:
        box = make_sandbox(phase=phase, name=name or f"{phase}-{ago.days}d")
        when = timezone.now() - ago
        Sandbox.objects.filter(pk=box.pk).update(updated_at=when, stopped_at=when if stopped_at else None)
        return box

    return make


@pytest.fixture
def data_dir(settings: Any, tmp_path: Path) -> Path:
    settings.DATA_DIR = tmp_path
    return tmp_path


def leftover_dir(data_dir: Path, box: Sandbox) -> Path:
    path = data_dir / "sandboxes" / str(box.pk)
    (path / "home").mkdir(parents=True)
    (path / "home" / "notes.txt").write_text("left behind")
    return path


def test_old_stopped_and_failed_rows_go_live_and_recent_ones_stay(aged, data_dir: Path, settings: Any) -> None:
    settings.NAMEK_RETENTION_DAYS = 30
    old_stopped = aged("stopped", 40 * DAY)
    old_failed = aged("failed", 40 * DAY, stopped_at=False)  # counts from updated_at
    recent_stopped = aged("stopped", 10 * DAY)
    recent_failed = aged("failed", 29 * DAY, stopped_at=False)
    # A failed row stopped long ago but changed since: stopped_at decides.
    failed_stopped_long_ago = aged("failed", 40 * DAY)
    Sandbox.objects.filter(pk=failed_stopped_long_ago.pk).update(updated_at=timezone.now())
    live = [aged(phase, 400 * DAY) for phase in ("pending", "starting", "ready", "stopping")]
    gone_dir = leftover_dir(data_dir, old_stopped)
    kept_dir = leftover_dir(data_dir, recent_stopped)

    out = prune()

    assert "pruned 3 sandboxes ended more than 30 days ago" in out
    remaining = set(Sandbox.objects.values_list("pk", flat=True))
    assert remaining == {recent_stopped.pk, recent_failed.pk, *(box.pk for box in live)}
    assert not gone_dir.exists()
    assert f"removed the leftover directory {gone_dir}" in out
    assert kept_dir.exists() and (kept_dir / "home" / "notes.txt").read_text() == "left behind"
    assert not Sandbox.objects.filter(pk__in=[old_failed.pk, failed_stopped_long_ago.pk]).exists()

    # Nothing left to do: a second run deletes nothing.
    assert "pruned 0 sandboxes" in prune()


def test_days_overrides_the_retention_setting(aged, data_dir: Path, settings: Any) -> None:
    settings.NAMEK_RETENTION_DAYS = 60
    old = aged("stopped", 40 * DAY)
    recent = aged("failed", 3 * DAY)
    assert "pruned 0 sandboxes ended more than 60 days ago" in prune()
    assert "pruned 1 sandboxes ended more than 30 days ago" in prune("--days", "30")
    assert set(Sandbox.objects.values_list("pk", flat=True)) == {recent.pk}
    assert "pruned 1 sandboxes ended more than 2 days ago" in prune("--days=2")
    assert not Sandbox.objects.exists()
    assert old.pk != recent.pk


def test_dry_run_changes_nothing(aged, data_dir: Path) -> None:
    old = aged("stopped", 40 * DAY)
    failed = aged("failed", 50 * DAY, stopped_at=False)
    aged("ready", 90 * DAY)
    directory = leftover_dir(data_dir, old)
    before = list(Sandbox.objects.order_by("pk").values())

    out = prune("--days", "30", "--dry-run")

    assert f"would prune 2 sandboxes ended more than 30 days ago: {old.pk}, {failed.pk}" in out
    assert list(Sandbox.objects.order_by("pk").values()) == before
    assert directory.exists()


@pytest.mark.parametrize("days", ["0", "-1", "-30", "abc", "1.5", ""])
def test_bad_days_are_refused(aged, data_dir: Path, days: str) -> None:
    aged("stopped", 400 * DAY)
    with pytest.raises(CommandError, match="--days"):
        prune(f"--days={days}")
    assert Sandbox.objects.count() == 1


def test_a_directory_that_cannot_be_removed_is_reported_and_the_row_goes_anyway(
    aged, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    old = aged("stopped", 40 * DAY)
    directory = leftover_dir(data_dir, old)

    def refuse(path: Any, *args: Any, **kwargs: Any) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(shutil, "rmtree", refuse)
    out = prune("--days", "30")
    assert "pruned 1 sandboxes" in out
    assert f"could not remove {directory}" in out
    assert not Sandbox.objects.filter(pk=old.pk).exists()


def test_a_symlink_in_place_of_a_directory_is_left_alone(aged, data_dir: Path, tmp_path_factory: Any) -> None:
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    (elsewhere / "precious.txt").write_text("keep me")
    old = aged("stopped", 40 * DAY)
    (data_dir / "sandboxes").mkdir()
    (data_dir / "sandboxes" / str(old.pk)).symlink_to(elsewhere, target_is_directory=True)
    prune("--days", "30")
    assert (elsewhere / "precious.txt").read_text() == "keep me"


def test_the_runs_of_a_pruned_sandbox_lose_their_logs_and_recordings(aged, data_dir: Path, cast: dict) -> None:
    from sandboxes.models import AgentRun

    old, recent = aged("stopped", 40 * DAY), aged("stopped", 2 * DAY)
    directories = {}
    for box in (old, recent):
        run = AgentRun.objects.create(sandbox=box, task="t", token_digest=f"d{box.pk}", status="done")
        directories[box.pk] = data_dir / "runs" / str(run.pk)
        directories[box.pk].mkdir(parents=True)
        (directories[box.pk] / "screen.webm").write_bytes(b"\x1aE\xdf\xa3")
    prune("--days", "30")
    assert not directories[old.pk].exists()
    assert (directories[recent.pk] / "screen.webm").exists()
