"""The OpenAPI document: valid, complete (every /api/ route, every method, every field), the
docs page rendered from it, and schemathesis fuzzing a live Namek from it."""

from __future__ import annotations

import atexit
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import jsonschema
import jsonschema_rs
import pytest
import schemathesis
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver
from hypothesis import HealthCheck, settings
from hypothesis.configuration import set_hypothesis_home_dir
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)
from schemathesis.specs.openapi.definitions import OPENAPI_30

from sandboxes import openapi
from sandboxes.services import sandbox_json
from tests.live import LiveNamek

HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


def spec() -> dict[str, Any]:
    return openapi.document("http://testserver")


def json_schema(document: dict[str, Any], schema: Any) -> Any:
    """An OpenAPI 3.0 schema as plain JSON Schema: references inlined, ``nullable`` as a type."""
    schema = openapi.resolve(document, schema)
    if isinstance(schema, list):
        return [json_schema(document, item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    converted = {
        key: json_schema(document, value) for key, value in schema.items() if key not in ("nullable", "example")
    }
    if schema.get("nullable"):
        converted["type"] = [schema["type"], "null"]
    return converted


def validate(document: dict[str, Any], instance: Any, schema: Any) -> None:
    """With JSON Schema's (ECMA 262) regular expressions, as schemathesis: ``$`` is the very end,
    ``\\d`` an ASCII digit (Python's ``re``, under the ``jsonschema`` package, differs on both)."""
    jsonschema_rs.Draft7Validator(json_schema(document, schema), validate_formats=True).validate(instance)


# --- the document -------------------------------------------------------------------------


def test_the_document_is_valid_openapi() -> None:
    document = spec()
    jsonschema.Draft4Validator(OPENAPI_30).validate(document)
    schemathesis.openapi.from_dict(document).validate()
    # Every schema in it is a valid JSON Schema, and every example fits its schema.
    for name, schema in document["components"]["schemas"].items():
        jsonschema.Draft7Validator.check_schema(json_schema(document, schema))
        if "example" in schema:
            validate(document, schema["example"], schema)
        assert name
    for item in document["paths"].values():
        for method in HTTP_METHODS:
            for response in item.get(method, {}).get("responses", {}).values():
                for media in openapi.resolve(document, response).get("content", {}).values():
                    if "example" in media:
                        validate(document, media["example"], media["schema"])


def _routes(patterns: list[Any], prefix: str = "") -> Iterator[str]:
    for pattern in patterns:
        if isinstance(pattern, URLResolver):
            yield from _routes(pattern.url_patterns, prefix + str(pattern.pattern))
        elif isinstance(pattern, URLPattern):
            yield prefix + str(pattern.pattern)


CATCH_ALL = "^api/(?P<rest>.*)$"


def test_every_api_route_is_documented_and_nothing_else() -> None:
    routes = set(_routes(get_resolver().url_patterns))
    # The catch-all (JSON 404 for unknown API paths) is the one regular expression under /api/.
    assert {r for r in routes if r.startswith("^api")} == {CATCH_ALL}
    names = {"sandbox_id": "id", "run_id": "id", "seq": "seq", "link_id": "id"}
    served = {"/" + re.sub(r"<int:(\w+)>", lambda m: "{" + names[m[1]] + "}", r) for r in routes - {CATCH_ALL}}
    served_api = {r for r in served if r.startswith("/api/")}
    documented = set(spec()["paths"])
    assert served_api == {p for p in documented if p.startswith("/api/")}
    assert documented - served_api == {"/healthz", "/readyz"}
    assert {"/healthz", "/readyz"} <= served
    # ... and the catch-all comes after every documented route.
    patterns = [str(p.pattern) for p in get_resolver().url_patterns]
    assert patterns.index(CATCH_ALL) == len(patterns) - 1


@pytest.mark.django_db
def test_other_methods_answer_405_with_the_documented_allow(client: Client, cast: dict, make_sandbox) -> None:
    box = make_sandbox(phase="stopped")
    headers = {"HTTP_AUTHORIZATION": f"Bearer {cast['tokens']['owner']}"}
    for path, item in spec()["paths"].items():
        documented = [m.upper() for m in HTTP_METHODS if m in item]
        assert item["x-allow"] == documented, path
        for method in HTTP_METHODS:
            if method in item:
                continue
            concrete = path.replace("{id}", str(box.pk)).replace("{seq}", "1")
            response = client.generic(method.upper(), concrete, **headers)
            assert response.status_code == 405, (method, path, response.content)
            assert response["Allow"] == ", ".join(documented), (method, path)
            if method != "head":
                assert response.json()["error"].startswith("method not allowed")


@pytest.mark.django_db
def test_the_sandbox_schema_is_exactly_sandbox_json(make_sandbox) -> None:
    document = spec()
    schema = document["components"]["schemas"]["Sandbox"]
    for phase in ("pending", "ready", "failed", "stopped"):
        answer = sandbox_json(make_sandbox(phase=phase))
        assert set(answer) == set(schema["properties"]) == set(schema["required"])
        validate(document, answer, schema)
    assert schema["properties"]["phase"]["enum"] == ["pending", "starting", "ready", "stopping", "stopped", "failed"]


@pytest.mark.django_db
@pytest.mark.parametrize(
    "screen",
    [
        "1280x80",
        "12800x800",
        " 1280x800",
        "1280X800",
        "1280x800\n",
        "\u0661\u0662\u0668\u0660x\u0668\u0660\u0660",
    ],
)
def test_screens_the_document_refuses_are_refused(client: Client, cast: dict, screen: str) -> None:
    assert not jsonschema_rs.is_valid({"type": "string", "pattern": openapi.SCREEN_PATTERN}, screen)
    response = client.post(
        "/api/sandboxes",
        data={"screen": screen},
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {cast['tokens']['owner']}",
    )
    assert response.status_code == 400, response.content
    assert response.json()["error"].startswith("screen:")


@pytest.mark.django_db
@pytest.mark.parametrize("too_much", ["body", "query"])
def test_requests_django_refuses_itself_are_answered_in_json(client: Client, cast: dict, too_much: str) -> None:
    headers = {"HTTP_AUTHORIZATION": f"Bearer {cast['tokens']['owner']}"}
    if too_much == "body":  # over DATA_UPLOAD_MAX_MEMORY_SIZE (2.5 MiB)
        body = b"{" + b" " * (3 * 1024 * 1024) + b"}"
        response = client.post("/api/sandboxes", data=body, content_type="application/json", **headers)
    else:  # over DATA_UPLOAD_MAX_NUMBER_FIELDS (1000)
        response = client.get("/api/sandboxes?" + "&".join(f"f{n}=1" for n in range(1001)), **headers)
    assert response.status_code == 400
    assert response["Content-Type"] == "application/json", response.content[:200]


def test_errors_and_security_are_described_where_they_occur() -> None:
    document = spec()
    paths = document["paths"]

    def codes(path: str, method: str) -> set[str]:
        return set(paths[path][method]["responses"])

    assert codes("/api/sandboxes", "get") == {"200", "401"}
    assert codes("/api/sandboxes", "post") == {"201", "400", "401", "403", "429", "502", "503"}
    assert codes("/api/sandboxes/{id}", "get") == {"200", "401", "403", "404"}
    assert codes("/api/sandboxes/{id}", "delete") == {"200", "401", "403", "404", "502"}
    assert codes("/api/sandboxes/{id}/restart-browser", "post") == {"200", "401", "403", "404", "409", "502", "503"}
    assert codes("/readyz", "get") == {"200", "503"}
    body = document["components"]["schemas"]["CreateSandbox"]
    assert body["additionalProperties"] is False
    assert body["properties"]["name"]["maxLength"] == 64
    assert body["properties"]["screen"]["pattern"] == r"^\d{3,4}x\d{3,4}$"
    error = document["components"]["schemas"]["Error"]
    assert error["required"] == ["error"] and error["properties"]["limit"]["type"] == "integer"
    schemes = document["components"]["securitySchemes"]
    assert schemes["bearerAuth"] == {**schemes["bearerAuth"], "type": "http", "scheme": "bearer"}
    assert schemes["sessionCookie"]["in"] == "cookie" and schemes["csrfHeader"]["name"] == "X-CSRFToken"
    for path, item in paths.items():
        for method in HTTP_METHODS:
            if method not in item:
                continue
            security = item[method]["security"]
            if path.startswith(("/api/sandboxes", "/api/runs", "/api/share-links")):
                assert {"bearerAuth": []} in security, (method, path)
                assert "401" in item[method]["responses"]
                if method != "get":
                    assert {"sessionCookie": [], "csrfHeader": []} in security
                    assert "403" in item[method]["responses"]
            else:
                assert security == [], (method, path)


@pytest.mark.django_db
def test_the_document_is_served_without_login(client: Client) -> None:
    response = client.get("/api/openapi.json")
    assert response.status_code == 200
    assert response["Content-Type"] == "application/json"
    served = response.json()
    assert served["servers"] == [{"url": "http://testserver"}]
    assert served == spec()
    assert client.get("/api/openapi.json", HTTP_HOST="localhost").json()["servers"] == [{"url": "http://localhost"}]
    response = client.post("/api/openapi.json")
    assert response.status_code == 405 and response["Allow"] == "GET"


@pytest.mark.django_db
def test_the_docs_page_lists_every_operation_without_external_assets(client: Client) -> None:
    response = client.get("/api/docs")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/html")
    page = response.content.decode()
    document = spec()
    for path, item in document["paths"].items():
        for method in HTTP_METHODS:
            if method in item:
                operation = item[method]
                assert f'id="{operation["operationId"]}"' in page
                assert f'{method.upper()}</span> <code class="path">{path}</code>' in page
                assert operation["summary"].replace("'", "&#x27;") in page
    # parameters, body fields, every response status, a curl with a bearer token
    assert "<code>all</code>" in page and "<code>id</code>" in page
    assert "<code>name</code>" in page and "<code>screen</code>" in page and "at most 64 characters" in page
    for status in ("200", "201", "400", "401", "403", "404", "409", "429", "502", "503"):
        assert f'data-status="{status}"' in page
    assert "curl -sS -X POST -H &quot;Authorization: Bearer $NAMEK_TOKEN&quot;" in page
    assert "http://testserver/api/sandboxes/7/restart-browser" in page
    assert "Allow: GET, DELETE" in page
    for field in document["components"]["schemas"]["Sandbox"]["properties"]:
        assert f"<td><code>{field}</code></td>" in page
    # nothing from elsewhere: every src/href is a path on this server (or an anchor)
    for reference in re.findall(r'(?:src|href)="([^"]*)"', page):
        assert reference.startswith(("/", "#")), reference
    assert "<script" not in page
    assert client.post("/api/docs").status_code == 405


# --- fuzzing a live Namek from the document --------------------------------------------------


@pytest.fixture(scope="module")
def fuzzed_namek(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveNamek]:
    """A Namek of its own with small caps, so that fuzzing starts at most a couple of sandboxes."""
    namek = LiveNamek(
        tmp_path_factory.mktemp("fuzz"),
        NAMEK_MAX_SANDBOXES_PER_USER="1",
        NAMEK_MAX_SANDBOXES="2",
        NAMEK_WARM_POOL="0",
    )
    try:
        yield namek.start()
        remove_every_sandbox(namek)
    finally:
        namek.stop()


def remove_every_sandbox(namek: LiveNamek) -> None:
    status, answer = namek.api("GET", "/api/sandboxes?all=1", "staff")
    assert status == 200, answer
    for sandbox in answer["sandboxes"]:
        if sandbox["phase"] != "stopped":
            namek.delete_sandbox(sandbox["id"], "staff")
    status, answer = namek.api("GET", "/api/sandboxes", "staff")
    assert (status, answer) == (200, {"sandboxes": []})
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any((namek.data_dir / "sandboxes").glob("[0-9]*")):
        time.sleep(0.2)


def documented_server_errors_only(ctx: Any, response: Any, case: Any) -> bool | None:
    """5xx only as 502/503, and only where the operation documents it (with an Error body)."""
    status = response.status_code
    if status >= 500:
        documented = str(status) in case.operation.definition.raw["responses"]
        assert status in (502, 503) and documented, (
            f"server error {status} on {case.method} {case.formatted_path}: {response.text[:500]}"
        )
    return None


CHECKS = [
    documented_server_errors_only,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
    unsupported_method,
    ignored_auth,
]

# Hypothesis (already while schemathesis builds the tests, at collection) keeps its files in
# a temporary directory rather than .hypothesis/ in the repository.
_HYPOTHESIS_HOME = tempfile.mkdtemp(prefix="namek-hypothesis-")
atexit.register(shutil.rmtree, _HYPOTHESIS_HOME, True)
set_hypothesis_home_dir(_HYPOTHESIS_HOME)

# The schema is built in-process at collection time (the live server does not run yet);
# test_the_live_server_serves_the_fuzzed_document checks that the server serves the same.
# (schemathesis.pytest.from_fixture, which loads it from the server inside a fixture, fails
# on pytest 9.2: it sets Node._nodeid, which pytest 9.2 no longer has.)
fuzzed = schemathesis.openapi.from_dict(openapi.document("http://127.0.0.1"))


@pytest.mark.processes
def test_the_live_server_serves_the_fuzzed_document(fuzzed_namek: LiveNamek) -> None:
    served = schemathesis.openapi.from_url(fuzzed_namek.base_url + "/api/openapi.json")
    assert served.raw_schema["servers"] == [{"url": fuzzed_namek.base_url}]
    assert {**served.raw_schema, "servers": []} == {**fuzzed.raw_schema, "servers": []}


@pytest.mark.processes
@fuzzed.parametrize()
@settings(max_examples=50, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_fuzzing_finds_no_server_error(case: Any, fuzzed_namek: LiveNamek) -> None:
    case.call_and_validate(
        base_url=fuzzed_namek.base_url,
        headers={"Authorization": f"Bearer {fuzzed_namek.token('owner')}"},
        checks=CHECKS,
        timeout=60,
    )
