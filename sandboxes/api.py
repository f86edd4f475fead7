"""The JSON API. Every answer, errors included, is JSON.

Authentication: ``Authorization: Bearer <token>`` (no CSRF) or the session cookie
(writes need the CSRF header, as Django forms do).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Collection
from typing import Any

from asgiref.sync import sync_to_async
from django.core.files.storage import default_storage
from django.http import FileResponse, HttpRequest, HttpResponse, JsonResponse
from django.middleware.csrf import CsrfViewMiddleware
from django.views.decorators.csrf import csrf_exempt

from namek_web.errors import json_error
from sandboxes import control, events, runs, services
from sandboxes.access import can_create, can_use, can_view, visible_sandboxes
from sandboxes.auth import authenticate_request
from sandboxes.backends.base import BackendError
from sandboxes.models import AgentRun, Event, Phase, Sandbox

log = logging.getLogger(__name__)
MAX_BODY = 16 * 1024
CREATE_FIELDS = {"name", "screen"}
NOTE_FIELDS = {"text", "data"}
RUN_FIELDS = {"task", "script", "demo"}
EVENTS_LIMIT = 100
EVENTS_MAX_LIMIT = 1000


View = Callable[..., HttpResponse]


def _admit(request: HttpRequest, methods: tuple[str, ...]) -> HttpResponse | None:
    """The method, the credentials and (for a session's writes) CSRF; sets request.user.
    Returns the error response, or None."""
    if request.method not in methods:
        response = json_error(405, f"method not allowed; use {' or '.join(methods)}")
        response["Allow"] = ", ".join(methods)
        return response
    user, method = authenticate_request(request)
    if method is None:
        return json_error(401, "authentication required: log in, or send Authorization: Bearer <token>")
    if method == "session" and request.method not in ("GET", "HEAD", "OPTIONS"):
        refused = CsrfViewMiddleware(lambda r: HttpResponse()).process_view(request, None, (), {})
        if refused is not None:
            return refused
    request.user = user
    return None


def api_view(methods: tuple[str, ...]) -> Callable[[View], View]:
    def decorate(view: View) -> View:
        @csrf_exempt
        @functools.wraps(view)
        def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:  # noqa: PLR0911 - one per error
            refused = _admit(request, methods)
            if refused is not None:
                return refused
            try:
                return view(request, *args, **kwargs)
            except (services.SandboxRequestError, BadBody) as exc:
                return json_error(400, str(exc))
            except (services.SandboxStateError, runs.RunStateError) as exc:
                return json_error(409, str(exc))
            except runs.RunRequestError as exc:
                return json_error(400, str(exc))
            except services.LimitReached as exc:
                return json_error(exc.status, str(exc), limit=exc.limit)
            except BackendError as exc:
                return json_error(503 if exc.retryable else 502, str(exc))
            except control.ControlError as exc:
                return json_error(exc.status, str(exc))

        return wrapper

    return decorate


class BadBody(ValueError):
    """A request body that is not a JSON object of the allowed fields (a 400)."""


def _json_body(request: HttpRequest, allowed: Collection[str], limit: int = MAX_BODY) -> dict[str, Any]:
    """The body as a JSON object (empty: {}) with no field outside ``allowed``."""
    if len(request.body) > limit:
        raise BadBody(f"body larger than {limit} bytes")
    if not request.body.strip():
        return {}
    try:
        body = json.loads(request.body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadBody(f"malformed JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadBody("expected a JSON object")
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise BadBody(f"unknown fields: {', '.join(unknown)}; allowed: {', '.join(sorted(allowed)) or 'none'}")
    return body


def _find(request: HttpRequest, sandbox_id: int) -> Sandbox | HttpResponse:
    sandbox = Sandbox.objects.select_related("owner", "lease__user", "lease__run").filter(pk=sandbox_id).first()
    if sandbox is None:
        return json_error(404, f"no sandbox {sandbox_id}")
    if not can_view(request.user, sandbox):
        return json_error(403, "not allowed")
    return sandbox


@api_view(("GET", "POST"))
def sandboxes(request: HttpRequest) -> HttpResponse:
    if request.method == "GET":
        show_all = request.GET.get("all") in ("1", "true", "yes")
        found = visible_sandboxes(request.user)
        if not show_all:
            found = found.exclude(phase=Phase.STOPPED)
        return JsonResponse({"sandboxes": [services.sandbox_json(s) for s in found]})
    if not can_create(request.user):
        return json_error(403, "viewers may not create sandboxes")
    body = _json_body(request, CREATE_FIELDS)
    sandbox = services.create_sandbox(request.user, body.get("name"), body.get("screen"))
    return JsonResponse(services.sandbox_json(sandbox), status=201)


@api_view(("GET", "DELETE"))
def sandbox_detail(request: HttpRequest, sandbox_id: int) -> HttpResponse:
    found = _find(request, sandbox_id)
    if isinstance(found, HttpResponse):
        return found
    if request.method == "DELETE":
        if not can_use(request.user, found):
            return json_error(403, "not allowed")
        found = services.delete_sandbox(found, by=request.user.get_username())
    return JsonResponse(services.sandbox_json(found))


@api_view(("POST",))
def restart_browser(request: HttpRequest, sandbox_id: int) -> HttpResponse:
    found = _find(request, sandbox_id)
    if isinstance(found, HttpResponse):
        return found
    if not can_use(request.user, found):
        return json_error(403, "not allowed")
    found = services.restart_browser(found, request.user.get_username())
    return JsonResponse(services.sandbox_json(found))


@api_view(("GET", "POST"))
def sandbox_events(request: HttpRequest, sandbox_id: int) -> HttpResponse:
    """GET: the log after ``after``, oldest first. POST: add a note (``person.note``)."""
    found = _find(request, sandbox_id)
    if isinstance(found, HttpResponse):
        return found
    try:
        if request.method == "GET":
            return _list_events(request, found)
        if not can_use(request.user, found):
            return json_error(403, "not allowed")
        return _add_note(request, found)
    except ValueError as exc:  # EventError is one
        return json_error(400, str(exc))


def _list_events(request: HttpRequest, sandbox: Sandbox) -> HttpResponse:
    after = events.parse_seq(request.GET.get("after"), "after", 0)
    limit = events.parse_seq(request.GET.get("limit"), "limit", EVENTS_LIMIT)
    if not 1 <= limit <= EVENTS_MAX_LIMIT:
        raise ValueError(f"limit: must be from 1 to {EVENTS_MAX_LIMIT}, not {limit}")
    page = events.events_after(sandbox.pk, after, limit)
    return JsonResponse({"events": page, "next_after": page[-1]["seq"] if page else after})


def _add_note(request: HttpRequest, sandbox: Sandbox) -> HttpResponse:
    body = _json_body(request, NOTE_FIELDS)
    text = body.get("text")
    if not isinstance(text, str) or not text.strip():
        raise ValueError("text: a non-empty string is required")
    event = events.record(sandbox.pk, "person.note", text, data=body.get("data", {}), actor=request.user.get_username())
    return JsonResponse(event, status=201)


@api_view(("GET",))
def event_image(request: HttpRequest, sandbox_id: int, seq: int, which: str) -> HttpResponse:
    """An event's screenshot or its thumbnail, for those who may see the sandbox."""
    found = _find(request, sandbox_id)
    if isinstance(found, HttpResponse):
        return found
    event = Event.objects.filter(sandbox=found, seq=seq).first()
    if event is None:
        return json_error(404, f"sandbox {sandbox_id} has no event {seq}")
    name = event.screenshot if which == "screenshot" else event.thumbnail
    if not name:
        return json_error(404, f"event {seq} has no {which}")
    try:
        handle = default_storage.open(name, "rb")
    except OSError:
        return json_error(404, f"the {which} of event {seq} is gone")
    content_type = "image/png" if name.endswith(".png") else "image/jpeg"
    response = FileResponse(handle, content_type=content_type)
    response["Cache-Control"] = "private, max-age=86400, immutable"
    response["X-Content-Type-Options"] = "nosniff"
    return response


@api_view(("GET", "POST"))
def sandbox_runs(request: HttpRequest, sandbox_id: int) -> HttpResponse:
    """GET: the sandbox's runs, newest first. POST: start one."""
    found = _find(request, sandbox_id)
    if isinstance(found, HttpResponse):
        return found
    if request.method == "GET":
        return JsonResponse({"runs": [runs.run_json(r) for r in found.runs.select_related("started_by")[:100]]})
    if not can_use(request.user, found):
        return json_error(403, "not allowed")
    body = _json_body(request, RUN_FIELDS, runs.MAX_SCRIPT + MAX_BODY)
    run = runs.start_run(found, request.user, body.get("task"), body.get("script"), body.get("demo"))
    return JsonResponse(runs.run_json(run), status=201)


def _find_run(request: HttpRequest, run_id: int) -> AgentRun | HttpResponse:
    run = AgentRun.objects.select_related("sandbox", "started_by").filter(pk=run_id).first()
    if run is None:
        return json_error(404, f"no run {run_id}")
    if not can_view(request.user, run.sandbox):
        return json_error(403, "not allowed")
    if request.method != "GET" and not can_use(request.user, run.sandbox):
        return json_error(403, "not allowed")
    return run


@api_view(("GET",))
def run_detail(request: HttpRequest, run_id: int) -> HttpResponse:
    found = _find_run(request, run_id)
    return found if isinstance(found, HttpResponse) else JsonResponse(runs.run_json(found))


@api_view(("POST",))
def run_command(request: HttpRequest, run_id: int, command: str) -> HttpResponse:
    """stop, pause, resume (``{"note": str}``) a run's agent."""
    found = _find_run(request, run_id)
    if isinstance(found, HttpResponse):
        return found
    body = _json_body(request, {"note"} if command == "resume" else ())
    if command == "stop":
        found = runs.stop(found, request.user.get_username())
    elif command == "pause":
        runs.pause(found)
    else:
        runs.resume(found, request.user, body.get("note", ""))
    found.refresh_from_db()
    return JsonResponse(runs.run_json(found))


@api_view(("GET",))
def sandbox_control(request: HttpRequest, sandbox_id: int) -> HttpResponse:
    """Who drives the sandbox, and what the caller may do about it."""
    found = _find(request, sandbox_id)
    if isinstance(found, HttpResponse):
        return found
    if control.expire_lapsed():
        found.refresh_from_db()
    return JsonResponse(control.state_json(control.lease_of(found.pk), request.user))


def _takeover_request(request: HttpRequest, sandbox_id: int) -> HttpResponse | Sandbox:
    refused = _admit(request, ("POST",))
    if refused is not None:
        return refused
    try:
        _json_body(request, ())
    except BadBody as exc:
        return json_error(400, str(exc))
    return _find(request, sandbox_id)


@csrf_exempt
async def takeover(request: HttpRequest, sandbox_id: int) -> HttpResponse:
    """Take control: answers once the agent has paused (or did not in time) and the
    caller's connections are interactive; 409 while someone else drives."""
    found = await sync_to_async(_takeover_request)(request, sandbox_id)
    if isinstance(found, HttpResponse):
        return found
    try:
        state = await control.take_over(found.pk, request.user)
    except control.ControlError as exc:
        return json_error(exc.status, str(exc))
    return JsonResponse(state)


@api_view(("POST",))
def handback(request: HttpRequest, sandbox_id: int) -> HttpResponse:
    """Hand control back (``{"note": str}`` optional): the agent resumes with the note."""
    found = _find(request, sandbox_id)
    if isinstance(found, HttpResponse):
        return found
    body = _json_body(request, {"note"})
    lease = control.lease_of(found.pk)
    if lease.holder != "person":
        return json_error(409, "nobody holds control")
    if not isinstance(body.get("note", ""), str):
        return json_error(400, "note: must be a string")
    image = control.screenshot_now(found.pk)
    control.release(found.pk, request.user, body.get("note", ""), screenshot=image)
    return JsonResponse(control.state_json(control.lease_of(found.pk), request.user))


@csrf_exempt
def api_not_found(request: HttpRequest, rest: str = "") -> HttpResponse:
    return json_error(404, f"no API route {request.path}")
