"""The Kubernetes manifests (k8s/) and images (k8s/images/), checked without a cluster.

Every kustomization under k8s/ is built by tests/k8s_render.py (no kustomize binary), and
every resource it yields is validated strictly: core kinds with kubernetes-validate's
strict schemas for Kubernetes 1.31, agent-sandbox kinds with the CRDs' openAPIV3Schema
from ../shared/k8s-crds/, closed against unknown fields. Then what the manifests promise:
locked-down pods, pinned images, the Role's exact rules, the sandboxes' network policy,
what each overlay changes (and that it changes nothing else), the Dockerfiles, and that
the README's "Deploy on Kubernetes" tells how to create every Secret the manifests use.

Bad input tried, each of which must be refused:

- a misspelt field (tests/fixtures/k8s/misspelt-template.yaml): ``runtimeClasName`` in a
  Deployment (kubernetes-validate) and in a SandboxTemplate (the closed CRD schema), and
  ``imagePullPolcy`` inside a SandboxTemplate's container (closing reaches list items);
- kustomizations the renderer does not implement: an unknown field
  (``commonAnnotations``), a strategic-merge patch, an inline ``patch``, a target field it
  does not know (``labelSelector``), ``labels`` with ``includeSelectors``, an unknown
  ``images`` field; and wrong ones: a target that selects nothing, a JSON patch whose
  ``test`` fails, a file outside the kustomization's directory, a resource twice;
- image references without an exact tag (none, ``latest``, ``alpine``, ``7-alpine``).
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from namek_web.serve import daphne_command
from tests.k8s_render import KustomizeError, render

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
IMAGES = K8S / "images"
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "k8s"
#: CI has a copy of shared/ beside the clone.
CRD_DIR = Path(__file__).resolve().parents[2] / "shared" / "k8s-crds"
#: The oldest Kubernetes the manifests are for.
K8S_VERSION = "1.31"
TARGETS = ["base", "overlays/dev", "overlays/gke-gvisor", "overlays/xvnc"]
#: The base's parts, which an overlay may list one by one (an external database).
PARTS = ["base/namek", "base/redis", "base/postgres"]
CUSTOM_GROUPS = {"agents.x-k8s.io", "extensions.agents.x-k8s.io"}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "Job", "SandboxTemplate"}
#: Volume types the "restricted" Pod Security Standard admits (and all we need).
VOLUME_TYPES = {"emptyDir", "secret", "configMap", "persistentVolumeClaim", "projected", "downwardAPI"}
#: Commands the sandbox's containers run, and the Debian package of each.
SANDBOX_BINARIES = {
    "Xvfb": "xvfb",
    "x11vnc": "x11vnc",
    "Xvnc": "tigervnc-standalone-server",
    "vncpasswd": "tigervnc-tools",
    "chromium": "chromium",
    "socat": "socat",
    "tmux": "tmux",
}
#: The flags ../shared/platform.md gives for Chromium on these machines.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--test-type",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=9222",
    "--user-data-dir=/home/sandbox/profile",
    "--window-position=0,0",
    "--window-size=1280,800",
]
#: What Namek may do through the API (apiGroup, resource, verb), and nothing more.
NAMEK_RIGHTS = {
    *(
        ("extensions.agents.x-k8s.io", "sandboxclaims", v)
        for v in ("get", "list", "watch", "create", "delete", "patch")
    ),
    ("extensions.agents.x-k8s.io", "sandboxwarmpools", "get"),
    *(("agents.x-k8s.io", "sandboxes", v) for v in ("get", "list", "watch")),
    ("", "pods", "get"),
    ("", "pods", "list"),
    ("", "pods", "watch"),
    ("", "pods/exec", "create"),
    ("", "pods/exec", "get"),
}
#: Secrets the manifests use and the README must tell how to create: name -> keys.
SECRETS = {
    "namek-secrets": {"database-url", "secret-key", "postgres-password"},
    "namek-sandbox-vnc": {"password"},
    "namek-tls": set(),
    "namek-llm": set(),  # optional, whole (envFrom): NAMEK_LLM_* for agents with an LLM
}

Resource = dict[str, Any]


# --- rendering and lookups ------------------------------------------------------------------


@functools.cache
def deploy_guide() -> str:
    """The README's "Deploy on Kubernetes" section."""
    readme = (K8S.parent / "README.md").read_text()
    start = readme.index("## Deploy on Kubernetes")
    end = readme.find("\n## ", start + 1)
    return readme[start : end if end != -1 else len(readme)]


def _rendered(target: str) -> tuple[Resource, ...]:
    return tuple(render(K8S / target))


def rendered(target: str) -> list[Resource]:
    """The target's resources, a copy the test may change."""
    return copy.deepcopy(list(_rendered(target)))


def find(resources: list[Resource], kind: str, name: str) -> Resource:
    found = [r for r in resources if r["kind"] == kind and r["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def identity(resource: Resource) -> tuple[str, str]:
    return resource["kind"], resource["metadata"]["name"]


def pod_template(resource: Resource) -> dict[str, Any]:
    """The pod template (metadata and spec) of a workload."""
    if resource["kind"] == "SandboxTemplate":
        return resource["spec"]["podTemplate"]
    return resource["spec"]["template"]


def workloads(resources: list[Resource]) -> Iterator[Resource]:
    return (r for r in resources if r["kind"] in WORKLOAD_KINDS)


def all_containers(pod_spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod_spec.get("initContainers", []), *pod_spec["containers"]]


def container(pod_spec: dict[str, Any], name: str) -> dict[str, Any]:
    found = [c for c in all_containers(pod_spec) if c["name"] == name]
    assert len(found) == 1, f"container {name}: {len(found)} found"
    return found[0]


def words(container_: dict[str, Any]) -> list[str]:
    """Every word of a container's command line, shell scripts split too."""
    found: list[str] = []
    for part in [*container_.get("command", []), *container_.get("args", [])]:
        if "\n" in part or " " in part:
            found += shlex.split(part.replace("\\\n", " "), comments=True)
        else:
            found.append(part)
    return found


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a label selector (matchLabels and matchExpressions) selects these labels."""
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and labels.get(key) in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


def pod_labels(resources: list[Resource]) -> dict[str, dict[str, str]]:
    """The pod labels of every workload, by workload name."""
    return {r["metadata"]["name"]: pod_template(r)["metadata"].get("labels", {}) for r in workloads(resources)}


def effective_env(resources: list[Resource], container_: dict[str, Any]) -> dict[str, Any]:
    """A container's environment: its ConfigMaps' data, then its own env entries.

    A whole Secret in ``envFrom`` (its keys are not known here) shows as
    ``{"secretRef": ...}`` under the key ``"envFrom:<name>"``.
    """
    env: dict[str, Any] = {}
    for source in container_.get("envFrom", []):
        if "configMapRef" in source:
            env.update(find(resources, "ConfigMap", source["configMapRef"]["name"])["data"])
        else:
            env[f"envFrom:{source['secretRef']['name']}"] = {"secretRef": source["secretRef"]}
    for entry in container_.get("env", []):
        env[entry["name"]] = entry.get("value", entry.get("valueFrom"))
    return env


# --- the CRDs, closed -------------------------------------------------------------------------


def closed(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema with unknown fields refused, as the API server's pruning would drop them.

    Every object schema that lists ``properties`` gets ``additionalProperties: false``
    unless it says otherwise or keeps unknown fields; ``metadata`` (an object without
    properties) stays open. An int-or-string accepts exactly an integer or a string.
    """
    schema = dict(schema)
    if "properties" in schema:
        schema["properties"] = {name: closed(sub) for name, sub in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
    if isinstance(schema.get("additionalProperties"), dict):
        schema["additionalProperties"] = closed(schema["additionalProperties"])
    if isinstance(schema.get("items"), dict):
        schema["items"] = closed(schema["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in schema:
            schema[key] = [closed(sub) for sub in schema[key]]
    if schema.get("x-kubernetes-int-or-string"):
        schema.pop("type", None)
        schema.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    return schema


@functools.cache
def crd_schemas(close: bool = True) -> dict[tuple[str, str], dict[str, Any]]:
    """The served versions' schemas, by (apiVersion, kind)."""
    if not CRD_DIR.is_dir():
        pytest.skip(f"the agent-sandbox CRDs are not at {CRD_DIR} (CI copies ../shared beside the clone)")
    schemas = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        for version in crd["spec"]["versions"]:
            if version.get("served"):
                schema = version["schema"]["openAPIV3Schema"]
                key = (f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])
                schemas[key] = closed(schema) if close else schema
    return schemas


def validate_custom(resource: Resource, close: bool = True) -> None:
    schemas = crd_schemas(close)
    key = (resource["apiVersion"], resource["kind"])
    assert key in schemas, f"no served CRD version for {key}"
    jsonschema.validate(resource, schemas[key], cls=jsonschema.Draft7Validator)
    metadata = resource["metadata"]
    # The CRD leaves metadata open; the API server knows ObjectMeta. What we write of it:
    assert set(metadata) <= {"name", "namespace", "labels", "annotations"}, metadata
    for field in ("labels", "annotations"):
        assert all(isinstance(v, str) for v in metadata.get(field, {}).values()), metadata


def validate_core(resource: Resource) -> None:
    kubernetes_validate.validate(resource, K8S_VERSION, strict=True)


def is_custom(resource: Resource) -> bool:
    return resource["apiVersion"].rpartition("/")[0] in CUSTOM_GROUPS


# --- images and Dockerfiles --------------------------------------------------------------------

_IMAGE = re.compile(r"^(?P<name>[a-z0-9][a-z0-9._/-]*)(?::(?P<tag>[\w][\w.-]{0,127}))?(?:@sha256:[0-9a-f]{64})?$")


def exact_image(image: str) -> bool:
    """A pinned image: a digest, or a tag naming one version (x.y... or a date stamp)."""
    match = _IMAGE.match(image)
    if not match:
        return False
    if "@sha256:" in image:
        return True
    tag = match["tag"] or ""
    return tag != "latest" and bool(re.search(r"\d+\.\d+|\d{8}", tag))


def dockerfile(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (IMAGES / name).read_text())
    instructions = []
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            instructions.append((keyword.upper(), " ".join(rest.split())))
    return instructions


def from_images(instructions: list[tuple[str, str]]) -> list[str]:
    return [args.split()[0] for keyword, args in instructions if keyword == "FROM"]


def final_user(instructions: list[tuple[str, str]]) -> str:
    users = [args for keyword, args in instructions if keyword == "USER"]
    assert users, "no USER: the image runs as root"
    return users[-1]


def copy_sources(instructions: list[tuple[str, str]]) -> list[str]:
    """What the Dockerfile's COPY instructions take from the build context."""
    sources = []
    for keyword, args in instructions:
        if keyword == "COPY" and "--from=" not in args:
            sources += [part for part in args.split() if not part.startswith("--")][:-1]
    return sources


def apt_packages(instructions: list[tuple[str, str]]) -> set[str]:
    packages: set[str] = set()
    for keyword, args in instructions:
        if keyword == "RUN" and "apt-get install" in args:
            install = args.split("apt-get install", 1)[1].split("&&")[0]
            packages |= {word for word in install.split() if not word.startswith("-")}
    return packages


# --- every resource is valid ---------------------------------------------------------------


def test_every_kustomization_under_k8s_is_tested() -> None:
    found = {str(path.parent.relative_to(K8S)) for path in K8S.rglob("kustomization.yaml")}
    assert found == {*TARGETS, *PARTS}


def test_every_yaml_file_under_k8s_parses() -> None:
    for path in sorted(K8S.rglob("*.yaml")):
        documents = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
        assert documents, f"{path}: empty"


@pytest.mark.parametrize("target", TARGETS)
def test_core_resources_pass_strict_kubernetes_schemas(target: str) -> None:
    resources = rendered(target)
    for resource in resources:
        if not is_custom(resource):
            validate_core(resource)
    # The sandbox's pod template is a pod, too: the Kubernetes schema checks it again.
    for template in (r for r in resources if r["kind"] == "SandboxTemplate"):
        pod = template["spec"]["podTemplate"]
        validate_core(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": template["metadata"]["name"], **pod["metadata"]},
                "spec": pod["spec"],
            }
        )


@pytest.mark.parametrize("target", TARGETS)
def test_custom_resources_pass_their_crd_schemas_closed(target: str) -> None:
    custom = [r for r in rendered(target) if is_custom(r)]
    assert {r["kind"] for r in custom} == {"SandboxTemplate", "SandboxWarmPool"}
    for resource in custom:
        validate_custom(resource)


def misspelt() -> list[Resource]:
    return [doc for doc in yaml.safe_load_all((FIXTURES / "misspelt-template.yaml").read_text()) if doc]


def spelt_right(resource: Resource) -> Resource:
    text = json.dumps(resource).replace("runtimeClasName", "runtimeClassName")
    return json.loads(text.replace("imagePullPolcy", "imagePullPolicy"))


def test_a_misspelt_field_fails_kubernetes_validation() -> None:
    deployment = misspelt()[0]
    with pytest.raises(kubernetes_validate.ValidationError, match="runtimeClasName"):
        validate_core(deployment)
    validate_core(spelt_right(deployment))


@pytest.mark.parametrize("number, field", [(1, "runtimeClasName"), (2, "imagePullPolcy")])
def test_a_misspelt_field_fails_the_closed_crd_schema(number: int, field: str) -> None:
    template = misspelt()[number]
    with pytest.raises(jsonschema.ValidationError, match=field):
        validate_custom(template)
    validate_custom(spelt_right(template))
    # The CRD as published would have let it through: closing the schema is what catches it.
    validate_custom(template, close=False)


def test_closing_keeps_metadata_open_and_int_or_string_either() -> None:
    schema = closed(
        {
            "type": "object",
            "properties": {
                "metadata": {"type": "object"},
                "port": {"anyOf": [{"type": "integer"}, {"type": "string"}], "x-kubernetes-int-or-string": True},
                "bare": {"x-kubernetes-int-or-string": True},
                "free": {"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": True},
                "kept": {"type": "object", "properties": {}, "x-kubernetes-preserve-unknown-fields": True},
            },
        }
    )
    good = {"metadata": {"anything": 1}, "port": "vnc", "bare": 5900, "free": {"b": 1}, "kept": {"c": 1}}
    jsonschema.validate(good, schema, cls=jsonschema.Draft7Validator)
    for bad in ({"bare": 1.5}, {"port": True}, {"unknown": 1}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema, cls=jsonschema.Draft7Validator)


@pytest.mark.parametrize("target", TARGETS)
def test_no_secret_is_committed(target: str) -> None:
    assert [identity(r) for r in rendered(target) if r["kind"] == "Secret"] == []


@pytest.mark.parametrize("target", TARGETS)
def test_everything_lives_in_the_namek_namespace(target: str) -> None:
    for resource in rendered(target):
        if resource["kind"] == "Namespace":
            assert resource["metadata"]["name"] == "namek"
        else:
            assert resource["metadata"]["namespace"] == "namek", identity(resource)
        assert resource["metadata"]["labels"]["app.kubernetes.io/part-of"] == "namek", identity(resource)
        assert resource["kind"] not in {"ClusterRole", "ClusterRoleBinding"}


# --- pods are locked down ---------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_every_container_is_unprivileged_and_bounded(target: str) -> None:
    checked = 0
    for workload in workloads(rendered(target)):
        spec = pod_template(workload)["spec"]
        pod = spec.get("securityContext", {})
        assert not ({"hostNetwork", "hostPID", "hostIPC"} & set(spec)), identity(workload)
        for volume in spec.get("volumes", []):
            assert set(volume) - {"name"} <= VOLUME_TYPES, (identity(workload), volume)
        for each in all_containers(spec):
            where = (identity(workload), each["name"])
            own = each.get("securityContext", {})
            assert own.get("runAsNonRoot", pod.get("runAsNonRoot")) is True, where
            assert own.get("runAsUser", pod.get("runAsUser", 0)) > 0, where
            assert own.get("allowPrivilegeEscalation") is False, where
            assert own.get("privileged", False) is False, where
            assert own.get("readOnlyRootFilesystem") is True, where
            assert own.get("capabilities") == {"drop": ["ALL"]}, where
            assert own.get("seccompProfile", pod.get("seccompProfile")) == {"type": "RuntimeDefault"}, where
            resources = each.get("resources", {})
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(bound, {})), (where, bound)
            assert exact_image(each["image"]), (where, each["image"])
            checked += 1
    assert checked >= 10


@pytest.mark.parametrize(
    "image, exact",
    [
        ("namek/web:0.7.0", True),
        ("redis:7.4.2-alpine", True),
        ("debian:bookworm-20250929-slim", True),
        ("namek/web@sha256:" + "a" * 64, True),
        ("namek/web", False),
        ("namek/web:latest", False),
        ("redis:alpine", False),
        ("redis:7-alpine", False),
        ("Namek/Web:0.7.0", False),
    ],
)
def test_an_image_needs_an_exact_tag(image: str, exact: bool) -> None:
    assert exact_image(image) is exact


@pytest.mark.parametrize("target", TARGETS)
def test_only_the_pods_that_talk_to_the_api_get_a_token(target: str) -> None:
    for workload in workloads(rendered(target)):
        spec = pod_template(workload)["spec"]
        talks = workload["kind"] == "Deployment" and workload["metadata"]["name"] in {"namek-web", "namek-controller"}
        assert spec.get("automountServiceAccountToken") is talks, identity(workload)
        if talks:
            assert spec["serviceAccountName"] == "namek"


@pytest.mark.parametrize("target", TARGETS)
def test_selectors_match_their_pods_and_named_ports_exist(target: str) -> None:
    resources = rendered(target)
    labels = pod_labels(resources)
    for workload in workloads(resources):
        if workload["kind"] in {"Deployment", "StatefulSet"}:
            assert selects(workload["spec"]["selector"], labels[workload["metadata"]["name"]]), identity(workload)
    for service in (r for r in resources if r["kind"] == "Service"):
        backends = [
            w
            for w in workloads(resources)
            if selects({"matchLabels": service["spec"]["selector"]}, labels.get(w["metadata"]["name"], {}))
        ]
        assert len(backends) == 1, identity(service)
        ports = {
            p["name"]: p["containerPort"]
            for c in pod_template(backends[0])["spec"]["containers"]
            for p in c.get("ports", [])
        }
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, (identity(service), port)
    budget = find(resources, "PodDisruptionBudget", "namek-web")
    assert [name for name, pod in labels.items() if selects(budget["spec"]["selector"], pod)] == ["namek-web"]


# --- RBAC ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_the_role_grants_exactly_what_namek_needs(target: str) -> None:
    resources = rendered(target)
    assert [identity(r) for r in resources if r["kind"] in {"Role", "RoleBinding"}] == [
        ("Role", "namek"),
        ("RoleBinding", "namek"),
    ]
    rights = set()
    for rule in find(resources, "Role", "namek")["rules"]:
        assert set(rule) == {"apiGroups", "resources", "verbs"}, rule  # no resourceNames, no URLs
        rights |= {(g, r, v) for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    assert rights == NAMEK_RIGHTS
    binding = find(resources, "RoleBinding", "namek")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "namek"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "namek", "namespace": "namek"}]
    assert find(resources, "ServiceAccount", "namek-sandbox")["automountServiceAccountToken"] is False


# --- Namek's own pods -----------------------------------------------------------------------------


def test_the_web_deployment_runs_daphne_as_namek_web_serve_does() -> None:
    resources = rendered("base")
    web = find(resources, "Deployment", "namek-web")
    assert web["spec"]["replicas"] == 3
    spec = pod_template(web)["spec"]
    main = container(spec, "web")
    assert main["image"] == "namek/web:0.7.0"
    assert main["command"] == ["python", *daphne_command("0.0.0.0", 8000)[1:]]
    assert main["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    assert main["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert main["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert spec["securityContext"]["runAsUser"] == 10001
    mounts = {m["mountPath"]: m for m in main["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    assert "emptyDir" in volumes[mounts["/var/lib/namek"]["name"]]
    assert mounts["/etc/namek/vnc"]["readOnly"] is True
    assert volumes[mounts["/etc/namek/vnc"]["name"]]["secret"]["secretName"] == "namek-sandbox-vnc"


@pytest.mark.parametrize("target", TARGETS)
def test_web_controller_and_migrate_share_namek_settings(target: str) -> None:
    resources = rendered(target)
    ingress_host = find(resources, "Ingress", "namek")["spec"]["rules"][0]["host"]
    expected = {
        "NAMEK_BACKEND": "kubernetes",
        "NAMEK_DEBUG": "false",
        "NAMEK_DATA_DIR": "/var/lib/namek",
        "NAMEK_K8S_NAMESPACE": "namek",
        "NAMEK_K8S_WARM_POOL": "namek-sandboxes",
        "NAMEK_K8S_VNC_PASSWORD_FILE": "/etc/namek/vnc/password",
        "NAMEK_INTERNAL_URL": "http://namek-web.namek.svc.cluster.local:8000",
        "REDIS_URL": "redis://namek-redis:6379/0",
        "DATABASE_URL": {"secretKeyRef": {"name": "namek-secrets", "key": "database-url"}},
        "SECRET_KEY": {"secretKeyRef": {"name": "namek-secrets", "key": "secret-key"}},
    }
    commands = {
        ("Deployment", "namek-web"): None,
        ("Deployment", "namek-controller"): ["python", "manage.py", "namek_controller"],
        ("Job", "namek-migrate"): ["python", "manage.py", "migrate", "--noinput"],
    }
    for (kind, name), command in commands.items():
        main = pod_template(find(resources, kind, name))["spec"]["containers"][0]
        env = effective_env(resources, main)
        assert {key: env.get(key) for key in expected} == expected, name
        hosts = env["ALLOWED_HOSTS"].split(",")
        assert ingress_host in hosts and "namek-web.namek.svc.cluster.local" in hosts
        scheme = "https" if find(resources, "Ingress", "namek")["spec"].get("tls") else "http"
        assert env["CSRF_TRUSTED_ORIGINS"] == f"{scheme}://{ingress_host}"
        if command:
            assert main["command"] == command
        for probe in ("livenessProbe", "readinessProbe"):
            for header in main.get(probe, {}).get("httpGet", {}).get("httpHeaders", []):
                assert header["name"] != "Host" or header["value"] in hosts, (name, probe)
    controller = find(resources, "Deployment", "namek-controller")
    assert controller["spec"]["replicas"] == 1
    assert controller["spec"]["strategy"] == {"type": "Recreate"}
    assert not [r for r in resources if r["kind"] == "Service" and r["metadata"]["name"] == "namek-controller"]


@pytest.mark.parametrize("target", TARGETS)
def test_the_ingress_carries_websockets_to_the_web_service(target: str) -> None:
    resources = rendered(target)
    ingress = find(resources, "Ingress", "namek")
    assert ingress["spec"]["ingressClassName"] == "nginx"
    annotations = ingress["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"] == "3600"
    assert annotations["nginx.ingress.kubernetes.io/proxy-send-timeout"] == "3600"
    assert annotations["nginx.ingress.kubernetes.io/proxy-body-size"] == "8m"
    assert not any("affinity" in key for key in annotations)
    (path,) = ingress["spec"]["rules"][0]["http"]["paths"]
    assert path["backend"]["service"] == {"name": "namek-web", "port": {"name": "http"}}
    service = find(resources, "Service", "namek-web")
    assert service["spec"]["ports"] == [{"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}]


def test_redis_and_postgres_admit_only_namek_and_pin_their_images() -> None:
    resources = rendered("base")
    labels = pod_labels(resources)
    for name, port in (("namek-redis", 6379), ("namek-postgres", 5432)):
        policy = find(resources, "NetworkPolicy", name)
        assert selects(policy["spec"]["podSelector"], labels[name])
        (rule,) = policy["spec"]["ingress"]
        assert rule["ports"] == [{"protocol": "TCP", "port": port}]
        admitted = {w for w, pod in labels.items() for peer in rule["from"] if selects(peer["podSelector"], pod)}
        assert admitted == {"namek-web", "namek-controller", "namek-migrate"}
    postgres = find(resources, "StatefulSet", "namek-postgres")
    assert postgres["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    env = effective_env(resources, postgres["spec"]["template"]["spec"]["containers"][0])
    assert env["POSTGRES_PASSWORD"] == {"secretKeyRef": {"name": "namek-secrets", "key": "postgres-password"}}


def test_the_migrate_job_runs_again_on_a_later_apply() -> None:
    job = find(rendered("base"), "Job", "namek-migrate")
    assert job["spec"]["ttlSecondsAfterFinished"] <= 3600
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "OnFailure"


def test_an_external_database_drops_postgres(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump({"resources": [str(K8S / "base" / "namek"), str(K8S / "base" / "redis")]})
    )
    resources = render(tmp_path)
    assert not [r for r in resources if "postgres" in r["metadata"]["name"]]
    assert {identity(r) for r in resources} == {identity(r) for r in rendered("base")} - {
        ("StatefulSet", "namek-postgres"),
        ("Service", "namek-postgres"),
        ("NetworkPolicy", "namek-postgres"),
    }


# --- the sandbox ------------------------------------------------------------------------------------


def sandbox(target: str) -> tuple[list[Resource], Resource, dict[str, Any]]:
    resources = rendered(target)
    template = find(resources, "SandboxTemplate", "namek-sandbox")
    return resources, template, template["spec"]["podTemplate"]["spec"]


@pytest.mark.parametrize("target", TARGETS)
def test_the_sandbox_pod_offers_screen_browser_and_shell(target: str) -> None:
    resources, template, spec = sandbox(target)
    assert template["spec"]["podTemplate"]["metadata"]["labels"]["app.kubernetes.io/name"] == "namek-sandbox"
    # Namek's claims inject no env (agent-sandbox starts such claims cold, never warm).
    assert template["spec"]["envVarsInjectionPolicy"] == "Disallowed"
    assert spec["automountServiceAccountToken"] is False
    assert spec["serviceAccountName"] == "namek-sandbox"
    assert spec["securityContext"]["runAsUser"] == 61001
    names = [c["name"] for c in spec["containers"]]
    assert names[-3:] == ["chromium", "cdp", "shell"]
    ports = {p["containerPort"]: c["name"] for c in spec["containers"] for p in c.get("ports", [])}
    assert ports == {5900: "vnc" if "vnc" in names else "display", 9223: "cdp"}
    screen = container(spec, ports[5900])
    assert screen["readinessProbe"]["tcpSocket"]["port"] == "vnc"
    # Every container that draws or runs programs on the display shares its socket.
    for name in {"display", "vnc", "chromium", "shell"} & set(names):
        assert "/tmp/.X11-unix" in {m["mountPath"] for m in container(spec, name)["volumeMounts"]}, name
    volumes = {v["name"]: v for v in spec["volumes"]}
    x11 = next(m for m in container(spec, "display")["volumeMounts"] if m["mountPath"] == "/tmp/.X11-unix")
    assert "emptyDir" in volumes[x11["name"]]

    chromium = container(spec, "chromium")
    chromium_words = words(chromium)
    assert "chromium" in chromium_words
    assert [flag for flag in CHROMIUM_FLAGS if flag not in chromium_words] == []
    assert "${NAMEK_START_URL:-about:blank}" in chromium_words
    env = {e["name"]: e["value"] for e in chromium["env"]}
    assert env["DISPLAY"] == ":1"
    assert "NAMEK_START_URL" not in env  # Namek opens the start page over CDP
    profile = next(m for m in chromium["volumeMounts"] if m["mountPath"] == "/home/sandbox")
    assert "emptyDir" in volumes[profile["name"]]

    cdp = container(spec, "cdp")
    assert cdp["args"] == ["socat", "TCP-LISTEN:9223,fork,reuseaddr", "TCP:127.0.0.1:9222"]
    assert cdp["readinessProbe"]["httpGet"] == {"path": "/json/version", "port": "cdp"}

    shell = container(spec, "shell")
    assert shell["args"] == ["tmux", "-D", "-S", "/run/namek/tmux.sock", "-f", "/etc/namek/sandbox-tmux.conf"]
    assert shell["workingDir"] == "/home/sandbox"
    assert {e["name"]: e["value"] for e in shell["env"]}["DISPLAY"] == ":1"
    assert shell["readinessProbe"]["exec"]["command"][-2:] == ["-t", "namek"]
    tmux = next(m for m in shell["volumeMounts"] if m["mountPath"] == "/run/namek")
    assert "emptyDir" in volumes[tmux["name"]]

    pool = find(resources, "SandboxWarmPool", "namek-sandboxes")
    assert pool["spec"]["sandboxTemplateRef"] == {"name": "namek-sandbox"}
    assert pool["spec"]["updateStrategy"] == {"type": "Recreate"}  # a new image reaches the pool at once


@pytest.mark.parametrize("target", TARGETS)
def test_only_the_vnc_server_sees_the_vnc_password(target: str) -> None:
    _, _, spec = sandbox(target)
    secret_volumes = {
        v["name"] for v in spec["volumes"] if v.get("secret", {}).get("secretName") == "namek-sandbox-vnc"
    }
    readers = {
        c["name"] for c in all_containers(spec) for m in c.get("volumeMounts", []) if m["name"] in secret_volumes
    }
    assert readers == ({"vnc-passwd"} if target == "overlays/xvnc" else {"vnc"})


def test_the_base_screen_is_xvfb_exported_by_x11vnc_with_the_password() -> None:
    _, _, spec = sandbox("base")
    assert [c["name"] for c in spec["containers"]] == ["display", "vnc", "chromium", "cdp", "shell"]
    assert container(spec, "display")["args"] == ["Xvfb", ":1", "-screen", "0", "1280x800x24", "-nolisten", "tcp"]
    vnc = words(container(spec, "vnc"))
    for flag in ("x11vnc", "-display", ":1", "-rfbport", "5900", "-forever", "-shared"):
        assert flag in vnc
    assert vnc[vnc.index("-passwdfile") + 1] == "/etc/namek/vnc/password"
    assert "-nopw" not in vnc


@pytest.mark.parametrize("target", TARGETS)
def test_the_sandbox_network_policy_admits_only_namek(target: str) -> None:
    resources, template, _ = sandbox(target)
    assert template["spec"]["networkPolicyManagement"] == "Managed"
    policy = template["spec"]["networkPolicy"]
    labels = pod_labels(resources)
    in_namek = {"matchLabels": {"kubernetes.io/metadata.name": "namek"}}
    admitted_ports: set[tuple[str, int]] = set()
    for rule in policy["ingress"]:
        assert rule["from"], "a rule without peers admits everyone"
        for peer in rule["from"]:
            assert peer.get("namespaceSelector") == in_namek and "ipBlock" not in peer, peer
            admitted = {name for name, pod in labels.items() if selects(peer["podSelector"], pod)}
            assert admitted == {"namek-web", "namek-controller"}, admitted
        admitted_ports |= {(p["protocol"], p["port"]) for p in rule["ports"]}
    assert admitted_ports == {("TCP", 5900), ("TCP", 9223)}

    egress_ports: set[tuple[str, int]] = set()
    for rule in policy["egress"]:
        assert rule["to"], "a rule without peers lets sandboxes reach anywhere"
        ports = {(p["protocol"], p["port"]) for p in rule["ports"]}
        for peer in rule["to"]:
            assert "ipBlock" not in peer, peer
            if ports == {("TCP", 8000)}:
                assert peer.get("namespaceSelector") == in_namek
                assert {n for n, pod in labels.items() if selects(peer["podSelector"], pod)} == {"namek-web"}
            else:
                assert ports == {("UDP", 53), ("TCP", 53)}
                assert peer["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}}
                assert peer["podSelector"] == {"matchLabels": {"k8s-app": "kube-dns"}}
        egress_ports |= ports
    assert egress_ports == {("UDP", 53), ("TCP", 53), ("TCP", 8000)}
    assert find(resources, "Service", "namek-web")["spec"]["ports"][0]["port"] == 8000


@pytest.mark.parametrize("target", TARGETS)
def test_the_sandbox_image_installs_every_command_the_template_runs(target: str) -> None:
    _, _, spec = sandbox(target)
    packages = apt_packages(dockerfile("sandbox.Dockerfile"))
    used = set()
    for each in all_containers(spec):
        used |= set(words(each)) & set(SANDBOX_BINARIES)
        for probe in ("readinessProbe", "livenessProbe"):
            used |= set(each.get(probe, {}).get("exec", {}).get("command", [])) & set(SANDBOX_BINARIES)
    assert used
    assert {SANDBOX_BINARIES[binary] for binary in used} <= packages


# --- overlays -------------------------------------------------------------------------------------


def changed(target: str) -> set[tuple[str, str]]:
    base = {identity(r): r for r in rendered("base")}
    overlay = {identity(r): r for r in rendered(target)}
    assert set(base) == set(overlay)
    return {key for key in base if base[key] != overlay[key]}


def test_gke_gvisor_runs_sandboxes_under_gvisor_and_changes_nothing_else() -> None:
    assert changed("overlays/gke-gvisor") == {("SandboxTemplate", "namek-sandbox")}
    _, _, spec = sandbox("overlays/gke-gvisor")
    assert spec.pop("runtimeClassName") == "gvisor"
    assert spec.pop("nodeSelector") == {"sandbox.gke.io/runtime": "gvisor"}
    assert spec.pop("tolerations") == [
        {"key": "sandbox.gke.io/runtime", "operator": "Equal", "value": "gvisor", "effect": "NoSchedule"}
    ]
    assert spec == sandbox("base")[2]
    assert "runtimeClassName" not in sandbox("base")[2]


def test_xvnc_replaces_xvfb_and_x11vnc_with_one_xvnc_and_changes_nothing_else() -> None:
    assert changed("overlays/xvnc") == {("SandboxTemplate", "namek-sandbox")}
    _, _, spec = sandbox("overlays/xvnc")
    assert [c["name"] for c in spec["containers"]] == ["display", "chromium", "cdp", "shell"]
    every_word = {word for each in all_containers(spec) for word in words(each)}
    assert not every_word & {"Xvfb", "x11vnc"}
    display = words(container(spec, "display"))
    assert display[:2] == ["Xvnc", ":1"]
    for flag, value in (("-rfbport", "5900"), ("-SecurityTypes", "VncAuth"), ("-geometry", "1280x800")):
        assert display[display.index(flag) + 1] == value
    password_file = display[display.index("-PasswordFile") + 1]
    # The init container writes that file, in vncpasswd's format, from the Secret.
    (init,) = spec["initContainers"]
    script = " ".join(words(init))
    assert f"vncpasswd -f < /etc/namek/vnc/password > {password_file}" in script
    volumes = {v["name"]: v for v in spec["volumes"]}
    shared = [
        m["name"] for m in container(spec, "display")["volumeMounts"] if password_file.startswith(m["mountPath"] + "/")
    ]
    assert [m["name"] for m in init["volumeMounts"] if password_file.startswith(m["mountPath"] + "/")] == shared
    assert volumes[shared[0]]["emptyDir"]["medium"] == "Memory"
    # The other containers are the base's, untouched.
    base = sandbox("base")[2]
    for name in ("chromium", "cdp", "shell"):
        assert container(spec, name) == container(base, name)


def test_dev_is_one_web_replica_one_warm_sandbox_plain_http_and_smaller() -> None:
    assert changed("overlays/dev") == {
        ("Deployment", "namek-web"),
        ("Ingress", "namek"),
        ("ConfigMap", "namek-config"),
        ("SandboxWarmPool", "namek-sandboxes"),
        ("SandboxTemplate", "namek-sandbox"),
        ("StatefulSet", "namek-postgres"),
    }
    base, dev = rendered("base"), rendered("overlays/dev")
    assert find(base, "Deployment", "namek-web")["spec"]["replicas"] == 3
    assert find(dev, "Deployment", "namek-web")["spec"]["replicas"] == 1
    assert find(base, "SandboxWarmPool", "namek-sandboxes")["spec"]["replicas"] == 2
    assert find(dev, "SandboxWarmPool", "namek-sandboxes")["spec"]["replicas"] == 1
    ingress = find(dev, "Ingress", "namek")
    assert ingress["spec"]["rules"][0]["host"] == "namek.localtest.me"
    assert "tls" not in ingress["spec"]

    def memory(resources: list[Resource], kind: str, name: str, container_name: str) -> float:
        value = container(pod_template(find(resources, kind, name))["spec"], container_name)["resources"]
        amount = value["requests"]["memory"]
        return float(amount[:-2]) * (1024 if amount.endswith("Gi") else 1)

    for kind, name, container_name in (
        ("Deployment", "namek-web", "web"),
        ("SandboxTemplate", "namek-sandbox", "chromium"),
        ("StatefulSet", "namek-postgres", "postgres"),
    ):
        assert memory(dev, kind, name, container_name) < memory(base, kind, name, container_name)


# --- the renderer refuses what it does not implement -----------------------------------------------

DEPLOYMENT = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "metadata": {"name": "app"},
    "spec": {"template": {"spec": {"containers": [{"name": "app", "image": "example/app"}]}}},
}


def kustomization(directory: Path, spec: dict[str, Any], files: dict[str, Any] | None = None) -> Path:
    """A kustomization with app.yaml (a Deployment) and other files: text, or data as YAML."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "kustomization.yaml").write_text(yaml.safe_dump(spec))
    (directory / "app.yaml").write_text(yaml.safe_dump(DEPLOYMENT))
    for name, content in (files or {}).items():
        (directory / name).write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    return directory


TARGET = {"group": "apps", "version": "v1", "kind": "Deployment", "name": "app"}


@pytest.mark.parametrize(
    "spec, files, error",
    [
        ({"resources": ["app.yaml"], "commonAnnotations": {"a": "b"}}, {}, "commonAnnotations"),
        (
            {"resources": ["app.yaml"], "patches": [{"path": "p.yaml", "target": TARGET}]},
            {"p.yaml": {"spec": {"replicas": 2}}},
            "not an RFC 6902 JSON patch",
        ),
        (
            {"resources": ["app.yaml"], "patches": [{"patch": "- op: remove\n  path: /spec", "target": TARGET}]},
            {},
            "patch",
        ),
        (
            {"resources": ["app.yaml"], "patches": [{"path": "p.yaml", "target": {**TARGET, "labelSelector": "a=b"}}]},
            {"p.yaml": [{"op": "remove", "path": "/spec"}]},
            "labelSelector",
        ),
        (
            {"resources": ["app.yaml"], "patches": [{"path": "p.yaml", "target": {**TARGET, "name": "other"}}]},
            {"p.yaml": [{"op": "remove", "path": "/spec"}]},
            "selects no resource",
        ),
        (
            {"resources": ["app.yaml"], "patches": [{"path": "p.yaml", "target": TARGET}]},
            {"p.yaml": [{"op": "test", "path": "/metadata/name", "value": "other"}]},
            "other",
        ),
        (
            {"resources": ["app.yaml"], "labels": [{"pairs": {"a": "b"}, "includeSelectors": True}]},
            {},
            "includeSelectors",
        ),
        (
            {"resources": ["app.yaml"], "labels": [{"pairs": {"a": "b"}, "includeTemplates": True}]},
            {},
            "includeTemplates",
        ),
        (
            {"resources": ["app.yaml"], "images": [{"name": "example/app", "newTag": "1.0", "tagSuffix": "x"}]},
            {},
            "tagSuffix",
        ),
        ({"resources": ["app.yaml", "app.yaml"]}, {}, "twice"),
        ({"resources": ["../outside.yaml"]}, {}, "outside"),
        ({"kind": "Component", "resources": ["app.yaml"]}, {}, "Component"),
    ],
)
def test_the_renderer_refuses_what_it_does_not_implement(
    tmp_path: Path, spec: dict[str, Any], files: dict[str, Any], error: str
) -> None:
    (tmp_path / "outside.yaml").write_text(yaml.safe_dump(DEPLOYMENT))
    with pytest.raises(KustomizeError, match=error):
        render(kustomization(tmp_path / "k", spec, files))


def test_the_renderer_applies_namespace_labels_images_and_patches(tmp_path: Path) -> None:
    custom = {
        "apiVersion": "extensions.agents.x-k8s.io/v1beta1",
        "kind": "SandboxTemplate",
        "metadata": {"name": "t"},
        "spec": {"podTemplate": {"spec": {"initContainers": [{"name": "i", "image": "example/app:0.1"}]}}},
    }
    base = kustomization(
        tmp_path / "base",
        {
            "resources": ["app.yaml", "more.yaml"],
            "namespace": "namek",
            "labels": [{"pairs": {"app.kubernetes.io/part-of": "namek"}}],
            "images": [{"name": "example/app", "newName": "registry.example/app", "newTag": "1.2.3"}],
        },
        {
            "more.yaml": yaml.safe_dump_all(
                [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "namek"}}, custom]
            )
        },
    )
    overlay = kustomization(
        tmp_path / "overlay",
        {"resources": [str(base)], "patches": [{"path": "p.yaml", "target": {"kind": "Deployment", "name": "a.*"}}]},
        {"p.yaml": [{"op": "add", "path": "/spec/replicas", "value": 2}]},
    )
    app, namespace, template = render(overlay)
    assert "namespace" not in namespace["metadata"]
    assert app["metadata"]["namespace"] == template["metadata"]["namespace"] == "namek"
    assert app["metadata"]["labels"] == {"app.kubernetes.io/part-of": "namek"}
    assert "labels" not in app["spec"]["template"].get("metadata", {})  # never into templates or selectors
    assert app["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.example/app:1.2.3"
    assert template["spec"]["podTemplate"]["spec"]["initContainers"][0]["image"] == "registry.example/app:1.2.3"
    assert app["spec"]["replicas"] == 2


# --- images ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["web.Dockerfile", "sandbox.Dockerfile"])
def test_dockerfiles_pin_their_bases_run_unprivileged_and_install_the_lock_file(name: str) -> None:
    instructions = dockerfile(name)
    bases = from_images(instructions)
    assert bases and all(exact_image(image) for image in bases), bases
    user = final_user(instructions).split(":")[0]
    assert user.isdigit() and int(user) > 0, user
    assert "requirements.lock" in " ".join(copy_sources(instructions))
    installs = [args for keyword, args in instructions if keyword == "RUN" and "pip install" in args]
    assert installs and all(re.search(r"-r \S*requirements\.lock", args) for args in installs), installs
    # Nothing is copied that the Dockerfile's own ignore file keeps out of the context.
    allowed = [
        line[1:].rstrip("/")
        for line in (IMAGES / f"{name}.dockerignore").read_text().splitlines()
        if line.startswith("!")
    ]
    for source in copy_sources(instructions):
        assert any(source.rstrip("/") == a or source.startswith(a + "/") for a in allowed), source


def test_the_web_image_runs_daphne_as_namek_web_serve_does() -> None:
    instructions = dockerfile("web.Dockerfile")
    (cmd,) = [json.loads(args) for keyword, args in instructions if keyword == "CMD"]
    assert cmd == ["python", *daphne_command("0.0.0.0", 8000)[1:]]
    assert final_user(instructions) == "10001:10001"
    # Python 3.11 (pyproject: >=3.11,<3.12), the app, and the vendored front end.
    assert re.match(r"python:3\.11\.\d+-", from_images(instructions)[-1])
    copied = set(copy_sources(instructions))
    assert {"manage.py", "namek_web", "sandboxes", "viewer", "templates", "static", "demo"} <= copied
    assert any(
        args.startswith("--from=frontend") and args.endswith("static/vendor") for k, args in instructions if k == "COPY"
    )
    run = " ".join(args for keyword, args in instructions if keyword == "RUN")
    assert "npm ci" in run
    makefile = (ROOT / "Makefile").read_text()
    for vendored in sorted(set(re.findall(r"node_modules/\S+", makefile))):
        assert vendored in run, f"the Makefile vendors {vendored}, the image does not"


def test_the_sandbox_image_carries_the_runner_and_the_screen_servers() -> None:
    instructions = dockerfile("sandbox.Dockerfile")
    assert re.match(r"debian:bookworm-\d{8}-slim$", from_images(instructions)[0])
    assert final_user(instructions) == "61001:61001"
    packages = apt_packages(instructions)
    assert set(SANDBOX_BINARIES.values()) | {"tini", "python3", "python3-venv"} <= packages
    copied = copy_sources(instructions)
    # The runner's package only: it imports no Django (import-linter's contract).
    assert {"sandboxes/__init__.py", "sandboxes/agents", "k8s/images/sandbox-tmux.conf"} <= set(copied)
    assert (ROOT / "sandboxes" / "__init__.py").read_text().strip() == ""
    entrypoint = [json.loads(args) for keyword, args in instructions if keyword == "ENTRYPOINT"]
    assert entrypoint == [["/usr/bin/tini", "--"]]
    # Every template container gives args only, so that tini stays the entrypoint.
    for target in TARGETS:
        for each in all_containers(sandbox(target)[2]):
            assert "command" not in each and each["args"], (target, each["name"])


def test_the_sandbox_tmux_configuration_matches_the_local_one_but_for_the_session() -> None:
    def settings(path: Path) -> list[str]:
        return [line for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]

    local = settings(ROOT / "sandboxes" / "local" / "sandbox-tmux.conf")
    pod = settings(IMAGES / "sandbox-tmux.conf")
    assert [line.replace("-s main", "-s namek") for line in local] == pod
    assert "new-session -d -s namek" in pod[-1]


# --- the deployment guide -------------------------------------------------------------------------


def test_deploy_md_tells_how_to_create_every_secret_the_manifests_use() -> None:
    guide = deploy_guide()
    used: dict[str, set[str]] = {}
    for target in TARGETS:
        resources = rendered(target)
        for workload in workloads(resources):
            spec = pod_template(workload)["spec"]
            for volume in spec.get("volumes", []):
                if "secret" in volume:
                    keys = {item["key"] for item in volume["secret"].get("items", [])}
                    used.setdefault(volume["secret"]["secretName"], set()).update(keys)
            for each in all_containers(spec):
                for value in effective_env(resources, each).values():
                    if isinstance(value, dict) and "secretKeyRef" in value:
                        used.setdefault(value["secretKeyRef"]["name"], set()).add(value["secretKeyRef"]["key"])
                    elif isinstance(value, dict) and "secretRef" in value:
                        assert value["secretRef"].get("optional") is True, value
                        used.setdefault(value["secretRef"]["name"], set())
        for ingress in (r for r in resources if r["kind"] == "Ingress"):
            for tls in ingress["spec"].get("tls", []):
                used.setdefault(tls["secretName"], set())
    assert used == SECRETS
    assert "kubectl -n namek create secret generic namek-secrets" in guide
    assert "kubectl -n namek create secret generic namek-sandbox-vnc" in guide
    assert "kubectl -n namek create secret tls namek-tls" in guide
    assert "kubectl -n namek create secret generic namek-llm" in guide
    for keys in SECRETS.values():
        for key in keys:
            assert f"--from-literal={key}=" in guide, key


def test_deploy_md_covers_install_build_apply_and_the_first_admin() -> None:
    guide = deploy_guide()
    for step in (
        "releases/download/${VERSION}/manifest.yaml",
        "releases/download/${VERSION}/extensions.yaml",
        "docker build -f k8s/images/web.Dockerfile",
        "docker build -f k8s/images/sandbox.Dockerfile",
        "kubectl apply -k k8s/overlays/gke-gvisor",
        "kubectl apply -k k8s/overlays/dev",
        "job/namek-migrate",
        "python manage.py createsuperuser",
    ):
        assert step in guide, step
