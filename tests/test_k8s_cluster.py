"""The Kubernetes backend against a real API server: the CRDs, strict server-side validation
of what Namek sends, and ``status``/``follow`` following what a controller writes.

Runs when ``NAMEK_TEST_KUBECONFIG`` names a kubeconfig whose user may create namespaces
(and, when they are missing, the agent-sandbox CRDs from ``../shared/k8s-crds/``, which the
test then removes again); skipped, with that reason, otherwise. The test plays the
agent-sandbox controller itself (it creates the Sandbox and writes the status subresources),
so it needs no controller and no pods: use a cluster where that controller does not run
(kind, minikube), or it would answer the claims too.
"""

from __future__ import annotations

import copy
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from sandboxes.backends.base import SandboxSpec
from sandboxes.backends.kubernetes import KubernetesBackend
from tests.test_k8s_backend import fixture as api_fixture

KUBECONFIG = os.environ.get("NAMEK_TEST_KUBECONFIG", "")
CRD_DIR = Path(__file__).resolve().parents[2] / "shared" / "k8s-crds"
GROUP, EXTENSIONS, VERSION = "agents.x-k8s.io", "extensions.agents.x-k8s.io", "v1beta1"

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(not KUBECONFIG, reason="NAMEK_TEST_KUBECONFIG is not set: no Kubernetes API server to test"),
]


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def api() -> Iterator[client.ApiClient]:
    if not CRD_DIR.is_dir():
        pytest.skip(f"the agent-sandbox CRDs are not at {CRD_DIR}")
    api_client = config.new_client_from_config(config_file=KUBECONFIG)
    try:
        yield api_client
    finally:
        api_client.close()


@pytest.fixture(scope="module")
def crds(api: client.ApiClient) -> Iterator[None]:
    """The agent-sandbox CRDs, installed for the test if the cluster has none."""
    extensions = client.ApiextensionsV1Api(api)
    installed: list[str] = []
    try:
        for path in sorted(CRD_DIR.glob("*.yaml")):
            for crd in yaml.safe_load_all(path.read_text()):
                if not crd:
                    continue
                name = crd["metadata"]["name"]
                try:
                    extensions.read_custom_resource_definition(name)
                    continue
                except ApiException as exc:
                    if exc.status != 404:
                        raise
                extensions.create_custom_resource_definition(crd, field_validation="Strict")
                installed.append(name)
        for name in installed:
            wait_for(lambda name=name: _established(extensions, name), what=f"the CRD {name} to be established")
        yield
    finally:
        for name in installed:
            extensions.delete_custom_resource_definition(name)


def _established(extensions: client.ApiextensionsV1Api, name: str) -> bool:
    crd = extensions.read_custom_resource_definition(name)
    return any(c.type == "Established" and c.status == "True" for c in (crd.status.conditions or []))


@pytest.fixture
def namespace(api: client.ApiClient, crds: None) -> Iterator[str]:
    core = client.CoreV1Api(api)
    name = f"namek-test-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "namek-tests"}}})
    try:
        yield name
    finally:
        core.delete_namespace(name)


@pytest.fixture
def custom(api: client.ApiClient) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api)


@pytest.fixture
def backend(namespace: str, settings: Any, tmp_path: Path) -> KubernetesBackend:
    settings.NAMEK_SANDBOX_START_TIMEOUT = 600.0
    settings.NAMEK_K8S_VNC_PASSWORD_FILE = str(tmp_path / "password")
    (tmp_path / "password").write_text("cluster-test\n")
    return KubernetesBackend(namespace=namespace, warm_pool="namek-sandboxes", kubeconfig=KUBECONFIG)


@pytest.fixture
def pool(namespace: str, custom: client.CustomObjectsApi) -> None:
    """The template and the (empty) warm pool, through strict server-side validation."""
    template = {
        "apiVersion": f"{EXTENSIONS}/{VERSION}",
        "kind": "SandboxTemplate",
        "metadata": {"name": "namek-sandbox", "namespace": namespace},
        "spec": {
            "podTemplate": copy.deepcopy(api_fixture("sandbox_warm_ready")["spec"]["podTemplate"]),
        },
    }
    template["spec"]["podTemplate"]["metadata"] = {"labels": {"app.kubernetes.io/name": "namek-sandbox"}}
    custom.create_namespaced_custom_object(
        EXTENSIONS, VERSION, namespace, "sandboxtemplates", template, field_validation="Strict"
    )
    warm_pool = {
        "apiVersion": f"{EXTENSIONS}/{VERSION}",
        "kind": "SandboxWarmPool",
        "metadata": {"name": "namek-sandboxes", "namespace": namespace},
        "spec": {"replicas": 0, "sandboxTemplateRef": {"name": "namek-sandbox"}},
    }
    custom.create_namespaced_custom_object(
        EXTENSIONS, VERSION, namespace, "sandboxwarmpools", warm_pool, field_validation="Strict"
    )


def _condition(status: str, reason: str, message: str) -> dict[str, Any]:
    return {
        "type": "Ready",
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


class Controller:
    """What the agent-sandbox controller would write, written by the test."""

    def __init__(self, custom: client.CustomObjectsApi, namespace: str) -> None:
        self.custom = custom
        self.namespace = namespace

    def adopt(self, claim_name: str) -> str:
        """A warm Sandbox (generated name, from the fixture) now controlled by the claim."""
        claim = self.custom.get_namespaced_custom_object(
            EXTENSIONS, VERSION, self.namespace, "sandboxclaims", claim_name
        )
        fixture = api_fixture("sandbox_warm_ready")
        body = {
            "apiVersion": fixture["apiVersion"],
            "kind": "Sandbox",
            "metadata": {
                "generateName": "namek-sandboxes-",
                "namespace": self.namespace,
                "labels": fixture["metadata"]["labels"],
                "ownerReferences": [
                    {
                        "apiVersion": f"{EXTENSIONS}/{VERSION}",
                        "kind": "SandboxClaim",
                        "name": claim_name,
                        "uid": claim["metadata"]["uid"],
                        "controller": True,
                    }
                ],
            },
            "spec": fixture["spec"],
        }
        created = self.custom.create_namespaced_custom_object(
            GROUP, VERSION, self.namespace, "sandboxes", body, field_validation="Strict"
        )
        return str(created["metadata"]["name"])

    def claim_status(self, name: str, status: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object_status(
            EXTENSIONS, VERSION, self.namespace, "sandboxclaims", name, {"status": status},
            field_validation="Strict", _content_type="application/merge-patch+json",
        )  # fmt: skip

    def sandbox_status(self, name: str, status: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, self.namespace, "sandboxes", name, {"status": status},
            field_validation="Strict", _content_type="application/merge-patch+json",
        )  # fmt: skip


SPEC = SandboxSpec(id=7, name="cluster test", width=1280, height=800, start_url="http://namek.namek.svc:8000/s/x/")


def test_status_follows_a_claim_from_pending_to_ready_and_a_failure(
    backend: KubernetesBackend, pool: None, custom: client.CustomObjectsApi, namespace: str
) -> None:
    backend.create(SPEC)  # strict server-side validation of the claim Namek sends
    backend.create(SPEC)  # a retry finds its own claim: fine
    backend.check()
    assert backend.status(7).phase == "pending"

    controller = Controller(custom, namespace)
    sandbox = controller.adopt("namek-7")
    assert sandbox.startswith("namek-sandboxes-")
    not_ready = _condition("False", "DependenciesNotReady", "Pod is Running but not Ready")
    controller.sandbox_status(sandbox, {"conditions": [not_ready]})
    controller.claim_status("namek-7", {"conditions": [not_ready], "sandbox": {"name": sandbox}})
    status = backend.status(7)
    assert status.phase == "starting"
    assert f"adopted the warm sandbox {sandbox}" in status.reason

    ready = _condition("True", "DependenciesReady", "Pod is Ready")
    controller.sandbox_status(sandbox, {"conditions": [ready], "podIPs": ["10.244.0.7"]})
    controller.claim_status("namek-7", {"conditions": [ready], "sandbox": {"name": sandbox, "podIPs": ["10.244.0.7"]}})
    assert backend.status(7).phase == "ready"
    assert backend.browser_target(7).endpoint.host == "10.244.0.7"
    assert backend.screen_target(7).password == "cluster-test"

    controller.claim_status("namek-7", {"conditions": [_condition("False", "TemplateNotFound", "gone")]})
    status = backend.status(7)
    assert (status.phase, status.reason) == ("failed", "the warm pool's SandboxTemplate was not found: gone")

    backend.delete(7)
    backend.delete(7)  # already gone: fine
    wait_for(lambda: backend.status(7).phase == "stopped", what="the claim to be deleted")


def test_follow_watches_the_transitions(
    backend: KubernetesBackend, pool: None, custom: client.CustomObjectsApi, namespace: str
) -> None:
    phases: list[tuple[int, str, str]] = []
    stop = threading.Event()
    follower = threading.Thread(
        target=backend.follow, args=(lambda *a: phases.append(a), stop), kwargs={"watch_timeout": 5}, daemon=True
    )
    follower.start()
    try:
        backend.create(SPEC)
        wait_for(lambda: any(p[1] == "pending" for p in phases), what="pending")
        controller = Controller(custom, namespace)
        sandbox = controller.adopt("namek-7")
        ready = _condition("True", "DependenciesReady", "Pod is Ready")
        controller.sandbox_status(sandbox, {"conditions": [ready], "podIPs": ["10.244.0.8"]})
        controller.claim_status(
            "namek-7", {"conditions": [ready], "sandbox": {"name": sandbox, "podIPs": ["10.244.0.8"]}}
        )
        wait_for(lambda: (7, "ready", "") in phases, what="ready")
        backend.delete(7)
        wait_for(lambda: phases[-1][1] == "stopped", what="stopped")
    finally:
        stop.set()
        follower.join(15)
    assert phases[-1] == (7, "stopped", "deleted: its SandboxClaim namek-7 was deleted")


@pytest.mark.parametrize("target", ["base", "overlays/dev", "overlays/gke-gvisor", "overlays/xvnc"])
def test_every_rendered_manifest_passes_a_server_side_dry_run(
    api: client.ApiClient, crds: None, namespace: str, target: str
) -> None:
    """What `kubectl apply -k k8s/<target>` would send, created with dryRun=All and strict
    field validation, in a scratch namespace (the Namespace itself under another name)."""
    from kubernetes.dynamic import DynamicClient

    from tests.k8s_render import render

    dynamic = DynamicClient(api)
    refused = []
    for resource in render(Path(__file__).resolve().parents[1] / "k8s" / target):
        body = copy.deepcopy(resource)
        if body["kind"] == "Namespace":
            body["metadata"]["name"] = f"{namespace}-ns"
        elif "namespace" in body["metadata"]:
            body["metadata"]["namespace"] = namespace
        kind = dynamic.resources.get(api_version=body["apiVersion"], kind=body["kind"])
        try:
            kind.create(
                body=body, namespace=body["metadata"].get("namespace"), dry_run="All", field_validation="Strict"
            )
        except ApiException as exc:
            refused.append(f"{body['kind']}/{body['metadata']['name']}: {exc.status} {exc.body}")
    assert refused == []
