"""Create, list and revoke API tokens: ``manage.py namek_token <username>`` prints a new one."""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from sandboxes.models import ApiToken


class Command(BaseCommand):
    help = "Create an API token for a user (printed once), or --list / --revoke ID."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")
        parser.add_argument("--name", default="", help="a label for the token")
        parser.add_argument("--list", action="store_true", help="list the user's tokens")
        parser.add_argument("--revoke", type=int, metavar="ID", help="revoke the token with this id")

    def handle(self, *args: Any, **options: Any) -> None:
        user = get_user_model().objects.filter(username=options["username"]).first()
        if user is None:
            raise CommandError(f"no user named {options['username']!r}")
        tokens = ApiToken.objects.filter(user=user)
        if options["list"]:
            for token in tokens.order_by("pk"):
                state = f"revoked {token.revoked_at:%Y-%m-%d %H:%M}" if token.revoked_at else "active"
                self.stdout.write(f"{token.pk}\t{token.name or '-'}\t{token.created_at:%Y-%m-%d %H:%M}\t{state}")
            return
        if options["revoke"] is not None:
            if not tokens.filter(pk=options["revoke"], revoked_at__isnull=True).update(revoked_at=timezone.now()):
                raise CommandError(f"{user.username} has no active token {options['revoke']}")
            self.stdout.write(f"revoked token {options['revoke']}")
            return
        _record, token = ApiToken.issue(user, options["name"])
        self.stdout.write(token)
