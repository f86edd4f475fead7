"""Start Namek: the sandbox supervisor and Daphne, until Ctrl-C (what ``make run`` runs)."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from namek_web.serve import daphne_command
from sandboxes.backends.base import BackendError
from sandboxes.backends.local import LocalBackend

MANAGE = str(Path(settings.BASE_DIR) / "manage.py")


class Command(BaseCommand):
    help = "Run Namek (supervisor + Daphne on NAMEK_BIND); creates an admin account on first run."

    def handle(self, *args: Any, **options: Any) -> None:
        login = self.ensure_admin()
        children: list[subprocess.Popen[bytes]] = []
        stopping = False

        def stop(signum: int, frame: Any) -> None:
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
        try:
            if settings.NAMEK_BACKEND == "local":
                children.append(subprocess.Popen([sys.executable, MANAGE, "namek_supervisor"]))
                self.wait_for_supervisor(children[0])
            children.append(subprocess.Popen(daphne_command(settings.BIND_HOST, settings.BIND_PORT)))
            url = f"http://{settings.NAMEK_BIND}/"
            self.stdout.write(self.style.SUCCESS(f"\nNamek is up: open {url}\n{login}\nStop it with Ctrl-C.\n"))
            while not stopping and all(child.poll() is None for child in children):
                time.sleep(0.2)
        finally:
            for child in reversed(children):
                if child.poll() is None:
                    child.send_signal(signal.SIGTERM)
            for child in reversed(children):
                try:
                    child.wait(15)
                except subprocess.TimeoutExpired:
                    child.kill()
        failed = [c for c in children if c.returncode not in (0, -signal.SIGTERM, -signal.SIGINT)]
        if failed and not stopping:
            raise CommandError(f"stopped: {' '.join(map(str, failed[0].args[1:3]))} exited unexpectedly")

    def wait_for_supervisor(self, process: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise CommandError("the sandbox supervisor did not start (see above)")
            try:
                LocalBackend(timeout=2).ping()
                return
            except BackendError:
                time.sleep(0.1)
        raise CommandError("the sandbox supervisor did not answer within 30 s")

    def ensure_admin(self) -> str:
        users = get_user_model().objects
        path = Path(settings.DATA_DIR) / "admin-password"
        if users.filter(is_superuser=True).exists():
            if path.exists():
                return f"Log in as admin; the password is in {path}."
            return "Log in with your superuser account."
        password = os.environ.get("NAMEK_ADMIN_PASSWORD") or secrets.token_urlsafe(12)
        users.create_superuser("admin", "", password)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(password + "\n")
        return f"Created the account admin with password {password} (also kept in {path})."
