"""The JSON API's answers to good and bad requests (no sandbox processes here: the
supervisor is not running, which is itself one of the cases)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.test import Client

from sandboxes.models import Sandbox

pytestmark = pytest.mark.django_db


def bearer(cast: dict, who: str = "owner") -> dict[str, str]:
    return {"HTTP_AUTHORIZATION": f"Bearer {cast['tokens'][who]}"}


def post(client: Client, path: str, body: Any, **headers: str) -> Any:
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return client.post(path, data=data, content_type="application/json", **headers)


def test_every_route_requires_a_user_and_answers_json(client: Client, make_sandbox) -> None:
    box = make_sandbox()
    for method, path in [("get", "/api/sandboxes"), ("post", "/api/sandboxes"), ("get", f"/api/sandboxes/{box.pk}")]:
        response = getattr(client, method)(path)
        assert response.status_code == 401
        assert "authentication required" in response.json()["error"]
    response = client.delete(f"/api/sandboxes/{box.pk}")
    assert response.status_code == 401


def test_a_wrong_or_revoked_token_is_refused(client: Client, cast: dict) -> None:
    from django.utils import timezone

    from sandboxes.models import ApiToken

    assert client.get("/api/sandboxes", HTTP_AUTHORIZATION="Bearer nmk_wrong").status_code == 401
    assert client.get("/api/sandboxes", HTTP_AUTHORIZATION="Basic abc").status_code == 401
    assert client.get("/api/sandboxes", **bearer(cast)).status_code == 200
    ApiToken.objects.update(revoked_at=timezone.now())
    assert client.get("/api/sandboxes", **bearer(cast)).status_code == 401


def test_tokens_are_stored_hashed(cast: dict) -> None:
    from sandboxes.models import ApiToken

    token = cast["tokens"]["owner"]
    assert not ApiToken.objects.filter(digest__contains=token[4:20]).exists()
    assert ApiToken.objects.filter(digest=ApiToken.hash(token)).exists()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("{not json", "malformed JSON"),
        ("[1, 2]", "expected a JSON object"),
        ({"name": 5}, "name: must be a string"),
        ({"name": "x" * 65}, "at most 64"),
        ({"name": "tab\there"}, "printable"),
        ({"screen": "huge"}, "screen: must be"),
        ({"screen": 1280}, "screen: must be"),
        ({"screen": "100x100"}, "screen: must be"),
        ({"colour": "red"}, "unknown fields: colour"),
        (b"\xff\xfe", "malformed JSON"),
    ],
)
def test_bad_create_requests_get_400_with_a_reason(client: Client, cast: dict, body: Any, message: str) -> None:
    response = post(client, "/api/sandboxes", body, **bearer(cast))
    assert response.status_code == 400
    assert message in response.json()["error"]
    assert not Sandbox.objects.exists()


def test_a_huge_body_is_refused(client: Client, cast: dict) -> None:
    response = post(client, "/api/sandboxes", {"name": "a" * 20000}, **bearer(cast))
    assert response.status_code == 400
    assert "larger than" in response.json()["error"]


def test_create_without_a_supervisor_answers_503_and_records_the_failure(client: Client, cast: dict) -> None:
    response = post(client, "/api/sandboxes", {"name": "nobody home"}, **bearer(cast))
    assert response.status_code == 503
    assert "supervisor is not running" in response.json()["error"]
    sandbox = Sandbox.objects.get()
    assert sandbox.phase == "failed"
    assert "supervisor is not running" in sandbox.failure_reason


def test_unknown_ids_and_routes_get_json_404(client: Client, cast: dict) -> None:
    for path in ("/api/sandboxes/999", "/api/nothing/here", "/api/sandboxes/abc"):
        response = client.get(path, **bearer(cast))
        assert response.status_code == 404, path
        assert response["Content-Type"] == "application/json"
        assert response.json()["error"]


def test_wrong_methods_get_405(client: Client, cast: dict, make_sandbox) -> None:
    box = make_sandbox()
    response = client.put(f"/api/sandboxes/{box.pk}", **bearer(cast))
    assert response.status_code == 405
    assert response["Allow"] == "GET, DELETE"


def test_an_outsider_cannot_see_or_delete_anothers_sandbox(client: Client, cast: dict, make_sandbox) -> None:
    box = make_sandbox(owner="owner")
    assert client.get(f"/api/sandboxes/{box.pk}", **bearer(cast, "outsider")).status_code == 403
    assert client.delete(f"/api/sandboxes/{box.pk}", **bearer(cast, "outsider")).status_code == 403
    assert client.get("/api/sandboxes", **bearer(cast, "outsider")).json() == {"sandboxes": []}
    box.refresh_from_db()
    assert box.phase == "ready"


def test_staff_see_everyones_sandboxes(client: Client, cast: dict, make_sandbox) -> None:
    make_sandbox(owner="owner", name="a")
    make_sandbox(owner="outsider", name="b")
    names = {s["name"] for s in client.get("/api/sandboxes", **bearer(cast, "staff")).json()["sandboxes"]}
    assert names == {"a", "b"}


def test_delete_keeps_the_row_and_the_list_hides_stopped_unless_all(client: Client, cast: dict, make_sandbox) -> None:
    box = make_sandbox(phase="failed")
    response = client.delete(f"/api/sandboxes/{box.pk}", **bearer(cast))
    assert response.status_code == 200
    assert response.json()["phase"] == "stopped"
    assert Sandbox.objects.get(pk=box.pk).phase == "stopped"
    assert client.get("/api/sandboxes", **bearer(cast)).json()["sandboxes"] == []
    listed = client.get("/api/sandboxes?all=1", **bearer(cast)).json()["sandboxes"]
    assert [s["id"] for s in listed] == [box.pk]
    again = client.delete(f"/api/sandboxes/{box.pk}", **bearer(cast))
    assert again.status_code == 200


def test_cookie_writes_need_csrf_and_the_refusal_is_json(cast: dict) -> None:
    client = Client(enforce_csrf_checks=True)
    assert client.login(username="owner", password=cast["password"])
    response = post(client, "/api/sandboxes", {"name": "x"})
    assert response.status_code == 403
    assert "CSRF" in response.json()["error"]
    assert client.get("/api/sandboxes").status_code == 200
    # With the token from the cookie, the write goes through to the (absent) supervisor.
    client.get("/")
    response = post(client, "/api/sandboxes", {"name": "x"}, HTTP_X_CSRFTOKEN=client.cookies["csrftoken"].value)
    assert response.status_code == 503


def test_a_token_write_needs_no_csrf(cast: dict) -> None:
    client = Client(enforce_csrf_checks=True)
    assert post(client, "/api/sandboxes", {"name": 1}, **bearer(cast)).status_code == 400
