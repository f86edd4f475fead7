"""Namek settings, all read from the environment (see the table in README.md)."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from namek_web.env import (
    env_bool,
    env_choice,
    env_float,
    env_int,
    env_list,
    env_screen_size,
    env_str,
    env_url,
    parse_bind,
    secret_key,
)

BASE_DIR = Path(__file__).resolve().parent.parent

DATA_DIR = Path(env_str("NAMEK_DATA_DIR", str(BASE_DIR / "var"))).resolve()
try:
    DATA_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
except OSError as exc:
    raise ImproperlyConfigured(f"NAMEK_DATA_DIR={str(DATA_DIR)!r}: cannot create it ({exc})") from None

SECRET_KEY = secret_key("SECRET_KEY", DATA_DIR)
DEBUG = env_bool("NAMEK_DEBUG", False)

NAMEK_BIND = env_str("NAMEK_BIND", "127.0.0.1:8000")
BIND_HOST, BIND_PORT = parse_bind("NAMEK_BIND", NAMEK_BIND)
_internal_host = "127.0.0.1" if BIND_HOST in ("0.0.0.0", "::") else BIND_HOST
_internal_default = f"http://{'[' + _internal_host + ']' if ':' in _internal_host else _internal_host}:{BIND_PORT}"
NAMEK_INTERNAL_URL = env_url("NAMEK_INTERNAL_URL", _internal_default, ("http", "https")).rstrip("/")

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]"])
_internal = urlsplit(NAMEK_INTERNAL_URL)
if _internal.hostname and _internal.hostname not in ALLOWED_HOSTS and "*" not in ALLOWED_HOSTS:
    # Sandboxes open the start page through NAMEK_INTERNAL_URL: its host must be served.
    ALLOWED_HOSTS.append(_internal.hostname)

NAMEK_BACKEND = env_choice("NAMEK_BACKEND", "local", ("local", "kubernetes"))
NAMEK_SCREEN_SIZE = env_screen_size("NAMEK_SCREEN_SIZE", "1280x800")
NAMEK_LOCAL_ISOLATION = env_choice("NAMEK_LOCAL_ISOLATION", "on", ("on", "off"))
NAMEK_SUPERVISOR_SOCKET = Path(env_str("NAMEK_SUPERVISOR_SOCKET", str(DATA_DIR / "supervisor.sock")))
NAMEK_SANDBOX_START_TIMEOUT = env_float("NAMEK_SANDBOX_START_TIMEOUT", 30.0, minimum=1.0)
NAMEK_CHROMIUM = env_str("NAMEK_CHROMIUM", "/usr/bin/chromium")
NAMEK_SCREEN = env_choice("NAMEK_SCREEN", "xvnc", ("xvnc", "xvfb-x11vnc"))
NAMEK_WARM_POOL = env_int("NAMEK_WARM_POOL", 1, minimum=0, maximum=20)

# --- Kubernetes backend (NAMEK_BACKEND=kubernetes: sandboxes.backends.kubernetes) -----------
# A sandbox is a SandboxClaim against a SandboxWarmPool of agent-sandbox; Namek dials the
# pod's VNC and CDP ports itself and attaches to its tmux server over pods/exec. The start
# timeout is NAMEK_SANDBOX_START_TIMEOUT's; `manage.py namek_controller` follows phases.
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", re.ASCII)
_DNS_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?", re.ASCII)
NAMEK_K8S_NAMESPACE = env_str("NAMEK_K8S_NAMESPACE", "namek")
NAMEK_K8S_WARM_POOL = env_str("NAMEK_K8S_WARM_POOL", "namek-sandboxes")
NAMEK_K8S_SHELL_CONTAINER = env_str("NAMEK_K8S_SHELL_CONTAINER", "shell")
NAMEK_K8S_CHROMIUM_CONTAINER = env_str("NAMEK_K8S_CHROMIUM_CONTAINER", "chromium")
for _name, _value, _pattern in (
    ("NAMEK_K8S_NAMESPACE", NAMEK_K8S_NAMESPACE, _DNS_LABEL),
    ("NAMEK_K8S_WARM_POOL", NAMEK_K8S_WARM_POOL, _DNS_NAME),
    ("NAMEK_K8S_SHELL_CONTAINER", NAMEK_K8S_SHELL_CONTAINER, _DNS_LABEL),
    ("NAMEK_K8S_CHROMIUM_CONTAINER", NAMEK_K8S_CHROMIUM_CONTAINER, _DNS_LABEL),
):
    if not _pattern.fullmatch(_value):
        raise ImproperlyConfigured(f"{_name}={_value!r}: expected a Kubernetes name (lower case, digits, '-')")
#: empty: the in-cluster service account; otherwise a kubeconfig file
NAMEK_K8S_KUBECONFIG = env_str("NAMEK_K8S_KUBECONFIG")
if NAMEK_K8S_KUBECONFIG and NAMEK_BACKEND == "kubernetes" and not Path(NAMEK_K8S_KUBECONFIG).is_file():
    raise ImproperlyConfigured(f"NAMEK_K8S_KUBECONFIG={NAMEK_K8S_KUBECONFIG!r}: no such file")
#: the template's VNC password Secret, mounted into Namek's pods
NAMEK_K8S_VNC_PASSWORD_FILE = env_str("NAMEK_K8S_VNC_PASSWORD_FILE", "/etc/namek/vnc/password")
NAMEK_K8S_VNC_PORT = env_int("NAMEK_K8S_VNC_PORT", 5900, minimum=1, maximum=65535)
#: the pod's CDP forwarder (Chromium itself listens on 127.0.0.1:9222 only)
NAMEK_K8S_CDP_PORT = env_int("NAMEK_K8S_CDP_PORT", 9223, minimum=1, maximum=65535)
NAMEK_K8S_TMUX_SOCKET = env_str("NAMEK_K8S_TMUX_SOCKET", "/run/namek/tmux.sock")
if not NAMEK_K8S_TMUX_SOCKET.startswith("/"):
    raise ImproperlyConfigured(f"NAMEK_K8S_TMUX_SOCKET={NAMEK_K8S_TMUX_SOCKET!r}: expected an absolute path")
# --- end of the Kubernetes backend block ------------------------------------------------------

# Agents. With no LLM configured a run needs a step file (the scripted model). The key
# goes to the runner's environment only, never into the database or a page.
NAMEK_LLM_PROVIDER = env_choice(
    "NAMEK_LLM_PROVIDER",
    "openai",
    ("openai", "anthropic", "google", "ollama", "groq", "mistral", "deepseek", "openrouter", "azure"),
)
NAMEK_LLM_MODEL = env_str("NAMEK_LLM_MODEL")
NAMEK_LLM_BASE_URL = env_url("NAMEK_LLM_BASE_URL", "", ("http", "https")) if env_str("NAMEK_LLM_BASE_URL") else ""
NAMEK_LLM_API_KEY = env_str("NAMEK_LLM_API_KEY")
NAMEK_LLM_CONFIGURED = bool(NAMEK_LLM_MODEL)
NAMEK_RUN_STOP_GRACE = env_float("NAMEK_RUN_STOP_GRACE", 10.0, minimum=0.5)
# Takeover (sandboxes.control): how long a take-over waits for the agent's pause, and how
# long the holder's connections may all be gone before control lapses to nobody.
NAMEK_TAKEOVER_PAUSE_TIMEOUT = env_float("NAMEK_TAKEOVER_PAUSE_TIMEOUT", 15.0, minimum=0.0)
NAMEK_CONTROL_LAPSE = env_float("NAMEK_CONTROL_LAPSE", 60.0, minimum=1.0)
# The wall (viewer.wall): at most this many thumbnails per second per sandbox.
NAMEK_WALL_FPS = env_float("NAMEK_WALL_FPS", 2.0, minimum=0.1)

# Limits. One sandbox is ~0.4-0.5 GiB and a busy one about a core: the defaults fit the
# 2-core, 24 GiB machines Namek is measured on.
NAMEK_MAX_SANDBOXES = env_int("NAMEK_MAX_SANDBOXES", 8, minimum=1)
NAMEK_MAX_SANDBOXES_PER_USER = env_int("NAMEK_MAX_SANDBOXES_PER_USER", 3, minimum=1)
NAMEK_IDLE_TIMEOUT = env_float("NAMEK_IDLE_TIMEOUT", 1800.0, minimum=1.0)
NAMEK_MAX_LIFETIME = env_float("NAMEK_MAX_LIFETIME", 8 * 3600.0, minimum=1.0)
NAMEK_REAPER_INTERVAL = env_float("NAMEK_REAPER_INTERVAL", 10.0, minimum=0.1)
NAMEK_RETENTION_DAYS = env_int("NAMEK_RETENTION_DAYS", 30, minimum=1)

# The screen relay's flow control: a browser must acknowledge what it received; a reader
# with more than NAMEK_RELAY_WINDOW bytes unacknowledged for NAMEK_RELAY_STALL_SECONDS is
# closed with 4408 (Daphne itself would buffer without bound: django/daphne#170).
NAMEK_RELAY_WINDOW = env_int("NAMEK_RELAY_WINDOW", 8 * 1024 * 1024, minimum=2 * 1024 * 1024)
NAMEK_RELAY_STALL_SECONDS = env_float("NAMEK_RELAY_STALL_SECONDS", 15.0, minimum=0.1)

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "sandboxes",
    "viewer",
]

MIDDLEWARE = [
    "namek_web.middleware.PlainHttpForSandboxes",
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "namek_web.urls"
ASGI_APPLICATION = "namek_web.asgi.application"
WSGI_APPLICATION = None

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

_default_db = f"sqlite:///{DATA_DIR / 'db.sqlite3'}"
try:
    DATABASES = {"default": dj_database_url.parse(env_str("DATABASE_URL") or _default_db, conn_max_age=0)}
except Exception as exc:  # dj_database_url raises several types for bad URLs
    raise ImproperlyConfigured(f"DATABASE_URL: cannot parse it ({exc})") from None
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # The supervisor and the web process write the same file: WAL lets readers go on,
    # IMMEDIATE transactions and a timeout make writers queue instead of failing.
    DATABASES["default"]["OPTIONS"] = {
        "timeout": 20,
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = env_str("REDIS_URL")
if REDIS_URL:
    env_url("REDIS_URL", REDIS_URL, ("redis", "rediss", "unix"))
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [REDIS_URL]},
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "dashboard"
LOGOUT_REDIRECT_URL = "login"
CSRF_FAILURE_VIEW = "namek_web.errors.csrf_failure"
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Lax"
CSRF_COOKIE_SAMESITE = "Lax"
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])
# Behind a TLS-terminating proxy (an Ingress): HTTPS is told by X-Forwarded-Proto, cookies
# are Secure, browsers are told to come back over HTTPS only. The proxy redirects HTTP to
# HTTPS itself: sandboxes reach Namek over plain HTTP on NAMEK_INTERNAL_URL (the start
# page, the demo site), and their cookies lose the Secure flag there
# (namek_web.middleware.PlainHttpForSandboxes).
NAMEK_HTTPS = env_bool("NAMEK_HTTPS", False)
if NAMEK_HTTPS:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = True
    SECURE_HSTS_SECONDS = int(env_float("NAMEK_HSTS_SECONDS", 31536000, minimum=1))
    # Whether every subdomain is HTTPS too, and the browsers' preload list, are the
    # domain owner's choice: off unless said, and then not warned about.
    SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("NAMEK_HSTS_SUBDOMAINS", False)
    SECURE_HSTS_PRELOAD = env_bool("NAMEK_HSTS_PRELOAD", False)
    SILENCED_SYSTEM_CHECKS = [
        "security.W008",  # SECURE_SSL_REDIRECT: the proxy redirects
        *([] if SECURE_HSTS_INCLUDE_SUBDOMAINS else ["security.W005"]),
        *([] if SECURE_HSTS_PRELOAD else ["security.W021"]),
    ]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

STATIC_URL = "/static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = DATA_DIR / "static"
#: event screenshots (served by Namek's views, which check access; no MEDIA_URL): files
#: under MEDIA_ROOT, or rows in the database when several web replicas share no volume
MEDIA_ROOT = DATA_DIR / "media"
NAMEK_MEDIA_STORAGE = env_choice("NAMEK_MEDIA_STORAGE", "files", ("files", "database"))
STORAGES = {
    "default": {
        "BACKEND": "sandboxes.storage.DatabaseStorage"
        if NAMEK_MEDIA_STORAGE == "database"
        else "sandboxes.storage.FileStorage"
    },
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}


LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("NAMEK_LOG_LEVEL", "INFO").upper()},
    "loggers": {"daphne": {"level": "WARNING"}, "django.channels.server": {"level": "WARNING"}},
}
