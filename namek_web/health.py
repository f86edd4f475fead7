"""Probes for load balancers and orchestrators; no login, JSON only.

``GET /healthz``: the process answers (touches nothing, not even the database).
``GET /readyz``: the database, the channel layer and the sandbox backend answer; 503 with
the reason of each failing check otherwise. Reasons never carry credentials.
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import Callable
from typing import Any

from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from namek_web.errors import json_error
from sandboxes.backends import get_backend

log = logging.getLogger(__name__)

#: seconds each readiness check may take before it counts as failed
CHECK_TIMEOUT = 5.0
CHANNEL_TIMEOUT = 2.0
MAX_REASON = 300
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s]+@", re.IGNORECASE)


def _method_not_allowed() -> HttpResponse:
    response = json_error(405, "method not allowed; use GET")
    response["Allow"] = "GET"
    return response


@csrf_exempt
def healthz(request: HttpRequest) -> HttpResponse:
    if request.method != "GET":
        return _method_not_allowed()
    return JsonResponse({"status": "ok"})


def _secrets() -> list[str]:
    found = [settings.SECRET_KEY]
    for database in settings.DATABASES.values():
        found.append(str(database.get("PASSWORD") or ""))
    for layer in getattr(settings, "CHANNEL_LAYERS", {}).values():
        for host in layer.get("CONFIG", {}).get("hosts", ()):
            found.append(str(host.get("password") or "") if isinstance(host, dict) else str(host))
    return [secret for secret in found if len(secret) >= 4]


def redact(text: str) -> str:
    """An error's text without credentials: no ``user:password@`` in URLs, no known secret."""
    text = _URL_CREDENTIALS.sub(r"\g<scheme>***@", text)
    for secret in _secrets():
        text = text.replace(secret, "***")
    text = " ".join(text.split())
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 1] + "…"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    return redact(str(exc)) or type(exc).__name__


def _check_database() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        if cursor.fetchone() != (1,):
            raise RuntimeError("SELECT 1 did not answer 1")


def _check_backend() -> None:
    get_backend().check()


async def _in_thread(check: Callable[[], None], *, thread_sensitive: bool) -> None:
    # The database check runs in Django's one sync thread, which owns (and closes) its
    # connections; the backend's check in a thread of its own, so that it blocks nothing.
    await asyncio.wait_for(sync_to_async(check, thread_sensitive=thread_sensitive)(), CHECK_TIMEOUT)


async def _check_channel_layer() -> None:
    layer = get_channel_layer()
    if layer is None:
        raise RuntimeError("no channel layer configured")
    channel = await layer.new_channel()
    nonce = uuid.uuid4().hex
    await asyncio.wait_for(layer.send(channel, {"type": "readyz.ping", "nonce": nonce}), CHANNEL_TIMEOUT)
    message = await asyncio.wait_for(layer.receive(channel), CHANNEL_TIMEOUT)
    if message.get("nonce") != nonce:
        raise RuntimeError("a different message came back")


async def _run(name: str, check: Any) -> tuple[str, str]:
    try:
        await check
    except Exception as exc:  # every failure is a reason, never a 500
        log.warning("readiness check %s failed: %s", name, exc, exc_info=not isinstance(exc, TimeoutError))
        return name, _reason(exc)
    return name, "ok"


async def readiness() -> dict[str, Any]:
    """``{"status": "ready" | "not ready", "checks": {name: "ok" | reason}}``."""
    results = await asyncio.gather(
        _run("database", _in_thread(_check_database, thread_sensitive=True)),
        _run("channel_layer", _check_channel_layer()),
        _run("backend", _in_thread(_check_backend, thread_sensitive=False)),
    )
    checks = dict(results)
    return {"status": "ready" if all(v == "ok" for v in checks.values()) else "not ready", "checks": checks}


@csrf_exempt
async def readyz(request: HttpRequest) -> HttpResponse:
    if request.method != "GET":
        return _method_not_allowed()
    answer = await readiness()
    return JsonResponse(answer, status=200 if answer["status"] == "ready" else 503)
