"""The Kubernetes backend at the client boundary, and ``kube_exec``'s copy loop in a real PTY.

No cluster or API server can run on these machines (``../shared/platform.md``), so these
tests patch only that outbound boundary: fakes stand in for the kubernetes client's
``CustomObjectsApi`` and ``CoreV1Api`` methods, its ``watch.Watch`` stream and the
``pods/exec`` stream, and never for HTTP. What the fakes accept and return is checked
against the agent-sandbox CRD schemas in ``../shared/k8s-crds/``, closed against unknown
fields, so a claim Namek sends, or a fixture the tests serve, cannot carry a field the API
server would drop or refuse. ``tests/test_k8s_cluster.py`` runs against a real API server
when ``NAMEK_TEST_KUBECONFIG`` points at one.
"""

from __future__ import annotations

import copy
import fcntl
import io
import json
import os
import queue
import signal
import socket
import struct
import termios
import threading
import time
import types
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from kubernetes.client.exceptions import ApiException
from kubernetes.stream.ws_client import V5_CHANNEL_PROTOCOL, WSClient
from websocket import ABNF

from sandboxes.backends import kube_exec
from sandboxes.backends.base import BackendError, RunnerSpec, SandboxSpec
from sandboxes.backends.kubernetes import (
    ANNOTATION_BROWSER_RESTART,
    LABEL_RUN_ID,
    KubernetesBackend,
)
from tests.test_k8s_manifests import crd_schemas

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "k8s_api"
NOW = datetime(2026, 1, 10, 12, 0, 0, tzinfo=UTC)
PLURALS = {"SandboxClaim": "sandboxclaims", "Sandbox": "sandboxes", "SandboxWarmPool": "sandboxwarmpools"}
SUCCESS = json.dumps({"metadata": {}, "status": "Success"}).encode()


def exit_code_status(code: int) -> bytes:
    return json.dumps(
        {
            "metadata": {},
            "status": "Failure",
            "message": f"command terminated with non-zero exit code: exit status {code}",
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]},
        }
    ).encode()


# --- schemas --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def schemas() -> dict[str, jsonschema.Validator]:
    """Validators by plural, of the CRDs closed against unknown fields (as the manifests'
    test closes them; it skips when ../shared/k8s-crds is missing)."""
    return {
        PLURALS[kind]: jsonschema.Draft7Validator(schema, format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER)
        for (api_version, kind), schema in crd_schemas().items()
        if api_version.endswith("/v1beta1") and kind in PLURALS
    }


def validate(schemas: dict[str, jsonschema.Validator], obj: dict[str, Any]) -> None:
    errors = sorted(schemas[PLURALS[obj["kind"]]].iter_errors(obj), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)


def fixture(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((FIXTURES / f"{name}.json").read_text())
    return loaded


def api_exception(status: int, reason: str, message: str) -> ApiException:
    exc = ApiException(status=status, reason=reason)
    exc.body = json.dumps(
        {
            "kind": "Status",
            "apiVersion": "v1",
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": status,
        }
    )
    return exc


def ready(status: str, reason: str, message: str) -> dict[str, Any]:
    return {
        "type": "Ready",
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": "2026-01-10T11:59:55Z",
        "observedGeneration": 1,
    }


# --- fakes of the client -----------------------------------------------------------------------


def matches(obj: dict[str, Any], selector: str | None) -> bool:
    labels = obj.get("metadata", {}).get("labels") or {}
    for term in filter(None, (selector or "").split(",")):
        key, _, value = term.partition("=")
        if labels.get(key) != value:
            return False
    return True


class FakeCustomObjects:
    """``CustomObjectsApi``: objects by (plural, name), each checked against its CRD."""

    def __init__(self, schemas: dict[str, jsonschema.Validator]) -> None:
        self.schemas = schemas
        self.store: dict[tuple[str, str], dict[str, Any]] = {}
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        self.errors: dict[str, ApiException] = {}
        self.resource_version = 2000

    def put(self, obj: dict[str, Any]) -> dict[str, Any]:
        validate(self.schemas, obj)
        self.store[(PLURALS[obj["kind"]], obj["metadata"]["name"])] = copy.deepcopy(obj)
        return obj

    def _enter(self, method: str, *args: Any, **kwargs: Any) -> None:
        self.calls.append((method, args, kwargs))
        if method in self.errors:
            raise self.errors[method]

    def _out(self, obj: dict[str, Any]) -> dict[str, Any]:
        validate(self.schemas, obj)
        return copy.deepcopy(obj)

    def create_namespaced_custom_object(
        self, group: str, version: str, namespace: str, plural: str, body: dict[str, Any], **kwargs: Any
    ) -> dict[str, Any]:
        self._enter("create", plural, body, **kwargs)
        validate(self.schemas, body)
        name = body["metadata"]["name"]
        if (plural, name) in self.store:
            raise api_exception(409, "AlreadyExists", f'{plural}.{group} "{name}" already exists')
        created = copy.deepcopy(body)
        self.resource_version += 1
        created["metadata"].update(
            uid="5c0ffee0-0000-4000-8000-0000000000ff",
            resourceVersion=str(self.resource_version),
            creationTimestamp="2026-01-10T12:00:00Z",
            generation=1,
        )
        self.store[(plural, name)] = created
        return self._out(created)

    def get_namespaced_custom_object(
        self, group: str, version: str, namespace: str, plural: str, name: str, **kwargs: Any
    ) -> dict[str, Any]:
        self._enter("get", plural, name, **kwargs)
        if (plural, name) not in self.store:
            raise api_exception(404, "NotFound", f'{plural}.{group} "{name}" not found')
        return self._out(self.store[(plural, name)])

    def list_namespaced_custom_object(
        self, group: str, version: str, namespace: str, plural: str, label_selector: str | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        self._enter("list", plural, label_selector=label_selector, **kwargs)
        items = [self._out(o) for (p, _), o in sorted(self.store.items()) if p == plural and matches(o, label_selector)]
        return {
            "apiVersion": f"{group}/{version}",
            "metadata": {"resourceVersion": str(self.resource_version)},
            "items": items,
        }

    def delete_namespaced_custom_object(
        self, group: str, version: str, namespace: str, plural: str, name: str, **kwargs: Any
    ) -> dict[str, Any]:
        self._enter("delete", plural, name, **kwargs)
        if self.store.pop((plural, name), None) is None:
            raise api_exception(404, "NotFound", f'{plural}.{group} "{name}" not found')
        return {"kind": "Status", "status": "Success"}

    def patch_namespaced_custom_object(  # noqa: PLR0917 - the client's own signature
        self, group: str, version: str, namespace: str, plural: str, name: str, body: dict[str, Any], **kwargs: Any
    ) -> dict[str, Any]:
        self._enter("patch", plural, name, body, **kwargs)
        if (plural, name) not in self.store:
            raise api_exception(404, "NotFound", f'{plural}.{group} "{name}" not found')
        obj = self.store[(plural, name)]
        for key in ("labels", "annotations"):
            if body.get("metadata", {}).get(key):
                obj["metadata"].setdefault(key, {}).update(body["metadata"][key])
        return self._out(obj)


class FakeCore:
    """``CoreV1Api``'s pod reads (pods have no CRD: they are served as fixtures)."""

    def __init__(self) -> None:
        self.pods: dict[str, dict[str, Any]] = {}
        self.errors: dict[str, ApiException] = {}

    def read_namespaced_pod(self, name: str, namespace: str, **kwargs: Any) -> dict[str, Any]:
        if "read" in self.errors:
            raise self.errors["read"]
        if name not in self.pods:
            raise api_exception(404, "NotFound", f'pods "{name}" not found')
        return copy.deepcopy(self.pods[name])

    def list_namespaced_pod(
        self, namespace: str, label_selector: str | None = None, field_selector: str | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        items = [p for p in self.pods.values() if matches(p, label_selector)]
        if field_selector:
            items = [p for p in items if field_selector == f"metadata.name={p['metadata']['name']}"]
        return {"metadata": {"resourceVersion": "3000"}, "items": copy.deepcopy(items)}


class WatchHub:
    """``watch.Watch`` instances that play scripted rounds per resource, and record how each
    watch was opened. A round is a list of events, or an exception to raise; with no round
    left a watch ends empty after a moment, as one whose timeout passed."""

    def __init__(self, schemas: dict[str, jsonschema.Validator] | None = None) -> None:
        self.schemas = schemas
        self.rounds: dict[str, list[Any]] = {}
        self.opened: list[tuple[str, dict[str, Any]]] = []
        self.lock = threading.Lock()

    def script(self, resource: str, *rounds: Any) -> None:
        self.rounds.setdefault(resource, []).extend(rounds)

    def __call__(self) -> FakeWatch:
        return FakeWatch(self)

    def opened_for(self, resource: str) -> list[dict[str, Any]]:
        with self.lock:
            return [kwargs for r, kwargs in self.opened if r == resource]


class FakeWatch:
    def __init__(self, hub: WatchHub) -> None:
        self.hub = hub
        self.stopped = False

    def stop(self) -> None:
        self.stopped = True

    def stream(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Iterator[dict[str, Any]]:
        resource = args[3] if len(args) > 3 else "pods"
        with self.hub.lock:
            self.hub.opened.append((resource, kwargs))
            rounds = self.hub.rounds.get(resource) or []
            current = rounds.pop(0) if rounds else None
        if current is None:
            time.sleep(0.05)
            return
        if isinstance(current, BaseException):
            raise current
        for event_type, obj in current:
            if self.hub.schemas is not None and obj.get("kind") in PLURALS and event_type != "BOOKMARK":
                validate(self.hub.schemas, obj)
            yield {"type": event_type, "object": obj, "raw_object": obj}
            if self.stopped:
                return


class FakeExec:
    """A ``pods/exec`` stream: records what is written; ends (with ``status``) when told to."""

    def __init__(self, status: bytes = SUCCESS, output: bytes = b"", ended: bool = True) -> None:
        self.status = status
        self.channels: dict[int, bytes] = {1: output} if output else {}
        self.written: list[tuple[int, bytes]] = []
        self.open = True
        self.closed = False
        self.end = threading.Event()
        if ended:
            self.end.set()

    def is_open(self) -> bool:
        return self.open

    def update(self, timeout: float = 0) -> None:
        if self.open and self.end.wait(timeout):
            self.open = False
            self.channels[3] = self.status

    def read_channel(self, channel: int) -> bytes:
        return self.channels.pop(channel, b"")

    def write_channel(self, channel: int, data: bytes) -> None:
        self.written.append((channel, data))

    def close_stdin(self) -> None:
        pass

    def close(self) -> None:
        self.open = False
        self.closed = True

    def stdin(self) -> bytes:
        return b"".join(data for channel, data in self.written if channel == 0)


class ExecRecorder:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.streams: queue.Queue[FakeExec] = queue.Queue()

    def __call__(self, **kwargs: Any) -> FakeExec:
        self.calls.append(kwargs)
        try:
            return self.streams.get_nowait()
        except queue.Empty:
            return FakeExec()


@pytest.fixture
def k8s(schemas: dict[str, jsonschema.Validator]) -> dict[str, Any]:
    return {
        "custom": FakeCustomObjects(schemas),
        "core": FakeCore(),
        "watch": WatchHub(schemas),
        "exec": ExecRecorder(),
        "exits": [],
    }


@pytest.fixture
def backend(k8s: dict[str, Any], tmp_path: Path, settings: Any) -> KubernetesBackend:
    settings.NAMEK_K8S_VNC_PASSWORD_FILE = str(tmp_path / "vnc-password")
    (tmp_path / "vnc-password").write_text("s3cret-vnc\n")
    settings.NAMEK_SANDBOX_START_TIMEOUT = 30.0
    settings.NAMEK_MAX_LIFETIME = 8 * 3600.0
    return KubernetesBackend(
        namespace="namek",
        warm_pool="namek-sandboxes",
        kubeconfig="",
        custom_api=k8s["custom"],
        core_api=k8s["core"],
        watch_factory=k8s["watch"],
        exec_factory=k8s["exec"],
        http_get=lambda host, port, path, timeout: b'{"webSocketDebuggerUrl": "ws://localhost/devtools/browser/1"}',
        on_runner_exit=lambda *args: k8s["exits"].append(args),
        now=lambda: NOW,
        environ={"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443"},
    )


def warm_ready(k8s: dict[str, Any]) -> None:
    k8s["custom"].put(fixture("claim_bound_warm"))
    k8s["custom"].put(fixture("sandbox_warm_ready"))
    k8s["core"].pods["namek-sandboxes-x7k2p"] = fixture("pod_running")


def cold_starting(k8s: dict[str, Any], pod: str | None = None) -> dict[str, Any]:
    claim = fixture("claim_pending")
    claim["status"] = {
        "conditions": [ready("False", "DependenciesNotReady", "Pod exists with phase: Pending")],
        "sandbox": {"name": "namek-7"},
    }
    k8s["custom"].put(claim)
    k8s["custom"].put(fixture("sandbox_cold_starting"))
    if pod:
        k8s["core"].pods["namek-7"] = fixture(pod)
    return claim


SPEC = SandboxSpec(id=7, name="sandbox-7", width=1280, height=800, start_url="http://namek.namek.svc:8000/s/abc/")


# --- create -------------------------------------------------------------------------------------


def test_create_posts_a_claim_the_crd_accepts(backend: KubernetesBackend, k8s: dict[str, Any]) -> None:
    backend.create(SPEC)
    method, (plural, body), kwargs = k8s["custom"].calls[-1]
    assert (method, plural) == ("create", "sandboxclaims")
    assert kwargs["field_validation"] == "Strict"
    validate(k8s["custom"].schemas, body)
    assert body["metadata"]["name"] == "namek-7"
    assert body["metadata"]["labels"] == {"namek.dev/sandbox-id": "7", "app.kubernetes.io/managed-by": "namek"}
    assert body["spec"]["warmPoolRef"] == {"name": "namek-sandboxes"}
    # No env: agent-sandbox starts a claim with env cold, never from the warm pool.
    assert "env" not in body["spec"]
    assert body["metadata"]["annotations"]["namek.dev/start-url"] == SPEC.start_url
    assert body["spec"]["additionalPodMetadata"]["labels"] == {"namek.sandbox.users.io/sandbox-id": "7"}
    assert body["spec"]["lifecycle"] == {"shutdownPolicy": "Delete", "shutdownTime": "2026-01-10T20:00:00Z"}


def test_the_schemas_refuse_what_the_api_server_would_drop(schemas: dict[str, jsonschema.Validator]) -> None:
    claim = fixture("claim_pending")
    claim["spec"]["warmPool"] = {"name": "namek-sandboxes"}  # a misspelt field
    with pytest.raises(AssertionError, match="Additional properties are not allowed"):
        validate(schemas, claim)


def test_create_again_is_fine_when_the_claim_is_ours(backend: KubernetesBackend, k8s: dict[str, Any]) -> None:
    backend.create(SPEC)
    backend.create(SPEC)  # a retry: 409 AlreadyExists, and the claim carries our labels
    assert [c[0] for c in k8s["custom"].calls] == ["create", "create", "get"]


def test_create_refuses_a_claim_of_that_name_namek_did_not_make(
    backend: KubernetesBackend, k8s: dict[str, Any]
) -> None:
    foreign = fixture("claim_pending")
    foreign["metadata"]["labels"] = {"team": "someone-else"}
    k8s["custom"].put(foreign)
    with pytest.raises(BackendError, match="that Namek did not make") as caught:
        backend.create(SPEC)
    assert not caught.value.retryable


# --- status ---------------------------------------------------------------------------------


def test_a_new_claim_is_pending(backend: KubernetesBackend, k8s: dict[str, Any]) -> None:
    k8s["custom"].put(fixture("claim_pending"))
    status = backend.status(7)
    assert (status.phase, status.reason) == ("pending", "pending: waiting for the sandbox controller to take the claim")


def test_warm_adoption_resolves_the_sandbox_by_the_claims_status(
    backend: KubernetesBackend, k8s: dict[str, Any]
) -> None:
    warm_ready(k8s)
    status = backend.status(7)
    assert status.phase == "ready"
    gets = [args for method, args, _ in k8s["custom"].calls if method == "get"]
    # The adopted Sandbox keeps the pool's generated name: it is read by that name.
    assert gets == [("sandboxclaims", "namek-7"), ("sandboxes", "namek-sandboxes-x7k2p")]


def test_warm_adoption_in_progress_says_so(backend: KubernetesBackend, k8s: dict[str, Any]) -> None:
    warm_ready(k8s)
    sandbox = fixture("sandbox_warm_ready")
    sandbox["status"]["conditions"] = [ready("False", "DependenciesNotReady", "Pod is Running but not Ready")]
    k8s["custom"].put(sandbox)
    claim = fixture("claim_bound_warm")
    claim["status"]["conditions"] = [ready("False", "DependenciesNotReady", "Pod is Running but not Ready")]
    k8s["custom"].put(claim)
    status = backend.status(7)
    assert status.phase == "starting"
    assert status.reason == (
        "starting: adopted the warm sandbox namek-sandboxes-x7k2p, waiting for it to be ready "
        "(Pod is Running but not Ready)"
    )


def test_an_empty_warm_pool_means_a_cold_start(backend: KubernetesBackend, k8s: dict[str, Any]) -> None:
    cold_starting(k8s)
    status = backend.status(7)
    assert status.phase == "starting"
    assert status.reason == "starting: no warm sandbox was free, starting one cold (Pod exists with phase: Pending)"


def test_an_unschedulable_pod_keeps_it_pending(backend: KubernetesBackend, k8s: dict[str, Any]) -> None:
    cold_starting(k8s, pod="pod_unschedulable")
    status = backend.status(7)
    assert status.phase == "pending"
    assert status.reason.startswith("pending: unschedulable: 0/3 nodes are available: 3 Insufficient memory.")


def test_an_image_pull_error_is_the_reason(backend: KubernetesBackend, k8s: dict[str, Any]) -> None:
    cold_starting(k8s, pod="pod_image_pull_backoff")
    status = backend.status(7)
    assert status.phase == "starting"
    assert status.reason == (
        "starting: cannot pull the image ghcr.io/namek/sandbox:nope of container chromium (ImagePullBackOff): "
        'Back-off pulling image "ghcr.io/namek/sandbox:nope"'
    )


def test_an_image_that_can_never_be_pulled_fails_at_once(backend: KubernetesBackend, k8s: dict[str, Any]) -> None:
    cold_starting(k8s, pod="pod_image_pull_backoff")
    k8s["core"].pods["namek-7"]["status"]["containerStatuses"][1]["state"]["waiting"] = {
        "reason": "InvalidImageName",
        "message": 'couldn\'t parse image name "ghcr.io/namek/Sandbox"',
    }
    status = backend.status(7)
    assert status.phase == "failed"
    assert "(InvalidImageName)" in status.reason


def test_not_ready_within_the_start_timeout_fails_with_the_last_reason(
    backend: KubernetesBackend, k8s: dict[str, Any]
) -> None:
    cold_starting(k8s, pod="pod_image_pull_backoff")
    backend._now = lambda: NOW + timedelta(minutes=5)
    status = backend.status(7)
    assert status.phase == "failed"
    assert status.reason.startswith("not ready after 30 s (cannot pull the image ghcr.io/namek/sandbox:nope")


def test_a_sandbox_that_was_ready_before_has_no_start_deadline(backend: KubernetesBackend, k8s: dict[str, Any]) -> None:
    claim = cold_starting(k8s, pod="pod_image_pull_backoff")
    backend._now = lambda: NOW + timedelta(minutes=5)
    sandbox = fixture("sandbox_cold_starting")
    status = backend.evaluate(claim, sandbox, fixture("pod_image_pull_backoff"), was_ready=True)
    assert status.phase == "starting"


def test_a_passed_shutdown_time_is_expired(backend: KubernetesBackend, k8s: dict[str, Any]) -> None:
    warm_ready(k8s)
    backend._now = lambda: NOW + timedelta(hours=9)
    status = backend.status(7)
    assert (status.phase, status.reason) == ("stopped", "expired: it reached its shutdown time 2026-01-10T19:59:50Z")


def test_a_gone_claim_is_stopped(backend: KubernetesBackend) -> None:
    status = backend.status(7)
    assert (status.phase, status.reason) == ("stopped", "deleted: its SandboxClaim namek-7 is gone")


def test_the_browser_restarts_are_chromiums_restart_count(backend: KubernetesBackend, k8s: dict[str, Any]) -> None:
    warm_ready(k8s)
    k8s["core"].pods["namek-sandboxes-x7k2p"]["status"]["containerStatuses"][1]["restartCount"] = 2
    assert backend.status(7).browser_restarts == 2


# Every Ready reason the agent-sandbox controllers set (extensions/controllers/
# sandboxclaim_controller.go computeReadyCondition; controllers/sandbox_controller.go
# computeReadyCondition; api/v1beta1/sandbox_types.go), and one they do not.
CLAIM_REASONS = [
    ("TemplateNotFound", 'SandboxTemplate "namek-sandbox" not found', "failed", "the warm pool's SandboxTemplate"),
    ("WarmPoolNotFound", 'SandboxWarmPool "namek-sandboxes" not found', "failed", "the SandboxWarmPool was not found"),
    ("InvalidMetadata", 'label domain "namek.dev" is not in the allowlist', "failed", "refused the claim's pod meta"),
    ("EnvVarsInjectionRejected", "environment variable injection is not allowed", "failed", "envVarsInjectionPolicy"),
    ("VolumeClaimTemplatesError", "invalid volume claim templates", "failed", "volume claim templates are invalid"),
    ("ClaimExpired", "Claim expired. Sandbox cleanup initiated.", "stopped", "expired: it reached its shutdown time"),
    ("SandboxExpired", "Underlying Sandbox resource has expired", "stopped", "expired: its Sandbox reached"),
    ("SandboxMissing", "Sandbox does not exist", "pending", "pending: waiting for the sandbox controller to make"),
    ("AdoptionPending", "Warm-pool sandbox adoption triggered", "starting", "starting: adopting a warm sandbox"),
    ("ReconcilerError", "Error seen: sandbox create error: forbidden", "pending", "the sandbox controller failed and"),
    ("SomethingNewer", "a reason Namek does not know", "pending", "pending: SomethingNewer: a reason Namek does not"),
]
SANDBOX_REASONS = [
    ("True", "DependenciesReady", "Pod is Ready", "ready", ""),
    ("False", "DependenciesNotReady", "Pod does not exist", "starting", "(Pod does not exist)"),
    ("False", "ReconcilerError", "Error seen: pods is forbidden", "starting", "failed and retries: Error seen"),
    ("False", "MultiplePods", "multiple Pods (2) are controlled by this Sandbox", "failed", "more than one pod"),
    ("False", "SandboxSuspended", "Sandbox is suspended", "stopped", "suspended: its Sandbox namek-7"),
    ("False", "PodFailed", "Pod failed", "failed", "the sandbox pod ended (PodFailed: Pod failed)"),
    ("False", "PodSucceeded", "Pod completed successfully", "failed", "the sandbox pod ended (PodSucceeded"),
    ("False", "SandboxExpired", "Sandbox expired", "stopped", "expired: its Sandbox reached its shutdown time"),
    ("False", "SomethingNewer", "a reason Namek does not know", "starting", "starting: SomethingNewer: a reason"),
]


@pytest.mark.parametrize("case", CLAIM_REASONS, ids=[r[0] for r in CLAIM_REASONS])
def test_each_claim_ready_reason_maps_to_a_phase(
    backend: KubernetesBackend, k8s: dict[str, Any], case: tuple[str, str, str, str]
) -> None:
    reason, message, phase, text = case
    claim = fixture("claim_pending")
    claim["status"] = {"conditions": [ready("False", reason, message)]}
    k8s["custom"].put(claim)
    status = backend.status(7)
    assert status.phase == phase
    assert text in status.reason


@pytest.mark.parametrize("case", SANDBOX_REASONS, ids=[r[1] for r in SANDBOX_REASONS])
def test_each_sandbox_ready_reason_maps_to_a_phase(
    backend: KubernetesBackend, k8s: dict[str, Any], case: tuple[str, str, str, str, str]
) -> None:
    state, reason, message, phase, text = case
    cold_starting(k8s)
    sandbox = fixture("sandbox_cold_starting")
    sandbox["status"]["conditions"] = [ready(state, reason, message)]
    if state == "True":
        sandbox["status"]["podIPs"] = ["10.8.0.40"]
    k8s["custom"].put(sandbox)
    status = backend.status(7)
    assert status.phase == phase
    assert text in status.reason


# --- API errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    [
        (
            403,
            "Forbidden",
            'sandboxclaims.extensions.agents.x-k8s.io is forbidden: User "system:serviceaccount:namek:'
            'namek" cannot create resource "sandboxclaims"',
            False,
            "needs the RBAC verb 'create' on 'sandboxclaims'",
        ),
        (404, "NotFound", "the server could not find the requested resource", False, "was not found in namespace"),
        (409, "Conflict", "the object has been modified; please apply your changes", True, "409 Conflict"),
        (
            422,
            "Invalid",
            'SandboxClaim.extensions.agents.x-k8s.io "namek-7" is invalid: spec.lifecycle.shutdownPolicy: '
            'Unsupported value: "Later"',
            False,
            'as invalid (422): SandboxClaim.extensions.agents.x-k8s.io "namek-7" is',
        ),
        (500, "InternalError", "Internal error occurred: etcdserver: request timed out", True, "failed to create"),
        (503, "ServiceUnavailable", "the server is currently unable to handle the request", True, "(503"),
    ],
    ids=["403", "404", "409", "422", "500", "503"],
)
def test_api_errors_become_clear_backend_errors(
    backend: KubernetesBackend, k8s: dict[str, Any], case: tuple[int, str, str, bool, str]
) -> None:
    status, reason, message, retryable, text = case
    if status == 409:
        k8s["custom"].errors["get"] = api_exception(status, reason, message)
        k8s["custom"].put(fixture("claim_pending"))  # the create's 409 makes it read the claim
    else:
        k8s["custom"].errors["create"] = api_exception(status, reason, message)
    with pytest.raises(BackendError) as caught:
        backend.create(SPEC)
    assert text in str(caught.value)
    assert caught.value.retryable is retryable
    if status != 409:
        assert message in str(caught.value)


def test_an_unreachable_api_is_retryable(backend: KubernetesBackend, k8s: dict[str, Any]) -> None:
    import urllib3

    k8s["custom"].errors["get"] = urllib3.exceptions.MaxRetryError(None, "/apis", "connection refused")  # type: ignore[assignment]
    with pytest.raises(BackendError, match="cannot reach the Kubernetes API") as caught:
        backend.status(7)
    assert caught.value.retryable


def test_without_a_cluster_or_kubeconfig_the_error_says_what_to_set(settings: Any) -> None:
    plain = KubernetesBackend(namespace="namek", warm_pool="namek-sandboxes", kubeconfig="", environ={})
    with pytest.raises(BackendError, match="set NAMEK_K8S_KUBECONFIG") as caught:
        plain.status(7)
    assert not caught.value.retryable


# --- delete, check ---------------------------------------------------------------------------


def test_delete_deletes_the_claim(backend: KubernetesBackend, k8s: dict[str, Any]) -> None:
    warm_ready(k8s)
    backend.delete(7)
    assert ("sandboxclaims", "namek-7") not in k8s["custom"].store


def test_deleting_a_gone_claim_is_fine(backend: KubernetesBackend, k8s: dict[str, Any]) -> None:
    backend.delete(7)
    assert k8s["custom"].calls[-1][0] == "delete"


def test_deleting_without_permission_says_which(backend: KubernetesBackend, k8s: dict[str, Any]) -> None:
    k8s["custom"].errors["delete"] = api_exception(403, "Forbidden", "cannot delete resource")
    with pytest.raises(BackendError, match="RBAC verb 'delete' on 'sandboxclaims'"):
        backend.delete(7)


def test_check_reads_the_warm_pool(backend: KubernetesBackend, k8s: dict[str, Any]) -> None:
    k8s["custom"].put(
        {
            "apiVersion": "extensions.agents.x-k8s.io/v1beta1",
            "kind": "SandboxWarmPool",
            "metadata": {"name": "namek-sandboxes", "namespace": "namek"},
            "spec": {"replicas": 2, "sandboxTemplateRef": {"name": "namek-sandbox"}},
            "status": {"replicas": 2, "readyReplicas": 2, "selector": "agents.x-k8s.io/warm-pool-sandbox=abc"},
        }
    )
    backend.check()
    assert k8s["custom"].calls[-1][1] == ("sandboxwarmpools", "namek-sandboxes")


def test_check_names_the_missing_permission(backend: KubernetesBackend, k8s: dict[str, Any]) -> None:
    k8s["custom"].errors["get"] = api_exception(403, "Forbidden", "cannot get resource sandboxwarmpools")
    with pytest.raises(BackendError, match="the service account may not read sandboxwarmpools") as caught:
        backend.check()
    assert not caught.value.retryable


def test_check_of_a_missing_pool_names_it(backend: KubernetesBackend) -> None:
    with pytest.raises(BackendError, match="SandboxWarmPool namek-sandboxes does not exist"):
        backend.check()


def test_check_of_an_unreachable_api_is_retryable(backend: KubernetesBackend, k8s: dict[str, Any]) -> None:
    k8s["custom"].errors["get"] = ConnectionRefusedError(111, "Connection refused")  # type: ignore[assignment]
    with pytest.raises(BackendError) as caught:
        backend.check()
    assert caught.value.retryable


# --- targets and the shell ------------------------------------------------------------------


def test_screen_target_is_the_pod_ip_and_the_secret_password(backend: KubernetesBackend, k8s: dict[str, Any]) -> None:
    warm_ready(k8s)
    target = backend.screen_target(7)
    assert (target.endpoint.host, target.endpoint.port, target.password) == ("10.8.0.12", 5900, "s3cret-vnc")


def test_a_missing_password_file_names_the_file(backend: KubernetesBackend, k8s: dict[str, Any]) -> None:
    warm_ready(k8s)
    backend.vnc_password_file.unlink()
    with pytest.raises(BackendError, match=f"cannot read the VNC password file {backend.vnc_password_file}"):
        backend.screen_target(7)


def test_an_empty_password_file_names_the_file(backend: KubernetesBackend, k8s: dict[str, Any]) -> None:
    warm_ready(k8s)
    backend.vnc_password_file.write_text(" \n")
    with pytest.raises(BackendError, match=f"the VNC password file {backend.vnc_password_file} is empty"):
        backend.screen_target(7)


def test_browser_target_is_the_cdp_forwarder(backend: KubernetesBackend, k8s: dict[str, Any]) -> None:
    warm_ready(k8s)
    target = backend.browser_target(7)
    assert (target.endpoint.host, target.endpoint.port) == ("10.8.0.12", 9223)


def test_a_sandbox_without_an_ip_has_no_targets_yet(backend: KubernetesBackend, k8s: dict[str, Any]) -> None:
    cold_starting(k8s)
    with pytest.raises(BackendError, match="no pod IP yet") as caught:
        backend.browser_target(7)
    assert caught.value.retryable


def test_open_shell_runs_kube_exec_into_the_tmux_server(backend: KubernetesBackend, k8s: dict[str, Any]) -> None:
    warm_ready(k8s)
    argv = backend.open_shell(7)
    assert argv[1:3] == ["-m", "sandboxes.backends.kube_exec"]
    assert argv[3:] == [
        "--namespace", "namek", "--pod", "namek-sandboxes-x7k2p", "--container", "shell",
        "--in-cluster", "--api-server", "https://10.0.0.1:443",
        "--", "env", "TERM=xterm-256color", "tmux", "-u", "-S", "/run/namek/tmux.sock", "attach-session", "-t", "namek",
    ]  # fmt: skip
    assert backend.open_shell(7, readonly=True)[-2:] == ["-f", "read-only,ignore-size"]
    # What the argv asks for, kube_exec accepts.
    parsed = kube_exec.parse_args(argv[3:])
    assert (parsed.pod, parsed.in_cluster, parsed.api_server) == ("namek-sandboxes-x7k2p", True, "https://10.0.0.1:443")
    assert parsed.command[:3] == ["env", "TERM=xterm-256color", "tmux"]


def test_open_shell_with_a_kubeconfig_passes_its_path(
    backend: KubernetesBackend, k8s: dict[str, Any], tmp_path: Path
) -> None:
    warm_ready(k8s)
    backend.kubeconfig = str(tmp_path / "kubeconfig")
    argv = backend.open_shell(7)
    assert argv[argv.index("--kubeconfig") + 1] == str(tmp_path / "kubeconfig")
    assert "--in-cluster" not in argv


# --- the browser ------------------------------------------------------------------------------


def test_restart_browser_kills_chromium_and_waits_for_the_restart_and_cdp(
    backend: KubernetesBackend, k8s: dict[str, Any]
) -> None:
    warm_ready(k8s)
    restarted = fixture("pod_running")
    restarted["metadata"]["resourceVersion"] = "3005"
    restarted["status"]["containerStatuses"][1]["restartCount"] = 1
    k8s["watch"].script("pods", [("MODIFIED", restarted)])
    backend.restart_browser(7, "restarted by alice")
    assert k8s["exec"].calls == [
        {
            "pod": "namek-sandboxes-x7k2p",
            "container": "chromium",
            "command": ["sh", "-c", "kill -TERM 1"],
            "stdin": False,
        }
    ]
    assert k8s["watch"].opened_for("pods")[0]["field_selector"] == "metadata.name=namek-sandboxes-x7k2p"
    assert k8s["watch"].opened_for("pods")[0]["resource_version"] == "3000"
    claim = k8s["custom"].store[("sandboxclaims", "namek-7")]
    assert claim["metadata"]["annotations"][ANNOTATION_BROWSER_RESTART] == "0:restarted by alice"


def test_restart_browser_says_why_when_cdp_does_not_come_back(backend: KubernetesBackend, k8s: dict[str, Any]) -> None:
    warm_ready(k8s)
    restarted = fixture("pod_running")
    restarted["status"]["containerStatuses"][1]["restartCount"] = 1
    k8s["watch"].script("pods", [("MODIFIED", restarted)])

    def refused(host: str, port: int, path: str, timeout: float) -> bytes:
        raise ConnectionRefusedError(111, "Connection refused")

    backend._http_get = refused
    backend.start_timeout = 0.5
    with pytest.raises(BackendError, match=r"Chromium did not come back within 0 s \(ConnectionRefusedError") as caught:
        backend.restart_browser(7, "restarted by alice")
    assert caught.value.retryable


def test_restart_browser_reports_a_failed_kill(backend: KubernetesBackend, k8s: dict[str, Any]) -> None:
    warm_ready(k8s)
    k8s["exec"].streams.put(FakeExec(status=exit_code_status(1), output=b"sh: kill: (1) - Operation not permitted\n"))
    with pytest.raises(BackendError, match=r"could not stop Chromium .* exit status 1 sh: kill"):
        backend.restart_browser(7, "restarted by alice")


def test_the_start_page_opens_in_a_warm_pod_once(backend: KubernetesBackend, k8s: dict[str, Any]) -> None:
    warm_ready(k8s)
    asked: list[tuple[str, str]] = []

    def devtools(host: str, port: int, path: str, timeout: float, method: str = "GET") -> bytes:
        asked.append((method, path))
        assert (host, port) == ("10.8.0.12", 9223)
        if path == "/json/list":
            return json.dumps([{"id": "BLANK", "type": "page", "url": "about:blank"}]).encode()
        if path.startswith("/json/new?"):
            return json.dumps({"id": "START", "type": "page"}).encode()
        return b"Target is closing"

    backend._http_get = devtools
    backend.open_start_page(7)
    start_url = fixture("claim_bound_warm")["metadata"]["annotations"]["namek.dev/start-url"]
    assert asked == [("GET", "/json/list"), ("PUT", f"/json/new?{start_url}"), ("GET", "/json/close/BLANK")]
    claim = k8s["custom"].store[("sandboxclaims", "namek-7")]
    assert claim["metadata"]["annotations"]["namek.dev/start-opened"] == "true"
    backend.open_start_page(7)
    assert len(asked) == 3, "opened twice"


def test_a_start_page_that_cannot_open_is_a_retryable_error(backend: KubernetesBackend, k8s: dict[str, Any]) -> None:
    warm_ready(k8s)

    def refused(host: str, port: int, path: str, timeout: float, method: str = "GET") -> bytes:
        raise ConnectionRefusedError(111, "Connection refused")

    backend._http_get = refused
    with pytest.raises(BackendError, match="cannot open the start page of sandbox 7") as caught:
        backend.open_start_page(7)
    assert caught.value.retryable


# --- runners -----------------------------------------------------------------------------------


def test_start_runner_hands_the_token_on_stdin_never_in_argv(
    backend: KubernetesBackend, k8s: dict[str, Any], settings: Any
) -> None:
    warm_ready(k8s)
    settings.NAMEK_LLM_MODEL = "gpt-4.1-mini"
    settings.NAMEK_LLM_API_KEY = "sk-very-secret"
    stream = FakeExec(status=exit_code_status(3), ended=False)
    k8s["exec"].streams.put(stream)
    spec = RunnerSpec(run_id=5, sandbox_id=7, token="nkr_run_token_123", bridge_url="ws://namek:8000/ws/agent/5/")
    backend.start_runner(spec)
    call = k8s["exec"].calls[0]
    assert (call["pod"], call["container"], call["stdin"]) == ("namek-sandboxes-x7k2p", "shell", True)
    assert call["command"][:2] == ["sh", "-c"]
    assert call["command"][3:] == ["namek-runner", "ws://namek:8000/ws/agent/5/", "5"]
    argv = " ".join(call["command"])
    assert "nkr_run_token_123" not in argv and "sk-very-secret" not in argv
    assert "python -m sandboxes.agents.runner" in call["command"][2]
    stdin = stream.stdin().decode()
    assert stdin.startswith("nkr_run_token_123\n")
    assert "NAMEK_LLM_API_KEY=sk-very-secret\n" in stdin and stdin.endswith("\n\n")
    labels = k8s["custom"].store[("sandboxclaims", "namek-7")]["metadata"]["labels"]
    assert labels[LABEL_RUN_ID] == "5"
    stream.end.set()
    wait_for(lambda: k8s["exits"] == [(5, 3, "exit status 3")])


def test_stop_runner_terms_then_kills_the_runs_processes(backend: KubernetesBackend, k8s: dict[str, Any]) -> None:
    warm_ready(k8s)
    runner = FakeExec(ended=False)
    k8s["exec"].streams.put(runner)
    backend.start_runner(RunnerSpec(run_id=5, sandbox_id=7, token="nkr_x", bridge_url="ws://namek/ws/agent/5/"))
    backend.stop_runner(5, grace=0.1)
    wait_for(lambda: len(k8s["exec"].calls) == 3)
    signals = [(c["container"], c["command"][4:]) for c in k8s["exec"].calls[1:]]
    assert signals == [("shell", ["TERM", "NAMEK_RUN_ID=5"]), ("shell", ["KILL", "NAMEK_RUN_ID=5"])]
    assert "nkr_x" not in json.dumps(k8s["exec"].calls)
    wait_for(lambda: runner.closed and len(k8s["exits"]) == 1)
    assert k8s["exits"][0][:2] == (5, -1)


def test_stop_runner_from_another_replica_finds_the_pod_by_the_claims_label(
    backend: KubernetesBackend, k8s: dict[str, Any]
) -> None:
    warm_ready(k8s)
    claim = k8s["custom"].store[("sandboxclaims", "namek-7")]
    claim["metadata"]["labels"][LABEL_RUN_ID] = "5"
    backend.stop_runner(5, grace=30)
    assert k8s["exec"].calls[0]["pod"] == "namek-sandboxes-x7k2p"
    assert k8s["exec"].calls[0]["command"][4:] == ["TERM", "NAMEK_RUN_ID=5"]


def test_stopping_a_runner_of_a_gone_sandbox_is_not_an_error(backend: KubernetesBackend, k8s: dict[str, Any]) -> None:
    backend.stop_runner(5, grace=30)
    assert k8s["exec"].calls == []


# --- following phases ---------------------------------------------------------------------------


class Followed:
    def __init__(self, backend: KubernetesBackend) -> None:
        self.phases: list[tuple[int, str, str]] = []
        self.syncs: list[set[int]] = []
        self.restarts: list[tuple[int, int, str]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(
            target=backend.follow,
            args=(lambda *a: self.phases.append(a), self.stop),
            kwargs={
                "on_sync": self.syncs.append,
                "on_browser_restart": lambda *a: self.restarts.append(a),
                "watch_timeout": 5,
                "tick": 0.02,
            },
            daemon=True,
        )

    def __enter__(self) -> Followed:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(5)
        assert not self.thread.is_alive()


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_follow_reports_phases_resumes_watches_and_relists_after_410(
    backend: KubernetesBackend, k8s: dict[str, Any]
) -> None:
    k8s["custom"].put(fixture("claim_pending"))
    k8s["custom"].resource_version = 100
    bound = fixture("claim_bound_warm")
    bound["metadata"]["resourceVersion"] = "105"
    bookmark = {"kind": "SandboxClaim", "apiVersion": "extensions.agents.x-k8s.io/v1beta1",
                "metadata": {"resourceVersion": "107"}}  # fmt: skip
    hub = k8s["watch"]
    hub.script("sandboxclaims", [("MODIFIED", bound), ("BOOKMARK", bookmark)])
    hub.script("sandboxes", [("ADDED", fixture("sandbox_warm_ready"))])
    hub.script("pods", [("ADDED", fixture("pod_running"))])
    with Followed(backend) as followed:
        wait_for(lambda: (7, "ready", "") in followed.phases)
        # The claim vanishes, and the resourceVersion the watch resumes from expires: the
        # listing after the 410 no longer has the claim.
        k8s["custom"].store.pop(("sandboxclaims", "namek-7"))
        k8s["custom"].resource_version = 200
        hub.script("sandboxclaims", api_exception(410, "Expired", "too old resource version: 107 (250)"))
        wait_for(lambda: len(followed.syncs) == 2)
        wait_for(lambda: followed.phases[-1][1] == "stopped")
    assert followed.phases[0] == (7, "pending", "pending: waiting for the sandbox controller to take the claim")
    assert followed.phases[-1] == (7, "stopped", "deleted: its SandboxClaim namek-7 was deleted")
    assert followed.syncs[0] == {7} and followed.syncs[1] == set()
    versions = [o["resource_version"] for o in hub.opened_for("sandboxclaims")]
    # From the list, then from the last event (a bookmark) on every reopening, then from
    # the new list.
    assert versions[:2] == ["100", "107"]
    assert set(versions[1 : versions.index("200")]) == {"107"}
    opened = hub.opened_for("sandboxclaims")
    assert all(o["timeout_seconds"] == 5 and o["allow_watch_bookmarks"] for o in opened)
    assert opened[0]["label_selector"] == "app.kubernetes.io/managed-by=namek"
    assert hub.opened_for("pods")[0]["label_selector"] == "app.kubernetes.io/name=namek-sandbox"


def test_follow_passes_the_start_deadline_without_an_event(backend: KubernetesBackend, k8s: dict[str, Any]) -> None:
    cold_starting(k8s, pod="pod_unschedulable")
    clock = {"now": NOW}
    backend._now = lambda: clock["now"]
    with Followed(backend) as followed:
        wait_for(lambda: bool(followed.phases) and followed.phases[-1][1] == "pending")
        clock["now"] = NOW + timedelta(seconds=60)
        wait_for(lambda: followed.phases[-1][1] == "failed")
    assert followed.phases[-1][2].startswith("not ready after 30 s (unschedulable: 0/3 nodes are available")


def test_follow_asks_whether_a_sandbox_past_its_deadline_was_ready_before(
    backend: KubernetesBackend, k8s: dict[str, Any]
) -> None:
    cold_starting(k8s, pod="pod_image_pull_backoff")  # a ready sandbox's Chromium restarting, say
    backend._now = lambda: NOW + timedelta(minutes=5)
    asked: list[int] = []
    phases: list[tuple[int, str, str]] = []
    stop = threading.Event()

    def was_ready(sandbox_id: int) -> bool:
        asked.append(sandbox_id)
        return True

    thread = threading.Thread(
        target=backend.follow,
        args=(lambda *a: phases.append(a), stop),
        kwargs={"was_ready": was_ready, "watch_timeout": 5, "tick": 0.02},
        daemon=True,
    )
    thread.start()
    try:
        wait_for(lambda: bool(phases))
        time.sleep(0.2)
    finally:
        stop.set()
        thread.join(5)
    assert asked == [7]  # once, not on every tick
    assert {p[1] for p in phases} == {"starting"}  # its reason changes as the pod is seen, never failed


def test_follow_reports_an_expired_claims_deletion_as_expiry(backend: KubernetesBackend, k8s: dict[str, Any]) -> None:
    claim = fixture("claim_bound_warm")
    k8s["custom"].put(claim)
    k8s["watch"].script("sandboxclaims", [("DELETED", claim)])
    backend._now = lambda: NOW + timedelta(hours=9)
    with Followed(backend) as followed:
        wait_for(lambda: any(p[1] == "stopped" for p in followed.phases))
    assert (7, "stopped", "expired: it reached its shutdown time 2026-01-10T19:59:50Z") in followed.phases


def test_follow_reports_chromium_restarts_with_the_reason_given(
    backend: KubernetesBackend, k8s: dict[str, Any]
) -> None:
    warm_ready(k8s)
    claim = fixture("claim_bound_warm")
    claim["metadata"]["annotations"][ANNOTATION_BROWSER_RESTART] = "0:restarted by alice"
    restarted = fixture("pod_running")
    restarted["status"]["containerStatuses"][1]["restartCount"] = 1
    crashed = copy.deepcopy(restarted)
    crashed["status"]["containerStatuses"][1]["restartCount"] = 2
    crashed["status"]["containerStatuses"][1]["lastState"] = {
        "terminated": {"reason": "OOMKilled", "exitCode": 137, "finishedAt": "2026-01-10T12:10:00Z"}
    }
    k8s["watch"].script("sandboxclaims", [("MODIFIED", claim)])
    with Followed(backend) as followed:
        wait_for(lambda: (7, "ready", "") in followed.phases)
        k8s["watch"].script("pods", [("MODIFIED", restarted)], [("MODIFIED", crashed)])
        wait_for(lambda: len(followed.restarts) == 2)
    assert followed.restarts == [
        (7, 1, "Chromium restarted by alice"),
        (7, 2, "Chromium exited (OOMKilled, exit code 137); restarted"),
    ]


# --- kube_exec ----------------------------------------------------------------------------------


class PipeStream:
    """An exec stream whose frames the test feeds; a pipe makes it selectable."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        self.frames: queue.Queue[tuple[int, bytes] | None] = queue.Queue()
        self.buffers: dict[int, bytes] = {}
        self.sent: list[tuple[int, bytes]] = []
        self.open = True
        self.closed = False

    def feed(self, channel: int, data: bytes) -> None:
        self.frames.put((channel, data))
        os.write(self.write_fd, b"x")

    def hang_up(self) -> None:
        self.frames.put(None)
        os.write(self.write_fd, b"x")

    def fileno(self) -> int:
        return self.read_fd

    def pending(self) -> bool:
        return False

    def is_open(self) -> bool:
        return self.open

    def update(self, timeout: float = 0) -> None:
        try:
            frame = self.frames.get(timeout=timeout) if timeout else self.frames.get_nowait()
        except queue.Empty:
            return
        os.read(self.read_fd, 1)
        if frame is None:
            self.open = False
        else:
            self.buffers[frame[0]] = self.buffers.get(frame[0], b"") + frame[1]

    def read_channel(self, channel: int) -> bytes:
        return self.buffers.pop(channel, b"")

    def write_channel(self, channel: int, data: bytes) -> None:
        self.sent.append((channel, data))

    def close(self) -> None:
        self.open = False
        self.closed = True

    def typed(self) -> bytes:
        return b"".join(data for channel, data in self.sent if channel == kube_exec.STDIN)

    def resizes(self) -> list[dict[str, int]]:
        return [json.loads(data) for channel, data in self.sent if channel == kube_exec.RESIZE]


def set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def read_available(fd: int, want: bytes, timeout: float = 5.0) -> bytes:
    received = b""
    deadline = time.monotonic() + timeout
    os.set_blocking(fd, False)
    while want not in received and time.monotonic() < deadline:
        try:
            received += os.read(fd, 1024)
        except BlockingIOError:
            time.sleep(0.01)
    return received


@pytest.fixture
def pty() -> Iterator[tuple[int, int]]:
    master, slave = os.openpty()
    set_size(slave, 24, 80)
    try:
        yield master, slave
    finally:
        os.close(master)
        os.close(slave)


def run_session(session: kube_exec.ExecSession) -> tuple[threading.Thread, dict[str, int]]:
    result: dict[str, int] = {}
    thread = threading.Thread(target=lambda: result.update(code=session.run()), daemon=True)
    thread.start()
    return thread, result


def test_kube_exec_copies_both_ways_resizes_and_exits_with_the_remote_status(pty: tuple[int, int]) -> None:
    master, slave = pty
    stream = PipeStream()
    with kube_exec.raw_mode(slave):
        session = kube_exec.ExecSession(stream, slave, slave)
        thread, result = run_session(session)
        wait_for(lambda: stream.resizes() == [{"Width": 80, "Height": 24}])
        os.write(master, b"echo hi\r\x03")  # raw: carriage return and Ctrl-C reach the remote TTY as typed
        wait_for(lambda: stream.typed() == b"echo hi\r\x03")
        stream.feed(kube_exec.STDOUT, b"hi\r\n$ ")
        assert read_available(master, b"$ ") == b"hi\r\n$ "  # and no local echo of what was typed
        set_size(master, 30, 100)
        session.request_resize()
        wait_for(lambda: stream.resizes()[-1] == {"Width": 100, "Height": 30})
        stream.feed(kube_exec.ERROR, exit_code_status(3))
        stream.hang_up()
        thread.join(5)
    assert result["code"] == 3


class FakeWebSocket:
    """What ``WSClient`` reads frames from (websocket-client's ``WebSocket``), over a socket
    pair so that ``poll`` works: the client's own channel handling runs for real."""

    def __init__(self) -> None:
        self.sock, self.peer = socket.socketpair()
        self.connected = True
        self.frames: queue.Queue[tuple[int, bytes]] = queue.Queue()
        self.sent: list[tuple[bytes, int]] = []

    def frame(self, channel: int, data: bytes) -> None:
        self.frames.put((ABNF.OPCODE_BINARY, bytes([channel]) + data))
        self.peer.send(b"x")

    def close_frame(self) -> None:
        self.frames.put((ABNF.OPCODE_CLOSE, b""))
        self.peer.send(b"x")

    def recv_data_frame(self, control_frame: bool) -> tuple[int, Any]:
        opcode, data = self.frames.get(timeout=5)
        self.sock.recv(1)
        return opcode, types.SimpleNamespace(data=data)

    def send(self, payload: bytes, opcode: int) -> None:
        self.sent.append((payload, opcode))

    def close(self, **kwargs: Any) -> None:
        self.connected = False
        self.sock.close()
        self.peer.close()


def ws_client(websocket: FakeWebSocket) -> Any:
    """The kubernetes client's own ``WSClient`` on that websocket (its __init__ would dial)."""
    client = WSClient.__new__(WSClient)
    client._connected = True
    client._channels = {}
    client._closed_channels = set()
    client.subprotocol = V5_CHANNEL_PROTOCOL
    client.binary = True
    client.newline = b"\n"
    client._all = io.BytesIO()
    client._returncode = None
    client.sock = websocket
    return client


def test_kube_exec_speaks_the_clients_channels(pty: tuple[int, int]) -> None:
    master, slave = pty
    websocket = FakeWebSocket()
    stream = kube_exec.WebSocketStream(ws_client(websocket))
    with kube_exec.raw_mode(slave):
        session = kube_exec.ExecSession(stream, slave, slave)
        thread, result = run_session(session)
        wait_for(lambda: len(websocket.sent) == 1)
        os.write(master, b"ls\r")
        wait_for(lambda: len(websocket.sent) == 2)
        websocket.frame(kube_exec.STDOUT, "é\r\n".encode())
        assert read_available(master, "é\r\n".encode()) == "é\r\n".encode()
        websocket.frame(kube_exec.ERROR, exit_code_status(4))
        websocket.close_frame()
        thread.join(5)
    assert websocket.sent[0] == (b"\x04" + b'{"Width": 80, "Height": 24}', ABNF.OPCODE_BINARY)
    assert websocket.sent[1] == (b"\x00ls\r", ABNF.OPCODE_BINARY)
    assert result["code"] == 4


def test_kube_exec_ends_the_exec_on_sigterm(pty: tuple[int, int]) -> None:
    _, slave = pty
    stream = PipeStream()
    session = kube_exec.ExecSession(stream, slave, slave)
    thread, result = run_session(session)
    wait_for(lambda: bool(stream.resizes()))
    session.request_stop(signal.SIGTERM)
    thread.join(5)
    assert result["code"] == 128 + signal.SIGTERM
    assert stream.closed


def test_kube_exec_ends_when_the_terminal_goes(pty: tuple[int, int]) -> None:
    _, slave = pty
    stream = PipeStream()
    reader, writer = os.pipe()
    session = kube_exec.ExecSession(stream, reader, slave)
    thread, result = run_session(session)
    os.close(writer)  # what a PTY whose other end closed reads as: end of file
    thread.join(5)
    os.close(reader)
    assert result["code"] == kube_exec.TERMINAL_GONE
    assert stream.closed


def test_kube_exec_writes_why_it_cannot_attach(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--namespace", "namek", "--pod", "p", "--container", "shell", "--kubeconfig", str(tmp_path / "none")]
    assert kube_exec.main([*argv, "--", "tmux", "attach"]) == 1
    assert "namek: cannot attach to p (shell):" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (SUCCESS, (0, "exit status 0")),
        (exit_code_status(2), (2, "exit status 2")),
        (exit_code_status(137), (137, "exit status 137 (killed by SIGKILL)")),
        (b"", (-1, "the exec ended without an exit status (the connection was lost)")),
        (json.dumps({"status": "Failure", "message": "container not found (\"shell\")"}).encode(),
         (-1, 'container not found ("shell")')),
    ],
    ids=["success", "exit-2", "killed", "lost", "failure"],
)  # fmt: skip
def test_exit_status_reads_the_error_channel(payload: bytes, expected: tuple[int, str]) -> None:
    assert kube_exec.exit_status(payload) == expected


# --- the controller command (manage.py namek_controller) -------------------------------------


@pytest.fixture
def controller(backend: KubernetesBackend, cast: dict[str, Any]) -> Any:
    from sandboxes.management.commands.namek_controller import Command

    command = Command()
    command.backend = backend
    return command


def k8s_sandbox(cast: dict[str, Any], k8s: dict[str, Any] | None = None, phase: str = "pending") -> Any:
    """A Kubernetes sandbox's row, and (given ``k8s``) its claim."""
    from sandboxes.models import Sandbox

    sandbox = Sandbox.objects.create(
        name="box", owner_id=cast["ids"]["owner"], backend="kubernetes", screen="1280x800", phase=phase
    )
    if k8s is not None:
        claim = fixture("claim_pending")
        claim["metadata"]["name"] = f"namek-{sandbox.pk}"
        claim["metadata"]["labels"]["namek.dev/sandbox-id"] = str(sandbox.pk)
        k8s["custom"].put(claim)
    return sandbox


def test_the_controller_opens_the_start_page_then_passes_through_starting_to_ready(
    controller: Any, cast: dict[str, Any]
) -> None:
    sandbox = k8s_sandbox(cast)
    opened: list[int] = []

    def open_start_page(sandbox_id: int) -> None:
        if not opened:
            opened.append(0)
            raise BackendError("cannot open the start page of sandbox 1: refused", retryable=True)
        opened.append(sandbox_id)

    controller.backend.open_start_page = open_start_page
    controller.on_phase(sandbox.pk, "ready", "")
    sandbox.refresh_from_db()
    assert sandbox.phase == "starting", "ready only once its start page shows"
    controller.on_phase(sandbox.pk, "ready", "")  # the next look
    sandbox.refresh_from_db()
    assert sandbox.phase == "ready" and sandbox.ready_at is not None
    assert opened == [0, sandbox.pk]
    controller.on_phase(sandbox.pk, "ready", "")
    assert opened == [0, sandbox.pk], "opened once"


def test_the_controller_records_a_failure_and_deletes_the_claim(
    controller: Any, cast: dict[str, Any], k8s: dict[str, Any]
) -> None:
    sandbox = k8s_sandbox(cast, k8s, phase="starting")
    controller.on_phase(sandbox.pk, "failed", "the sandbox pod ended (Failed: Evicted)")
    sandbox.refresh_from_db()
    assert (sandbox.phase, sandbox.failure_reason) == ("failed", "the sandbox pod ended (Failed: Evicted)")
    assert ("sandboxclaims", f"namek-{sandbox.pk}") not in k8s["custom"].store


def test_the_controller_deletes_the_claim_of_a_sandbox_namek_stopped(
    controller: Any, cast: dict[str, Any], k8s: dict[str, Any]
) -> None:
    sandbox = k8s_sandbox(cast, k8s, phase="stopped")
    controller.on_phase(sandbox.pk, "ready", "")  # its delete could not reach the API then
    assert ("sandboxclaims", f"namek-{sandbox.pk}") not in k8s["custom"].store


def test_the_controller_stops_sandboxes_whose_claim_vanished(controller: Any, cast: dict[str, Any]) -> None:
    from django.utils import timezone

    from sandboxes.models import Sandbox

    old, kept, young = (k8s_sandbox(cast, phase="ready") for _ in range(3))
    Sandbox.objects.filter(pk__in=[old.pk, kept.pk]).update(created_at=timezone.now() - timedelta(minutes=5))
    controller.on_sync({kept.pk})
    phases = dict(Sandbox.objects.values_list("pk", "phase"))
    assert (phases[old.pk], phases[kept.pk], phases[young.pk]) == ("stopped", "ready", "ready")
    old.refresh_from_db()
    assert old.failure_reason == f"deleted: its SandboxClaim namek-{old.pk} vanished"


def test_the_controller_records_browser_restarts(controller: Any, cast: dict[str, Any]) -> None:
    sandbox = k8s_sandbox(cast, phase="ready")
    controller.on_browser_restart(sandbox.pk, 2, "Chromium exited (OOMKilled, exit code 137); restarted")
    sandbox.refresh_from_db()
    assert (sandbox.phase, sandbox.browser_restarts) == ("ready", 2)
    assert sandbox.last_browser_exit == "Chromium exited (OOMKilled, exit code 137); restarted"


def test_the_controller_serves_the_kubernetes_backend_only(settings: Any) -> None:
    from django.core.management import CommandError, call_command

    settings.NAMEK_BACKEND = "local"
    with pytest.raises(CommandError, match="serves kubernetes only"):
        call_command("namek_controller")


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        (
            "Handshake status 403 Forbidden -+-+- {} -+-+- b'{}'",
            "forbidden (the service account may not create pods/exec",
        ),
        ("Handshake status 404 Not Found -+-+- {} -+-+- b''", "no such pod or container"),
        ("[Errno 111] Connection refused", "the exec websocket failed: [Errno 111] Connection refused"),
    ],
    ids=["403", "404", "refused"],
)
def test_a_refused_exec_websocket_is_described(reason: str, expected: str) -> None:
    assert kube_exec.describe_error(ApiException(status=0, reason=reason)).startswith(expected)
