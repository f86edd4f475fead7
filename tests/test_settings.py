"""Settings come from the environment; a bad value stops Namek and names the variable."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured

from namek_web import env
from tests.live import ROOT


def load_settings(tmp_path: Path, **overrides: str) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, "NAMEK_DATA_DIR": str(tmp_path / "data"), **overrides}
    return subprocess.run(
        [sys.executable, "-c", "import django; django.setup(); print('loaded')"],
        env={**environ, "DJANGO_SETTINGS_MODULE": "namek_web.settings"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("NAMEK_BIND", "nonsense"),
        ("NAMEK_BIND", "127.0.0.1:99999"),
        ("NAMEK_BACKEND", "docker"),
        ("NAMEK_SCREEN_SIZE", "10x10"),
        ("NAMEK_SCREEN_SIZE", "big"),
        ("NAMEK_INTERNAL_URL", "ftp://example"),
        ("DATABASE_URL", "nosuchdb://x"),
        ("REDIS_URL", "http://localhost"),
        ("NAMEK_DEBUG", "maybe"),
        ("NAMEK_RELAY_WINDOW", "lots"),
        ("NAMEK_LOCAL_ISOLATION", "partly"),
        ("SECRET_KEY", "short"),
        ("NAMEK_LLM_PROVIDER", "skynet"),
        ("NAMEK_LLM_BASE_URL", "ftp://llm.example"),
        ("NAMEK_RUN_STOP_GRACE", "0"),
        ("NAMEK_TAKEOVER_PAUSE_TIMEOUT", "-1"),
        ("NAMEK_CONTROL_LAPSE", "soon"),
        ("NAMEK_HTTPS", "perhaps"),
    ],
)
def test_bad_values_fail_at_start_naming_the_variable(tmp_path: Path, name: str, value: str) -> None:
    result = load_settings(tmp_path, **{name: value})
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    assert name in result.stderr.splitlines()[-1]


def test_defaults_load_and_keep_a_generated_secret_key(tmp_path: Path) -> None:
    first = load_settings(tmp_path)
    assert first.returncode == 0, first.stderr
    key_file = tmp_path / "data" / "secret_key"
    key = key_file.read_text()
    assert len(key) >= 50
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    assert load_settings(tmp_path).returncode == 0
    assert key_file.read_text() == key


def test_bind_addresses_parse_with_ipv6_and_refuse_a_missing_port() -> None:
    assert env.parse_bind("X", "0.0.0.0:8123") == ("0.0.0.0", 8123)
    assert env.parse_bind("X", "[::1]:80") == ("::1", 80)
    with pytest.raises(ImproperlyConfigured, match="X="):
        env.parse_bind("X", "localhost")


def test_screen_sizes_are_bounded() -> None:
    assert env.parse_screen_size("1280x800") == (1280, 800)
    assert env.parse_screen_size("3840x2160") == (3840, 2160)
    for bad in ("319x200", "4000x800", "1280x", "x800", "1280X800", " 1280x800", ""):
        assert env.parse_screen_size(bad) is None, bad


def deploy_check(environ: dict[str, str]) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"]
    return subprocess.run(command, env=environ, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)


def test_production_settings_pass_the_deploy_checks(tmp_path: Path) -> None:
    """What k8s/ sets for Namek behind its Ingress: `check --deploy` finds nothing (the
    HTTPS redirect is the proxy's; HSTS for subdomains and preloading are the domain
    owner's choice, see settings)."""
    environ = {
        **os.environ,
        "NAMEK_DATA_DIR": str(tmp_path / "data"),
        "NAMEK_DEBUG": "false",
        "NAMEK_HTTPS": "true",
        "SECRET_KEY": "k" * 20 + "-production-secret-of-more-than-fifty-characters-0123456789",
        "ALLOWED_HOSTS": "namek.example.com,namek-web.namek.svc.cluster.local",
        "CSRF_TRUSTED_ORIGINS": "https://namek.example.com",
        "NAMEK_INTERNAL_URL": "http://namek-web.namek.svc.cluster.local:8000",
    }
    result = deploy_check(environ)
    assert result.returncode == 0, result.stderr + result.stdout
    assert "System check identified no issues (3 silenced)." in result.stdout
    # Said explicitly, the owner's choices are checked rather than silenced.
    result = deploy_check({**environ, "NAMEK_HSTS_SUBDOMAINS": "true", "NAMEK_HSTS_PRELOAD": "true"})
    assert result.returncode == 0 and "no issues (1 silenced)" in result.stdout, result.stderr + result.stdout


@pytest.mark.django_db
def test_behind_https_cookies_are_secure_except_for_sandboxes_on_the_internal_url(client, settings) -> None:  # type: ignore[no-untyped-def]
    settings.NAMEK_HTTPS = True
    settings.SESSION_COOKIE_SECURE = settings.CSRF_COOKIE_SECURE = True
    settings.NAMEK_INTERNAL_URL = "http://namek-web.namek.svc.cluster.local:8000"
    settings.ALLOWED_HOSTS = ["namek.example.com", "namek-web.namek.svc.cluster.local"]
    # The demo site sets its session and CSRF cookies on the quote form.
    sandbox = client.get("/demo/quote", HTTP_HOST="namek-web.namek.svc.cluster.local:8000")
    assert sandbox.status_code == 200 and sandbox.cookies
    assert all(not morsel["secure"] for morsel in sandbox.cookies.values()), sandbox.cookies
    person = client.get("/login/", HTTP_HOST="namek.example.com", HTTP_X_FORWARDED_PROTO="http")
    assert person.cookies and all(morsel["secure"] for morsel in person.cookies.values()), person.cookies
