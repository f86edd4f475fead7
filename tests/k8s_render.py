"""A tiny kustomize: exactly the part of it that Namek's manifests (k8s/) use, and no more.

``render(path)`` builds the kustomization in ``path`` (a directory holding
``kustomization.yaml``, or that file) into a list of resources, as ``kubectl apply -k``
would, for these fields only:

- ``resources``: YAML files (one or more documents) inside the kustomization's directory,
  and directories holding other kustomizations (built first, recursively);
- ``patches``: RFC 6902 JSON patches from a file (``path``), applied with ``jsonpatch`` to
  every resource that ``target`` (kind, name, group, version, namespace; kind and name are
  anchored regular expressions, as in kustomize) selects;
- ``namespace``: set on every namespaced resource;
- ``labels``: ``pairs`` added to every resource's ``metadata.labels`` (never to selectors);
- ``images``: ``newName``/``newTag``/``digest`` for the images of every ``containers`` and
  ``initContainers`` list, at any depth, custom resources included (kustomize's default).

Kustomize applies them in that order (patches, namespace, labels, images). Anything else is
refused with ``KustomizeError``: an unknown field in a kustomization, a patch entry or a
target, a patch that is not a JSON patch (a strategic-merge patch, an inline ``patch``), a
target that selects nothing, a file outside the kustomization's directory, two resources
with the same kind, namespace and name. Refusing is the point: a field this renderer does
not implement would otherwise be silently ignored by the tests and applied by kubectl.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jsonpatch
import yaml

Resource = dict[str, Any]

KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "resources", "patches", "namespace", "labels", "images"}
PATCH_FIELDS = {"path", "target"}
TARGET_FIELDS = {"group", "version", "kind", "name", "namespace"}
LABEL_FIELDS = {"pairs", "includeSelectors"}
IMAGE_FIELDS = {"name", "newName", "newTag", "digest"}
JSON_PATCH_OPS = {"add", "remove", "replace", "move", "copy", "test"}
#: Kinds without a namespace; every other kind (the agent-sandbox ones too) has one.
CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PersistentVolume",
    "StorageClass",
    "IngressClass",
    "RuntimeClass",
    "PriorityClass",
    "ValidatingWebhookConfiguration",
    "MutatingWebhookConfiguration",
}


class KustomizeError(ValueError):
    """The kustomization uses something this renderer does not implement, or is wrong."""


def render(path: str | Path) -> list[Resource]:
    """The resources the kustomization at ``path`` builds, in order."""
    file = Path(path)
    if file.is_dir():
        file = file / "kustomization.yaml"
    spec = _load_kustomization(file)
    root = file.parent
    resources: list[Resource] = []
    for entry in spec.get("resources", []):
        target = root / entry
        resources += render(target) if target.is_dir() else _load_documents(_inside(root, entry, file))
    _check_unique(resources, file)
    for number, patch in enumerate(spec.get("patches", [])):
        _apply_patch(root, file, number, patch, resources)
    if "namespace" in spec:
        for resource in resources:
            if resource["kind"] not in CLUSTER_SCOPED:
                resource["metadata"]["namespace"] = spec["namespace"]
    for entry in spec.get("labels", []):
        for resource in resources:
            resource["metadata"].setdefault("labels", {}).update(entry["pairs"])
    for image in spec.get("images", []):
        for resource in resources:
            _set_image(resource, image)
    _check_unique(resources, file)
    return resources


def _load_kustomization(file: Path) -> dict[str, Any]:
    """The kustomization's fields, refused unless this renderer implements every one."""
    if not file.is_file():
        raise KustomizeError(f"{file}: no such kustomization")
    spec = yaml.safe_load(file.read_text())
    if not isinstance(spec, dict):
        raise KustomizeError(f"{file}: not a mapping")
    _only(spec, KUSTOMIZATION_FIELDS, f"{file}")
    if spec.get("apiVersion", "kustomize.config.k8s.io/v1beta1") != "kustomize.config.k8s.io/v1beta1":
        raise KustomizeError(f"{file}: apiVersion {spec['apiVersion']!r} is not kustomize.config.k8s.io/v1beta1")
    if spec.get("kind", "Kustomization") != "Kustomization":
        raise KustomizeError(f"{file}: kind {spec['kind']!r} is not Kustomization")
    for entry in spec.get("labels", []):
        _only(entry, LABEL_FIELDS, f"{file}: labels")
        if not isinstance(entry.get("pairs"), dict):
            raise KustomizeError(f"{file}: labels need pairs")
        if entry.get("includeSelectors", False):
            raise KustomizeError(f"{file}: labels with includeSelectors are not implemented")
    for image in spec.get("images", []):
        _only(image, IMAGE_FIELDS, f"{file}: images")
        if "name" not in image:
            raise KustomizeError(f"{file}: an images entry needs a name")
    return spec


def _only(mapping: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = set(mapping) - allowed
    if unknown:
        raise KustomizeError(f"{where}: unsupported field(s) {', '.join(sorted(unknown))}")


def _inside(root: Path, entry: str, file: Path) -> Path:
    """Kustomize's default load restriction: files must lie under the kustomization."""
    target = (root / entry).resolve()
    if not target.is_relative_to(root.resolve()):
        raise KustomizeError(f"{file}: {entry} is outside the kustomization's directory")
    if not target.is_file():
        raise KustomizeError(f"{file}: {entry} does not exist")
    return target


def _load_documents(path: Path) -> list[Resource]:
    documents = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    for doc in documents:
        if not isinstance(doc, dict) or not {"apiVersion", "kind", "metadata"} <= set(doc):
            raise KustomizeError(f"{path}: every document needs apiVersion, kind and metadata")
        if not doc["metadata"].get("name"):
            raise KustomizeError(f"{path}: a {doc['kind']} without metadata.name")
    return documents


def _identity(resource: Resource) -> tuple[str, str, str, str]:
    metadata = resource["metadata"]
    return (resource["apiVersion"], resource["kind"], metadata.get("namespace", ""), metadata["name"])


def _check_unique(resources: list[Resource], file: Path) -> None:
    seen: set[tuple[str, str, str, str]] = set()
    for resource in resources:
        identity = _identity(resource)
        if identity in seen:
            raise KustomizeError(f"{file}: {identity} appears twice")
        seen.add(identity)


def _apply_patch(root: Path, file: Path, number: int, patch: dict[str, Any], resources: list[Resource]) -> None:
    where = f"{file}: patches[{number}]"
    _only(patch, PATCH_FIELDS, where)
    if "path" not in patch or "target" not in patch:
        raise KustomizeError(f"{where}: needs a path and a target (only JSON patches are implemented)")
    _only(patch["target"], TARGET_FIELDS, f"{where}.target")
    operations = yaml.safe_load(_inside(root, patch["path"], file).read_text())
    if (
        not isinstance(operations, list)
        or not operations
        or not all(isinstance(op, dict) and op.get("op") in JSON_PATCH_OPS and "path" in op for op in operations)
    ):
        raise KustomizeError(f"{where}: {patch['path']} is not an RFC 6902 JSON patch (a list of operations)")
    json_patch = jsonpatch.JsonPatch(operations)
    matched = 0
    for index, resource in enumerate(resources):
        if _selects(patch["target"], resource):
            try:
                resources[index] = json_patch.apply(resource)
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
                raise KustomizeError(f"{where}: {patch['path']} on {_identity(resource)}: {exc}") from exc
            matched += 1
    if not matched:
        raise KustomizeError(f"{where}: the target {patch['target']} selects no resource")


def _selects(target: dict[str, str], resource: Resource) -> bool:
    group, _, version = resource["apiVersion"].rpartition("/")
    actual = {
        "group": group,
        "version": version,
        "kind": resource["kind"],
        "name": resource["metadata"]["name"],
        "namespace": resource["metadata"].get("namespace", ""),
    }
    return all(re.fullmatch(wanted, actual[key]) for key, wanted in target.items())


def _split_image(image: str) -> tuple[str, str, str]:
    """(name, tag, digest) of an image reference."""
    name, _, digest = image.partition("@")
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        return name[:colon], name[colon + 1 :], digest
    return name, "", digest


def _set_image(node: Any, image: dict[str, str]) -> None:
    if isinstance(node, list):
        for item in node:
            _set_image(item, image)
        return
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        if key in ("containers", "initContainers") and isinstance(value, list):
            for container in value:
                name, tag, digest = _split_image(container.get("image", ""))
                if name != image["name"]:
                    continue
                name = image.get("newName", name)
                if "digest" in image:
                    container["image"] = f"{name}@{image['digest']}"
                elif "newTag" in image:
                    container["image"] = f"{name}:{image['newTag']}"
                else:
                    container["image"] = name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
        else:
            _set_image(value, image)
