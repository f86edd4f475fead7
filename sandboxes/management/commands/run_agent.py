"""``manage.py run_agent <sandbox-id> --task "..." [--script FILE | --demo NAME] [--detach]``

Creates a run and its token and launches the runner (through the sandbox's backend, as
the API does), then follows the run's events until it ends; Ctrl-C stops the run. With
``--detach`` it returns once the runner is launched. Exit status: 0 done, 1 failed.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from sandboxes import runs
from sandboxes.backends.base import BackendError
from sandboxes.models import Event, RunStatus, Sandbox


class Command(BaseCommand):
    help = "Start an agent on a sandbox and follow it (Ctrl-C stops it)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("sandbox", type=int, help="the sandbox's id")
        parser.add_argument("--task", help="what the agent should do (default: the step file's task)")
        source = parser.add_mutually_exclusive_group()
        source.add_argument("--script", type=Path, help="a step file for the scripted model")
        source.add_argument("--demo", help=f"a built-in demo: {', '.join(runs.demos())}")
        parser.add_argument("--detach", action="store_true", help="return once the runner is launched")

    def handle(self, *args: Any, **options: Any) -> None:
        sandbox = Sandbox.objects.select_related("owner").filter(pk=options["sandbox"]).first()
        if sandbox is None:
            raise CommandError(f"no sandbox {options['sandbox']}")
        script = None
        if options["script"] is not None:
            try:
                script = options["script"].read_text()
            except (OSError, UnicodeDecodeError) as exc:
                raise CommandError(f"--script: cannot read {options['script']}: {exc}") from None
        try:
            run = runs.start_run(sandbox, sandbox.owner, options["task"], script, options["demo"])
        except (runs.RunRequestError, runs.RunStateError, BackendError) as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(f"run #{run.pk} started on sandbox {sandbox.pk} ({sandbox.name})")
        if options["detach"]:
            return
        seen = sandbox.event_seq
        try:
            while True:
                for event in Event.objects.filter(sandbox=sandbox, seq__gt=seen, kind__startswith="agent."):
                    self.stdout.write(f"{event.at:%H:%M:%S} {event.kind:<14} {event.text}")
                    seen = event.seq
                run.refresh_from_db()
                if not run.is_active:
                    break
                time.sleep(0.5)
        except KeyboardInterrupt:
            runs.stop(run, "run_agent (Ctrl-C)")
            run.refresh_from_db()
        self.stdout.write(f"run #{run.pk}: {run.status} {run.result or run.error}")
        if run.status != RunStatus.DONE:
            raise SystemExit(1)
