"""The domain's state: sandboxes, their event logs and API tokens. Transitions live in
``services``, events are written by ``events``."""

from __future__ import annotations

import hashlib
import secrets

from django.conf import settings
from django.db import models
from django.utils import timezone


class Phase(models.TextChoices):
    PENDING = "pending"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


#: Phases in which a sandbox may still own processes somewhere.
LIVE_PHASES = (Phase.PENDING, Phase.STARTING, Phase.READY, Phase.STOPPING)


class Sandbox(models.Model):
    name = models.CharField(max_length=64)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="sandboxes")
    backend = models.CharField(max_length=32)
    screen = models.CharField(max_length=16, help_text="WIDTHxHEIGHT of the display")
    phase = models.CharField(max_length=16, choices=Phase.choices, default=Phase.PENDING)
    failure_reason = models.TextField(blank=True)
    browser_restarts = models.PositiveIntegerField(default=0)
    last_browser_exit = models.TextField(blank=True, help_text="why Chromium last had to be restarted")
    #: open screen connections, and when the last one opened or closed: the idle timeout
    viewers = models.IntegerField(default=0)
    last_active_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    ready_at = models.DateTimeField(null=True, blank=True)
    stopped_at = models.DateTimeField(null=True, blank=True)
    #: the sequence number of the sandbox's newest event (0: none yet)
    event_seq = models.PositiveBigIntegerField(default=0)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["phase"])]

    def __str__(self) -> str:
        return f"{self.name} (#{self.pk}, {self.phase})"

    @property
    def is_live(self) -> bool:
        return self.phase in LIVE_PHASES

    @property
    def banner_color(self) -> str:
        """A stable, saturated colour per sandbox, shown on its start page."""
        digest = hashlib.sha256(f"namek-sandbox-{self.pk}".encode()).digest()
        palette = ("#d62828", "#2a9d8f", "#f77f00", "#3a86ff", "#8338ec", "#06d6a0", "#ff006e", "#118ab2")
        return palette[digest[0] % len(palette)]


class Source(models.TextChoices):
    SYSTEM = "system"
    AGENT = "agent"
    PERSON = "person"


class Event(models.Model):
    """One line of a sandbox's event log. ``seq`` counts from 1 per sandbox, without gaps.

    The screenshot and its thumbnail are files in Django's default storage (the data
    dir's ``media/``), named here; see ``sandboxes.events``.
    """

    sandbox = models.ForeignKey(Sandbox, on_delete=models.CASCADE, related_name="events")
    seq = models.PositiveBigIntegerField()
    at = models.DateTimeField(default=timezone.now)
    kind = models.CharField(max_length=64)
    source = models.CharField(max_length=8, choices=Source.choices)
    actor = models.CharField(max_length=150, blank=True)
    text = models.TextField(blank=True)
    data = models.JSONField(default=dict, blank=True)
    screenshot = models.CharField(max_length=200, blank=True)
    thumbnail = models.CharField(max_length=200, blank=True)

    class Meta:
        ordering = ["sandbox", "seq"]
        constraints = [models.UniqueConstraint(fields=["sandbox", "seq"], name="event_seq_unique_per_sandbox")]

    def __str__(self) -> str:
        return f"{self.kind} #{self.seq} of sandbox {self.sandbox_id}"


class ApiTokenQuerySet(models.QuerySet["ApiToken"]):
    def active(self) -> ApiTokenQuerySet:
        return self.filter(revoked_at__isnull=True, user__is_active=True)


class ApiToken(models.Model):
    """A bearer token. Only its SHA-256 is stored; the token is shown once, at creation."""

    PREFIX = "nmk_"

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=64, blank=True)
    digest = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    objects = ApiTokenQuerySet.as_manager()

    def __str__(self) -> str:
        return f"token #{self.pk} of {self.user} ({self.name or 'unnamed'})"

    @staticmethod
    def hash(token: str) -> str:
        return hashlib.sha256(token.encode()).hexdigest()

    @classmethod
    def issue(cls, user: models.Model, name: str = "") -> tuple[ApiToken, str]:
        token = cls.PREFIX + secrets.token_urlsafe(32)
        return cls.objects.create(user=user, name=name, digest=cls.hash(token)), token
