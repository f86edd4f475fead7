"""Delete the rows of sandboxes that ended long ago: ``manage.py namek_prune [--days N] [--dry-run]``.

Only stopped and failed sandboxes go, once they have been so for more than N days
(default NAMEK_RETENTION_DAYS): a stopped one counts from ``stopped_at``, a failed one
from ``stopped_at`` or, without it, from its last change (``updated_at``). Live sandboxes
are never touched. Their events go with them, screenshots included. The supervisor
removes a sandbox's directory when it stops; one that is still there for a pruned row is
removed too.
"""

from __future__ import annotations

import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db.models import QuerySet
from django.db.models.functions import Coalesce
from django.utils import timezone

from sandboxes.events import delete_screenshots
from sandboxes.models import AgentRun, Phase, Sandbox

ENDED_PHASES = (Phase.STOPPED, Phase.FAILED)


def prunable(days: int, now: Any = None) -> QuerySet[Sandbox]:
    cutoff = (now or timezone.now()) - timedelta(days=days)
    return (
        Sandbox.objects.filter(phase__in=ENDED_PHASES)
        .alias(ended_at=Coalesce("stopped_at", "updated_at"))
        .filter(ended_at__lt=cutoff)
    )


def _positive_days(value: str) -> int:
    try:
        days = int(value)
    except ValueError:
        raise CommandError(f"--days: {value!r} is not a whole number of days") from None
    if days < 1:
        raise CommandError(f"--days: must be at least 1, not {days}")
    return days


class Command(BaseCommand):
    help = "Delete rows of sandboxes stopped or failed more than --days ago (default NAMEK_RETENTION_DAYS)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--days",
            type=str,
            default=None,
            help=f"keep sandboxes that ended less than this many days ago (default {settings.NAMEK_RETENTION_DAYS})",
        )
        parser.add_argument("--dry-run", action="store_true", help="only say what would be deleted")

    def handle(self, *args: Any, **options: Any) -> None:
        days = settings.NAMEK_RETENTION_DAYS if options["days"] is None else _positive_days(str(options["days"]))
        ids = sorted(prunable(days).values_list("pk", flat=True))
        listed = f": {', '.join(map(str, ids[:50]))}{', …' if len(ids) > 50 else ''}" if ids else ""
        if options["dry_run"]:
            self.stdout.write(f"would prune {len(ids)} sandboxes ended more than {days} days ago{listed}")
            return
        # Their runs' directories (runner logs, screen recordings) go with them.
        run_ids = dict(AgentRun.objects.filter(sandbox_id__in=ids).values_list("pk", "sandbox_id"))
        # Deleting by id and phase again: a row that changed meanwhile is left alone.
        _total, per_model = Sandbox.objects.filter(pk__in=ids, phase__in=ENDED_PHASES).delete()
        deleted = per_model.get(Sandbox._meta.label, 0)
        self.stdout.write(f"pruned {deleted} sandboxes ended more than {days} days ago{listed}")
        kept = set(Sandbox.objects.filter(pk__in=ids).values_list("pk", flat=True))
        for run_id, sandbox_id in sorted(run_ids.items()):
            if sandbox_id not in kept:
                self._remove_directory(Path(settings.DATA_DIR) / "runs" / str(run_id))
        for sandbox_id in sorted(set(ids) - kept):
            self._remove_directory(Path(settings.DATA_DIR) / "sandboxes" / str(sandbox_id))
            try:
                delete_screenshots(sandbox_id)
            except OSError as exc:
                self.stderr.write(f"could not remove the screenshots of sandbox {sandbox_id}: {exc}")

    def _remove_directory(self, path: Path) -> None:
        if path.is_symlink() or not path.is_dir():
            return
        try:
            shutil.rmtree(path)
        except OSError as exc:
            self.stderr.write(f"could not remove {path}: {exc}")
        else:
            self.stdout.write(f"removed the leftover directory {path}")
