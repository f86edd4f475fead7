"""The domain's state: sandboxes, their event logs and API tokens. Transitions live in
``services``, events are written by ``events``."""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime

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


def token_digest(token: str) -> str:
    """What is stored of a secret token (API or run): its SHA-256, never the token."""
    return hashlib.sha256(token.encode()).hexdigest()


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


class RunStatus(models.TextChoices):
    PENDING = "pending"  # created; the runner has not said hello yet
    RUNNING = "running"
    PAUSED = "paused"
    DONE = "done"
    FAILED = "failed"


#: a run in one of these holds its sandbox: at most one per sandbox
ACTIVE_RUN_STATUSES = (RunStatus.PENDING, RunStatus.RUNNING, RunStatus.PAUSED)


class AgentRun(models.Model):
    """One agent working on one sandbox's browser, from its task to done or failed.

    The runner reaches Namek only through the agent bridge, with a per-run secret token
    (only its SHA-256 is stored here).
    """

    TOKEN_PREFIX = "nmkrun_"

    sandbox = models.ForeignKey(Sandbox, on_delete=models.CASCADE, related_name="runs")
    task = models.TextField()
    script = models.TextField(blank=True, help_text="a step file for the scripted model; empty: an LLM drives")
    started_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="agent_runs"
    )
    #: what drives it: {"model": "scripted"} or {"provider", "model", "base_url"} (never a key)
    model_settings = models.JSONField(default=dict, blank=True)
    status = models.CharField(max_length=16, choices=RunStatus.choices, default=RunStatus.PENDING)
    result = models.TextField(blank=True)
    error = models.TextField(blank=True)
    steps = models.PositiveIntegerField(default=0)
    token_digest = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    ended_at = models.DateTimeField(null=True, blank=True)
    exit_code = models.IntegerField(null=True, blank=True, help_text="the runner process's exit status")

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["sandbox"],
                condition=models.Q(status__in=["pending", "running", "paused"]),
                name="one_active_run_per_sandbox",
            )
        ]

    def __str__(self) -> str:
        return f"run #{self.pk} on sandbox {self.sandbox_id} ({self.status})"

    @property
    def is_active(self) -> bool:
        return self.status in ACTIVE_RUN_STATUSES

    @classmethod
    def new_token(cls) -> tuple[str, str]:
        """(token, its digest): the token is handed to the runner once."""
        token = cls.TOKEN_PREFIX + secrets.token_urlsafe(32)
        return token, token_digest(token)


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
        return token_digest(token)

    @classmethod
    def issue(cls, user: models.Model, name: str = "") -> tuple[ApiToken, str]:
        token = cls.PREFIX + secrets.token_urlsafe(32)
        return cls.objects.create(user=user, name=name, digest=cls.hash(token)), token


class Holder(models.TextChoices):
    NOBODY = "nobody"
    AGENT = "agent"
    PERSON = "person"


class ControlSpan(models.Model):
    """One person's time in control of a sandbox, from the request to its end: the audit
    record behind the ``control.*`` events (who, when, how long, how many inputs, note)."""

    class Ended(models.TextChoices):
        HANDED_BACK = "handed_back"
        RELEASED = "released"  # ended by someone else (an admin) or by the sandbox going
        LAPSED = "lapsed"

    sandbox = models.ForeignKey(Sandbox, on_delete=models.CASCADE, related_name="control_spans")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    username = models.CharField(max_length=150)
    #: the agent run that was active when control was taken (and paused for it)
    run = models.ForeignKey(AgentRun, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    requested_at = models.DateTimeField(default=timezone.now)
    granted_at = models.DateTimeField(null=True, blank=True)
    #: whether the agent acknowledged its pause in time (None: there was no agent to pause)
    agent_confirmed = models.BooleanField(null=True, blank=True)
    ended_at = models.DateTimeField(null=True, blank=True)
    ended = models.CharField(max_length=16, choices=Ended.choices, blank=True)
    ended_by = models.CharField(max_length=150, blank=True)
    note = models.TextField(blank=True)
    # Input the holder's connections forwarded (counted per connection, added up here)
    keys = models.PositiveIntegerField(default=0)
    pointer = models.PositiveIntegerField(default=0)
    clipboard = models.PositiveIntegerField(default=0)
    terminal = models.PositiveIntegerField(default=0)

    class Meta:
        ordering = ["-requested_at", "-id"]

    def __str__(self) -> str:
        return f"control span #{self.pk} of {self.username} on sandbox {self.sandbox_id}"

    @property
    def inputs(self) -> dict[str, int]:
        return {"keys": self.keys, "pointer": self.pointer, "clipboard": self.clipboard, "terminal": self.terminal}


class ControlLease(models.Model):
    """Who drives a sandbox: its agent run, one person, or nobody. One row per sandbox,
    changed only by ``sandboxes.control`` under a lock; ``version`` grows with every change
    so that web processes can order what the channel layer tells them."""

    sandbox = models.OneToOneField(Sandbox, primary_key=True, on_delete=models.CASCADE, related_name="lease")
    holder = models.CharField(max_length=8, choices=Holder.choices, default=Holder.NOBODY)
    #: the person holding control, or taking it (holder "person")
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    #: that person's span
    span = models.ForeignKey(ControlSpan, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    #: the person's connections are interactive (the agent's pause settled or timed out)
    granted = models.BooleanField(default=False)
    #: the sandbox's active agent run, whoever drives (it stays paused while a person does)
    run = models.ForeignKey(AgentRun, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    version = models.PositiveBigIntegerField(default=0)
    changed_at = models.DateTimeField(default=timezone.now)
    #: the last sign of life from the holding person's connections (for the lapse)
    seen_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"control of sandbox {self.sandbox_id}: {self.holder} (v{self.version})"


class StoredFile(models.Model):
    """A file kept in the database (event screenshots with NAMEK_MEDIA_STORAGE=database):
    every web replica reads what any of them stored, with no shared volume."""

    name = models.CharField(max_length=200, unique=True)
    content = models.BinaryField()
    size = models.PositiveIntegerField()
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"{self.name} ({self.size} bytes)"


class ShareLink(models.Model):
    """A read-only link to one sandbox's page (``sandbox``) or to the wall (``sandbox`` null).

    The link's token is signed over its id (``sandboxes.sharing``); this row says whether
    it still works: until ``expires_at``, unless ``revoked_at``."""

    sandbox = models.ForeignKey(
        Sandbox, null=True, blank=True, on_delete=models.CASCADE, related_name="share_links", help_text="null: the wall"
    )
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="share_links")
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField()
    revoked_at = models.DateTimeField(null=True, blank=True)
    revoked_by = models.CharField(max_length=150, blank=True)
    uses = models.PositiveIntegerField(default=0)
    last_used_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"share link #{self.pk} to {f'sandbox {self.sandbox_id}' if self.sandbox_id else 'the wall'}"

    @property
    def wall(self) -> bool:
        return self.sandbox_id is None

    def active_at(self, when: datetime) -> bool:
        return self.revoked_at is None and when < self.expires_at
