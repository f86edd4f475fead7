"""The Kubernetes backend: sandboxes are agent-sandbox ``SandboxClaim``s (``v1beta1``).

What Namek makes and reads, all in ``NAMEK_K8S_NAMESPACE``:

- a ``SandboxClaim`` ``namek-<id>`` against the warm pool ``NAMEK_K8S_WARM_POOL``, labelled
  ``namek.dev/sandbox-id`` and ``app.kubernetes.io/managed-by: namek``, its start page in
  the annotation ``namek.dev/start-url``; its ``lifecycle`` deletes it at
  ``NAMEK_MAX_LIFETIME`` should Namek's own reaper not have. It sets no ``env``:
  agent-sandbox starts every claim that does cold, never from the warm pool. Warm pods
  show ``about:blank`` until ``open_start_page`` opens the claim's start page over CDP,
  once the sandbox is ready (``manage.py namek_controller`` does, before it records
  ``ready``, as the local supervisor does for its warm sandboxes);
- the ``Sandbox`` the controller binds to it, named in ``claim.status.sandbox.name``: a
  sandbox adopted from the warm pool keeps the pool's generated name, a cold one is named
  after the claim;
- the Sandbox's pod, of the Sandbox's name (older controllers: its ``agents.x-k8s.io/pod-name``
  annotation), labelled ``app.kubernetes.io/name: namek-sandbox`` by the template.

Phases (``evaluate``), from the claim's and the Sandbox's ``Ready`` conditions and the pod:

=========  ==============================================================================
phase      when
=========  ==============================================================================
pending    no Sandbox yet (``SandboxMissing``, ``ReconcilerError`` before one exists), or the
           pod cannot be scheduled (its ``PodScheduled`` condition: ``Unschedulable``)
starting   a Sandbox exists and is not ready (``DependenciesNotReady``, ``SandboxNotReady``,
           ``AdoptionPending``, ``ReconcilerError``, unknown reasons: shown verbatim); the
           reason says cold start or warm adoption, and image pull or crash trouble
ready      ``Ready`` is True (``DependenciesReady``) and the pod has an IP
failed     the claim cannot be served (``TemplateNotFound``, ``WarmPoolNotFound``,
           ``InvalidMetadata``, ``EnvVarsInjectionRejected``, ``VolumeClaimTemplatesError``),
           the pod ended (``PodFailed``, ``PodSucceeded``), ``MultiplePods``, an image that
           can never be pulled, or not ready within ``NAMEK_SANDBOX_START_TIMEOUT`` of the
           claim's creation (unless it was ready before: ``follow`` asks ``was_ready``)
stopped    the claim is gone or being deleted, expired (``ClaimExpired``, ``SandboxExpired``,
           its shutdown time passed), or the Sandbox was suspended
=========  ==============================================================================

Waits are watches with deadlines that resume from the last ``resourceVersion`` and list
again on 410 Gone (``follow``, ``restart_browser``). The shell and agent runners use
``pods/exec`` (``kube_exec``): a shell is a tmux client attached to the shell container's
tmux server; a runner is ``python -m sandboxes.agents.runner`` started in that container
with its token on stdin, marked by ``NAMEK_RUN_ID=<id>`` in its environment so that any
replica can signal it. Every API error becomes a ``BackendError`` saying what was
refused and whether retrying can help. Only this module and ``kube_exec`` import
``kubernetes`` (an import-linter contract).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import urllib3
from django.conf import settings
from kubernetes import client as k8s
from kubernetes import watch as k8s_watch
from kubernetes.client.exceptions import ApiException
from kubernetes.config import ConfigException

from sandboxes.backends import kube_exec
from sandboxes.backends.base import (
    BackendError,
    BrowserTarget,
    Endpoint,
    RunnerSpec,
    SandboxBackend,
    SandboxSpec,
    SandboxStatus,
    ScreenTarget,
)

log = logging.getLogger(__name__)

CLAIMS = ("extensions.agents.x-k8s.io", "v1beta1", "sandboxclaims")
SANDBOXES = ("agents.x-k8s.io", "v1beta1", "sandboxes")
WARM_POOLS = ("extensions.agents.x-k8s.io", "v1beta1", "sandboxwarmpools")

LABEL_SANDBOX_ID = "namek.dev/sandbox-id"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_RUN_ID = "namek.dev/run-id"
#: on the sandbox's pod (``additionalPodMetadata``). The agent-sandbox controller accepts
#: only label domains on its allowlist there, ``sandbox.users.io`` (and its subdomains) by
#: default: another domain would fail the claim with ``InvalidMetadata``.
POD_LABEL_SANDBOX_ID = "namek.sandbox.users.io/sandbox-id"
ANNOTATION_NAME = "namek.dev/sandbox-name"
#: the start page the claim's sandbox opens, and whether it has (see open_start_page)
ANNOTATION_START_URL = "namek.dev/start-url"
ANNOTATION_START_OPENED = "namek.dev/start-opened"
#: "<chromium restarts before>:<why>", set by ``restart_browser`` for ``follow`` to report
ANNOTATION_BROWSER_RESTART = "namek.dev/browser-restart"
CLAIM_SELECTOR = f"{LABEL_MANAGED_BY}=namek"
POD_SELECTOR = "app.kubernetes.io/name=namek-sandbox"
# Set by the agent-sandbox controllers.
LAUNCH_TYPE_LABEL = "agents.x-k8s.io/launch-type"
POD_NAME_ANNOTATION = "agents.x-k8s.io/pod-name"

#: what the viewer's terminal is (xterm.js), for the tmux client in the pod
TERMINAL_TYPE = "xterm-256color"
#: seconds one API request may take (``check`` stays under /readyz's 5 s)
REQUEST_TIMEOUT = 10.0
CHECK_TIMEOUT = 4.0
#: seconds a watch lasts before it is opened again from its last resourceVersion
WATCH_TIMEOUT = 60
#: an exec that must finish (kill, restart) gets this long
EXEC_TIMEOUT = 20.0

#: claim Ready reasons the controller will not get past by retrying
CLAIM_FAILURES = {
    "TemplateNotFound": "the warm pool's SandboxTemplate was not found",
    "WarmPoolNotFound": "the SandboxWarmPool was not found",
    "InvalidMetadata": "the sandbox controller refused the claim's pod metadata",
    "EnvVarsInjectionRejected": "the SandboxTemplate refuses the claim's env (set its envVarsInjectionPolicy: Allowed)",
    "VolumeClaimTemplatesError": "the volume claim templates are invalid",
}
EXPIRED_REASONS = ("ClaimExpired", "SandboxExpired")
ENDED_REASONS = ("PodFailed", "PodSucceeded")
SUSPENDED_REASONS = ("SandboxSuspended", "IdleSuspended")
#: waiting reasons of a container that retrying will not cure
IMAGE_FATAL = ("InvalidImageName", "ErrImageNeverPull")
IMAGE_TROUBLE = ("ErrImagePull", "ImagePullBackOff", "RegistryUnavailable", "SignatureValidationFailed")
CONTAINER_TROUBLE = ("CrashLoopBackOff", "CreateContainerConfigError", "CreateContainerError", "RunContainerError")

#: how a runner is started in the shell container: the token, then ``NAMEK_LLM_*=value``
#: lines and an empty line arrive on stdin (never in argv, which every process can read)
RUNNER_SCRIPT = """IFS= read -r NAMEK_RUN_TOKEN || exit 90
export NAMEK_RUN_TOKEN
while IFS= read -r line && [ -n "$line" ]; do
  case "$line" in NAMEK_LLM_*=*) export "$line" ;; esac
done
NAMEK_RUN_ID=$2
export NAMEK_RUN_ID PYTHONUNBUFFERED=1
exec python -m sandboxes.agents.runner --bridge "$1"
"""
#: signals every process whose environment holds the marker ``NAMEK_RUN_ID=<id>``
SIGNAL_SCRIPT = """sig=$1 marker=$2
for dir in /proc/[0-9]*; do
  pid=${dir#/proc/}
  [ "$pid" = "$$" ] && continue
  if tr '\\0' '\\n' < "$dir/environ" 2>/dev/null | grep -qxF "$marker"; then
    kill "-$sig" "$pid" 2>/dev/null && echo "signalled $pid"
  fi
done
exit 0
"""

PhaseCallback = Callable[[int, str, str], Any]
RunnerExitCallback = Callable[[int, int, str], Any]


def claim_name(sandbox_id: int) -> str:
    return f"namek-{sandbox_id}"


# --- reading objects ------------------------------------------------------------------------


def _get(obj: Mapping[str, Any] | None, *path: str) -> Any:
    for key in path:
        if not isinstance(obj, Mapping):
            return None
        obj = obj.get(key)
    return obj


@dataclass(frozen=True)
class Condition:
    type: str
    status: str
    reason: str
    message: str

    def text(self) -> str:
        return f"{self.reason}: {self.message}" if self.message else self.reason


def condition(obj: Mapping[str, Any] | None, kind: str) -> Condition | None:
    for item in _get(obj, "status", "conditions") or []:
        if item.get("type") == kind:
            return Condition(kind, str(item.get("status", "")), str(item.get("reason", "")), item.get("message") or "")
    return None


def parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def format_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def sandbox_id_of(claim: Mapping[str, Any]) -> int | None:
    raw = _get(claim, "metadata", "labels", LABEL_SANDBOX_ID)
    if raw is None:
        name = str(_get(claim, "metadata", "name") or "")
        raw = name.removeprefix("namek-") if name.startswith("namek-") else None
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None


def pod_name_of(sandbox: Mapping[str, Any]) -> str:
    return str(_get(sandbox, "metadata", "annotations", POD_NAME_ANNOTATION) or _get(sandbox, "metadata", "name"))


def pod_ips(claim: Mapping[str, Any] | None, sandbox: Mapping[str, Any] | None) -> list[str]:
    return list(_get(claim, "status", "sandbox", "podIPs") or _get(sandbox, "status", "podIPs") or [])


def _container_statuses(pod: Mapping[str, Any] | None) -> list[Mapping[str, Any]]:
    status = _get(pod, "status") or {}
    return [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]


def restart_count(pod: Mapping[str, Any] | None, container: str) -> int:
    for item in _container_statuses(pod):
        if item.get("name") == container:
            return int(item.get("restartCount") or 0)
    return 0


def describe_termination(state: Mapping[str, Any] | None) -> str:
    terminated = _get(state, "terminated")
    if not terminated:
        return ""
    parts = [str(terminated.get("reason") or "exited"), f"exit code {terminated.get('exitCode')}"]
    if terminated.get("signal"):
        parts.append(f"signal {terminated['signal']}")
    text = ", ".join(parts)
    return f"{text}: {terminated['message']}" if terminated.get("message") else text


def container_problem(pod: Mapping[str, Any] | None) -> tuple[str, bool] | None:
    """What keeps a container of the pod from running, and whether it is for good."""
    for item in _container_statuses(pod):
        waiting = _get(item, "state", "waiting") or {}
        reason = waiting.get("reason") or ""
        message = f": {waiting['message']}" if waiting.get("message") else ""
        name = item.get("name")
        if reason in IMAGE_FATAL or reason in IMAGE_TROUBLE:
            text = f"cannot pull the image {item.get('image')} of container {name} ({reason}){message}"
            return text, reason in IMAGE_FATAL
        if reason == "CrashLoopBackOff":
            last = describe_termination(item.get("lastState"))
            return f"container {name} keeps crashing (CrashLoopBackOff{', last: ' + last if last else ''})", False
        if reason in CONTAINER_TROUBLE:
            return f"container {name} cannot start ({reason}){message}", False
    return None


def pod_ended(pod: Mapping[str, Any] | None) -> str:
    """Why the pod ended for good ("" while it has not)."""
    phase = _get(pod, "status", "phase")
    if phase not in ("Failed", "Succeeded"):
        return ""
    detail = _get(pod, "status", "reason") or ""
    if _get(pod, "status", "message"):
        detail = f"{detail}: {_get(pod, 'status', 'message')}" if detail else _get(pod, "status", "message")
    if not detail:
        ended = [
            f"{item.get('name')} {describe_termination(item.get('state'))}"
            for item in _container_statuses(pod)
            if _get(item, "state", "terminated")
        ]
        detail = "; ".join(ended)
    return f"{phase}{': ' + detail if detail else ''}"


def evaluate(  # noqa: PLR0911 - one return per outcome, in the order of the table
    claim: Mapping[str, Any],
    sandbox: Mapping[str, Any] | None,
    pod: Mapping[str, Any] | None,
    *,
    now: datetime,
    start_timeout: float,
    chromium_container: str = "chromium",
    was_ready: bool = False,
) -> SandboxStatus:
    """The Namek phase and a reason for people, from what the cluster says (see the table above).

    ``was_ready``: the sandbox was ready before, so the start deadline is behind it (its pod
    goes un-ready for a moment while Chromium restarts, say)."""
    restarts = restart_count(pod, chromium_container)

    def status(phase: str, reason: str = "") -> SandboxStatus:
        return SandboxStatus(phase, reason, restarts)

    name = str(_get(claim, "metadata", "name"))
    if _get(claim, "metadata", "deletionTimestamp"):
        return status("stopped", f"deleted: its SandboxClaim {name} is being deleted")
    claim_ready = condition(claim, "Ready")
    sandbox_ready = condition(sandbox, "Ready") if sandbox is not None else None
    ready = sandbox_ready or (claim_ready if sandbox is not None else None)

    shutdown = parse_time(_get(claim, "spec", "lifecycle", "shutdownTime"))
    if (shutdown is not None and now >= shutdown) or (claim_ready and claim_ready.reason == "ClaimExpired"):
        when = f" {format_time(shutdown)}" if shutdown else ""
        return status("stopped", f"expired: it reached its shutdown time{when}")
    if any(c is not None and c.reason == "SandboxExpired" for c in (claim_ready, sandbox_ready)):
        return status("stopped", "expired: its Sandbox reached its shutdown time")

    if claim_ready and claim_ready.status != "True" and claim_ready.reason in CLAIM_FAILURES:
        failure = CLAIM_FAILURES[claim_ready.reason]
        return status("failed", f"{failure}: {claim_ready.message}" if claim_ready.message else failure)

    if sandbox is not None:
        sandbox_name = _get(sandbox, "metadata", "name")
        ended = pod_ended(pod)
        finished = condition(sandbox, "Finished")
        if ended or (ready and ready.reason in ENDED_REASONS) or (finished and finished.status == "True"):
            detail = ended or (
                ready.text() if ready and ready.reason in ENDED_REASONS else finished.text() if finished else ""
            )
            return status("failed", f"the sandbox pod ended ({detail})")
        if ready and ready.reason == "MultiplePods":
            return status("failed", f"more than one pod belongs to the Sandbox {sandbox_name}: {ready.message}")
        suspended = condition(sandbox, "Suspended")
        if (
            (ready and ready.reason in SUSPENDED_REASONS)
            or (suspended and suspended.status == "True")
            or _get(sandbox, "spec", "operatingMode") == "Suspended"
        ):
            return status("stopped", f"suspended: its Sandbox {sandbox_name} was suspended")

    progress_phase, progress = _progress(claim, claim_ready, sandbox, sandbox_ready, pod)
    if progress_phase == "failed":
        return status("failed", progress)
    if ready is not None and ready.status == "True":
        if pod_ips(claim, sandbox):
            return status("ready")
        progress_phase, progress = "starting", "ready, waiting for the pod's IP address"

    created = parse_time(_get(claim, "metadata", "creationTimestamp"))
    if not was_ready and created is not None and (now - created).total_seconds() > start_timeout:
        return status("failed", f"not ready after {start_timeout:.0f} s ({progress})")
    return status(progress_phase, f"{progress_phase}: {progress}")


def _progress(  # noqa: PLR0911, PLR0912 - one branch per reason
    claim: Mapping[str, Any],
    claim_ready: Condition | None,
    sandbox: Mapping[str, Any] | None,
    sandbox_ready: Condition | None,
    pod: Mapping[str, Any] | None,
) -> tuple[str, str]:
    """Where a sandbox that is on its way stands: (phase, what it waits for)."""
    if sandbox is None:
        bound = _get(claim, "status", "sandbox", "name")
        if claim_ready is None:
            if bound:
                return "starting", f"waiting for its Sandbox {bound}"
            return "pending", "waiting for the sandbox controller to take the claim"
        if claim_ready.reason == "AdoptionPending":
            return "starting", "adopting a warm sandbox from the pool"
        if claim_ready.reason == "SandboxMissing":
            return "pending", "waiting for the sandbox controller to make its Sandbox"
        if claim_ready.reason == "ReconcilerError":
            return "pending", f"the sandbox controller failed and retries: {claim_ready.message}"
        if bound:
            return "starting", f"waiting for its Sandbox {bound} ({claim_ready.text()})"
        return "pending", claim_ready.text()

    scheduled = condition(pod, "PodScheduled") if pod is not None else condition(sandbox, "PodScheduled")
    if scheduled and scheduled.status == "False" and scheduled.reason == "Unschedulable":
        return "pending", f"unschedulable: {scheduled.message or 'no node fits the pod'}"
    if scheduled and scheduled.status == "False" and scheduled.reason == "SchedulingGated":
        return "pending", f"waiting for the pod's scheduling gates to be removed ({scheduled.message})"
    problem = container_problem(pod)
    if problem is not None:
        text, fatal = problem
        return ("failed" if fatal else "starting"), text
    if sandbox_ready and sandbox_ready.reason == "ReconcilerError":
        return "starting", f"the sandbox controller failed and retries: {sandbox_ready.message}"
    known = ("DependenciesNotReady", "DependenciesReady")
    if sandbox_ready and sandbox_ready.reason not in known:
        return "starting", sandbox_ready.text()

    sandbox_name = str(_get(sandbox, "metadata", "name"))
    launch = _get(sandbox, "metadata", "labels", LAUNCH_TYPE_LABEL)
    if launch is None:
        launch = "cold" if sandbox_name == _get(claim, "metadata", "name") else "warm"
    if launch == "warm":
        text = f"adopted the warm sandbox {sandbox_name}, waiting for it to be ready"
    else:
        text = "no warm sandbox was free, starting one cold"
    detail = sandbox_ready.message if sandbox_ready else ""
    return "starting", f"{text} ({detail})" if detail else text


# --- errors ---------------------------------------------------------------------------------


def _api_message(exc: ApiException) -> str:
    with contextlib.suppress(TypeError, ValueError, AttributeError):
        body = json.loads(exc.body)
        if isinstance(body, dict) and body.get("message"):
            return str(body["message"])
    return str(exc.reason or "")


def api_error(  # noqa: PLR0911 - one per status
    exc: ApiException, verb: str, resource: str, name: str, namespace: str
) -> BackendError:
    """A BackendError that says what Kubernetes refused, and whether retrying can help."""
    status = exc.status or 0
    message = " ".join(_api_message(exc).split())[:1000]
    target = f"{resource} {name}".strip()
    where = f"in namespace {namespace}"
    if status == 401:
        return BackendError(f"the Kubernetes API did not accept Namek's credentials (401): {message}")
    if status == 403:
        return BackendError(
            f"Kubernetes refused to let Namek {verb} {target} {where} (403 Forbidden): its service account "
            f"needs the RBAC verb {verb!r} on {resource!r}. The API said: {message}"
        )
    if status == 404:
        if not name:
            return BackendError(
                f"Kubernetes has no {resource} {where} (404): is the agent-sandbox CRD installed? {message}"
            )
        return BackendError(f"{target} was not found {where} (404): {message}")
    if status == 409:
        return BackendError(f"{target} changed or exists already {where} (409 Conflict): {message}", retryable=True)
    if status in (400, 422):
        return BackendError(f"Kubernetes rejected {target} as invalid ({status}): {message}")
    if status == 429:
        return BackendError(f"the Kubernetes API is throttling Namek (429): {message}", retryable=True)
    if status >= 500:
        return BackendError(
            f"the Kubernetes API failed to {verb} {target} ({status} {exc.reason}): {message}", retryable=True
        )
    if status == 0:
        return BackendError(f"cannot reach the Kubernetes API to {verb} {target}: {message}", retryable=True)
    return BackendError(f"Kubernetes answered {status} to {verb} {target}: {message}", retryable=status >= 500)


# --- the backend ----------------------------------------------------------------------------


class KubernetesBackend(SandboxBackend):
    name = "kubernetes"

    def __init__(
        self,
        *,
        namespace: str | None = None,
        warm_pool: str | None = None,
        kubeconfig: str | None = None,
        custom_api: Any = None,
        core_api: Any = None,
        watch_factory: Callable[[], Any] | None = None,
        exec_factory: Callable[..., Any] | None = None,
        http_get: Callable[[str, int, str, float], bytes] | None = None,
        on_runner_exit: RunnerExitCallback | None = None,
        now: Callable[[], datetime] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.namespace = namespace or settings.NAMEK_K8S_NAMESPACE
        self.warm_pool = warm_pool or settings.NAMEK_K8S_WARM_POOL
        self.kubeconfig = settings.NAMEK_K8S_KUBECONFIG if kubeconfig is None else kubeconfig
        self.vnc_password_file = Path(settings.NAMEK_K8S_VNC_PASSWORD_FILE)
        self.vnc_port = settings.NAMEK_K8S_VNC_PORT
        self.cdp_port = settings.NAMEK_K8S_CDP_PORT
        self.shell_container = settings.NAMEK_K8S_SHELL_CONTAINER
        self.chromium_container = settings.NAMEK_K8S_CHROMIUM_CONTAINER
        self.tmux_socket = settings.NAMEK_K8S_TMUX_SOCKET
        self.start_timeout = float(settings.NAMEK_SANDBOX_START_TIMEOUT)
        self.max_lifetime = float(settings.NAMEK_MAX_LIFETIME)
        self._custom = custom_api
        self._core = core_api
        self._configuration: Any = None
        self._watch_factory = watch_factory or k8s_watch.Watch
        self._exec_factory = exec_factory
        self._http_get = http_get or _http_get
        self._on_runner_exit = on_runner_exit or _record_runner_exit
        self._now = now or (lambda: datetime.now(UTC))
        self._environ = os.environ if environ is None else environ
        self._lock = threading.Lock()
        #: run id -> (pod, exec stream) of the runners this process started
        self._runners: dict[int, tuple[str, Any]] = {}

    # --- the client ---------------------------------------------------------------------

    def _apis(self) -> tuple[Any, Any]:
        with self._lock:
            if self._custom is None or self._core is None:
                api_client = k8s.ApiClient(self._client_configuration())
                self._custom = self._custom or k8s.CustomObjectsApi(api_client)
                self._core = self._core or k8s.CoreV1Api(api_client)
            return self._custom, self._core

    def _client_configuration(self) -> Any:
        if self._configuration is None:
            try:
                self._configuration = kube_exec.load_configuration(self.kubeconfig)
            except (ConfigException, OSError, ValueError) as exc:
                where = f"the kubeconfig {self.kubeconfig}" if self.kubeconfig else "the in-cluster service account"
                hint = "" if self.kubeconfig else " (outside a cluster, set NAMEK_K8S_KUBECONFIG)"
                raise BackendError(
                    f"cannot load the Kubernetes client configuration from {where}: {exc}{hint}"
                ) from None
        return self._configuration

    @property
    def custom(self) -> Any:
        return self._apis()[0]

    @property
    def core(self) -> Any:
        return self._apis()[1]

    def _call(self, verb: str, resource: str, name: str, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``method(*args, **kwargs)`` with a timeout; API and connection errors as BackendError.
        ``missing_ok=True``: None for a 404."""
        missing_ok = kwargs.pop("missing_ok", False)
        kwargs.setdefault("_request_timeout", REQUEST_TIMEOUT)
        try:
            return method(*args, **kwargs)
        except ApiException as exc:
            if missing_ok and exc.status == 404:
                return None
            raise api_error(exc, verb, resource, name, self.namespace) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise BackendError(
                f"cannot reach the Kubernetes API to {verb} {resource} {name}: {exc}", retryable=True
            ) from None

    def _get_custom(self, kind: tuple[str, str, str], name: str) -> dict[str, Any] | None:
        group, version, plural = kind
        method = self.custom.get_namespaced_custom_object
        obj = self._call("get", plural, name, method, group, version, self.namespace, plural, name, missing_ok=True)
        return None if obj is None else dict(obj)

    def _get_pod(self, name: str) -> dict[str, Any] | None:
        pod = self._call("get", "pods", name, self.core.read_namespaced_pod, name, self.namespace, missing_ok=True)
        return None if pod is None else _plain(pod)

    # --- create, status, delete -------------------------------------------------------

    def claim_body(self, spec: SandboxSpec) -> dict[str, Any]:
        shutdown = self._now() + timedelta(seconds=self.max_lifetime)
        return {
            "apiVersion": f"{CLAIMS[0]}/{CLAIMS[1]}",
            "kind": "SandboxClaim",
            "metadata": {
                "name": claim_name(spec.id),
                "namespace": self.namespace,
                "labels": {LABEL_SANDBOX_ID: str(spec.id), LABEL_MANAGED_BY: "namek"},
                "annotations": {ANNOTATION_NAME: spec.name, ANNOTATION_START_URL: spec.start_url},
            },
            "spec": {
                "warmPoolRef": {"name": self.warm_pool},
                "additionalPodMetadata": {"labels": {POD_LABEL_SANDBOX_ID: str(spec.id)}},
                # A backstop: Namek's reaper stops sandboxes at NAMEK_MAX_LIFETIME itself.
                "lifecycle": {"shutdownPolicy": "Delete", "shutdownTime": format_time(shutdown)},
            },
        }

    def create(self, spec: SandboxSpec) -> None:
        name = claim_name(spec.id)
        body = self.claim_body(spec)
        try:
            self.custom.create_namespaced_custom_object(
                *CLAIMS[:2],
                self.namespace,
                CLAIMS[2],
                body,
                field_validation="Strict",
                _request_timeout=REQUEST_TIMEOUT,
            )
        except ApiException as exc:
            if exc.status != 409:
                raise api_error(exc, "create", "sandboxclaims", name, self.namespace) from None
            self._accept_existing(spec.id)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise BackendError(
                f"cannot reach the Kubernetes API to create sandboxclaims {name}: {exc}", retryable=True
            ) from None

    def _accept_existing(self, sandbox_id: int) -> None:
        """A create that found the claim there: fine if it is this sandbox's (a retry)."""
        name = claim_name(sandbox_id)
        existing = self._get_custom(CLAIMS, name)
        if existing is None:
            raise BackendError(
                f"sandboxclaims {name} was being deleted while Namek created it: try again", retryable=True
            )
        labels = _get(existing, "metadata", "labels") or {}
        if labels.get(LABEL_SANDBOX_ID) != str(sandbox_id) or labels.get(LABEL_MANAGED_BY) != "namek":
            raise BackendError(
                f"a SandboxClaim {name} that Namek did not make exists in namespace {self.namespace}: delete it or "
                "use another namespace"
            )
        if _get(existing, "metadata", "deletionTimestamp"):
            raise BackendError(f"an earlier SandboxClaim {name} is still being deleted: try again", retryable=True)

    def status(self, sandbox_id: int) -> SandboxStatus:
        name = claim_name(sandbox_id)
        claim = self._get_custom(CLAIMS, name)
        if claim is None:
            return SandboxStatus("stopped", f"deleted: its SandboxClaim {name} is gone")
        sandbox = pod = None
        bound = _get(claim, "status", "sandbox", "name")
        if bound:
            sandbox = self._get_custom(SANDBOXES, bound)
        if sandbox is not None:
            pod = self._get_pod(pod_name_of(sandbox))
        return self.evaluate(claim, sandbox, pod)

    def evaluate(
        self,
        claim: Mapping[str, Any],
        sandbox: Mapping[str, Any] | None,
        pod: Mapping[str, Any] | None,
        *,
        was_ready: bool = False,
    ) -> SandboxStatus:
        return evaluate(
            claim,
            sandbox,
            pod,
            now=self._now(),
            start_timeout=self.start_timeout,
            chromium_container=self.chromium_container,
            was_ready=was_ready,
        )

    def delete(self, sandbox_id: int) -> None:
        """Delete the claim (its Sandbox and pod go with it); a claim already gone is fine."""
        name = claim_name(sandbox_id)
        try:
            self.custom.delete_namespaced_custom_object(
                *CLAIMS[:2], self.namespace, CLAIMS[2], name, _request_timeout=REQUEST_TIMEOUT
            )
        except ApiException as exc:
            if exc.status != 404:
                raise api_error(exc, "delete", "sandboxclaims", name, self.namespace) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise BackendError(
                f"cannot reach the Kubernetes API to delete sandboxclaims {name}: {exc}", retryable=True
            ) from None

    # --- where things are -------------------------------------------------------------

    def _bound(self, sandbox_id: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
        name = claim_name(sandbox_id)
        claim = self._get_custom(CLAIMS, name)
        if claim is None:
            raise BackendError(f"sandbox {sandbox_id} has no SandboxClaim {name} (it was deleted)")
        bound = _get(claim, "status", "sandbox", "name")
        sandbox = self._get_custom(SANDBOXES, bound) if bound else None
        return claim, sandbox

    def _pod_ip(self, sandbox_id: int) -> str:
        claim, sandbox = self._bound(sandbox_id)
        ips = pod_ips(claim, None) or pod_ips(None, sandbox)
        if not ips:
            raise BackendError(f"sandbox {sandbox_id} has no pod IP yet (it is not ready)", retryable=True)
        return ips[0]

    def _pod_name(self, sandbox_id: int) -> str:
        _, sandbox = self._bound(sandbox_id)
        if sandbox is None:
            raise BackendError(f"sandbox {sandbox_id} has no Sandbox (pod) yet: it is not ready", retryable=True)
        return pod_name_of(sandbox)

    def _vnc_password(self) -> str:
        path = self.vnc_password_file
        try:
            password = path.read_text().strip()
        except OSError as exc:
            raise BackendError(
                f"cannot read the VNC password file {path} ({exc.strerror or exc}): mount the sandbox template's "
                "VNC password Secret there (NAMEK_K8S_VNC_PASSWORD_FILE)"
            ) from None
        if not password:
            raise BackendError(f"the VNC password file {path} is empty (NAMEK_K8S_VNC_PASSWORD_FILE)")
        return password

    def screen_target(self, sandbox_id: int) -> ScreenTarget:
        password = self._vnc_password()
        return ScreenTarget(Endpoint(host=self._pod_ip(sandbox_id), port=self.vnc_port), password)

    def browser_target(self, sandbox_id: int) -> BrowserTarget:
        return BrowserTarget(Endpoint(host=self._pod_ip(sandbox_id), port=self.cdp_port))

    def open_start_page(self, sandbox_id: int) -> None:
        """Open the claim's start page in a new tab over CDP and close the other tabs (a
        warm pod shows about:blank), once: the claim then says so. Raises BackendError."""
        claim = self._get_custom(CLAIMS, claim_name(sandbox_id))
        if claim is None:
            raise BackendError(f"sandbox {sandbox_id} has no SandboxClaim")
        annotations = _get(claim, "metadata", "annotations") or {}
        url = annotations.get(ANNOTATION_START_URL)
        if not url or annotations.get(ANNOTATION_START_OPENED) == "true":
            return
        host = self._pod_ip(sandbox_id)
        try:
            before = json.loads(self._http_get(host, self.cdp_port, "/json/list", REQUEST_TIMEOUT))
            created = json.loads(self._http_get(host, self.cdp_port, f"/json/new?{url}", REQUEST_TIMEOUT, method="PUT"))
            for target in before:
                if target.get("type") == "page" and target.get("id") != created.get("id"):
                    self._http_get(host, self.cdp_port, f"/json/close/{target['id']}", REQUEST_TIMEOUT)
        except (OSError, ValueError, http.client.HTTPException) as exc:
            raise BackendError(f"cannot open the start page of sandbox {sandbox_id}: {exc}", retryable=True) from None
        self._annotate_claim(sandbox_id, {ANNOTATION_START_OPENED: "true"})

    def check(self) -> None:
        """The warm pool can be read: the API answers, the CRDs exist, RBAC lets Namek in."""
        try:
            self.custom.get_namespaced_custom_object(
                *WARM_POOLS[:2], self.namespace, WARM_POOLS[2], self.warm_pool, _request_timeout=CHECK_TIMEOUT
            )
        except ApiException as exc:
            if exc.status == 403:
                raise BackendError(
                    f"the service account may not read sandboxwarmpools in namespace {self.namespace} (403): give "
                    f"it get on sandboxwarmpools.extensions.agents.x-k8s.io. The API said: {_api_message(exc)}"
                ) from None
            if exc.status == 404:
                raise BackendError(
                    f"the SandboxWarmPool {self.warm_pool} does not exist in namespace {self.namespace} "
                    f"(NAMEK_K8S_WARM_POOL), or agent-sandbox's extensions are not installed: {_api_message(exc)}"
                ) from None
            raise api_error(exc, "get", "sandboxwarmpools", self.warm_pool, self.namespace) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise BackendError(f"cannot reach the Kubernetes API: {exc}", retryable=True) from None

    # --- the shell ----------------------------------------------------------------------

    def client_arguments(self) -> list[str]:
        """How ``kube_exec`` reaches the API server, given that it gets no environment."""
        if self.kubeconfig:
            return ["--kubeconfig", str(Path(self.kubeconfig).resolve())]
        host = self._environ.get("KUBERNETES_SERVICE_HOST", "")
        port = self._environ.get("KUBERNETES_SERVICE_PORT", "")
        if not host or not port:
            raise BackendError(
                "not running in a Kubernetes pod (KUBERNETES_SERVICE_HOST/PORT are unset): set NAMEK_K8S_KUBECONFIG"
            )
        server = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
        return ["--in-cluster", "--api-server", server]

    def open_shell(self, sandbox_id: int, *, readonly: bool = False) -> list[str]:
        """``kube_exec`` attaching a tmux client to the shell container's tmux server."""
        pod = self._pod_name(sandbox_id)
        command = [sys.executable, "-m", "sandboxes.backends.kube_exec", "--namespace", self.namespace]
        command += ["--pod", pod, "--container", self.shell_container, *self.client_arguments()]
        # The exec gets the container's environment, not the viewer's: tell the tmux client
        # what the viewer's terminal (xterm.js) is, as viewer.terminal does locally.
        command += ["--", "env", f"TERM={TERMINAL_TYPE}", "tmux", "-u", "-S", self.tmux_socket]
        command += ["attach-session", "-t", "namek"]
        if readonly:
            # A read-only client must not shrink the shared window to its own size either.
            command += ["-f", "read-only,ignore-size"]
        return command

    # --- exec ---------------------------------------------------------------------------

    def _exec(self, pod: str, container: str, command: list[str], *, stdin: bool = False) -> Any:
        if self._exec_factory is not None:
            return self._exec_factory(pod=pod, container=container, command=command, stdin=stdin)
        try:
            return kube_exec.open_exec(
                self._client_configuration(), self.namespace, pod, container, command, tty=False, stdin=stdin
            )
        except ApiException as exc:
            if exc.status:
                raise api_error(exc, "create", "pods/exec", pod, self.namespace) from None
            reason = kube_exec.describe_error(exc)
            retryable = "forbidden" not in reason and "credentials" not in reason and "no such" not in reason
            raise BackendError(f"cannot exec in pod {pod} ({container}): {reason}", retryable=retryable) from None

    def _exec_run(
        self, pod: str, container: str, command: list[str], timeout: float = EXEC_TIMEOUT
    ) -> tuple[int, str, str]:
        """Run a command to its end: (exit code, description, output)."""
        stream = self._exec(pod, container, command)
        output = bytearray()
        deadline = time.monotonic() + timeout
        try:
            while stream.is_open() and time.monotonic() < deadline:
                stream.update(timeout=min(0.5, max(0.0, deadline - time.monotonic())))
                output += stream.read_channel(kube_exec.STDOUT) + stream.read_channel(kube_exec.STDERR)
            output += stream.read_channel(kube_exec.STDOUT) + stream.read_channel(kube_exec.STDERR)
            if stream.is_open():
                return -1, f"no exit within {timeout:.0f} s", output.decode(errors="replace")
            code, description = kube_exec.exit_status(stream.read_channel(kube_exec.ERROR))
            return code, description, output.decode(errors="replace")
        finally:
            stream.close()

    # --- the browser --------------------------------------------------------------------

    def restart_browser(self, sandbox_id: int, reason: str) -> None:
        """Stop Chromium's container process (the kubelet starts it again), then wait until
        the kubelet counted the restart and CDP answers on the pod's forwarder."""
        claim, sandbox = self._bound(sandbox_id)
        if sandbox is None or not pod_ips(claim, sandbox):
            raise BackendError(f"sandbox {sandbox_id} is not ready", retryable=True)
        pod_name, ip = pod_name_of(sandbox), pod_ips(claim, sandbox)[0]
        pod = self._get_pod(pod_name)
        before = restart_count(pod, self.chromium_container)
        try:  # only for the record's wording: without patch rights the exit is recorded as is
            self._annotate_claim(sandbox_id, {ANNOTATION_BROWSER_RESTART: f"{before}:{reason}"})
        except BackendError as exc:
            log.warning("sandbox %s: noting why Chromium restarts failed: %s", sandbox_id, exc)
        # PID 1 is tini (the image's entrypoint): it hands the signal to Chromium and ends with it.
        code, description, output = self._exec_run(pod_name, self.chromium_container, ["sh", "-c", "kill -TERM 1"])
        if code > 0:
            raise BackendError(f"could not stop Chromium in pod {pod_name}: {description} {output.strip()}".strip())
        if code < 0:  # the container may stop before the exec reports: the restart count tells
            log.info("sandbox %s: the kill of Chromium reported no status (%s)", sandbox_id, description)
        deadline = time.monotonic() + self.start_timeout
        self._wait_pod(pod_name, lambda p: restart_count(p, self.chromium_container) > before, deadline)
        last = "nothing answered"
        while time.monotonic() < deadline:
            try:
                version = json.loads(self._http_get(ip, self.cdp_port, "/json/version", 2.0))
                if "webSocketDebuggerUrl" in version:
                    return
                last = "an answer without webSocketDebuggerUrl"
            except (OSError, ValueError, http.client.HTTPException) as exc:
                last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.2)
        raise BackendError(f"Chromium did not come back within {self.start_timeout:.0f} s ({last})", retryable=True)

    def _wait_pod(self, name: str, done: Callable[[Mapping[str, Any]], bool], deadline: float) -> None:
        """Watch one pod until ``done`` holds for it; resumes from the last resourceVersion."""
        resource_version: str | None = None
        while True:
            if resource_version is None:
                listed = self._call(
                    "list",
                    "pods",
                    name,
                    self.core.list_namespaced_pod,
                    self.namespace,
                    field_selector=f"metadata.name={name}",
                )
                listed = _plain(listed)
                resource_version = _get(listed, "metadata", "resourceVersion")
                if any(done(item) for item in listed.get("items") or []):
                    return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BackendError(f"Chromium did not restart within {self.start_timeout:.0f} s", retryable=True)
            watcher = self._watch_factory()
            try:
                for event in watcher.stream(
                    self.core.list_namespaced_pod,
                    self.namespace,
                    field_selector=f"metadata.name={name}",
                    resource_version=resource_version,
                    timeout_seconds=max(1, int(remaining)),
                    _request_timeout=(REQUEST_TIMEOUT, remaining + REQUEST_TIMEOUT),
                ):
                    obj = _event_object(event)
                    resource_version = _get(obj, "metadata", "resourceVersion") or resource_version
                    if event.get("type") in ("ADDED", "MODIFIED") and done(obj):
                        watcher.stop()
                        return
            except ApiException as exc:
                if exc.status != 410:
                    raise api_error(exc, "watch", "pods", name, self.namespace) from None
                resource_version = None  # expired: list again
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                raise BackendError(
                    f"cannot reach the Kubernetes API to watch pod {name}: {exc}", retryable=True
                ) from None

    def _annotate_claim(
        self, sandbox_id: int, annotations: Mapping[str, str | None], labels: Mapping[str, str | None] | None = None
    ) -> None:
        name = claim_name(sandbox_id)
        body: dict[str, Any] = {"metadata": {"annotations": dict(annotations)}}
        if labels:
            body["metadata"]["labels"] = dict(labels)
        self._call(
            "patch",
            "sandboxclaims",
            name,
            self.custom.patch_namespaced_custom_object,
            *CLAIMS[:2],
            self.namespace,
            CLAIMS[2],
            name,
            body,
            _content_type="application/merge-patch+json",
        )

    # --- agent runners ------------------------------------------------------------------

    def start_runner(self, spec: RunnerSpec) -> None:
        """``python -m sandboxes.agents.runner`` in the shell container, over ``pods/exec``.

        The token and the ``NAMEK_LLM_*`` settings go to the exec's stdin; the stream stays
        open in a daemon thread that logs the runner's output and reports its exit."""
        pod = self._pod_name(spec.sandbox_id)
        try:  # only stop_runner from another replica needs it
            self._annotate_claim(spec.sandbox_id, {}, {LABEL_RUN_ID: str(spec.run_id)})
        except BackendError as exc:
            log.warning("run %s: labelling its claim failed (only this replica can stop it): %s", spec.run_id, exc)
        command = ["sh", "-c", RUNNER_SCRIPT, "namek-runner", spec.bridge_url, str(spec.run_id)]
        stream = self._exec(pod, self.shell_container, command, stdin=True)
        lines = [spec.token, *self._runner_environment(), ""]
        try:
            stream.write_channel(kube_exec.STDIN, ("\n".join(lines) + "\n").encode())
            with contextlib.suppress(Exception):  # v4 cannot close stdin; the runner does not read it
                stream.close_stdin()
        except Exception as exc:
            stream.close()
            raise BackendError(f"could not hand the runner its token in pod {pod}: {exc}", retryable=True) from None
        with self._lock:
            self._runners[spec.run_id] = (pod, stream)
        threading.Thread(
            target=self._follow_runner, args=(spec.run_id, stream), name=f"namek-runner-{spec.run_id}", daemon=True
        ).start()
        log.info("run %s: runner started in pod %s", spec.run_id, pod)

    def _runner_environment(self) -> list[str]:
        values = {
            "NAMEK_LLM_PROVIDER": getattr(settings, "NAMEK_LLM_PROVIDER", ""),
            "NAMEK_LLM_MODEL": getattr(settings, "NAMEK_LLM_MODEL", ""),
            "NAMEK_LLM_BASE_URL": getattr(settings, "NAMEK_LLM_BASE_URL", ""),
            "NAMEK_LLM_API_KEY": getattr(settings, "NAMEK_LLM_API_KEY", ""),
        }
        return [f"{key}={value}" for key, value in values.items() if value and "\n" not in value]

    def _follow_runner(self, run_id: int, stream: Any) -> None:
        pending = b""
        try:
            while stream.is_open():
                stream.update(timeout=1.0)
                pending += stream.read_channel(kube_exec.STDOUT) + stream.read_channel(kube_exec.STDERR)
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    log.info("run %s: %s", run_id, line.decode(errors="replace").rstrip())
            tail = pending + stream.read_channel(kube_exec.STDOUT) + stream.read_channel(kube_exec.STDERR)
            for line in tail.splitlines():
                log.info("run %s: %s", run_id, line.decode(errors="replace").rstrip())
            code, description = kube_exec.exit_status(stream.read_channel(kube_exec.ERROR))
        except Exception as exc:  # a broken websocket raises from deep inside the client
            code, description = -1, f"the exec stream broke: {exc}"
        finally:
            with self._lock:
                self._runners.pop(run_id, None)
            stream.close()
        log.info("run %s: runner ended (%s)", run_id, description)
        try:
            self._on_runner_exit(run_id, code, description)
        except Exception:
            log.exception("recording the end of run %s failed", run_id)

    def stop_runner(self, run_id: int, grace: float) -> None:
        """SIGTERM to the run's processes in the pod now, SIGKILL after ``grace`` seconds."""
        with self._lock:
            started_here = self._runners.get(run_id)
        pod = started_here[0] if started_here else self._runner_pod(run_id)
        if pod is None:
            return  # no claim says it runs this: it ended with its sandbox
        self._signal_runner(pod, run_id, "TERM")

        def kill() -> None:
            try:
                self._signal_runner(pod, run_id, "KILL")
            except BackendError as exc:
                log.warning("killing the runner of run %s: %s", run_id, exc)
            with self._lock:
                entry = self._runners.get(run_id)
            if entry is not None:
                entry[1].close()  # its thread reports the end

        timer = threading.Timer(grace, kill)
        timer.daemon = True
        timer.start()

    def _runner_pod(self, run_id: int) -> str | None:
        listed = self._call(
            "list",
            "sandboxclaims",
            "",
            self.custom.list_namespaced_custom_object,
            *CLAIMS[:2],
            self.namespace,
            CLAIMS[2],
            label_selector=f"{CLAIM_SELECTOR},{LABEL_RUN_ID}={run_id}",
        )
        for claim in listed.get("items") or []:
            bound = _get(claim, "status", "sandbox", "name")
            sandbox = self._get_custom(SANDBOXES, bound) if bound else None
            if sandbox is not None:
                return pod_name_of(sandbox)
        return None

    def _signal_runner(self, pod: str, run_id: int, signal_name: str) -> None:
        command = ["sh", "-c", SIGNAL_SCRIPT, "namek-signal", signal_name, f"NAMEK_RUN_ID={run_id}"]
        code, description, output = self._exec_run(pod, self.shell_container, command)
        if code != 0:
            raise BackendError(
                f"could not signal the runner of run {run_id} in pod {pod}: {description} {output}".strip()
            )
        log.info("run %s: SIG%s sent (%s)", run_id, signal_name, output.strip() or "no process was left")

    # --- following phases --------------------------------------------------------------

    def follow(
        self,
        on_phase: PhaseCallback,
        stop: threading.Event,
        *,
        on_sync: Callable[[set[int]], Any] | None = None,
        on_browser_restart: Callable[[int, int, str], Any] | None = None,
        was_ready: Callable[[int], bool] | None = None,
        watch_timeout: int = WATCH_TIMEOUT,
        tick: float = 1.0,
    ) -> None:
        """Report phase changes of Namek's sandboxes as ``on_phase(sandbox_id, phase, reason)``
        until ``stop`` is set.

        Watches the namespace's claims (Namek's label), Sandboxes and sandbox pods, each in
        a thread: list, then watch from the list's resourceVersion for ``watch_timeout``
        seconds at a time, resuming from the last one seen (bookmarks included), listing
        again on 410 Gone. ``on_sync(ids)`` follows every listing of the claims with the
        sandbox ids that have one; ``on_browser_restart(sandbox_id, restarts, why)`` reports
        a Chromium container restart; ``was_ready(sandbox_id)`` whether a sandbox was ready
        before (its start deadline is then behind it). Every ``tick`` the phases are evaluated
        again, so that start deadlines pass without an event.
        """
        follower = _Follower(
            self,
            on_phase,
            on_sync=on_sync,
            on_browser_restart=on_browser_restart,
            was_ready=was_ready,
            watch_timeout=watch_timeout,
        )
        follower.run(stop, tick)


class _Follower:
    KINDS = ("claims", "sandboxes", "pods")

    def __init__(
        self,
        backend: KubernetesBackend,
        on_phase: PhaseCallback,
        *,
        on_sync: Callable[[set[int]], Any] | None,
        on_browser_restart: Callable[[int, int, str], Any] | None,
        was_ready: Callable[[int], bool] | None,
        watch_timeout: int,
    ) -> None:
        self.backend = backend
        self.on_phase = on_phase
        self.on_sync = on_sync
        self.on_browser_restart = on_browser_restart
        self.was_ready = was_ready
        self.watch_timeout = watch_timeout
        self.events: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self.objects: dict[str, dict[str, dict[str, Any]]] = {kind: {} for kind in self.KINDS}
        self.reported: dict[int, tuple[str, str]] = {}
        self.restarts: dict[int, int] = {}
        self.ready_before: set[int] = set()
        self.asked: set[int] = set()
        self.watchers: dict[str, Any] = {}

    def run(self, stop: threading.Event, tick: float) -> None:
        self.backend._apis()  # a configuration that cannot load fails here, not in a thread
        threads = [
            threading.Thread(target=self._watch, args=(kind, stop), name=f"namek-watch-{kind}", daemon=True)
            for kind in self.KINDS
        ]
        for thread in threads:
            thread.start()
        try:
            while not stop.is_set():
                # One change at a time: two restarts of Chromium are two reports.
                with contextlib.suppress(queue.Empty):
                    self._apply(self.events.get(timeout=tick))
                self._evaluate_all()
        finally:
            stop.set()
            for watcher in list(self.watchers.values()):
                with contextlib.suppress(Exception):
                    watcher.stop()

    # The watch threads only list and watch; all state lives in the main loop.

    def _list_call(self, kind: str) -> tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]:
        backend = self.backend
        if kind == "claims":
            return (
                backend.custom.list_namespaced_custom_object,
                (*CLAIMS[:2], backend.namespace, CLAIMS[2]),
                {"label_selector": CLAIM_SELECTOR},
            )
        if kind == "sandboxes":
            return backend.custom.list_namespaced_custom_object, (*SANDBOXES[:2], backend.namespace, SANDBOXES[2]), {}
        return backend.core.list_namespaced_pod, (backend.namespace,), {"label_selector": POD_SELECTOR}

    def _watch(self, kind: str, stop: threading.Event) -> None:
        method, args, selector = self._list_call(kind)
        resource_version: str | None = None
        backoff = 1.0
        while not stop.is_set():
            try:
                if resource_version is None:
                    listed = _plain(method(*args, **selector, _request_timeout=REQUEST_TIMEOUT))
                    resource_version = _get(listed, "metadata", "resourceVersion")
                    self.events.put(("sync", kind, list(listed.get("items") or [])))
                watcher = self.backend._watch_factory()
                self.watchers[kind] = watcher
                for event in watcher.stream(
                    method,
                    *args,
                    **selector,
                    resource_version=resource_version,
                    timeout_seconds=self.watch_timeout,
                    allow_watch_bookmarks=True,
                    _request_timeout=(REQUEST_TIMEOUT, self.watch_timeout + REQUEST_TIMEOUT),
                ):
                    obj = _event_object(event)
                    resource_version = _get(obj, "metadata", "resourceVersion") or resource_version
                    if event.get("type") in ("ADDED", "MODIFIED", "DELETED"):
                        self.events.put(("event", kind, event["type"], obj))
                    if stop.is_set():
                        watcher.stop()
                        break
                backoff = 1.0
            except ApiException as exc:
                if exc.status == 410:
                    log.info("the watch of %s expired (410 Gone): listing them again", kind)
                    resource_version = None
                    continue
                error = api_error(exc, "watch", kind, "", self.backend.namespace)
                log.warning("watching %s: %s (again in %.0f s)", kind, error, backoff)
                stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                log.warning("watching %s: cannot reach the Kubernetes API: %s (again in %.0f s)", kind, exc, backoff)
                stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
            except Exception:  # whatever else breaks, this watch must go on: list again
                log.exception("watching %s failed (again in %.0f s)", kind, backoff)
                resource_version = None
                stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)

    def _apply(self, item: tuple[Any, ...]) -> None:
        if item[0] == "sync":
            _, kind, items = item
            fresh = {str(_get(obj, "metadata", "name")): dict(obj) for obj in items}
            if kind == "claims":
                for name, old in self.objects["claims"].items():
                    if name not in fresh:
                        self._claim_gone(old)
            self.objects[kind] = fresh
            if kind == "claims" and self.on_sync is not None:
                ids = {i for i in map(sandbox_id_of, fresh.values()) if i is not None}
                self._callback(self.on_sync, ids)
            return
        _, kind, kind_of_event, obj = item
        name = str(_get(obj, "metadata", "name"))
        if kind_of_event == "DELETED":
            removed = self.objects[kind].pop(name, None)
            if kind == "claims":
                self._claim_gone(removed or obj)
        else:
            self.objects[kind][name] = dict(obj)

    def _claim_gone(self, claim: Mapping[str, Any]) -> None:
        sandbox_id = sandbox_id_of(claim)
        if sandbox_id is None:
            return
        shutdown = parse_time(_get(claim, "spec", "lifecycle", "shutdownTime"))
        if shutdown is not None and self.backend._now() >= shutdown:
            reason = f"expired: it reached its shutdown time {format_time(shutdown)}"
        else:
            reason = f"deleted: its SandboxClaim {_get(claim, 'metadata', 'name')} was deleted"
        self.reported.pop(sandbox_id, None)
        self.restarts.pop(sandbox_id, None)
        self.ready_before.discard(sandbox_id)
        self.asked.discard(sandbox_id)
        self._callback(self.on_phase, sandbox_id, "stopped", reason)

    def _evaluate_all(self) -> None:
        for claim in list(self.objects["claims"].values()):
            sandbox_id = sandbox_id_of(claim)
            if sandbox_id is None:
                continue
            bound = _get(claim, "status", "sandbox", "name")
            sandbox = self.objects["sandboxes"].get(bound) if bound else None
            pod = self.objects["pods"].get(pod_name_of(sandbox)) if sandbox else None
            status = self._evaluate(sandbox_id, claim, sandbox, pod)
            if self.reported.get(sandbox_id) != (status.phase, status.reason):
                self.reported[sandbox_id] = (status.phase, status.reason)
                self._callback(self.on_phase, sandbox_id, status.phase, status.reason)
            if pod is not None:
                self._browser_restarts(sandbox_id, claim, pod)

    def _evaluate(
        self,
        sandbox_id: int,
        claim: Mapping[str, Any],
        sandbox: Mapping[str, Any] | None,
        pod: Mapping[str, Any] | None,
    ) -> SandboxStatus:
        """``evaluate``, knowing which sandboxes were ready before: this follower saw them
        ready, or ``was_ready`` says so (asked once, and only when the start deadline is
        all that fails one)."""
        status = self.backend.evaluate(claim, sandbox, pod, was_ready=sandbox_id in self.ready_before)
        if status.phase == "failed" and self.was_ready is not None and sandbox_id not in self.asked:
            lenient = self.backend.evaluate(claim, sandbox, pod, was_ready=True)
            if lenient.phase != "failed":
                self.asked.add(sandbox_id)
                try:
                    before = bool(self.was_ready(sandbox_id))
                except Exception:
                    log.exception("asking whether sandbox %s was ready failed", sandbox_id)
                    before = False
                if before:
                    self.ready_before.add(sandbox_id)
                    status = lenient
        if status.phase == "ready":
            self.ready_before.add(sandbox_id)
        return status

    def _browser_restarts(self, sandbox_id: int, claim: Mapping[str, Any], pod: Mapping[str, Any]) -> None:
        container = self.backend.chromium_container
        count = restart_count(pod, container)
        before = self.restarts.setdefault(sandbox_id, count)
        if count <= before:
            return
        self.restarts[sandbox_id] = count
        asked = str(_get(claim, "metadata", "annotations", ANNOTATION_BROWSER_RESTART) or "")
        if asked.startswith(f"{before}:"):
            why = f"Chromium {asked.split(':', 1)[1]}"
        else:
            last = next(
                (
                    describe_termination(s.get("lastState"))
                    for s in _container_statuses(pod)
                    if s.get("name") == container
                ),
                "",
            )
            why = f"Chromium exited ({last or 'no reason given'}); restarted"
        if self.on_browser_restart is not None:
            self._callback(self.on_browser_restart, sandbox_id, count, why)

    @staticmethod
    def _callback(callback: Callable[..., Any], *args: Any) -> None:
        try:
            callback(*args)
        except Exception:  # one bad record must not stop following the others
            log.exception("recording %s failed", args[:2])


# --- helpers ----------------------------------------------------------------------------------


_serializer: Any = None


def _plain(obj: Any) -> dict[str, Any]:
    """A model object of the client (V1Pod...) or a dict, as a JSON-like dict."""
    global _serializer  # noqa: PLW0603 - one per process, made on first use
    if isinstance(obj, dict):
        return obj
    if _serializer is None:
        _serializer = k8s.ApiClient()
    plain = _serializer.sanitize_for_serialization(obj)
    return plain if isinstance(plain, dict) else {}


def _event_object(event: Mapping[str, Any]) -> dict[str, Any]:
    raw = event.get("raw_object")
    return raw if isinstance(raw, dict) else _plain(event.get("object"))


def _http_get(host: str, port: int, path: str, timeout: float, *, method: str = "GET") -> bytes:
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        # Chromium's DevTools accept only an IP address or "localhost" as Host.
        connection.request(method, path, headers={"Host": "localhost"})
        response = connection.getresponse()
        body = response.read()
        if response.status != 200:
            raise ValueError(f"HTTP {response.status}")
        return body
    finally:
        connection.close()


def _record_runner_exit(run_id: int, exit_code: int, description: str) -> None:
    """The default ``on_runner_exit``: the run's record, from this daemon thread."""
    from django.db import connections

    from sandboxes.runs import runner_exited

    try:
        runner_exited(run_id, exit_code, description)
    finally:
        connections.close_all()  # this thread's own connection
