"""The probes: /healthz (the process answers) and /readyz (database, channel layer, backend).

The happy path and the failures that matter run against real processes: a Namek whose
supervisor is stopped, a Redis that goes away. The rest (the answer's shape, redaction)
through Django's test client.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.db.utils import OperationalError
from django.test import Client

from namek_web import health
from tests.live import LiveNamek
from tests.live import redis_server as live_redis

SUPERVISOR_DOWN = "the sandbox supervisor is not running"


def get(base_url: str, path: str) -> tuple[int, Any]:
    """No credentials at all: probes need none."""
    try:
        with urllib.request.urlopen(base_url + path, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def wait_for(base_url: str, path: str, status: int, timeout: float = 20) -> Any:
    """The answer of ``path`` once it has ``status`` (a probe may take a moment to settle)."""
    deadline = time.monotonic() + timeout
    while True:
        got, answer = get(base_url, path)
        if got == status or time.monotonic() > deadline:
            assert got == status, answer
            return answer
        time.sleep(0.2)


READY = {"status": "ready", "checks": {"database": "ok", "channel_layer": "ok", "backend": "ok"}}


# --- /healthz ---------------------------------------------------------------------------------


def test_healthz_answers_without_login_and_without_the_database(client: Client) -> None:
    # No django_db mark: any query would fail the test.
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert response["Content-Type"] == "application/json"


def test_the_probes_answer_405_to_other_methods(client: Client) -> None:
    for path in ("/healthz", "/readyz"):
        for method in ("POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"):
            response = client.generic(method, path)
            assert response.status_code == 405, (method, path)
            assert response["Allow"] == "GET"
        assert client.post(path).json() == {"error": "method not allowed; use GET"}


# --- /readyz through the test client ------------------------------------------------------------


@pytest.fixture
def backend_ok(monkeypatch: pytest.MonkeyPatch) -> None:
    """The supervisor does not run under the test client: its check is replaced here only."""

    class Serving:
        def check(self) -> None:
            pass

    monkeypatch.setattr(health, "get_backend", Serving)


@pytest.mark.django_db
def test_readyz_is_ready_when_every_check_passes(client: Client, backend_ok: None) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {
        "status": "ready",
        "checks": {"database": "ok", "channel_layer": "ok", "backend": "ok"},
    }


@pytest.mark.django_db
def test_readyz_names_the_backend_when_the_supervisor_is_not_running(client: Client) -> None:
    response = client.get("/readyz")
    assert response.status_code == 503
    answer = response.json()
    assert answer["status"] == "not ready"
    assert answer["checks"]["database"] == "ok"
    assert answer["checks"]["channel_layer"] == "ok"
    assert SUPERVISOR_DOWN in answer["checks"]["backend"]


@pytest.mark.django_db
def test_a_failing_database_is_reported_without_its_password(
    client: Client, backend_ok: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from django.conf import settings

    monkeypatch.setitem(settings.DATABASES["default"], "PASSWORD", "db-pass-1234")

    def broken() -> None:
        raise OperationalError(
            'connection to server at "db" failed for postgres://namek:hunter2hunter2@db:5432/namek: '
            "password db-pass-1234 refused"
        )

    monkeypatch.setattr(health, "_check_database", broken)
    response = client.get("/readyz")
    assert response.status_code == 503
    answer = response.json()
    assert answer["status"] == "not ready"
    reason = answer["checks"]["database"]
    assert "postgres://***@db:5432/namek" in reason
    assert "hunter2" not in reason and "db-pass-1234" not in reason
    assert answer["checks"]["channel_layer"] == "ok" and answer["checks"]["backend"] == "ok"


@pytest.mark.django_db
def test_a_channel_layer_that_never_delivers_is_not_ready(
    client: Client, backend_ok: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from channels.layers import InMemoryChannelLayer

    class BlackHole(InMemoryChannelLayer):
        async def send(self, channel: str, message: dict) -> None:
            pass

    monkeypatch.setattr(health, "CHANNEL_TIMEOUT", 0.2)
    monkeypatch.setattr(health, "get_channel_layer", BlackHole)
    started = time.monotonic()
    response = client.get("/readyz")
    assert time.monotonic() - started < 5
    assert response.status_code == 503
    assert response.json()["checks"] == {"database": "ok", "channel_layer": "no answer in time", "backend": "ok"}


def test_redact_removes_credentials_and_known_secrets(settings: Any) -> None:
    settings.SECRET_KEY = "s" * 40 + "-very-secret"
    text = f"redis://:pw0rd@cache:6379/0 and https://user:pass@example.test/x and key {settings.SECRET_KEY}"
    redacted = health.redact(text)
    assert redacted == "redis://***@cache:6379/0 and https://***@example.test/x and key ***"
    assert len(health.redact("x" * 1000)) == health.MAX_REASON


# --- /readyz of a real Namek --------------------------------------------------------------------


@pytest.mark.processes
def test_a_live_namek_is_ready_until_its_supervisor_stops(fresh_namek: LiveNamek) -> None:
    namek = fresh_namek.start()
    assert get(namek.base_url, "/healthz") == (200, {"status": "ok"})
    assert wait_for(namek.base_url, "/readyz", 200) == READY

    assert namek.supervisor is not None
    namek.supervisor.send_signal(signal.SIGTERM)
    namek.supervisor.wait(20)

    status, answer = get(namek.base_url, "/readyz")
    assert status == 503, answer
    assert answer["status"] == "not ready"
    assert answer["checks"]["database"] == "ok" and answer["checks"]["channel_layer"] == "ok"
    assert SUPERVISOR_DOWN in answer["checks"]["backend"]
    # Alive all the same: only readiness depends on the supervisor.
    assert get(namek.base_url, "/healthz") == (200, {"status": "ok"})

    namek.start_supervisor()
    assert wait_for(namek.base_url, "/readyz", 200) == READY


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    with live_redis(tmp_path, "redis-pass-5678") as server:
        assert server.process is not None
        yield server.port, server.process


@pytest.mark.processes
def test_a_live_namek_on_redis_is_not_ready_once_redis_is_gone(
    tmp_path: Path, redis_server: tuple[int, subprocess.Popen[bytes]]
) -> None:
    port, redis = redis_server
    namek = LiveNamek(tmp_path, REDIS_URL=f"redis://:redis-pass-5678@127.0.0.1:{port}/0")
    try:
        namek.start()
        assert wait_for(namek.base_url, "/readyz", 200) == READY
        redis.terminate()
        redis.wait(10)
        status, answer = get(namek.base_url, "/readyz")
        assert status == 503, answer
        assert answer["checks"]["database"] == "ok" and answer["checks"]["backend"] == "ok"
        assert answer["checks"]["channel_layer"] not in ("", "ok")
        assert "redis-pass-5678" not in json.dumps(answer)
    finally:
        namek.stop()
