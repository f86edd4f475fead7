"""The small named cast of users every test uses: an owner, an outsider, a staff member,
an operator and a viewer (the role groups of ``sandboxes.access``)."""

from __future__ import annotations

import json
from typing import Any

PASSWORD = "correct horse battery staple"
NAMES = ("owner", "outsider", "staff", "operator", "viewer")


def create() -> dict[str, Any]:
    from django.contrib.auth import get_user_model
    from django.contrib.auth.models import Group

    from sandboxes.models import ApiToken

    users = get_user_model().objects
    cast: dict[str, Any] = {"password": PASSWORD, "tokens": {}, "ids": {}}
    for name in NAMES:
        user = users.create_user(name, f"{name}@example.test", PASSWORD, is_staff=name == "staff")
        if name in ("operator", "viewer"):
            user.groups.add(Group.objects.get_or_create(name=name)[0])
        cast["tokens"][name] = ApiToken.issue(user, "tests")[1]
        cast["ids"][name] = user.pk
    return cast


def print_cast() -> None:
    """For ``manage.py shell -c`` in a live server's data dir."""
    print("CAST " + json.dumps(create()))
