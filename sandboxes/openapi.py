"""The API described by hand as OpenAPI 3.0.3, and the two views that publish it.

``GET /api/openapi.json`` serves the document and ``GET /api/docs`` a page rendered from
it on the server (no script, no external assets). Both are documentation and need no
login. ``tests/test_openapi.py`` checks that the document is valid, that it names every
route under ``/api/`` and no other, and fuzzes a live Namek from it with schemathesis.
"""

from __future__ import annotations

import json
import re
import shlex
from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.utils.html import escape
from django.utils.safestring import SafeString, mark_safe
from django.views.decorators.csrf import csrf_exempt

from namek_web.errors import json_error
from sandboxes import events, sharing
from sandboxes.models import Phase, Source

OPENAPI_VERSION = "3.0.3"
SCREEN_PATTERN = r"^\d{3,4}x\d{3,4}$"
INT64_MAX = 2**63 - 1
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")

READ_SECURITY: list[dict[str, list[str]]] = [{"bearerAuth": []}, {"sessionCookie": []}]
WRITE_SECURITY: list[dict[str, list[str]]] = [{"bearerAuth": []}, {"sessionCookie": [], "csrfHeader": []}]
PUBLIC: list[dict[str, list[str]]] = []

DESCRIPTION = """\
Namek runs AI agents' browsers in isolated sandboxes. This API creates, lists, stops and
inspects them.

**Authentication.** Send `Authorization: Bearer <token>`; a user's token is printed once by
`manage.py namek_token <username>`. A logged-in browser may use its session cookie instead;
then every write (POST, DELETE) also needs the `X-CSRFToken` header holding the `csrftoken`
cookie's value. Staff and superusers see and do everything; any other user sees and uses
their own sandboxes.

**Errors.** Every answer, errors included, is JSON. Errors are `{"error": "..."}`; the
answers to a cap (429, 503) add `"limit"`. A method a path does not offer answers 405 with
an `Allow` header; a path under `/api/` that does not exist answers 404.

This document (`/api/openapi.json`), the page `/api/docs` and the probes `/healthz` and
`/readyz` need no login.
"""


def _ref(kind: str, name: str) -> dict[str, str]:
    return {"$ref": f"#/components/{kind}/{name}"}


def _json_content(schema: dict[str, Any], example: Any = None) -> dict[str, Any]:
    media: dict[str, Any] = {"schema": schema}
    if example is not None:
        media["example"] = example
    return {"application/json": media}


SANDBOX_EXAMPLE: dict[str, Any] = {
    "id": 7,
    "name": "checkout-flow",
    "owner": "alice",
    "backend": "local",
    "screen": "1280x800",
    "phase": "ready",
    "failure_reason": "",
    "browser_restarts": 0,
    "last_browser_exit": "",
    "banner_color": "#3a86ff",
    "created_at": "2025-05-01T09:30:00.125000+00:00",
    "updated_at": "2025-05-01T09:30:04.500000+00:00",
    "ready_at": "2025-05-01T09:30:04.500000+00:00",
    "stopped_at": None,
    "last_event_seq": 3,
    "url": "/sandboxes/7/",
    "screen_ws": "/ws/sandboxes/7/screen/",
    "control": {
        "state": "agent",
        "label": "Agent driving",
        "user": None,
        "run": {"id": 3, "status": "running"},
        "since": "2025-05-01T09:31:00.250000+00:00",
    },
}

EVENT_EXAMPLE: dict[str, Any] = {
    "sandbox": 7,
    "seq": 2,
    "at": "2025-05-01T09:30:04.500000+00:00",
    "kind": "sandbox.ready",
    "source": "system",
    "actor": "namek",
    "text": "Ready after 4.38 s",
    "data": {"seconds": 4.38},
    "screenshot_url": None,
    "thumbnail_url": None,
}


RUN_EXAMPLE: dict[str, Any] = {
    "id": 3,
    "sandbox": 7,
    "task": "Request a quote for 20 desk lamps delivered express",
    "scripted": True,
    "model": "scripted",
    "started_by": "alice",
    "status": "running",
    "result": "",
    "error": "",
    "steps": 4,
    "created_at": "2025-05-01T09:31:00.000000+00:00",
    "started_at": "2025-05-01T09:31:01.200000+00:00",
    "ended_at": None,
    "exit_code": None,
}


def _components() -> dict[str, Any]:
    timestamp = {"type": "string", "format": "date-time"}
    sandbox = {
        "type": "object",
        "description": "A sandbox: a desktop with Chromium whose screen Namek relays.",
        "additionalProperties": False,
        "required": list(SANDBOX_EXAMPLE),
        "properties": {
            "id": {"type": "integer", "format": "int64", "minimum": 1},
            "name": {"type": "string", "maxLength": 64},
            "owner": {"type": "string", "description": "the owner's username"},
            "backend": {"type": "string", "description": "where it runs, e.g. `local`"},
            "screen": {"type": "string", "pattern": SCREEN_PATTERN, "description": "WIDTHxHEIGHT"},
            "phase": {
                "type": "string",
                "enum": [phase.value for phase in Phase],
                "description": "pending → starting → ready → stopping → stopped; failed when it could not "
                "start or died (a failed sandbox can still be deleted)",
            },
            "failure_reason": {"type": "string", "description": "why it failed or was stopped; empty otherwise"},
            "browser_restarts": {"type": "integer", "minimum": 0},
            "last_browser_exit": {"type": "string", "description": "why Chromium last had to be restarted"},
            "banner_color": {"type": "string", "pattern": "^#[0-9a-f]{6}$"},
            "created_at": timestamp,
            "updated_at": timestamp,
            "ready_at": {**timestamp, "nullable": True},
            "stopped_at": {**timestamp, "nullable": True},
            "last_event_seq": {
                "type": "integer",
                "format": "int64",
                "minimum": 0,
                "description": "the `seq` of its newest event (0: none yet)",
            },
            "url": {"type": "string", "description": "the sandbox's page in Namek (a path)"},
            "screen_ws": {"type": "string", "description": "the websocket path of its screen (RFB)"},
            "control": _ref("schemas", "ControlSummary"),
        },
        "example": SANDBOX_EXAMPLE,
    }
    control_states = {
        "type": "string",
        "enum": ["nobody", "agent", "paused", "pending", "person", "you"],
        "description": "who drives: nobody; the agent run; nobody while the run is paused; a person taking "
        "over (the agent is pausing); a person; `you` (only in GET control, for the holder)",
    }
    control_summary = {
        "type": "object",
        "description": "Who drives the sandbox (the control lease), as everyone may see it.",
        "additionalProperties": False,
        "required": ["state", "label", "user", "run", "since"],
        "properties": {
            "state": control_states,
            "label": {"type": "string", "description": "the banner, e.g. `Agent driving`, `alice is driving`"},
            "user": {"type": "string", "nullable": True, "description": "the person driving or taking over"},
            "run": {
                "type": "object",
                "nullable": True,
                "description": "the sandbox's active agent run",
                "additionalProperties": False,
                "required": ["id", "status"],
                "properties": {
                    "id": {"type": "integer", "format": "int64", "minimum": 1},
                    "status": {"type": "string", "enum": ["pending", "running", "paused"]},
                },
            },
            "since": {**timestamp, "nullable": True, "description": "when the lease last changed"},
        },
    }
    control = {
        **control_summary,
        "description": "The control lease as the caller sees it, with what they may do.",
        "required": [*control_summary["required"], "version", "may"],
        "properties": {
            **control_summary["properties"],
            "version": {"type": "integer", "format": "int64", "minimum": 0, "description": "grows with every change"},
            "span": {"type": "integer", "format": "int64", "description": "the current person's control span"},
            "may": {
                "type": "object",
                "additionalProperties": False,
                "required": ["take_over", "hand_back", "resume"],
                "properties": {
                    "take_over": {"type": "boolean"},
                    "hand_back": {"type": "boolean", "description": "the holder, or an admin (who releases)"},
                    "resume": {"type": "boolean", "description": "resume the paused agent (nobody drives)"},
                },
            },
        },
        "example": {
            "state": "you",
            "label": "You are driving",
            "user": "alice",
            "run": {"id": 3, "status": "paused"},
            "since": "2025-05-01T09:32:10.500000+00:00",
            "version": 4,
            "span": 2,
            "may": {"take_over": False, "hand_back": True, "resume": False},
        },
    }
    event = {
        "type": "object",
        "description": "One line of a sandbox's event log; the kinds and their `data` are listed in the README.",
        "additionalProperties": False,
        "required": list(EVENT_EXAMPLE),
        "properties": {
            "sandbox": {"type": "integer", "format": "int64", "minimum": 1},
            "seq": {"type": "integer", "format": "int64", "minimum": 1, "description": "1, 2, 3, ... per sandbox"},
            "at": timestamp,
            "kind": {"type": "string", "description": "e.g. `sandbox.ready`, `terminal.opened`, `person.note`"},
            "source": {"type": "string", "enum": list(Source.values)},
            "actor": {"type": "string", "description": "a username, an agent's name, or `namek`"},
            "text": {
                "type": "string",
                "maxLength": events.MAX_TEXT,
                "description": "plain text, for people (never markup)",
            },
            "data": {"type": "object", "description": "the kind's fields"},
            "screenshot_url": {"type": "string", "nullable": True, "description": "a path; null when none"},
            "thumbnail_url": {"type": "string", "nullable": True, "description": "a path; null when none"},
        },
        "example": EVENT_EXAMPLE,
    }
    error = {
        "type": "object",
        "additionalProperties": False,
        "required": ["error"],
        "properties": {
            "error": {"type": "string", "description": "what went wrong, for people"},
            "limit": {"type": "integer", "minimum": 1, "description": "the cap that was reached (429, 503)"},
        },
    }
    check = {"type": "string", "description": "`ok`, or why the check failed"}

    def error_response(description: str, example: str, limit: int | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"error": example}
        if limit is not None:
            body["limit"] = limit
        return {"description": description, "content": _json_content(_ref("schemas", "Error"), body)}

    method_not_allowed = error_response("The path does not offer this method.", "method not allowed; use GET or POST")
    method_not_allowed["headers"] = {
        "Allow": {"description": "the methods the path offers", "schema": {"type": "string"}},
    }
    return {
        "schemas": {
            "Sandbox": sandbox,
            "SandboxList": {
                "type": "object",
                "additionalProperties": False,
                "required": ["sandboxes"],
                "properties": {"sandboxes": {"type": "array", "items": _ref("schemas", "Sandbox")}},
            },
            "CreateSandbox": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "name": {
                        "type": "string",
                        "nullable": True,
                        "maxLength": 64,
                        "description": "at most 64 printable characters (surrounding spaces are dropped); "
                        "missing, null or empty: `sandbox-<id>`",
                    },
                    "screen": {
                        "type": "string",
                        "nullable": True,
                        "pattern": SCREEN_PATTERN,
                        "description": "WIDTHxHEIGHT from 320x200 to 3840x2160; missing or null: NAMEK_SCREEN_SIZE",
                    },
                },
                "example": {"name": "checkout-flow", "screen": "1280x800"},
            },
            "Event": event,
            "EventPage": {
                "type": "object",
                "additionalProperties": False,
                "required": ["events", "next_after"],
                "properties": {
                    "events": {"type": "array", "items": _ref("schemas", "Event")},
                    "next_after": {
                        "type": "integer",
                        "format": "int64",
                        "minimum": 0,
                        "description": "the `after` that asks for the next page (`after` itself when empty)",
                    },
                },
            },
            "CreateNote": {
                "type": "object",
                "additionalProperties": False,
                "required": ["text"],
                "properties": {
                    "text": {
                        "type": "string",
                        "minLength": 1,
                        "description": f"what to note (not only spaces); cut at {events.MAX_TEXT} characters",
                    },
                    "data": {
                        "type": "object",
                        "description": f"anything to keep with it, at most {events.MAX_DATA_BYTES} bytes as JSON",
                    },
                },
                "example": {"text": "the checkout page is slow again", "data": {"ticket": "OPS-42"}},
            },
            "Run": {
                "type": "object",
                "description": "An agent run: one agent driving one sandbox's browser.",
                "additionalProperties": False,
                "required": list(RUN_EXAMPLE),
                "properties": {
                    "id": {"type": "integer", "format": "int64", "minimum": 1},
                    "sandbox": {"type": "integer", "format": "int64", "minimum": 1},
                    "task": {"type": "string"},
                    "scripted": {"type": "boolean", "description": "a step file drives it, not an LLM"},
                    "model": {"type": "string", "description": "`scripted`, or the LLM's name"},
                    "started_by": {"type": "string", "nullable": True},
                    "status": {"type": "string", "enum": ["pending", "running", "paused", "done", "failed"]},
                    "result": {"type": "string", "description": "what the agent reported when done"},
                    "error": {"type": "string", "description": "why it failed (or who stopped it)"},
                    "steps": {"type": "integer", "minimum": 0},
                    "created_at": timestamp,
                    "started_at": {**timestamp, "nullable": True},
                    "ended_at": {**timestamp, "nullable": True},
                    "exit_code": {
                        "type": "integer",
                        "nullable": True,
                        "description": "the runner process's exit status (negative: killed by that signal)",
                    },
                },
                "example": RUN_EXAMPLE,
            },
            "RunList": {
                "type": "object",
                "additionalProperties": False,
                "required": ["runs"],
                "properties": {"runs": {"type": "array", "items": _ref("schemas", "Run")}},
            },
            "CreateRun": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "task": {
                        "type": "string",
                        "maxLength": 4000,
                        "description": "what the agent should do; with a script or demo it defaults to the file's task",
                    },
                    "script": {
                        "type": "string",
                        "description": "a step file (YAML or JSON) for the scripted model; without it an LLM must be "
                        "configured (else 400)",
                    },
                    "demo": {"type": "string", "description": "the name of a built-in demo step file (`demo/*.yaml`)"},
                },
                "example": {"demo": "quote"},
            },
            "ControlSummary": control_summary,
            "Control": control,
            "HandBack": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "note": {
                        "type": "string",
                        "maxLength": 4000,
                        "description": "for the agent: added to its task, so its next model input has it",
                    }
                },
                "example": {"note": "I logged in; go on from the quote form."},
            },
            "ResumeRun": {
                "type": "object",
                "additionalProperties": False,
                "properties": {"note": {"type": "string", "maxLength": 4000, "description": "added to its task"}},
                "example": {"note": "The express option costs extra: leave it off."},
            },
            **_share_schemas(),
            "Error": error,
            "Health": {
                "type": "object",
                "additionalProperties": False,
                "required": ["status"],
                "properties": {"status": {"type": "string", "enum": ["ok"]}},
            },
            "Readiness": {
                "type": "object",
                "additionalProperties": False,
                "required": ["status", "checks"],
                "properties": {
                    "status": {"type": "string", "enum": ["ready", "not ready"]},
                    "checks": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["database", "channel_layer", "backend"],
                        "properties": {"database": check, "channel_layer": check, "backend": check},
                    },
                },
            },
        },
        "responses": {
            "BadRequest": error_response(
                "The request is malformed: not a JSON object, unknown fields, wrong types or values.",
                "screen: must be a string WIDTHxHEIGHT, from 320x200 to 3840x2160",
            ),
            "Unauthorized": error_response(
                "No valid bearer token and no session.",
                "authentication required: log in, or send Authorization: Bearer <token>",
            ),
            "Forbidden": error_response(
                "Not allowed: someone else's sandbox, or (with the session cookie) a write without a valid "
                "X-CSRFToken header.",
                "not allowed",
            ),
            "NotFound": error_response("No such sandbox (or event, or image).", "no sandbox 7"),
            "MethodNotAllowed": method_not_allowed,
            "Conflict": error_response(
                "The sandbox is not in a phase that allows this.", "the sandbox is starting, not ready"
            ),
            "TooMany": error_response(
                "The user already has NAMEK_MAX_SANDBOXES_PER_USER live sandboxes.",
                "you already have 3 sandboxes, the most one user may have: delete one",
                limit=3,
            ),
            "BadGateway": error_response(
                "The sandbox backend refused or failed the request (retrying will not help).", "no sandbox 7 here"
            ),
            "Unavailable": error_response(
                "Namek cannot do it now: the sandbox supervisor is not running, or Namek already runs "
                "NAMEK_MAX_SANDBOXES sandboxes (then with `limit`). Retry later.",
                "Namek runs its maximum of 8 sandboxes: try again later",
                limit=8,
            ),
        },
        "securitySchemes": {
            "bearerAuth": {
                "type": "http",
                "scheme": "bearer",
                "description": "`Authorization: Bearer <token>`; `manage.py namek_token <username>` prints a new "
                "token once (only its hash is stored). No CSRF header needed.",
            },
            "sessionCookie": {
                "type": "apiKey",
                "in": "cookie",
                "name": settings.SESSION_COOKIE_NAME,
                "description": "The session of a user logged in at /login/.",
            },
            "csrfHeader": {
                "type": "apiKey",
                "in": "header",
                "name": "X-CSRFToken",
                "description": f"With the session cookie, writes need this header set to the value of the "
                f"`{settings.CSRF_COOKIE_NAME}` cookie.",
            },
        },
    }


def _responses(ok: tuple[str, dict[str, Any]], *errors: int) -> dict[str, Any]:
    names = {
        400: "BadRequest",
        401: "Unauthorized",
        403: "Forbidden",
        404: "NotFound",
        409: "Conflict",
        429: "TooMany",
        502: "BadGateway",
        503: "Unavailable",
    }
    status, response = ok
    return {status: response, **{str(code): _ref("responses", names[code]) for code in errors}}


SANDBOX_ID = {
    "name": "id",
    "in": "path",
    "required": True,
    "description": "the sandbox's id",
    "schema": {"type": "integer", "format": "int64", "minimum": 1, "maximum": INT64_MAX},
    "example": 7,
}


RUN_ID = {
    "name": "id",
    "in": "path",
    "required": True,
    "description": "the run's id",
    "schema": {"type": "integer", "format": "int64", "minimum": 1, "maximum": INT64_MAX},
    "example": 3,
}


def _sandbox_ok(description: str, status: str = "200") -> tuple[str, dict[str, Any]]:
    return status, {"description": description, "content": _json_content(_ref("schemas", "Sandbox"))}


def _paths() -> dict[str, Any]:
    readiness = _json_content(_ref("schemas", "Readiness"))
    return {
        "/api/sandboxes": {
            "description": "Other methods answer 405 (Allow: GET, POST).",
            "x-allow": ["GET", "POST"],
            "get": {
                "operationId": "listSandboxes",
                "tags": ["sandboxes"],
                "summary": "List the sandboxes you may see",
                "description": "Newest first. Stopped sandboxes are left out unless `all` is given.",
                "security": READ_SECURITY,
                "parameters": [
                    {
                        "name": "all",
                        "in": "query",
                        "required": False,
                        "description": "`1`, `true` or `yes`: include stopped sandboxes; any other value: leave "
                        "them out",
                        "schema": {"type": "string"},
                        "example": "1",
                    }
                ],
                "responses": _responses(
                    (
                        "200",
                        {"description": "The sandboxes.", "content": _json_content(_ref("schemas", "SandboxList"))},
                    ),
                    401,
                ),
            },
            "post": {
                "operationId": "createSandbox",
                "tags": ["sandboxes"],
                "summary": "Create a sandbox",
                "description": "Stores the sandbox (phase `pending`) and asks the backend to start it; poll it "
                "until its phase is `ready`. An empty body takes every default.",
                "security": WRITE_SECURITY,
                "requestBody": {
                    "required": False,
                    "content": _json_content(_ref("schemas", "CreateSandbox")),
                },
                "responses": _responses(_sandbox_ok("Created; it is starting.", "201"), 400, 401, 403, 429, 502, 503),
            },
        },
        "/api/sandboxes/{id}": {
            "description": "Other methods answer 405 (Allow: GET, DELETE).",
            "x-allow": ["GET", "DELETE"],
            "parameters": [SANDBOX_ID],
            "get": {
                "operationId": "getSandbox",
                "tags": ["sandboxes"],
                "summary": "Get a sandbox",
                "security": READ_SECURITY,
                "responses": _responses(_sandbox_ok("The sandbox."), 401, 403, 404),
            },
            "delete": {
                "operationId": "deleteSandbox",
                "tags": ["sandboxes"],
                "summary": "Stop a sandbox",
                "description": "Stops its processes and removes its files; the row stays, with phase `stopped`. "
                "Deleting a stopped sandbox changes nothing.",
                "security": WRITE_SECURITY,
                "responses": _responses(_sandbox_ok("Stopped."), 401, 403, 404, 502),
            },
        },
        "/api/sandboxes/{id}/restart-browser": {
            "description": "Other methods answer 405 (Allow: POST).",
            "x-allow": ["POST"],
            "parameters": [SANDBOX_ID],
            "post": {
                "operationId": "restartBrowser",
                "tags": ["sandboxes"],
                "summary": "Restart a sandbox's Chromium",
                "description": "Answers once Chromium answers again; the reason (who restarted it) is recorded in "
                "`last_browser_exit`. The sandbox must be `ready` (else 409). No request body.",
                "security": WRITE_SECURITY,
                "responses": _responses(_sandbox_ok("Restarted."), 401, 403, 404, 409, 502, 503),
            },
        },
        "/api/sandboxes/{id}/events": {
            "description": "Other methods answer 405 (Allow: GET, POST). Live, the same events come over the "
            "websocket `/ws/sandboxes/{id}/events/?after=<seq>`.",
            "x-allow": ["GET", "POST"],
            "parameters": [SANDBOX_ID],
            "get": {
                "operationId": "listEvents",
                "tags": ["events"],
                "summary": "Read a sandbox's event log",
                "description": "Oldest first, the events numbered above `after`, at most `limit` of them. Page "
                "through the log by passing `next_after` as the next `after`. Stopped sandboxes keep their log.",
                "security": READ_SECURITY,
                "parameters": [
                    {
                        "name": "after",
                        "in": "query",
                        "required": False,
                        "description": "the last `seq` you have; default 0 (from the start)",
                        "schema": {"type": "integer", "format": "int64", "minimum": 0, "maximum": INT64_MAX},
                        "example": 0,
                    },
                    {
                        "name": "limit",
                        "in": "query",
                        "required": False,
                        "description": "how many at most; default 100",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
                        "example": 100,
                    },
                ],
                "responses": _responses(
                    (
                        "200",
                        {"description": "A page of events.", "content": _json_content(_ref("schemas", "EventPage"))},
                    ),
                    400,
                    401,
                    403,
                    404,
                ),
            },
            "post": {
                "operationId": "addNote",
                "tags": ["events"],
                "summary": "Add a note to a sandbox's event log",
                "description": "Stored as a `person.note` event by you, and sent to everyone watching the log.",
                "security": WRITE_SECURITY,
                "requestBody": {"required": True, "content": _json_content(_ref("schemas", "CreateNote"))},
                "responses": _responses(
                    ("201", {"description": "The note's event.", "content": _json_content(_ref("schemas", "Event"))}),
                    400,
                    401,
                    403,
                    404,
                ),
            },
        },
        **{
            f"/api/sandboxes/{{id}}/events/{{seq}}/{which}": {
                "description": "Other methods answer 405 (Allow: GET).",
                "x-allow": ["GET"],
                "parameters": [
                    SANDBOX_ID,
                    {
                        "name": "seq",
                        "in": "path",
                        "required": True,
                        "description": "the event's `seq`",
                        "schema": {"type": "integer", "format": "int64", "minimum": 0, "maximum": INT64_MAX},
                        "example": 1,
                    },
                ],
                "get": {
                    "operationId": f"getEvent{which.title()}",
                    "tags": ["events"],
                    "summary": summary,
                    "description": "Only for those who may see the sandbox. 404 when the event has none.",
                    "security": READ_SECURITY,
                    "responses": _responses(("200", {"description": "The image.", "content": content}), 401, 403, 404),
                },
            }
            for which, summary, content in (
                (
                    "screenshot",
                    "An event's screenshot, as the agent or person sent it",
                    {
                        "image/png": {"schema": {"type": "string", "format": "binary"}},
                        "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
                    },
                ),
                (
                    "thumbnail",
                    f"An event's thumbnail (JPEG, at most {events.THUMBNAIL_SIZE[0]}x{events.THUMBNAIL_SIZE[1]})",
                    {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}},
                ),
            )
        },
        "/api/sandboxes/{id}/runs": {
            "description": "Other methods answer 405 (Allow: GET, POST).",
            "x-allow": ["GET", "POST"],
            "parameters": [SANDBOX_ID],
            "get": {
                "operationId": "listRuns",
                "tags": ["agents"],
                "summary": "A sandbox's agent runs",
                "description": "Newest first, at most 100.",
                "security": READ_SECURITY,
                "responses": _responses(
                    ("200", {"description": "The runs.", "content": _json_content(_ref("schemas", "RunList"))}),
                    401,
                    403,
                    404,
                ),
            },
            "post": {
                "operationId": "startRun",
                "tags": ["agents"],
                "summary": "Start an agent on a sandbox",
                "description": "Launches the runner, which drives the sandbox's Chromium with browser-use; its steps "
                "arrive in the event log. One active run per sandbox (409). The sandbox must be `ready` (409). "
                "Without an LLM configured, give a `script` or a `demo` (else 400).",
                "security": WRITE_SECURITY,
                "requestBody": {"required": True, "content": _json_content(_ref("schemas", "CreateRun"))},
                "responses": _responses(
                    ("201", {"description": "Started.", "content": _json_content(_ref("schemas", "Run"))}),
                    400,
                    401,
                    403,
                    404,
                    409,
                    502,
                    503,
                ),
            },
        },
        "/api/sandboxes/{id}/control": {
            "description": "Other methods answer 405 (Allow: GET).",
            "x-allow": ["GET"],
            "parameters": [SANDBOX_ID],
            "get": {
                "operationId": "getControl",
                "tags": ["control"],
                "summary": "Who drives a sandbox",
                "description": "The control lease: the agent run, a person, or nobody; and whether you may take "
                "over, hand back or resume the agent.",
                "security": READ_SECURITY,
                "responses": _responses(
                    ("200", {"description": "The lease.", "content": _json_content(_ref("schemas", "Control"))}),
                    401,
                    403,
                    404,
                ),
            },
        },
        "/api/sandboxes/{id}/takeover": {
            "description": "Other methods answer 405 (Allow: POST).",
            "x-allow": ["POST"],
            "parameters": [SANDBOX_ID],
            "post": {
                "operationId": "takeOver",
                "tags": ["control"],
                "summary": "Take over a sandbox",
                "description": "Gives you the control lease, pauses the agent and waits for its pause (at most "
                "NAMEK_TAKEOVER_PAUSE_TIMEOUT seconds; the log says if it did not confirm), then makes your screen "
                "and terminal connections interactive; other connections' input is dropped and other CDP clients' "
                "commands are held. 409 while someone else drives or the sandbox is not ready; 403 for viewers. "
                "Taking over again while you drive changes nothing. No request body.",
                "security": WRITE_SECURITY,
                "responses": _responses(
                    ("200", {"description": "You drive.", "content": _json_content(_ref("schemas", "Control"))}),
                    400,
                    401,
                    403,
                    404,
                    409,
                ),
            },
        },
        "/api/sandboxes/{id}/handback": {
            "description": "Other methods answer 405 (Allow: POST).",
            "x-allow": ["POST"],
            "parameters": [SANDBOX_ID],
            "post": {
                "operationId": "handBack",
                "tags": ["control"],
                "summary": "Hand control back",
                "description": "Releases the lease: the agent run (if any) resumes with the note, else nobody "
                "drives. Only the holder, or an admin (which releases it). 409 when nobody holds control.",
                "security": WRITE_SECURITY,
                "requestBody": {"required": False, "content": _json_content(_ref("schemas", "HandBack"))},
                "responses": _responses(
                    ("200", {"description": "Handed back.", "content": _json_content(_ref("schemas", "Control"))}),
                    400,
                    401,
                    403,
                    404,
                    409,
                ),
            },
        },
        "/api/runs/{id}": {
            "description": "Other methods answer 405 (Allow: GET).",
            "x-allow": ["GET"],
            "parameters": [RUN_ID],
            "get": {
                "operationId": "getRun",
                "tags": ["agents"],
                "summary": "Get a run",
                "security": READ_SECURITY,
                "responses": _responses(
                    ("200", {"description": "The run.", "content": _json_content(_ref("schemas", "Run"))}),
                    401,
                    403,
                    404,
                ),
            },
        },
        **{
            f"/api/runs/{{id}}/{command}": {
                "description": "Other methods answer 405 (Allow: POST).",
                "x-allow": ["POST"],
                "parameters": [RUN_ID],
                "post": {
                    "operationId": f"{command}Run",
                    "tags": ["agents"],
                    "summary": summary,
                    "description": description + " The run must be active (409).",
                    "security": WRITE_SECURITY,
                    **(
                        {"requestBody": {"required": False, "content": _json_content(_ref("schemas", "ResumeRun"))}}
                        if command == "resume"
                        else {}
                    ),
                    "responses": _responses(
                        ("200", {"description": "The run.", "content": _json_content(_ref("schemas", "Run"))}),
                        400,
                        401,
                        403,
                        404,
                        409,
                    ),
                },
            }
            for command, summary, description in (
                (
                    "stop",
                    "Stop a run",
                    "Tells the agent to stop, ends its runner (killed after NAMEK_RUN_STOP_GRACE seconds) and marks "
                    "the run failed, stopped by you. No request body.",
                ),
                (
                    "pause",
                    "Pause a run's agent",
                    "The agent pauses once the step in flight has finished; the log then shows `agent.paused`. "
                    "No request body.",
                ),
                (
                    "resume",
                    "Resume a paused agent",
                    "With an optional note, added to the agent's task (its next model input).",
                ),
            )
        },
        **_share_paths(),
        "/api/openapi.json": {
            "description": "Other methods answer 405 (Allow: GET).",
            "x-allow": ["GET"],
            "get": {
                "operationId": "getOpenApiDocument",
                "tags": ["documentation"],
                "summary": "This document",
                "description": "No login needed.",
                "security": PUBLIC,
                "responses": {
                    "200": {
                        "description": "The OpenAPI document.",
                        "content": _json_content({"type": "object", "required": ["openapi", "info", "paths"]}),
                    }
                },
            },
        },
        "/api/docs": {
            "description": "Other methods answer 405 (Allow: GET).",
            "x-allow": ["GET"],
            "get": {
                "operationId": "getApiDocs",
                "tags": ["documentation"],
                "summary": "This document as a page",
                "description": "Every operation with its parameters, body, answers and a curl example. No login "
                "needed.",
                "security": PUBLIC,
                "responses": {
                    "200": {"description": "An HTML page.", "content": {"text/html": {"schema": {"type": "string"}}}}
                },
            },
        },
        "/healthz": {
            "description": "Other methods answer 405 (Allow: GET).",
            "x-allow": ["GET"],
            "get": {
                "operationId": "healthz",
                "tags": ["probes"],
                "summary": "Liveness: the process answers",
                "description": "Touches nothing (no database). No login needed.",
                "security": PUBLIC,
                "responses": {
                    "200": {
                        "description": "Up.",
                        "content": _json_content(_ref("schemas", "Health"), {"status": "ok"}),
                    }
                },
            },
        },
        "/readyz": {
            "description": "Other methods answer 405 (Allow: GET).",
            "x-allow": ["GET"],
            "get": {
                "operationId": "readyz",
                "tags": ["probes"],
                "summary": "Readiness: the database, the channel layer and the sandbox backend answer",
                "description": "Runs a trivial query, sends a message through the channel layer to itself, and "
                "asks the backend whether it can serve (the local backend: whether the supervisor answers). "
                "No login needed.",
                "security": PUBLIC,
                "responses": {
                    "200": {"description": "Ready.", "content": readiness},
                    "503": {
                        "description": "Not ready: each failing check gives its reason.",
                        "content": _json_content(
                            _ref("schemas", "Readiness"),
                            {
                                "status": "not ready",
                                "checks": {
                                    "database": "ok",
                                    "channel_layer": "ok",
                                    "backend": "the sandbox supervisor is not running (start Namek with `make run`)",
                                },
                            },
                        ),
                    },
                },
            },
        },
    }


SHARE_LINK_EXAMPLE: dict[str, Any] = {
    "id": 4,
    "url": "https://namek.example.com/sandboxes/7/?share=NA:Yq0cOEmh1yv6wY1R0aTz3vA1lS8",
    "expires_at": "2025-05-02T09:40:00.000000+00:00",
    "sandbox": 7,
    "wall": False,
    "created_by": "alice",
    "created_at": "2025-05-01T09:40:00.000000+00:00",
    "revoked_at": None,
    "active": True,
    "uses": 2,
    "last_used_at": "2025-05-01T10:02:13.250000+00:00",
}


def _share_schemas() -> dict[str, Any]:
    timestamp = {"type": "string", "format": "date-time"}
    return {
        "ShareLink": {
            "type": "object",
            "description": "A read-only share link: whoever opens `url` watches the screen, the terminal output and "
            "the event log without an account, and can send nothing.",
            "additionalProperties": False,
            "required": list(SHARE_LINK_EXAMPLE),
            "properties": {
                "id": {"type": "integer", "format": "int64", "minimum": 1},
                "url": {
                    "type": "string",
                    "description": "the page to open, with the link's token (`share=`): `/sandboxes/<id>/` or `/wall/`",
                },
                "expires_at": timestamp,
                "sandbox": {
                    "type": "integer",
                    "format": "int64",
                    "minimum": 1,
                    "nullable": True,
                    "description": "the shared sandbox; null for a wall link",
                },
                "wall": {"type": "boolean", "description": "a link to the wall (every live sandbox)"},
                "created_by": {"type": "string"},
                "created_at": timestamp,
                "revoked_at": {**timestamp, "nullable": True},
                "active": {"type": "boolean", "description": "neither expired nor revoked"},
                "uses": {"type": "integer", "minimum": 0, "description": "how many times the page was opened"},
                "last_used_at": {**timestamp, "nullable": True},
            },
            "example": SHARE_LINK_EXAMPLE,
        },
        "ShareLinkList": {
            "type": "object",
            "additionalProperties": False,
            "required": ["share_links"],
            "properties": {"share_links": {"type": "array", "items": _ref("schemas", "ShareLink")}},
        },
        "CreateShareLink": {
            "type": "object",
            "description": "`sandbox` or `wall: true`, not both.",
            "additionalProperties": False,
            "properties": {
                "sandbox": {
                    "type": "integer",
                    "format": "int64",
                    "minimum": 1,
                    "maximum": INT64_MAX,
                    "description": "the sandbox to share (you must be allowed to use it)",
                },
                "wall": {"type": "boolean", "description": "`true`: a link to the wall (operators and admins only)"},
                "expires_in": {
                    "type": "integer",
                    "minimum": sharing.MIN_EXPIRES_IN,
                    "maximum": sharing.MAX_EXPIRES_IN,
                    "description": f"seconds until it expires, from {sharing.MIN_EXPIRES_IN} to "
                    f"{sharing.MAX_EXPIRES_IN} (30 days); missing: {sharing.DEFAULT_EXPIRES_IN} (24 hours)",
                },
            },
            "example": {"sandbox": 7, "expires_in": 3600},
        },
    }


def _share_paths() -> dict[str, Any]:
    link_id = {
        "name": "id",
        "in": "path",
        "required": True,
        "description": "the share link's id",
        "schema": {"type": "integer", "format": "int64", "minimum": 1, "maximum": INT64_MAX},
        "example": 4,
    }
    link_ok = {"description": "The link.", "content": _json_content(_ref("schemas", "ShareLink"))}
    too_many = {
        "description": f"You already have {sharing.MAX_ACTIVE_PER_USER} active share links: revoke one.",
        "content": _json_content(
            _ref("schemas", "Error"),
            {
                "error": f"you already have {sharing.MAX_ACTIVE_PER_USER} active share links, the most one user "
                "may have: revoke one",
                "limit": sharing.MAX_ACTIVE_PER_USER,
            },
        ),
    }
    return {
        "/api/share-links": {
            "description": "Other methods answer 405 (Allow: GET, POST).",
            "x-allow": ["GET", "POST"],
            "get": {
                "operationId": "listShareLinks",
                "tags": ["sharing"],
                "summary": "List your share links",
                "description": f"Your own links (an admin's: everyone's), newest first, at most {sharing.LIST_LIMIT}. "
                "Only active ones (neither expired nor revoked) unless `all` is given.",
                "security": READ_SECURITY,
                "parameters": [
                    {
                        "name": "sandbox",
                        "in": "query",
                        "required": False,
                        "description": "only the links to this sandbox",
                        "schema": {"type": "integer", "format": "int64", "minimum": 0, "maximum": INT64_MAX},
                        "example": 7,
                    },
                    {
                        "name": "all",
                        "in": "query",
                        "required": False,
                        "description": "`1`, `true` or `yes`: expired and revoked links too",
                        "schema": {"type": "string"},
                        "example": "1",
                    },
                ],
                "responses": _responses(
                    (
                        "200",
                        {"description": "The links.", "content": _json_content(_ref("schemas", "ShareLinkList"))},
                    ),
                    400,
                    401,
                ),
            },
            "post": {
                "operationId": "createShareLink",
                "tags": ["sharing"],
                "summary": "Create a read-only share link",
                "description": "A link to one sandbox's page (for those who may use the sandbox) or to the wall "
                "(operators and admins). Whoever opens it watches the screen, the terminal output and the event "
                "log without logging in, and can send nothing; each opening of a sandbox link is a `share.opened` "
                "event in its log. The token in `url` is not an API token: the API refuses it.",
                "security": WRITE_SECURITY,
                "requestBody": {"required": True, "content": _json_content(_ref("schemas", "CreateShareLink"))},
                "responses": {
                    **_responses(("201", {**link_ok, "description": "Created."}), 400, 401, 403, 404),
                    "429": too_many,
                },
            },
        },
        "/api/share-links/{id}": {
            "description": "Other methods answer 405 (Allow: GET, DELETE).",
            "x-allow": ["GET", "DELETE"],
            "parameters": [link_id],
            "get": {
                "operationId": "getShareLink",
                "tags": ["sharing"],
                "summary": "Get a share link",
                "description": "Your own link (an admin: anyone's); someone else's answers 404.",
                "security": READ_SECURITY,
                "responses": _responses(("200", link_ok), 401, 404),
            },
            "delete": {
                "operationId": "revokeShareLink",
                "tags": ["sharing"],
                "summary": "Revoke a share link",
                "description": "Its creator or an admin. The link stops working at once: its pages answer 403 and "
                "the websockets opened with it close (4403). Revoking it again changes nothing.",
                "security": WRITE_SECURITY,
                "responses": _responses(("200", {**link_ok, "description": "Revoked."}), 401, 403, 404),
            },
        },
    }


def base_url_of(request_or_base_url: HttpRequest | str) -> str:
    if isinstance(request_or_base_url, str):
        return request_or_base_url.rstrip("/")
    return request_or_base_url.build_absolute_uri("/").rstrip("/")


def document(request_or_base_url: HttpRequest | str) -> dict[str, Any]:
    """The OpenAPI document, with the server it was asked from (or the given base URL)."""
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": "Namek", "version": "1", "description": DESCRIPTION},
        "servers": [{"url": base_url_of(request_or_base_url)}],
        "tags": [
            {"name": "sandboxes", "description": "Create, list, inspect and stop sandboxes."},
            {"name": "agents", "description": "Start agents on sandboxes, pause, resume and stop them."},
            {"name": "control", "description": "Take over a sandbox from its agent and hand it back."},
            {"name": "events", "description": "Read a sandbox's event log, add notes to it, fetch its screenshots."},
            {"name": "sharing", "description": "Read-only share links to a sandbox's page or the wall."},
            {"name": "documentation", "description": "This document, as JSON and as a page."},
            {"name": "probes", "description": "For load balancers and orchestrators."},
        ],
        "paths": _paths(),
        "components": _components(),
    }


# --- the views ------------------------------------------------------------------------------


def _only_get(request: HttpRequest) -> HttpResponse | None:
    if request.method == "GET":
        return None
    response = json_error(405, "method not allowed; use GET")
    response["Allow"] = "GET"
    return response


@csrf_exempt
def openapi_json(request: HttpRequest) -> HttpResponse:
    """The document. No login: it is documentation."""
    return _only_get(request) or JsonResponse(document(request), json_dumps_params={"indent": 1})


@csrf_exempt
def api_docs(request: HttpRequest) -> HttpResponse:
    """The document as a page, rendered here: no script, no external assets. No login."""
    refused = _only_get(request)
    if refused is not None:
        return refused
    spec = document(request)
    return render(
        request,
        "namek/api_docs.html",
        {
            "spec": spec,
            "paragraphs": paragraphs(spec["info"]["description"]),
            "base_url": spec["servers"][0]["url"],
            "operations": operations_for_page(spec),
            "sandbox_fields": _fields(spec, spec["components"]["schemas"]["Sandbox"]),
            "sandbox_example": json.dumps(SANDBOX_EXAMPLE, indent=2),
        },
    )


# --- the page's view of the document ----------------------------------------------------------


def resolve(spec: dict[str, Any], node: Any) -> Any:
    """Follow local ``$ref``s (``#/components/...``), one level at a time, until none is left."""
    while isinstance(node, dict) and "$ref" in node:
        target: Any = spec
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def describe_schema(spec: dict[str, Any], schema: dict[str, Any]) -> str:
    """A schema in a few words: ``string, at most 64 characters``."""
    schema = resolve(spec, schema)
    words = [schema.get("type", "any")]
    if "format" in schema:
        words[0] += f" ({schema['format']})"
    if schema.get("nullable"):
        words[0] += " or null"
    if "enum" in schema:
        words.append("one of " + ", ".join(map(str, schema["enum"])))
    if "pattern" in schema:
        words.append(f"matching {schema['pattern']}")
    if "maxLength" in schema:
        words.append(f"at most {schema['maxLength']} characters")
    if "minimum" in schema:
        words.append(f"at least {schema['minimum']}")
    return ", ".join(words)


def _fields(spec: dict[str, Any], schema: dict[str, Any]) -> list[dict[str, Any]]:
    schema = resolve(spec, schema)
    required = set(schema.get("required", ()))
    return [
        {
            "name": name,
            "type": describe_schema(spec, prop),
            "required": name in required,
            "description": markup(resolve(spec, prop).get("description", "")),
        }
        for name, prop in schema.get("properties", {}).items()
    ]


def _curl(base_url: str, method: str, path: str, operation: dict[str, Any], spec: dict[str, Any]) -> str:
    url = base_url + path.replace("{id}", str(SANDBOX_ID["example"]))
    for parameter in operation.get("parameters", ()):
        if parameter["in"] == "query" and "example" in parameter:
            url += f"?{parameter['name']}={parameter['example']}"
    parts = ["curl", "-sS"]
    if method != "get":
        parts += ["-X", method.upper()]
    words = [shlex.quote(part) for part in parts]
    if operation.get("security"):
        words.append('-H "Authorization: Bearer $NAMEK_TOKEN"')
    body = operation.get("requestBody")
    if body:
        example = resolve(spec, body["content"]["application/json"]["schema"]).get("example", {})
        words += ["-H 'Content-Type: application/json'", "-d " + shlex.quote(json.dumps(example))]
    words.append(shlex.quote(url))
    return " ".join(words)


def operations_for_page(spec: dict[str, Any]) -> list[dict[str, Any]]:
    base_url = spec["servers"][0]["url"]
    operations = []
    for path, item in spec["paths"].items():
        for method in METHODS:
            if method not in item:
                continue
            operation = item[method]
            parameters = [resolve(spec, p) for p in [*item.get("parameters", ()), *operation.get("parameters", ())]]
            body = operation.get("requestBody")
            responses = []
            for status, reference in operation["responses"].items():
                response = resolve(spec, reference)
                media = response.get("content", {})
                example = next((m["example"] for m in media.values() if "example" in m), None)
                responses.append(
                    {
                        "status": status,
                        "description": markup(response["description"]),
                        "types": ", ".join(media),
                        "example": json.dumps(example) if example is not None else "",
                    }
                )
            security = operation.get("security", [])
            operations.append(
                {
                    "anchor": operation["operationId"],
                    "method": method.upper(),
                    "path": path,
                    "summary": operation.get("summary", ""),
                    "description": markup(operation.get("description", "")),
                    "auth": _auth_words(security),
                    "allow": ", ".join(item.get("x-allow", ())),
                    "parameters": [
                        {
                            "name": p["name"],
                            "where": p["in"],
                            "required": p.get("required", False),
                            "type": describe_schema(spec, p["schema"]),
                            "description": markup(p.get("description", "")),
                        }
                        for p in parameters
                    ],
                    "body_fields": _fields(spec, body["content"]["application/json"]["schema"]) if body else [],
                    "body_required": bool(body and body.get("required")),
                    "responses": responses,
                    "curl": _curl(base_url, method, path, operation, spec),
                }
            )
    return operations


def _auth_words(security: list[dict[str, list[str]]]) -> str:
    if not security:
        return "none"
    if any(len(requirement) > 1 for requirement in security):
        return "bearer token, or session cookie with the X-CSRFToken header"
    return "bearer token, or session cookie"


_CODE = re.compile(r"`([^`]+)`")
_STRONG = re.compile(r"\*\*([^*]+)\*\*")


def markup(text: str) -> SafeString:
    """The document's own text as HTML: escaped first, then `code` and **strong**."""
    html = str(escape(" ".join(text.split())))
    html = _CODE.sub(r"<code>\1</code>", html)
    return mark_safe(_STRONG.sub(r"<strong>\1</strong>", html))  # escaped above


def paragraphs(text: str) -> list[SafeString]:
    """The description's paragraphs, marked up."""
    return [markup(block) for block in text.split("\n\n") if block.strip()]
