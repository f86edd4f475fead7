"""Give a user a role: ``manage.py namek_role <username> operator|viewer|none``."""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.core.management.base import BaseCommand, CommandError, CommandParser

from sandboxes.access import ROLE_GROUPS


class Command(BaseCommand):
    help = "Put a user in the operator or viewer group (none: neither). Staff are admins anyway."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")
        parser.add_argument("role", choices=[*ROLE_GROUPS, "none"])

    def handle(self, *args: Any, **options: Any) -> None:
        user = get_user_model().objects.filter(username=options["username"]).first()
        if user is None:
            raise CommandError(f"no user named {options['username']!r}")
        user.groups.remove(*Group.objects.filter(name__in=ROLE_GROUPS))
        role = options["role"]
        if role != "none":
            user.groups.add(Group.objects.get_or_create(name=role)[0])
        note = " (staff: may do everything whatever the group)" if user.is_staff or user.is_superuser else ""
        self.stdout.write(f"{user.get_username()}: {role}{note}")
