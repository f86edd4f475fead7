"""Backends by name, loaded lazily so that local mode never imports ``kubernetes``."""

from __future__ import annotations

from functools import cache

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string

from sandboxes.backends.base import SandboxBackend

REGISTRY = {
    "local": "sandboxes.backends.local.LocalBackend",
    "kubernetes": "sandboxes.backends.kubernetes.KubernetesBackend",
}


@cache
def get_backend(name: str | None = None) -> SandboxBackend:
    name = name or settings.NAMEK_BACKEND
    try:
        path = REGISTRY[name]
    except KeyError:
        raise ImproperlyConfigured(
            f"NAMEK_BACKEND={name!r}: no such backend here (available: {', '.join(REGISTRY)})"
        ) from None
    backend: SandboxBackend = import_string(path)()
    return backend
